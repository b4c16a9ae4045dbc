"""The video inversion file (kind "video-inversion", written by `ctxdiff invert`): the DDIM trajectory
of a source clip, its frames, the optional attention maps for fusion, and what made it (prompt,
settings, base model and tuned file by `ModelRef`), for `ctxdiff edit --inversion`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ctxdiff.checkpoints import load_bundle, save_bundle
from ctxdiff.formats.model_ref import ModelRef
from ctxdiff.recipes import from_dict

INVERSION_KIND = "video-inversion"


@dataclass(frozen=True)
class InversionParams:
    """Context-aware DDIM inversion settings (paper Sec. 4.2: T = 20 DDIM steps).

    `spacing`: "trailing" (the project's sampling default) runs t_1 = T/N .. t_N = T; "leading"
    runs 1 .. T - T/N + 1 (diffusers' DDIM for Stable Diffusion). On the shapes world
    (benchmarks/video_edit.py shapes, tuned, red -> blue circle) edits followed the source path in
    8/8 clips with "trailing" and 0/8 with "leading" on a 1000-step model (5/8 and 4/8 on the unit
    test's 300-step model), while same-prompt reconstruction was better with "leading" (PSNR 30.6
    against 15.2). `refine` fixed-point iterations repair the "trailing" reconstruction (PSNR 30.8)
    but edits after them ran along the mirrored path on that model, and from t_1 = 1 ("leading")
    they do not converge (the step divides by sqrt(1 - abar_1)): keep 0 for editing."""

    steps: int = 20
    spacing: str = "trailing"
    refine: int = 0                  # fixed-point iterations per step (0: plain DDIM inversion)
    adapter: bool = True             # r_phi in the inversion (False: r = 0)
    attention: bool = False          # store the low-resolution attention maps (for fusion)
    attention_on_cpu: bool = False   # keep stored maps in host memory


@dataclass
class Inversion:
    """The trajectory [N, F, C, H, W] at increasing `timesteps` t_1..t_N (x_{t_1} = the source
    frames in the denoiser's space: pixels or VAE latents), the frames themselves (uint8, at the
    model's size) and what made it."""

    trajectory: torch.Tensor
    timesteps: list[int]
    frames: np.ndarray
    fps: float
    prompt: str
    params: InversionParams
    model: ModelRef
    tuned: ModelRef | None
    source: str
    attention: dict[str, torch.Tensor] | None = None


def save_inversion(path: str | Path, inversion: Inversion) -> Path:
    """Write an inversion (kind "video-inversion") for `ctxdiff edit --inversion`."""
    modules = {"trajectory": {"x": inversion.trajectory}, "frames": {"rgb": torch.tensor(inversion.frames)}}
    if inversion.attention:
        modules["attention"] = inversion.attention
    extra = {"timesteps": inversion.timesteps, "fps": inversion.fps, "prompt": inversion.prompt,
             "params": asdict(inversion.params), "model": asdict(inversion.model),
             "tuned": asdict(inversion.tuned) if inversion.tuned else None, "source": inversion.source}
    return save_bundle(path, modules, {}, kind=INVERSION_KIND, extra=extra)


def load_inversion(path: str | Path) -> Inversion:
    bundle = load_bundle(path, kind=INVERSION_KIND)
    e = bundle.extra
    return Inversion(bundle.tensors["trajectory"]["x"], list(e["timesteps"]), bundle.tensors["frames"]["rgb"].numpy(),
                     float(e["fps"]), e["prompt"], from_dict(InversionParams, e["params"], "params"),
                     ModelRef(**e["model"]), ModelRef(**e["tuned"]) if e["tuned"] else None, e["source"],
                     bundle.tensors.get("attention"))
