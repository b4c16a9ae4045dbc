"""A pixel text-to-image model made a video model: the base stage of a t2i bundle (the
super-resolution stage of a cascade is not used) with its U-Net inflated (models/inflate.py), the
spatio-temporal adapter (models/video_adapter.py), the model's text encoder and noise schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ctxdiff.checkpoints import load_bundle, load_module_state
from ctxdiff.data.png import to_uint8
from ctxdiff.diffusion import make_schedule
from ctxdiff.diffusion.schedule import Schedule
from ctxdiff.errors import CtxdiffError
from ctxdiff.formats.model_ref import ModelRef
from ctxdiff.formats.tuned import TUNED_KIND, check_base, default_base, load_tuned_unet, tuned_on
from ctxdiff.models.adapter import image_branch
from ctxdiff.models.conditioning import TextCondition
from ctxdiff.models.encoders import ClipEncoders
from ctxdiff.models.inflate import InflateConfig, VideoUNet
from ctxdiff.models.video_adapter import VideoAdapter, VideoAdapterConfig
from ctxdiff.pipelines.text2image import Text2Image
from ctxdiff.pipelines.video_denoiser import VideoDenoiser, frames_to_tensor
from ctxdiff.recipes import DiffusionConfig, from_dict


@dataclass
class VideoModel(VideoDenoiser):
    """A pixel t2i model made a video model: build with `load`."""

    clip: ClipEncoders
    unet: VideoUNet
    adapter: VideoAdapter | None
    diffusion: DiffusionConfig
    base: ModelRef
    tuned: ModelRef | None = None
    tuned_on: dict | None = None

    def __post_init__(self) -> None:
        self.sched: Schedule = make_schedule(self.diffusion.schedule, self.diffusion.timesteps)

    @property
    def image_size(self) -> int:
        return self.unet.unet.config.image_size

    @property
    def grid_size(self) -> int:
        return self.image_size

    def text(self, prompts: list[str]) -> TextCondition:
        return self.clip.encode_text(prompts)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.clip.tokenize(prompts)

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.clip.clip]

    def to_model(self, frames: np.ndarray) -> torch.Tensor:
        return frames_to_tensor(frames, self.device)

    def to_frames(self, x: torch.Tensor) -> np.ndarray:
        return to_uint8(x)

    def _predict(self, x: torch.Tensor, cond: TextCondition, t: torch.Tensor, frames: int) -> torch.Tensor:
        return self.unet(x, t, cond, frames)

    @classmethod
    def load(cls, model: str | Path | None = None, tuned: str | Path | None = None,
             device: str | torch.device = "cpu", inflate: InflateConfig = InflateConfig(),
             window: int = 3) -> "VideoModel":
        """The base stage of the t2i bundle `model` (default: the tuned file's base model, else the
        bundled default model), inflated, with the tensors of the tuned file `tuned` if given."""
        bundle = load_bundle(tuned, kind=TUNED_KIND) if tuned is not None else None
        recorded = ModelRef(**bundle.extra["base_model"]) if bundle is not None else None
        path = Path(model) if model is not None else default_base(tuned, recorded)
        if not path.is_file():
            raise CtxdiffError(f"{path}: no such model file; pass --model FILE (a t2i bundle written by "
                               "`ctxdiff train`)")
        ref = check_base(tuned, recorded, path)
        pipe = Text2Image.from_bundle(path, device)
        if bundle is not None:
            inflate = from_dict(InflateConfig, bundle.configs["inflate"], "inflate")
        unet = VideoUNet(pipe.base.unet, inflate).eval()
        adapter = None
        if bundle is not None and bundle.configs.get("video_adapter") is not None:
            config = from_dict(VideoAdapterConfig, bundle.configs["video_adapter"], "video_adapter")
            adapter = VideoAdapter(config, image_branch(config.adapter, pipe.clip)).to(device)
            load_module_state(adapter, bundle.tensors["adapter"], f"{tuned} adapter")
        elif bundle is None and pipe.base.adapter is not None:
            adapter = VideoAdapter.from_image_adapter(pipe.base.adapter, window)
        if bundle is not None:
            load_tuned_unet(unet, bundle.tensors.get("unet", {}), f"{tuned} unet")
        return cls(pipe.clip, unet, adapter.eval() if adapter is not None else None, pipe.diffusion, ref,
                   ModelRef.of(tuned) if tuned is not None else None, tuned_on(bundle))
