from __future__ import annotations

import time
import warnings
from dataclasses import replace

import pytest
import safetensors.torch
import torch
from huggingface_hub import constants as hf_constants

from ctxdiff.errors import CtxdiffError, UsageError
from ctxdiff.models.encoders import (
    ClipConfig,
    PromptTruncatedWarning,
    _weights_file,
    load_clip,
    save_clip,
)
from ctxdiff.recipes import from_dict
from ctxdiff.training.clip import ClipTrainer, _batches, retrieval_top1, twin_accuracy
from ctxdiff.training.recipe import Recipe

TINY = ClipConfig(arch="tiny-clip")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_clip(TINY)


def test_loaded_encoders_are_frozen_and_in_eval_mode(tiny):
    assert not tiny.training
    assert not any(p.requires_grad for p in tiny.parameters())


def test_encode_text_gives_tokens_mask_through_eot_and_projected_pooled(tiny):
    cond = tiny.encode_text(["a red square", "a large blue circle above a small green cross"])
    assert cond.tokens.shape == (2, tiny.context_length, tiny.text_dim)
    assert cond.pooled.shape == (2, tiny.embed_dim)
    ids = tiny.tokenize(["a red square"])[0]
    # <start> a red square <end>: 5 real tokens, then padding
    assert cond.mask[0].tolist() == [True] * 5 + [False] * (tiny.context_length - 5)
    assert ids[4] == ids.max() and ids[5:].eq(0).all()
    assert cond.mask[1].sum() > 5 and cond.mask.dtype == torch.bool


def test_long_prompt_is_truncated_with_a_warning_naming_it(tiny):
    prompt = "a red square " * 10
    with pytest.warns(PromptTruncatedWarning, match="16 tokens .*'a red square a red"):
        cond = tiny.encode_text([prompt])
    assert cond.mask.all()
    with pytest.warns(PromptTruncatedWarning):
        ids = tiny.tokenize([prompt])[0]
    assert ids[-1] == ids.max()  # the end-of-text token is kept in the last slot


def test_short_prompt_gives_no_warning(tiny):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny.encode_text(["a red square"])


def test_same_prompt_gives_the_same_embedding_alone_or_in_a_batch(tiny):
    batch = tiny.encode_text(["a red square", "a blue circle", "a red square"])
    alone = tiny.encode_text(["a red square"])
    torch.testing.assert_close(batch.pooled[0], batch.pooled[2])
    torch.testing.assert_close(batch.tokens[0], alone.tokens[0], rtol=1e-5, atol=1e-6)


def test_text_features_are_the_normalised_pooled_embedding(tiny):
    prompts = ["a red square", "a large blue circle above a small green cross"]
    pooled = tiny.encode_text(prompts).pooled
    torch.testing.assert_close(tiny.text_features(prompts), pooled / pooled.norm(dim=-1, keepdim=True))


@pytest.mark.parametrize("size", [(17, 40), (32, 32), (100, 64)])
def test_encode_image_accepts_minus_one_to_one_images_of_any_size(tiny, size):
    images = torch.rand(2, 3, *size) * 2 - 1
    tokens, pooled = tiny.encode_image(images)
    patches = (tiny.image_size // 8) ** 2
    assert tokens.shape == (2, patches, tiny.image_dim) and pooled.shape == (2, tiny.embed_dim)
    assert torch.isfinite(tokens).all()


def test_encode_image_applies_clip_normalisation_to_minus_one_to_one_pixels(tiny):
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    pooled, _ = tiny.clip.visual(((images + 1) / 2 - mean) / std)
    torch.testing.assert_close(tiny.encode_image(images)[1], pooled)


def test_missing_weights_file_is_an_error_naming_the_path(tmp_path):
    path = tmp_path / "nope" / "clip.safetensors"
    with pytest.raises(CtxdiffError, match=str(path)):
        load_clip(ClipConfig(arch="tiny-clip", weights=str(path)))


def test_uncached_pretrained_tag_fails_fast_offline_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(CtxdiffError) as err:
        load_clip(ClipConfig(arch="ViT-B-32", weights="openai"))
    assert time.perf_counter() - start < 2
    message = str(err.value)
    assert "'ViT-B-32/openai' are not on this machine" in message
    assert "timm/vit_base_patch32_clip_224.openai" in message and "--clip-weights" in message


def test_cached_pretrained_tag_resolves_to_the_hub_cache_file(tmp_path, monkeypatch):
    repo = tmp_path / "models--timm--vit_base_patch32_clip_224.openai"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    cached = repo / "snapshots" / "abc123" / "open_clip_model.safetensors"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    assert _weights_file(ClipConfig(arch="ViT-B-32", weights="openai")) == str(cached)


def test_unknown_weights_that_are_neither_file_nor_tag_list_the_tags():
    with pytest.raises(CtxdiffError, match="laion2b_s34b_b79k"):
        load_clip(ClipConfig(arch="ViT-B-32", weights="laion3b"))


def test_unknown_arch_is_a_usage_error_suggesting_close_names():
    with pytest.raises(UsageError, match="did you mean .*ViT-B-32"):
        load_clip(ClipConfig(arch="ViT-B-23"))
    with pytest.raises(UsageError, match="tiny-clip"):
        load_clip(ClipConfig(arch="tiny-clipp"))


def test_arch_with_an_unsupported_tower_is_a_usage_error_listing_usable_ones():
    with pytest.raises(UsageError, match="ResNet image tower.*shapes-clip.*ViT-B-32"):
        load_clip(ClipConfig(arch="RN50"))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_state_dict_file_round_trip_gives_identical_embeddings(tiny, tmp_path, suffix):
    path = tmp_path / f"clip{suffix}"
    state = tiny.clip.state_dict()
    if suffix == ".pt":
        torch.save({"state_dict": state}, path)
    else:
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, path)
    torch.manual_seed(123)  # a different random init, overwritten by the file
    loaded = load_clip(ClipConfig(arch="tiny-clip", weights=str(path)))
    prompts, images = ["a red square", "two blue circles"], torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(loaded.encode_text(prompts).pooled, tiny.encode_text(prompts).pooled)
    assert torch.equal(loaded.encode_image(images)[0], tiny.encode_image(images)[0])


def test_clip_bundle_brings_its_own_arch_and_loads_identically(tiny, tmp_path):
    path = save_clip(tmp_path / "clip.safetensors", tiny)
    loaded = load_clip(ClipConfig(weights=str(path)))  # default arch is ViT-B-32: the bundle's wins
    assert loaded.config.arch == "tiny-clip" and loaded.config.weights == str(path)
    assert torch.equal(loaded.text_features(["a red square"]), tiny.text_features(["a red square"]))


def test_twin_accuracy_scores_texts_and_images_in_their_own_direction():
    class Table:   # fixed embeddings: captions by name, images are their own embeddings
        mean = torch.zeros(1)
        text = {"a": [2.0, 1.0], "a'": [3.0, 4.0], "b": [1.0, 0.0], "b'": [0.0, 1.0]}

        def text_features(self, captions):
            return torch.tensor([self.text[c] for c in captions])

        def image_features(self, images):
            return images

    eye = torch.eye(2)
    # pair a: similarity [[2, 1], [3, 4]] (caption x image): each caption picks its image, but image
    # a is closer to caption a' (3 > 2); pair b: identity, right both ways.
    scores = twin_accuracy(Table(), eye[[0, 0]], eye[[1, 1]], ["a", "b"], ["a'", "b'"])
    assert scores == {"text": 1.0, "image": 0.5}


def test_state_dict_with_wrong_keys_names_them(tiny, tmp_path):
    state = dict(tiny.clip.state_dict())
    state["visual.extra_head.weight"] = torch.zeros(2)
    del state["ln_final.weight"]
    path = tmp_path / "bad.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, path)
    with pytest.raises(CtxdiffError, match=r"ln_final\.weight.*visual\.extra_head\.weight"):
        load_clip(ClipConfig(arch="tiny-clip", weights=str(path)))


def test_weights_of_another_arch_name_the_shape_mismatches(tiny, tmp_path):
    path = tmp_path / "tiny.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in tiny.clip.state_dict().items()}, path)
    with pytest.raises(CtxdiffError, match=r"token_embedding\.weight \(file \(49408, 32\), model \(49408, 48\)\)"):
        load_clip(ClipConfig(arch="shapes-clip", weights=str(path)))


COLOURS = {"red": (1, -1, -1), "green": (-1, 1, -1), "blue": (-1, -1, 1), "yellow": (1, 1, -1),
           "cyan": (-1, 1, 1), "magenta": (1, -1, 1), "white": (1, 1, 1), "black": (-1, -1, -1)}


def _colour_squares(n: int, seed: int) -> list[tuple[torch.Tensor, str]]:
    """A coloured square of random size and place on a gray background, captioned by its colour."""
    g = torch.Generator().manual_seed(seed)
    names = list(COLOURS)
    pairs = []
    for _ in range(n):
        name = names[torch.randint(len(names), (1,), generator=g).item()]
        image = torch.zeros(3, 32, 32)
        side = torch.randint(10, 24, (1,), generator=g).item()
        y, x = torch.randint(0, 32 - side, (2,), generator=g).tolist()
        image[:, y:y + side, x:x + side] = torch.tensor(COLOURS[name], dtype=torch.float).view(3, 1, 1)
        pairs.append((image, f"a {name} square"))
    return pairs


def clip_recipe(output, **train) -> Recipe:
    return from_dict(Recipe, {"output": str(output), "model": {"clip": {"arch": "tiny-clip"}},
                              "data": {"source": "shapes", "image_size": 16, "shapes_count": 64, "hard_negatives": True},
                              "train": {"stage": "clip", "steps": 6, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2,
                                        "checkpoint_every": 2, "sample_every": 0, "log_every": 1, **train}})


def test_contrastive_training_lifts_retrieval_well_above_chance(tmp_path):
    held_out = _colour_squares(200, seed=1)
    images, captions = torch.stack([i for i, _ in held_out]), [c for _, c in held_out]
    losses = []
    trainer = ClipTrainer(clip_recipe(tmp_path, steps=20, batch_size=32, warmup_steps=5), data=_colour_squares(512, seed=0),
                          on_step=lambda record: losses.append(record["loss"]))
    assert not trainer.run().interrupted
    encoders = trainer.trained()
    scores = retrieval_top1(encoders, images, captions)
    assert scores["chance"] == pytest.approx(1 / 8, abs=0.03)
    assert scores["text_to_image"] > 0.5 and scores["image_to_text"] > 0.5, scores  # chance: 1/8
    assert sum(losses[-10:]) < sum(losses[:10])
    assert not encoders.training and not any(p.requires_grad for p in encoders.parameters())
    assert torch.equal(load_clip(ClipConfig(weights=str(tmp_path / "clip.safetensors"))).text_features(["a red square"]),
                       encoders.text_features(["a red square"]))


def test_clip_training_resumes_exactly_with_scenes_and_their_twins(tmp_path):
    full = ClipTrainer(clip_recipe(tmp_path / "full"))
    full.run()
    part = ClipTrainer(clip_recipe(tmp_path / "part"))
    result = part.run(should_stop=lambda: part.step >= 3)
    assert result.interrupted and result.step == 3
    resumed = ClipTrainer(clip_recipe(tmp_path / "part"), resume=True)
    assert resumed.step == 3 and not resumed.run().interrupted
    for (name, a), (_, b) in zip(full.encoders.state_dict().items(), resumed.encoders.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(CtxdiffError, match="already holds a run"):
        ClipTrainer(clip_recipe(tmp_path / "full"))
    recipe = clip_recipe(tmp_path / "part")
    with pytest.raises(CtxdiffError, match="trained with another data;"):
        ClipTrainer(replace(recipe, data=replace(recipe.data, shapes_count=65)), resume=True)


def test_clip_batches_hold_each_scene_with_its_twin(tmp_path):
    dataset = ClipTrainer(clip_recipe(tmp_path)).dataset
    images, captions = next(_batches(dataset, 4, 0, 0))
    assert images.shape == (8, 3, 16, 16) and len(captions) == 8
    pairs = [dataset.world.scene_and_twin(i)[:2] for i in range(64)]
    twins = {scene.caption: twin.caption for scene, twin in pairs}
    assert all(twins[captions[k]] == captions[k + 1] for k in range(0, 8, 2))
    later = next(_batches(dataset, 4, 0, 5))          # resuming at step 5 gives step 5's batch
    stream = _batches(dataset, 4, 0, 0)
    for _ in range(5):
        next(stream)
    assert next(stream)[1] == later[1]


def test_layout_head_learns_where_objects_are_and_resumes_exactly(tmp_path):
    """train.layout_loss: the head's centroid error falls, it is checkpointed with the run, and a
    checkpoint made with another layout_loss is refused on --resume."""
    recipe = clip_recipe(tmp_path / "full", steps=30, batch_size=16, layout_loss=10.0, checkpoint_every=10)
    full = ClipTrainer(recipe)
    world = full.dataset.world
    images, _ = _world_pairs(world, 64)

    def error(trainer):
        with torch.no_grad():
            return trainer.layout_error(images, trainer.encoders.image_features(images)).item()

    before = error(full)
    full.run()
    assert error(full) < 0.5 * before, (before, error(full))
    part_recipe = replace(recipe, output=str(tmp_path / "part"))
    part = ClipTrainer(part_recipe)
    part.run(should_stop=lambda: part.step >= 20)
    resumed = ClipTrainer(part_recipe, resume=True)
    resumed.run()
    assert torch.equal(full.layout_head.weight, resumed.layout_head.weight)
    without = replace(part_recipe, train=replace(part_recipe.train, layout_loss=0.0))
    with pytest.raises(CtxdiffError, match=r"trained with another train\.layout_loss;"):
        ClipTrainer(without, resume=True)


def _world_pairs(world, n: int) -> tuple[torch.Tensor, list[str]]:
    """The first n scenes of a shapes world: images [n, 3, H, W] in [-1, 1] and their captions."""
    scenes = [world.scene(i) for i in range(n)]
    images = torch.stack([torch.from_numpy(world.render(s)) for s in scenes]).permute(0, 3, 1, 2).float() / 127.5 - 1
    return images, [s.caption for s in scenes]
