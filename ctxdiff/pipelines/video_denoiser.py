"""What tuning, inversion and editing need from a video model, pixel (`VideoModel`,
pipelines/video_model.py) or latent (`LatentVideoModel`, pipelines/latent_video.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ctxdiff.diffusion.schedule import Schedule
from ctxdiff.formats.lora_ref import LoraRef
from ctxdiff.formats.model_ref import ModelRef
from ctxdiff.models.conditioning import TextCondition
from ctxdiff.models.encoders import ClipEncoders
from ctxdiff.models.inflate import VideoUNet
from ctxdiff.models.video_adapter import VideoAdapter
from ctxdiff.recipes import DiffusionConfig


def frames_to_tensor(frames: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> float [F, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.array(frames, dtype=np.uint8)).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1


@dataclass(frozen=True)
class FrameWindow:
    """The clip frames of one denoiser call, in order; the first `context` of them are there only to be
    attended to (the clip's first frame, the sparse-causal anchor, and the overlap with the previous
    window) and their outputs are dropped."""

    frames: tuple[int, ...]
    context: int = 0

    @property
    def own(self) -> tuple[int, ...]:
        return self.frames[self.context:]


def frame_windows(total: int, size: int | None, overlap: int = 2) -> list[FrameWindow]:
    """Windows of at most `size` frames covering frames 0..total-1, each after the first holding frame 0
    and the `overlap` frames before its own (so every frame sees frame 0 and its previous frames, as in
    one call over the clip). None or total <= size: one window of every frame."""
    if size is None or total <= size:
        return [FrameWindow(tuple(range(total)))]
    if size < overlap + 2:
        raise ValueError(f"a window of {size} frames cannot hold frame 0, {overlap} overlap frames and a frame "
                         "of its own")
    windows, start = [FrameWindow(tuple(range(size)))], size
    while start < total:
        end = min(total, start + size - 1 - overlap)
        context = (0, *range(max(1, start - overlap), start))
        windows.append(FrameWindow((*context, *range(start, end)), len(context)))
        start = end
    return windows


def _windowed(fn: Callable, frames: int, windows: list[FrameWindow], on_window: Callable | None) -> Callable:
    """fn(x, cond, t, frames) over F-frame videos (x [copies*F, ...]), run one window at a time."""

    def run(x: torch.Tensor, cond, t: torch.Tensor) -> torch.Tensor:
        if len(windows) == 1:
            if on_window is not None:
                on_window(windows[0])
            return fn(x, cond, t, frames)
        copies = x.shape[0] // frames
        out = None
        for window in windows:
            rows = torch.tensor([c * frames + f for c in range(copies) for f in window.frames], device=x.device)
            if on_window is not None:
                on_window(window)
            part = fn(x[rows], cond[rows], t[rows] if isinstance(t, torch.Tensor) and t.dim() else t,
                      len(window.frames))
            out = torch.empty((x.shape[0], *part.shape[1:]), dtype=part.dtype, device=part.device) if out is None else out
            keep = torch.tensor([c * len(window.frames) + i for c in range(copies)
                                 for i in range(window.context, len(window.frames))], device=x.device)
            own = torch.tensor([c * frames + f for c in range(copies) for f in window.own], device=x.device)
            out[own] = part[keep]
        return out

    return run


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
    loras: tuple[LoraRef, ...] = ()      # the LoRAs merged into the base (Stable Diffusion only)
    backbone = "pixel"              # what a tuned file records ("pixel" or "sd")
    clamp_x0 = True                 # x0_hat lies in [-1, 1] (pixels; latents are not clamped)
    first_token_column = 1          # cross-attention column of the start token (pixel U-Nets: after a null key)
    window_overlap = 2              # frames a window repeats before its own: the adapter's causal window - 1

    def windows(self, frames: int, window: int | None) -> list[FrameWindow]:
        """How an F-frame clip is cut into calls of at most `window` frames (None: one call)."""
        return frame_windows(frames, window, self.window_overlap)

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

    def x0_fn(self, frames: int, clamp: bool = True, on_call: Callable[[int], None] | None = None,
              on_window: Callable[[FrameWindow], None] | None = None, window: int | None = None) -> Callable:
        """x0_fn(x_t, cond, t) for the samplers on F-frame videos; `on_call(t)` runs before each
        call (attention controllers learn the step from it). A clip longer than `window` frames runs
        in windows (`frame_windows`), `on_window(window)` before each. `clamp` keeps pixel x0_hat in [-1, 1]."""
        run = _windowed(self._predict, frames, self.windows(frames, window), on_window)

        def predict(x: torch.Tensor, cond: TextCondition, t: torch.Tensor) -> torch.Tensor:
            if on_call is not None:
                on_call(int(t.reshape(-1)[0]))
            x0 = run(x, cond, t)
            return x0.clamp(-1, 1) if clamp and self.clamp_x0 else x0

        return predict

    def adapter_fn(self, frames: int, enabled: bool = True, window: int | None = None) -> Callable | None:
        """adapter(x0, cond, t) for the samplers (None: r = 0), window by window like `x0_fn`."""
        if self.adapter is None or not enabled:
            return None
        adapter = self.adapter
        return _windowed(lambda x0, cond, t, n: adapter(x0, cond, t, n), frames, self.windows(frames, window), None)
