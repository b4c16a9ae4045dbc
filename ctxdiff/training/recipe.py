"""The schema of a training recipe: the YAML users write (recipes/*.yaml) as typed dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ctxdiff.models.adapter import AdapterConfig
from ctxdiff.models.conditions import ConditionConfig
from ctxdiff.models.encoders import ClipConfig
from ctxdiff.models.unet import UNetConfig
from ctxdiff.recipes import DataConfig, DiffusionConfig, SampleConfig, TrainConfig, load_recipe


@dataclass(frozen=True)
class ModelConfig:
    """What is trained. `adapter: null` trains plain diffusion (r = 0) through the same code path.

    `init_from` continues training from a t2i bundle: its base stage (or, for train.stage: sr, its
    super-resolution stage) supplies the starting weights of the U-Net and the adapter.

    The SR stage (train.stage: sr) joins the base model of `base_model` (a t2i bundle) into a
    cascade bundle; its low-res input is the training image downsampled to `lowres_size`.
    """

    clip: ClipConfig = field(default_factory=ClipConfig)  # the text and image encoders (open_clip)
    unet: UNetConfig = field(default_factory=UNetConfig)  # the denoiser f_theta
    adapter: AdapterConfig | None = None  # the context-aware adapter r_phi; null: r = 0 (plain diffusion)
    base_model: str | None = None  # train.stage sr: the base t2i bundle joined into the cascade
    lowres_size: int = 64  # train.stage sr: the side the low-res input is downsampled to
    init_from: str | None = None  # a t2i bundle whose stage weights (unet, adapter) start this run
    condition: ConditionConfig | None = None  # what the model is conditioned on; null (or kind: text): the CLIP's
                                              # text; class / layout: labels or layouts (paper Sec. 4.3)

    def __post_init__(self) -> None:
        if self.condition is not None and self.condition.kind == "text":
            object.__setattr__(self, "condition", None)   # the same model as no key at all
        if self.lowres_size < 1:
            raise ValueError(f"lowres_size must be >= 1, got {self.lowres_size}")


@dataclass(frozen=True)
class LatentConfig:
    """ContextDiff over a pretrained Stable Diffusion backbone (ctxdiff/training/latent_adapter.py).

    The frozen backbone (U-Net, VAE, text encoder) is `sd_checkpoint`, a CompVis single file or a
    diffusers folder; `model.adapter` is trained on its latents (x_shape = (4, data.image_size / 8,
    data.image_size / 8)) by Eq. 6, and `model.clip` is the image tower of image_branch "clip".
    `model.unet` is not used; `diffusion.schedule` and `diffusion.timesteps` must be the checkpoint's.
    """

    sd_checkpoint: str  # the frozen backbone: a CompVis single file or a diffusers folder
    prediction_type: Literal["epsilon", "v_prediction"] | None = None  # None: as load_sd detects it
    use_ema: bool = True  # the checkpoint's EMA U-Net weights, when it has them

    def __post_init__(self) -> None:
        if not self.sd_checkpoint.strip():
            raise ValueError("sd_checkpoint must name a Stable Diffusion checkpoint file or diffusers folder")


@dataclass(frozen=True)
class Recipe:
    """A whole training run. `output` is the run folder (checkpoints, samples, metrics, model)."""

    output: str = "runs/run"  # the run folder: checkpoints/, samples/, metrics.jsonl, recipe.yaml, the model file
    model: ModelConfig = field(default_factory=ModelConfig)  # what is trained
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)  # the noise process and the loss
    data: DataConfig = field(default_factory=DataConfig)  # the training pairs
    train: TrainConfig = field(default_factory=TrainConfig)  # optimisation, precision, checkpoints, logging
    sample: SampleConfig = field(default_factory=SampleConfig)  # sampling defaults, written into the model file
    preview_prompts: tuple[str, ...] = ()  # prompts of the sample grid written while training
    export_dtype: Literal["fp32", "fp16", "bf16"] = "fp32"  # of <output>/model.safetensors (fp16: shipping)
    latent: LatentConfig | None = None  # set: train an adapter over this SD backbone (<output>/adapter.safetensors)

    def __post_init__(self) -> None:
        T = self.diffusion.timesteps
        if self.latent is None and self.train.stage != "clip":
            for key, steps in (("model.unet.timesteps", self.model.unet.timesteps),
                               ("model.adapter.timesteps", self.model.adapter and self.model.adapter.timesteps)):
                if steps not in (None, T):
                    raise ValueError(f"{key} is {steps} but diffusion.timesteps is {T}; a network embeds the "
                                     "steps of the process it is trained on: make them agree")
        for key in ("steps", "sr_steps"):
            if getattr(self.sample, key) > T:
                raise ValueError(f"sample.{key} is {getattr(self.sample, key)}, more than diffusion.timesteps {T}; "
                                 f"the model could not be sampled with it: set sample.{key} <= {T}")
        if self.model.condition is not None and (self.latent is not None or self.train.stage != "base"):
            raise ValueError(f"model.condition kind {self.model.condition.kind} trains a pixel base stage "
                             "(train.stage: base, no latent) only")
        if self.data.hard_negatives and (self.train.stage != "clip" or self.latent is not None):
            raise ValueError("data.hard_negatives is for contrastive CLIP training (train.stage: clip) only")
        if self.train.layout_loss and (self.train.stage != "clip" or self.data.source != "shapes"
                                       or self.latent is not None):
            raise ValueError("train.layout_loss is for CLIP training on the shapes world (train.stage: clip, "
                             "data.source: shapes) only")


def read_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load a recipe file with `--set a.b=value` overrides (errors name the dotted key)."""
    return load_recipe(path, overrides, schema=Recipe)
