"""What tuning, inversion and editing need from a video model, pixel (`VideoModel`,
pipelines/video_model.py) or latent (`LatentVideoModel`, pipelines/latent_video.py)."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ctxdiff.diffusion.schedule import Schedule
from ctxdiff.formats.model_ref import ModelRef
from ctxdiff.models.conditioning import TextCondition
from ctxdiff.models.encoders import ClipEncoders
from ctxdiff.models.inflate import VideoUNet
from ctxdiff.models.video_adapter import VideoAdapter
from ctxdiff.recipes import DiffusionConfig


def frames_to_tensor(frames: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> float [F, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.array(frames, dtype=np.uint8)).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1


class VideoDenoiser:
    """What tuning, inversion and editing need from a video model (pixel or latent).

    Subclasses set `unet`, `adapter`, `sched`, `diffusion` (the loss weighting of tuning), `base`,
    `tuned`, `tuned_on`, and define how frames enter and leave the denoiser's space, the text
    encoder, and the denoiser call `_predict`.
    """

    unet: VideoUNet
    adapter: VideoAdapter | None
    clip: ClipEncoders | None       # scores edits (text alignment, temporal consistency); None: no scores
    sched: Schedule
    diffusion: DiffusionConfig
    base: ModelRef
    tuned: ModelRef | None
    tuned_on: dict | None           # the tuned file's prompt, video, frames, stride and start
    adapter_ref: ModelRef | None = None   # the adapter file the adapter came from (None: the base model's)
    backbone = "pixel"              # what a tuned file records ("pixel" or "sd")
    clamp_x0 = True                 # x0_hat lies in [-1, 1] (pixels; latents are not clamped)
    first_token_column = 1          # cross-attention column of the start token (pixel U-Nets: after a null key)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def image_size(self) -> int:
        """The side of the (square) frames the model reads and writes, in pixels."""
        raise NotImplementedError

    @property
    def grid_size(self) -> int:
        """The side of the denoiser's input (pixels, or latent cells)."""
        raise NotImplementedError

    def text(self, prompts: list[str]) -> TextCondition:
        """The text condition of each prompt."""
        raise NotImplementedError

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def frozen_modules(self) -> list[torch.nn.Module]:
        """The modules tuning never trains (text and image encoders)."""
        raise NotImplementedError

    def to_model(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 frames [F, H, W, 3] -> x_0 in the denoiser's space [F, C, h, w]."""
        raise NotImplementedError

    def to_frames(self, x: torch.Tensor) -> np.ndarray:
        """x_0 in the denoiser's space -> uint8 frames [F, H, W, 3]."""
        raise NotImplementedError

    def _predict(self, x: torch.Tensor, cond: TextCondition, t: torch.Tensor, frames: int) -> torch.Tensor:
        """x0_hat for x_t of F-frame videos at paper steps t."""
        raise NotImplementedError

    def new_adapter(self, window: int) -> VideoAdapter | None:
        """The adapter tuning trains when the model has none (None: tune without one)."""
        return None

    def add_to_tuned_file(self, modules: dict, configs: dict, extra: dict) -> None:
        """What a tuned file of this backbone holds beyond the tuned tensors (nothing, for pixel models)."""

    def encode(self, prompt: str, frames: int) -> TextCondition:
        """The condition of one prompt, repeated for each of `frames` frames."""
        return self.text([prompt]).repeat_interleave(frames)

    def x0_fn(self, frames: int, clamp: bool = True, on_call: Callable[[int], None] | None = None) -> Callable:
        """x0_fn(x_t, cond, t) for the samplers on F-frame videos; `on_call(t)` runs before each
        call (attention controllers learn the step from it). `clamp` keeps pixel x0_hat in [-1, 1]."""

        def predict(x: torch.Tensor, cond: TextCondition, t: torch.Tensor) -> torch.Tensor:
            if on_call is not None:
                on_call(int(t.reshape(-1)[0]))
            x0 = self._predict(x, cond, t, frames)
            return x0.clamp(-1, 1) if clamp and self.clamp_x0 else x0

        return predict

    def adapter_fn(self, frames: int, enabled: bool = True) -> Callable | None:
        """adapter(x0, cond, t) for the samplers (None: r = 0)."""
        if self.adapter is None or not enabled:
            return None
        adapter = self.adapter
        return lambda x0, cond, t: adapter(x0, cond, t, frames)
