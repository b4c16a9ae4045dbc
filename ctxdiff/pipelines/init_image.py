"""img2img and inpainting through the context-aware forward process (Eq. 1).

Strength S in (0, 1]: sampling starts at paper step t_S = max(1, round(S T)) from Eq. 1 applied to the init image,

    x_{t_S} = sqrt(abar_{t_S}) x0_init + k_{t_S} r_phi(x0_init, c, t_S) + sqrt(1 - abar_{t_S}) eps      (`q_sample`)

(eps: the sample's own seeded noise, c: its prompt), and runs the sampler's own steps below t_S
(`start_timesteps`): a 50-step grid at S = 0.5 samples its last 25. S = 1 starts at T, where abar_T ~ 0 leaves
almost nothing of the image (as diffusers' img2img at strength 1).

Mask M (1 = repaint, white in a mask image), RePaint's blend as diffusers' inpaint pipeline does it for a U-Net
without mask channels: every denoiser evaluation sees the known region replaced by the forward process of the init
at that step, with the same eps,

    x_t <- M x_t + (1 - M) (sqrt(abar_t) x0_init + k_t r_phi(x0_init, c, t) + sqrt(1 - abar_t) eps)      (Eq. 1)

and its prediction keeps the init there: x0_hat <- M x0_hat + (1 - M) x0_init. The blend wraps x0_fn, so DDIM,
DDPM and every solver (each of its stages) see it; the sampler's own state outside the mask then follows Eq. 1 of the
init (exactly, for DDIM and r = 0: the noise estimate there is eps), and the last step returns x0_init outside the
mask. The known region's bias is the adapter's on the init itself (Eq. 1 applied to the image); the unknown region
is denoised in its context. Networks called between grid steps (Euler/Heun on Karras sigmas) get Eq. 1 at that
fractional step (abar from `ctxdiff.diffusion.solvers.sigma_at`).

Stable Diffusion: x0_init = scaling_factor * E(init), the encoder's mean (no extra randomness); the mask is
max-pooled to the latent grid (a latent cell is repainted when any of its pixels is) and the decoded image is pasted
over the init outside the pixel mask, since the VAE does not reproduce the init exactly (diffusers' `apply_overlay`).
A pixel cascade blends in each stage at its size, so its output outside the mask is the init itself.

Images of another size than the model's are resized (bicubic, the aspect not kept, as diffusers and A1111's
"just resize") with an `InitImageResized` warning (the CLI prints it as a note); a mask must have its image's size.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ctxdiff.diffusion.process import q_sample
from ctxdiff.diffusion.schedule import Schedule
from ctxdiff.errors import UsageError


class InitImageResized(UserWarning):
    """An init image (and its mask) had another size than the model's and was resized."""


@dataclass(frozen=True)
class InitImage:
    """img2img / inpainting input: `images` [N or 1, 3, H, W] in [-1, 1], `strength` in (0, 1], `mask`
    [N or 1, 1, H, W] in [0, 1] (1 = repaint; binarised at 0.5) or None. One image (or mask) serves every prompt."""

    images: torch.Tensor
    strength: float = 1.0
    mask: torch.Tensor | None = None

    def __post_init__(self):
        check_strength(self.strength)
        if self.images.ndim != 4 or self.images.shape[1] != 3:
            raise UsageError(f"init images must be [N, 3, H, W], got {tuple(self.images.shape)}")
        if self.mask is not None:
            mask = self.mask if self.mask.ndim == 4 else self.mask.reshape(-1, 1, *self.mask.shape[-2:])
            if tuple(mask.shape[-2:]) != tuple(self.images.shape[-2:]):
                raise UsageError(f"the mask is {mask.shape[-1]}x{mask.shape[-2]} but its init image "
                                 f"{self.images.shape[-1]}x{self.images.shape[-2]}; paint the mask at the image's size")
            object.__setattr__(self, "mask", (mask.float() >= 0.5).float())

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.images.shape[-2:])

    def resized(self, size: tuple[int, int], warn: bool = True) -> "InitImage":
        """At `size` (height, width): itself, or resized with an `InitImageResized` warning."""
        size = tuple(int(s) for s in size)
        if self.size == size:
            return self
        if warn:
            warnings.warn(InitImageResized(f"the init image is {self.size[1]}x{self.size[0]}, the model makes "
                                           f"{size[1]}x{size[0]}: resized to it (aspect ratio not kept)"),
                          stacklevel=3)
        images = F.interpolate(self.images.float(), size=size, mode="bicubic", antialias=True,
                               align_corners=False).clamp(-1, 1)
        mask = None if self.mask is None else F.interpolate(self.mask, size=size, mode="bilinear", antialias=True,
                                                            align_corners=False)
        return replace(self, images=images, mask=mask)

    def select(self, indices: list[int]) -> "InitImage":
        """The images (and masks) of these samples of a batch made by `for_batch`."""
        return InitImage(self.images[indices], self.strength, None if self.mask is None else self.mask[indices])

    def for_batch(self, n: int, device=None) -> "InitImage":
        """Images and mask repeated (or checked) to a batch of n, on `device`."""
        def expand(x):
            if x is None:
                return None
            if x.shape[0] not in (1, n):
                raise UsageError(f"{x.shape[0]} init images or masks for {n} prompts; give one, or one per prompt")
            return x.expand(n, *x.shape[1:]).to(device)
        return InitImage(expand(self.images), self.strength, expand(self.mask))


def check_strength(strength: float) -> float:
    if not (isinstance(strength, (int, float)) and math.isfinite(strength) and 0 < strength <= 1):
        raise UsageError(f"strength must lie in (0, 1] (the share of the steps that repaint the init image; "
                         f"1: start from noise), got {strength}")
    return float(strength)


def start_step(T: int, strength: float) -> int:
    """t_S = round(S T), at least 1: the paper step img2img starts from."""
    return max(1, min(T, round(check_strength(strength) * T)))


def start_timesteps(timesteps: list[int], start: int) -> list[int]:
    """A sampler's decreasing grid started at `start`: [start] then the grid's steps below it (ending at 0)."""
    return [start] + [t for t in timesteps if t < start]


# --------------------------------------------------------------------------- reading files


def read_init_image(path: str | Path, size: tuple[int, int], strength: float, mask_path: str | Path | None = None
                    ) -> tuple[InitImage, list[str]]:
    """The init image (and mask: white = repaint) of files, resized to `size` (height, width), and the notes to
    print (the resize). A mask of another size than its image, or a strength outside (0, 1], is a UsageError."""
    from ctxdiff.data.images import read_image
    check_strength(strength)
    image = read_image(path)
    images = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 127.5 - 1
    mask = None
    if mask_path is not None:
        painted = read_image(mask_path)
        if painted.shape[:2] != image.shape[:2]:
            raise UsageError(f"{mask_path}: the mask is {painted.shape[1]}x{painted.shape[0]} but {Path(path).name} "
                             f"is {image.shape[1]}x{image.shape[0]}; paint the mask at the image's size")
        mask = torch.from_numpy(np.array(painted)).float().mean(-1)[None, None] / 255
    init = InitImage(images, strength, mask)
    notes = []
    if init.size != tuple(size):
        notes.append(f"{path}: {init.size[1]}x{init.size[0]} resized to the model's {size[1]}x{size[0]}"
                     + (" (its mask too)" if mask is not None else ""))
    return init.resized(size, warn=False), notes


# --------------------------------------------------------------------------- the forward process in sampling


def forward_at(sched: Schedule, x0: torch.Tensor, t, adapter, cond, noise: torch.Tensor) -> torch.Tensor:
    """Eq. 1 of x0 at network time t (an int or [B]; fractional between grid steps) with the given noise."""
    tt = torch.as_tensor(t).detach().cpu()
    if not tt.is_floating_point() or bool((tt == tt.round()).all()):
        steps = tt.round().long()
        return q_sample(sched, x0, int(steps) if steps.ndim == 0 else steps.to(x0.device), adapter, cond, noise)
    from ctxdiff.diffusion.solvers import sigma_at
    sigma = torch.tensor([sigma_at(sched, float(v)) for v in tt.double().expand(x0.shape[0])], dtype=torch.float64)
    abar = (1 / (1 + sigma ** 2)).view(-1, *[1] * (x0.ndim - 1)).to(device=x0.device, dtype=x0.dtype)
    bias = 0.0
    if adapter is not None:
        times = tt.expand(x0.shape[0]).to(device=x0.device, dtype=x0.dtype)
        bias = abar.sqrt() * (1 - abar.sqrt()) * adapter(x0, cond, times)
    return abar.sqrt() * x0 + bias + (1 - abar).sqrt() * noise


def inpainting(x0_fn: Callable, sched: Schedule, x0_init: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor,
               adapter=None) -> Callable:
    """x0_fn with RePaint's blend (module doc): the known region (mask 0) is Eq. 1 of x0_init at every evaluation
    and its prediction is x0_init. Wrap the *guided* x0_fn: the blend is on the sample's own batch."""

    def blended(x: torch.Tensor, cond, t) -> torch.Tensor:
        known = forward_at(sched, x0_init, t, adapter, cond, noise)
        x0 = x0_fn(mask * x + (1 - mask) * known, cond, t)
        return mask * x0 + (1 - mask) * x0_init

    return blended


def prepare(x0_fn: Callable, x_T: torch.Tensor, sched: Schedule, x0_init: torch.Tensor, strength: float,
            mask: torch.Tensor | None, adapter, cond) -> tuple[Callable, torch.Tensor, int]:
    """(x0_fn, starting state, start step) of img2img / inpainting from the seeded noise x_T (used as eps)."""
    start = start_step(sched.T, strength)
    x_start = q_sample(sched, x0_init, start, adapter, cond, noise=x_T)
    if mask is not None:
        x0_fn = inpainting(x0_fn, sched, x0_init, mask, x_T, adapter)
    return x0_fn, x_start, start


def mask_for(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A repaint mask on a coarser grid (latents, a cascade's base stage): 1 where any pixel of a cell is 1."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.adaptive_max_pool2d(mask, size)


def overlay(images: torch.Tensor, init: InitImage) -> torch.Tensor:
    """The generated images inside the mask, the init outside (pixels; SD's VAE does not return the init)."""
    if init.mask is None:
        return images
    mask = init.mask.to(images.device)
    return mask * images + (1 - mask) * init.images.to(images.device, images.dtype)
