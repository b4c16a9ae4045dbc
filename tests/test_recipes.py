from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from ctxdiff.errors import UsageError
from ctxdiff.recipes import (
    DataConfig,
    DiffusionConfig,
    SampleConfig,
    TrainConfig,
    apply_overrides,
    dump_recipe,
    from_dict,
    load_recipe,
    to_dict,
)
from ctxdiff.training.recipe import Recipe as TrainingRecipe


@dataclass(frozen=True)
class UNetConfig:
    channels: int = 64
    channel_mults: tuple[int, ...] = (1, 2, 2)
    attention: Literal["none", "low", "all"] = "low"


@dataclass
class ModelConfig:  # deliberately not frozen: both kinds must work
    unet: UNetConfig = field(default_factory=UNetConfig)
    sr: UNetConfig | None = None
    dropout: float = 0.0


@dataclass(frozen=True)
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


def write(path, text):
    path.write_text(text)
    return path


def test_unknown_key_is_named_by_dotted_path_with_a_suggestion():
    with pytest.raises(UsageError, match=r"^train\.warmup_step: unknown recipe key; did you mean train\.warmup_steps\?"):
        from_dict(Recipe, {"train": {"warmup_step": 10}})
    with pytest.raises(UsageError, match=r"did you mean model\.unet\.channels\?"):
        from_dict(Recipe, {"model": {"unet": {"chanels": 32}}})


def test_unknown_key_inside_optional_section_keeps_its_suggestion():
    with pytest.raises(UsageError, match=r"model\.sr\.chanels: unknown recipe key; did you mean model\.sr\.channels\?"):
        from_dict(Recipe, {"model": {"sr": {"chanels": 32}}})


def test_unknown_key_without_close_match_lists_valid_keys():
    with pytest.raises(UsageError, match=r"valid keys under sample: sampler, steps"):
        from_dict(Recipe, {"sample": {"zzz": 1}})


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        ({"train": {"steps": "abc"}}, r"train\.steps: expected an integer, got 'abc'"),
        ({"train": {"steps": 1.5}}, r"train\.steps: expected an integer"),
        ({"train": {"gradient_checkpointing": 1}}, r"expected true or false, got 1"),
        ({"train": {"lr": "fast"}}, r"train\.lr: expected a number"),
        ({"train": {"precision": "fp8"}}, r"train\.precision: expected one of 'fp32', 'bf16', 'fp16', got 'fp8'"),
        ({"train": {"adam_betas": [0.9]}}, r"train\.adam_betas: expected a list of 2 items"),
        ({"train": {"grad_clip": "x"}}, r"expected a number or null"),
        ({"model": {"unet": {"channel_mults": [1, "two"]}}}, r"model\.unet\.channel_mults\[1\]: expected an integer"),
        ({"data": {"source": 5}}, r"data\.source: expected a string, got 5"),
        ({"train": 3}, r"train: expected a mapping \(TrainConfig\), got 3"),
    ],
)
def test_wrong_type_names_path_value_and_expected_type(data, pattern):
    with pytest.raises(UsageError, match=pattern):
        from_dict(Recipe, data)


def test_values_are_coerced_to_annotations():
    recipe = from_dict(
        Recipe,
        {"train": {"lr": 1, "adam_betas": [0.5, 0.9]}, "model": {"unet": {"channel_mults": [1, 2, 4]}}},
    )
    assert recipe.train.lr == 1.0 and isinstance(recipe.train.lr, float)
    assert recipe.train.adam_betas == (0.5, 0.9)
    assert recipe.model.unet.channel_mults == (1, 2, 4)
    assert recipe.model.sr is None
    assert from_dict(Recipe, {"train": {"grad_clip": None}}).train.grad_clip is None


def test_missing_required_key_is_reported():
    @dataclass
    class Needs:
        size: int

    with pytest.raises(UsageError, match=r"^model\.size: required recipe key is missing"):
        from_dict(Needs, {}, "model")


def test_post_init_value_error_becomes_usage_error_at_field_path():
    with pytest.raises(UsageError, match=r"^train\.steps must be >= 1, got 0$"):
        from_dict(Recipe, {"train": {"steps": 0}})
    with pytest.raises(UsageError, match=r"^diffusion\.cond_drop_prob must be in \[0, 1\)"):
        from_dict(Recipe, {"diffusion": {"cond_drop_prob": 1.0}})
    with pytest.raises(UsageError, match=r"^sample\.eta must be >= 0"):
        from_dict(Recipe, {"sample": {"eta": -0.1}})
    with pytest.raises(UsageError, match=r"^diffusion\.high_noise_share must be in \[0, 1\], got 1\.5"):
        from_dict(DiffusionConfig, {"high_noise_share": 1.5}, "diffusion")


def test_hard_negatives_are_refused_outside_shapes_clip_training():
    clip = {"source": "shapes", "hard_negatives": True}
    assert from_dict(TrainingRecipe, {"data": clip, "train": {"stage": "clip"}}).data.hard_negatives
    with pytest.raises(UsageError, match=r"data\.hard_negatives is for contrastive CLIP training"):
        from_dict(TrainingRecipe, {"data": clip, "train": {"stage": "base"}})
    with pytest.raises(UsageError, match=r"^data\.hard_negatives needs source 'shapes'.*not 'pics'"):
        from_dict(TrainingRecipe, {"data": {"source": "pics", "hard_negatives": True}, "train": {"stage": "clip"}})


def test_a_removed_key_reads_back_only_with_the_value_whose_behaviour_remains():
    """Files written before `train.shape_loss`, `model.clip.word_tokens` and `model.unet.token_pool`
    were removed keep loading; a recipe that asks for their removed behaviour is refused."""
    old = {"model": {"clip": {"word_tokens": False}, "unet": {"token_pool": False}}, "train": {"shape_loss": 0.0}}
    assert from_dict(TrainingRecipe, old) == TrainingRecipe()
    for section, key, value in (("train", "shape_loss", 2.0), ("model.clip", "word_tokens", True)):
        data = {"train": {key: value}} if section == "train" else {"model": {"clip": {key: value}}}
        with pytest.raises(UsageError, match=rf"^{section}\.{key}: this key was removed; only .* not {value}"):
            from_dict(TrainingRecipe, data)


@pytest.mark.parametrize("loss", ["layout_loss"])
def test_auxiliary_clip_losses_are_refused_outside_shapes_clip_training(loss):
    assert getattr(from_dict(TrainingRecipe, {"data": {"source": "shapes"}, "train": {"stage": "clip", loss: 1.0}}).train,
                   loss) == 1.0
    with pytest.raises(UsageError, match=rf"train\.{loss} is for CLIP training on the shapes world"):
        from_dict(TrainingRecipe, {"data": {"source": "shapes"}, "train": {"stage": "base", loss: 1.0}})
    with pytest.raises(UsageError, match=rf"train\.{loss} is for CLIP training on the shapes world"):
        from_dict(TrainingRecipe, {"data": {"source": "pics"}, "train": {"stage": "clip", loss: 1.0}})
    with pytest.raises(UsageError, match=rf"^train\.{loss} must be >= 0"):
        from_dict(TrainingRecipe, {"data": {"source": "shapes"}, "train": {"stage": "clip", loss: -1.0}})


def test_overrides_set_nested_keys_with_yaml_values():
    data = {"train": {"lr": 0.1}, "model": {"sr": {"channels": 8}}}
    out = apply_overrides(
        data,
        ["train.lr=1e-4", "train.steps=20", "model.unet.channel_mults=[1,2,4]", "model.sr=null", "data.source=a b"],
    )
    assert out == {
        "train": {"lr": 1e-4, "steps": 20},
        "model": {"sr": None, "unet": {"channel_mults": [1, 2, 4]}},
        "data": {"source": "a b"},
    }
    assert data == {"train": {"lr": 0.1}, "model": {"sr": {"channels": 8}}}  # the input is not mutated
    recipe = from_dict(Recipe, out)
    assert recipe.train.lr == 1e-4 and recipe.train.steps == 20
    assert recipe.model.unet.channel_mults == (1, 2, 4) and recipe.model.sr is None


def test_override_of_unknown_key_gets_a_suggestion_from_from_dict():
    with pytest.raises(UsageError, match=r"did you mean train\.steps\?"):
        from_dict(Recipe, apply_overrides({}, ["train.stpes=3"]))


@pytest.mark.parametrize("override", ["train.lr", "=3", "train..lr=1", ".lr=1", "train.=1"])
def test_malformed_override_is_a_usage_error(override):
    with pytest.raises(UsageError, match="malformed override"):
        apply_overrides({}, [override])


def test_override_below_a_value_is_refused():
    with pytest.raises(UsageError, match=r"cannot set train\.lr\.x: train\.lr is a value"):
        apply_overrides({"train": {"lr": 0.1}}, ["train.lr.x=1"])


def test_load_recipe_reads_yaml_with_overrides(tmp_path):
    path = write(tmp_path / "r.yaml", "train:\n  lr: 3e-4\n  steps: 100\ndata:\n  image_size: 32\n")
    recipe = load_recipe(path, ["train.steps=5"], schema=Recipe)
    assert (recipe.train.lr, recipe.train.steps, recipe.data.image_size) == (3e-4, 5, 32)


def test_missing_recipe_file_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match=r"recipe not found: .*nope\.yaml"):
        load_recipe(tmp_path / "nope.yaml", schema=Recipe)


def test_yaml_syntax_error_reports_line(tmp_path):
    path = write(tmp_path / "bad.yaml", "train:\n  lr: 1\n  steps: [1, 2\n")
    with pytest.raises(UsageError, match=r"bad\.yaml:\d+:\d+: YAML syntax error") as info:
        load_recipe(path, schema=Recipe)
    assert "\n" not in str(info.value)
    line = int(str(info.value).split("bad.yaml:")[1].split(":")[0])
    assert line >= 3


@pytest.mark.parametrize("text", ["- a\n- b\n", "", "just text\n"])
def test_top_level_must_be_a_mapping(tmp_path, text):
    with pytest.raises(UsageError, match="must be a mapping"):
        load_recipe(write(tmp_path / "r.yaml", text), schema=Recipe)


def test_base_inheritance_deep_merges_with_child_winning(tmp_path):
    write(tmp_path / "common.yaml", "train:\n  lr: 2e-4\n  steps: 100\nmodel:\n  unet:\n    channels: 32\n")
    (tmp_path / "ablation").mkdir()
    child = write(
        tmp_path / "ablation" / "no_adapter.yaml", "base: ../common.yaml\ntrain:\n  steps: 7\nmodel:\n  dropout: 0.1\n"
    )
    recipe = load_recipe(child, schema=Recipe)
    assert recipe.train.lr == 2e-4 and recipe.train.steps == 7
    assert recipe.model.unet.channels == 32 and recipe.model.dropout == 0.1


def test_base_cycle_is_a_usage_error(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(UsageError, match="loops"):
        load_recipe(tmp_path / "a.yaml", schema=Recipe)


def test_dump_round_trips_through_yaml():
    recipe = from_dict(
        Recipe,
        {
            "model": {"sr": {"channels": 16, "channel_mults": [1, 2]}, "dropout": 0.25},
            "train": {"lr": 1e-10, "grad_clip": None, "precision": "bf16"},
            "sample": {"guidance": 7.5},
        },
    )
    text = dump_recipe(recipe)
    assert "adam_betas: [0.9, 0.999]" in text
    assert from_dict(Recipe, yaml.safe_load(text)) == recipe
    assert from_dict(Recipe, to_dict(recipe)) == recipe


def test_dumped_recipe_loads_as_a_file(tmp_path):
    recipe = from_dict(Recipe, {"train": {"steps": 3}})
    assert load_recipe(write(tmp_path / "r.yaml", dump_recipe(recipe)), schema=Recipe) == recipe


def test_defaults_follow_paper_appendix_c():
    d, t = DiffusionConfig(), TrainConfig()
    assert (d.schedule, d.timesteps) == ("cosine", 1000)
    assert (t.lr, t.weight_decay, t.adam_betas) == (1e-4, 0.0, (0.9, 0.999))
