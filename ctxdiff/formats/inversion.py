"""The video inversion file (kind "video-inversion", written by `ctxdiff invert`): the DDIM trajectory
of a source clip, its frames, the optional attention maps for fusion, and what made it (prompt,
settings, base model and tuned file by `ModelRef`, the LoRAs merged into the base by `LoraRef`), for
`ctxdiff edit --inversion`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ctxdiff.checkpoints import load_bundle, save_bundle
from ctxdiff.formats.lora_ref import LoraRef, lora_records, read_lora_records
from ctxdiff.formats.model_ref import ModelRef
from ctxdiff.recipes import from_dict

INVERSION_KIND = "video-inversion"
INVERSION_METHODS = ("ddim", "edict")


@dataclass(frozen=True)
class InversionParams:
    """Context-aware inversion settings (paper Sec. 4.2: T = 20 DDIM steps).

    `method`: "ddim" (plain DDIM inversion, the source frames taken as x_{t_1}; sampling back is
    approximate) or "edict" (exact: two coupled chains from the data at t = 0, Wallace et al. 2023,
    docs/math.md#exact-inversion; sampling back returns the source up to rounding, at twice the
    denoiser calls). `max_t`: the highest step reached (None: the spacing's own, t = T for
    "trailing"); at t = T a cosine schedule's abar_T is ~2e-9 and x_T keeps no signal, and EDICT's
    step divides by sqrt(abar_t), so stop where abar_t is still >= 1e-3
    (`ctxdiff.diffusion.samplers.highest_invertible_step`).

    `spacing`: "trailing" runs t_1 = T/N .. t_N = T; "leading" runs 1 .. T - T/N + 1 (diffusers'
    DDIM for Stable Diffusion). `refine` (ddim only): fixed-point iterations per step; from t_1 = 1
    ("leading") they do not converge (the step divides by sqrt(1 - abar_1)).
    `benchmarks/video_edit.py inversion` measures the methods side by side. `window`: a clip longer
    than this runs in windows that all hold its first frame (the sparse-causal anchor) and overlap by
    2 frames, so memory does not grow with its length; editing uses the inversion's windows."""

    steps: int = 20
    spacing: str = "trailing"
    refine: int = 0                  # fixed-point iterations per step (ddim; 0: plain DDIM inversion)
    adapter: bool = True             # r_phi in the inversion (False: r = 0)
    attention: bool = False          # store the low-resolution attention maps (for fusion)
    attention_on_cpu: bool = False   # keep stored maps in host memory
    method: str = "ddim"             # "ddim" or "edict" (exact)
    max_t: int | None = None         # the highest step (None: the spacing's own; t = T for trailing)
    mix: float = 0.93                # EDICT's mixing weight p
    window: int | None = 16          # most frames per denoiser call; longer clips run in overlapping windows

    def __post_init__(self) -> None:
        if self.method not in INVERSION_METHODS:
            raise ValueError(f"inversion method must be one of {', '.join(INVERSION_METHODS)}, got {self.method!r}")
        if not 0.5 < self.mix <= 1:
            raise ValueError(f"EDICT's mix must be in (0.5, 1], got {self.mix}")
        if self.method == "edict" and self.refine:
            raise ValueError("refine is for ddim inversion; EDICT is exact without it")
        if self.window is not None and self.window < 4:
            raise ValueError(f"window must be >= 4 frames (frame 0, 2 overlap frames, one of its own), got {self.window}")


@dataclass
class Inversion:
    """The trajectory [N, F, C, H, W] at increasing `timesteps` t_1..t_N (ddim: x_{t_1} = the source
    frames in the denoiser's space, pixels or VAE latents; edict: the first chain x, with `partner`
    the second chain y at t_N), the frames themselves (uint8, at the model's size) and what made it."""

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
    partner: torch.Tensor | None = None    # edict: the chain y at t_N, [F, C, H, W]
    clip: dict | None = None    # how the frames were taken from `source`: frames, stride, start, crop (the CLI's)
    loras: tuple[LoraRef, ...] = ()   # the LoRAs merged into the base model (Stable Diffusion)

    @property
    def sampling_steps(self) -> list[int]:
        """The decreasing steps sampling back runs: t_N, ..., t_1, 0."""
        return self.timesteps[::-1] + [0]

    def start(self, device: torch.device | str = "cpu"):
        """Where sampling back starts: x_{t_N} (ddim) or the pair (x, y) at t_N (edict)."""
        x = self.trajectory[-1].to(device)
        if self.params.method == "edict":
            return x, self.partner.to(device)
        return x


def save_inversion(path: str | Path, inversion: Inversion) -> Path:
    """Write an inversion (kind "video-inversion") for `ctxdiff edit --inversion`."""
    modules = {"trajectory": {"x": inversion.trajectory}, "frames": {"rgb": torch.tensor(inversion.frames)}}
    if inversion.attention:
        modules["attention"] = inversion.attention
    if inversion.partner is not None:
        modules["partner"] = {"y": inversion.partner}
    extra = {"timesteps": inversion.timesteps, "fps": inversion.fps, "prompt": inversion.prompt,
             "params": asdict(inversion.params), "model": asdict(inversion.model),
             "tuned": asdict(inversion.tuned) if inversion.tuned else None, "source": inversion.source,
             "clip": inversion.clip, "loras": lora_records(inversion.loras)}
    return save_bundle(path, modules, {}, kind=INVERSION_KIND, extra=extra)


def load_inversion(path: str | Path) -> Inversion:
    bundle = load_bundle(path, kind=INVERSION_KIND)
    e = bundle.extra
    return Inversion(bundle.tensors["trajectory"]["x"], list(e["timesteps"]), bundle.tensors["frames"]["rgb"].numpy(),
                     float(e["fps"]), e["prompt"], from_dict(InversionParams, e["params"], "params"),
                     ModelRef(**e["model"]), ModelRef(**e["tuned"]) if e["tuned"] else None, e["source"],
                     bundle.tensors.get("attention"), bundle.tensors.get("partner", {}).get("y"), e.get("clip"),
                     read_lora_records(e.get("loras")))
