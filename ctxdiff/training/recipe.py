"""The schema of a training recipe: the YAML users write (recipes/*.yaml) as typed dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ctxdiff.models.adapter import AdapterConfig
from ctxdiff.models.encoders import ClipConfig
from ctxdiff.models.unet import UNetConfig
from ctxdiff.recipes import DataConfig, DiffusionConfig, SampleConfig, TrainConfig, load_recipe


@dataclass(frozen=True)
class ModelConfig:
    """What is trained. `adapter: null` trains plain diffusion (r = 0) through the same code path.

    The SR stage (train.stage: sr) joins the base model of `base_model` (a t2i bundle) into a
    cascade bundle; its low-res input is the training image downsampled to `lowres_size`.
    """

    clip: ClipConfig = field(default_factory=ClipConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    adapter: AdapterConfig | None = None
    base_model: str | None = None
    lowres_size: int = 64

    def __post_init__(self) -> None:
        if self.lowres_size < 1:
            raise ValueError(f"lowres_size must be >= 1, got {self.lowres_size}")


@dataclass(frozen=True)
class Recipe:
    """A whole training run. `output` is the run folder (checkpoints, samples, metrics, model)."""

    output: str = "runs/run"
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    preview_prompts: tuple[str, ...] = ()  # prompts of the sample grid written while training
    export_dtype: Literal["fp32", "fp16", "bf16"] = "fp32"  # of <output>/model.safetensors (fp16: shipping)


def read_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load a recipe file with `--set a.b=value` overrides (errors name the dotted key)."""
    return load_recipe(path, overrides, schema=Recipe)
