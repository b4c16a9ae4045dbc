"""Class and layout conditions (paper Sec. 4.3): encoders, data, training, files, sampling."""

import pytest
import torch

from ctxdiff.diffusion import diffusion_loss, make_schedule
from ctxdiff.errors import UsageError
from ctxdiff.models.adapter import ADAPTER_PRESETS, ContextAdapter
from ctxdiff.models.conditions import (ConditionConfig, ConditionedAdapter, ConditionEncoder, LayoutObject,
                                       make_layout, parse_layout, read_layout, resolve_label)
from ctxdiff.models.unet import UNET_PRESETS, UNet

LABELS = ("red circle", "blue square", "green triangle")


def _encoder(kind, **kw):
    torch.manual_seed(0)
    return ConditionEncoder(ConditionConfig(kind=kind, labels=LABELS, dim=32, pooled_dim=32, max_objects=3, **kw))


def _wake(module):
    """Give the zero-initialised branches weights, so the condition reaches the output."""
    g = torch.Generator().manual_seed(0)
    for p in module.parameters():
        if not p.abs().sum():
            p.data = 0.05 * torch.randn(p.shape, generator=g)
    return module


def test_class_encoder_gives_one_token_and_a_learned_null_label():
    enc = _encoder("class")
    cond = enc.encode(["red circle", None, "Blue  Square"])
    assert cond.tokens.shape == (3, 1, 32) and cond.mask.all() and cond.pooled.shape == (3, 32)
    null = enc.encode([""])
    assert torch.equal(null.tokens[0], cond.tokens[1])               # dropped: the null label
    assert not torch.equal(cond.tokens[0], cond.tokens[1])
    assert torch.allclose(enc.encode(["blue square"]).tokens[0], cond.tokens[2])


def test_layout_encoder_pads_masks_and_drops_to_the_empty_layout():
    enc = _encoder("layout")
    layout = parse_layout("red circle@0.1,0.1,0.4,0.4;blue square@0.5,0.5,0.9,0.9")
    cond = enc.encode([layout, None])
    assert cond.tokens.shape == (2, 4, 32) and cond.pooled.shape == (2, 32)
    assert cond.mask.tolist() == [[True, True, True, False], [True, False, False, False]]
    assert torch.allclose(enc.encode([()]).pooled, cond.pooled[1:], atol=1e-6)
    # one sample's encoding does not depend on the batch it is in
    assert torch.allclose(enc.encode([layout]).pooled, cond.pooled[:1], atol=1e-5)


def test_layout_boxes_reach_the_unet_prediction_at_t_T():
    torch.manual_seed(0)
    enc = _encoder("layout")
    unet = _wake(UNet(UNET_PRESETS["tiny"])).eval()
    x_T = torch.randn(1, 3, 32, 32)
    a = enc.encode([(LayoutObject("red circle", (0.1, 0.1, 0.4, 0.4)),)])
    b = enc.encode([(LayoutObject("red circle", (0.5, 0.5, 0.9, 0.9)),)])
    with torch.no_grad():
        pa, pb = unet(x_T, 1000, a), unet(x_T, 1000, b)
    assert (pa - pb).abs().max() > 1e-3


def test_zero_adapter_reduces_to_the_plain_conditional_model():
    torch.manual_seed(0)
    enc = _encoder("class")
    unet = UNet(UNET_PRESETS["tiny"])
    cfg = enc.config
    adapter = ConditionedAdapter(ContextAdapter(ADAPTER_PRESETS["tiny"]), cfg)
    sched = make_schedule("cosine", 1000)
    x0, noise = torch.rand(2, 3, 32, 32) * 2 - 1, torch.randn(2, 3, 32, 32)
    t = torch.tensor([10, 900])
    cond = enc.encode(["red circle", "green triangle"])
    assert adapter(x0, cond, t).abs().max() == 0

    def x0_fn(x, c, tt):
        return unet(x, tt, c)

    with_r = diffusion_loss(sched, x0_fn, x0, cond, adapter, t=t, noise=noise)
    plain = diffusion_loss(sched, x0_fn, x0, cond, None, t=t, noise=noise)
    assert torch.equal(with_r, plain)


def test_adapter_reads_the_condition_through_its_resnet_blocks():
    enc = _encoder("class")
    adapter = _wake(ConditionedAdapter(ContextAdapter(ADAPTER_PRESETS["tiny"]), enc.config))
    x0 = torch.zeros(1, 3, 32, 32)
    with torch.no_grad():
        ra, rb = adapter(x0, enc.encode(["red circle"]), 500), adapter(x0, enc.encode(["blue square"]), 500)
    assert (ra - rb).abs().max() > 1e-4
    assert len(adapter.context.blocks) == 2


def test_unknown_label_names_the_close_known_ones():
    with pytest.raises(UsageError, match="did you mean 'red circle'"):
        resolve_label("red circel", LABELS)
    with pytest.raises(UsageError, match="this model knows"):
        _encoder("class").encode(["purple hexagon"])


@pytest.mark.parametrize("text, message", [
    ("red circle@0.1,0.1,1.4,0.4", "outside"), ("red circle@0.5,0.1,0.4,0.4", "empty"),
    ("red circle@0.1,0.1,0.4", "four numbers"), ("red circle", "label@x0,y0,x1,y1"), (" ; ", "empty")])
def test_bad_inline_layouts_are_refused(text, message):
    with pytest.raises(UsageError, match=message):
        parse_layout(text)


def test_layout_file_reads_a_json_list(tmp_path):
    path = tmp_path / "layout.json"
    path.write_text('[{"label": "red circle", "box": [0.1, 0.1, 0.4, 0.4]}]')
    assert read_layout(path) == make_layout([("red circle", (0.1, 0.1, 0.4, 0.4))])
    path.write_text('[{"label": "red circle", "box": [0.1, 0.1, 0.4, -0.4]}]')
    with pytest.raises(UsageError, match="layout.json"):
        read_layout(path)


def test_too_many_objects_are_refused():
    layout = parse_layout(";".join(["red circle@0.1,0.1,0.4,0.4"] * 4))
    with pytest.raises(UsageError, match="at most 3"):
        _encoder("layout").encode([layout])


# ---------------------------------------------------------------- training, files, sampling

CLASS_MODEL = """
model:
  condition: {kind: class, adapter_blocks: 1}
data: {source: shapes, image_size: 16, shapes_count: 40}
"""
LAYOUT_MODEL = """
model:
  condition: {kind: layout, max_objects: 3}
preview_prompts: ["red circle@0.1,0.1,0.5,0.5"]
"""


def _train(tiny_recipe, name, extra, steps=2):
    from ctxdiff.training.recipe import read_recipe
    from ctxdiff.training.trainer import Trainer

    recipe = read_recipe(tiny_recipe(name, ""), [f"train.steps={steps}", "train.checkpoint_every=2",
                                                 "train.sample_every=2"])
    import yaml

    from ctxdiff.recipes import from_dict, to_dict
    from ctxdiff.training.recipe import Recipe
    merged = to_dict(recipe)
    for key, value in yaml.safe_load(extra).items():
        merged[key] = {**merged[key], **value} if isinstance(value, dict) else value
    merged["preview_prompts"] = merged.get("preview_prompts") if "preview_prompts" in yaml.safe_load(extra) else []
    recipe = from_dict(Recipe, merged)
    result = Trainer(recipe, torch.device("cpu")).run()
    return recipe, result


@pytest.mark.parametrize("extra, conditions", [
    (CLASS_MODEL, ["red circle", "blue square"]),
    (LAYOUT_MODEL, [parse_layout("red circle@0.1,0.1,0.4,0.4;blue square@0.5,0.5,0.9,0.9"), ()]),
])
def test_class_and_layout_models_train_save_and_sample_from_the_file_alone(tiny_recipe, extra, conditions):
    from ctxdiff.formats.t2i import T2IFile
    from ctxdiff.pipelines.text2image import Text2Image
    from ctxdiff.recipes import SampleConfig
    from ctxdiff.shapes.captions import OBJECT_COLOURS, SHAPES

    recipe, result = _train(tiny_recipe, "cond", extra)
    assert result.step == 2 and (result.model_path.parent / "samples" / "step-00000002.png").is_file()
    file = T2IFile.read(result.model_path)
    kind = recipe.model.condition.kind
    assert file.condition.kind == kind and len(file.condition.labels) == len(OBJECT_COLOURS) * len(SHAPES)
    pipe = Text2Image.from_bundle(result.model_path)
    assert pipe.condition_kind == kind and "red circle" in pipe.labels
    params = SampleConfig(steps=3, guidance=2.0)
    images = pipe.sample(conditions, [0, 1], params)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    assert torch.allclose(pipe.sample(conditions[:1], [0], params), images[:1], atol=1e-5)   # batch-independent
    with torch.no_grad():      # a checkpoint restores the condition encoder too (the ablation's curves)
        for weight in pipe.condition.parameters():
            weight.add_(1.0)
    pipe.load_base_checkpoint(result.model_path.parent / "checkpoints" / "step-00000002.pt")
    assert torch.allclose(pipe.sample(conditions[:1], [0], params), images[:1], atol=1e-5)
    with pytest.raises(UsageError, match="did you mean"):
        pipe.sample(["red circel"] if kind == "class" else [parse_layout("red circel@0,0,1,1")], [0], params)


def test_text_models_keep_their_state_and_files_without_a_condition(tiny_recipe):
    from ctxdiff.training.recipe import read_recipe
    from ctxdiff.training.trainer import DenoisingObjective

    recipe = read_recipe(tiny_recipe("text"))
    assert recipe.model.condition is None
    objective = DenoisingObjective(UNet(UNET_PRESETS["tiny"]), None, recipe)
    assert not any(k.startswith("condition") for k in objective.state_dict())


@pytest.mark.parametrize("name, kind", [("shapes-class", "class"), ("shapes-layout", "layout")])
def test_shipped_condition_recipes_read_and_build(name, kind):
    from pathlib import Path

    from ctxdiff.data.layouts import parse_layout
    from ctxdiff.training.recipe import read_recipe

    recipe = read_recipe(Path(__file__).parent.parent / "recipes" / f"{name}.yaml")
    assert recipe.model.condition.kind == kind
    assert recipe.train.keep_last * recipe.train.checkpoint_every >= recipe.train.steps   # every checkpoint kept for the curves
    if kind == "layout":
        assert all(parse_layout(p) for p in recipe.preview_prompts)


@pytest.mark.parametrize("name, labels", [("imagenet64-class", 1000), ("coco-layout", 80)])
def test_gpu_scale_condition_recipes_read_and_build_on_the_meta_device(name, labels):
    """The documented GPU-scale siblings (not trained here) read, and their U-Net, conditioned adapter
    and condition encoder build with agreeing widths (on the meta device: no memory)."""
    from pathlib import Path

    from ctxdiff.models.adapter import build_adapter
    from ctxdiff.models.conditions import ConditionedAdapter, ConditionEncoder, complete_config
    from ctxdiff.models.encoders import load_clip
    from ctxdiff.training.recipe import read_recipe
    from ctxdiff.training.trainer import _unet_config

    recipe = read_recipe(Path(__file__).parent.parent / "recipes" / f"{name}.yaml")
    clip = load_clip(recipe.model.clip, "cpu")
    with torch.device("meta"):
        unet = UNet(_unet_config(recipe))
        config = complete_config(recipe.model.condition, tuple(f"label {i}" for i in range(labels)),
                                 recipe.model.unet.text_dim, recipe.model.unet.pooled_dim)
        adapter = ConditionedAdapter(build_adapter(recipe.model.adapter, clip), config)
        tokens = ConditionEncoder(config)
    assert recipe.data.image_size == recipe.model.unet.image_size == recipe.model.adapter.x_shape[-1] == 64
    assert sum(p.numel() for p in unet.parameters()) > 100e6 and sum(p.numel() for p in adapter.parameters()) > 1e6
    assert tokens.config.dim == recipe.model.unet.text_dim
