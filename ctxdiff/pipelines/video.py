"""Which video model a file needs: `load_video_model` picks the pixel `VideoModel` for a t2i bundle
and the latent `LatentVideoModel` for a Stable Diffusion checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from ctxdiff.checkpoints import load_bundle
from ctxdiff.errors import CtxdiffError
from ctxdiff.formats.latent_adapter import is_sd_model
from ctxdiff.formats.tuned import TUNED_KIND
from ctxdiff.pipelines.latent_video import LatentVideoModel
from ctxdiff.pipelines.video_denoiser import VideoDenoiser
from ctxdiff.pipelines.video_model import VideoModel


def load_video_model(model: str | Path | None = None, tuned: str | Path | None = None,
                     device: str | torch.device = "cpu", adapter: str | Path | None = None,
                     window: int = 3, loras: list[tuple[str | Path, float]] = ()) -> VideoDenoiser:
    """A pixel `VideoModel` for a t2i bundle, a `LatentVideoModel` for a Stable Diffusion checkpoint
    (`model`, or the one the tuned file was tuned on); `adapter`: a latent adapter file (SD only);
    `window`: the temporal causal window of an adapter inflated here; `loras`: (file, weight) pairs
    merged into the SD base (SD only)."""
    if model is not None and not Path(model).exists():
        raise CtxdiffError(f"{model}: no such model file or folder; pass --model (a t2i bundle or a Stable "
                           "Diffusion checkpoint)")
    bundle = load_bundle(tuned, kind=TUNED_KIND) if tuned is not None else None
    if bundle is not None:
        latent = bundle.extra.get("backbone", "pixel") == "sd"
    else:
        latent = model is not None and is_sd_model(model)
    if latent:
        return LatentVideoModel.load(model, tuned, device, adapter, window=window, loras=loras)
    if adapter is not None:
        raise CtxdiffError("--adapter is for Stable Diffusion models (a latent adapter file); a ctxdiff t2i "
                           "bundle carries its own adapter")
    if loras:
        what = f"{tuned} tunes" if tuned is not None else f"{model or 'the bundled model'} is"
        raise CtxdiffError(f"--lora: only for Stable Diffusion checkpoints; {what} a ctxdiff t2i bundle (it takes no "
                           "LoRA)")
    return VideoModel.load(model, tuned, device, window=window)
