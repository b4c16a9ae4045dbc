"""The bundled model's recipes are flat and reproducible: every stage's first steps give the same
weights bit for bit when run twice (same seeds, same machine), so the README's three commands
reproduce the shipped file given the same machine type."""

from pathlib import Path

import pytest
import torch

from ctxdiff.formats.t2i import DEFAULT_MODEL
from ctxdiff.training.clip import ClipTrainer
from ctxdiff.training.recipe import read_recipe
from ctxdiff.training.trainer import Trainer

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
SHORT = ["train.steps=2", "train.checkpoint_every=2", "train.sample_every=0", "train.warmup_steps=1"]


def two_steps(stage: str, folder: Path) -> dict[str, torch.Tensor]:
    overrides = [*SHORT, f"output={folder}"]
    if stage == "shapes-clip":
        trainer = ClipTrainer(read_recipe(RECIPES / f"{stage}.yaml", [*overrides, "train.batch_size=8"]))
        trainer.run()
        return trainer.encoders.clip.state_dict()
    overrides.append(f"model.clip.weights={DEFAULT_MODEL}")   # stage 1's CLIP: the bundled model's stands in
    if stage == "shapes-sr":
        overrides += [f"model.base_model={DEFAULT_MODEL}", "train.batch_size=4"]
    trainer = Trainer(read_recipe(RECIPES / f"{stage}.yaml", overrides), torch.device("cpu"))
    trainer.run()
    return trainer.objective.state_dict()


@pytest.mark.skipif(not DEFAULT_MODEL.exists(), reason="the bundled model is not installed")
@pytest.mark.parametrize("stage", ["shapes-clip", "shapes-base", "shapes-sr"])
def test_the_shipped_stages_first_steps_are_deterministic(stage, tmp_path):
    first, second = two_steps(stage, tmp_path / "a"), two_steps(stage, tmp_path / "b")
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_the_shipped_recipes_are_flat():
    for name in ("shapes-clip", "shapes-base", "shapes-sr", "shapes-base-noadapter"):
        assert "base:" not in (RECIPES / f"{name}.yaml").read_text()
