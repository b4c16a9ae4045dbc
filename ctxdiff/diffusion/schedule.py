"""Noise schedules in paper indexing.

Paper indexing (see docs/math.md#notation-and-indexing): t = 1..T are diffusion steps and t = 0 is clean data.
Every array has length T + 1 with beta_0 = 0 and abar_0 = 1, hence k_0 = 0: the adapter's bias
vanishes on data. Networks receive the same paper step t (a diffusers-style integer timestep
tau in 0..T-1 is t = tau + 1; only the latent Stable Diffusion wrapper converts).

Constants are float64; `Schedule.at` gathers them for a step and casts to the data's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCHEDULES = ("linear", "scaled_linear", "cosine")


@dataclass(frozen=True)
class Schedule:
    """beta_t, alpha_t = 1 - beta_t, abar_t = prod_{i<=t} alpha_i, k_t = sqrt(abar_t)(1 - sqrt(abar_t))."""

    name: str
    T: int
    betas: torch.Tensor
    alphas: torch.Tensor
    alpha_bar: torch.Tensor
    k: torch.Tensor

    def at(self, name: str, t: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The constant `name` at step(s) t, shaped to broadcast against `like` ([B, ...])."""
        values = getattr(self, name)
        if isinstance(t, int):
            return values[t].to(device=like.device, dtype=like.dtype)
        picked = values.to(t.device)[t]
        return picked.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.dim() - 1)))

    def snr(self, t: int | torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio abar_t / (1 - abar_t) (float64)."""
        abar = self.alpha_bar[t]
        return abar / (1 - abar)


def _betas(name: str, T: int) -> torch.Tensor:
    if name == "linear":  # Ho et al. 2020, rescaled so any T spans the same noise range (Nichol & Dhariwal)
        scale = 1000 / T
        return torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64)
    if name == "scaled_linear":  # Stable Diffusion
        return torch.linspace(math.sqrt(0.00085), math.sqrt(0.012), T, dtype=torch.float64) ** 2
    if name == "cosine":  # Nichol & Dhariwal 2021, s = 0.008, beta clipped at 0.999
        s = 0.008
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        abar = f / f[0]
        return (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")


def make_schedule(name: str, T: int) -> Schedule:
    """Build schedule `name` with T steps; arrays have length T + 1 (index 0 = clean data)."""
    if T < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    betas = torch.cat([torch.zeros(1, dtype=torch.float64), _betas(name, T)])
    alphas = 1 - betas
    alpha_bar = torch.cumprod(alphas, 0)
    k = alpha_bar.sqrt() * (1 - alpha_bar.sqrt())
    return Schedule(name, T, betas, alphas, alpha_bar, k)


def schedule_from_alpha_bar(alpha_bar: torch.Tensor, name: str = "custom") -> Schedule:
    """The Schedule of given paper-indexed abar [T + 1] (abar_0 = 1), e.g. a Stable Diffusion
    checkpoint's `SchedulerInfo.alphas_cumprod()`: beta_t = 1 - abar_t / abar_{t-1}, k_t as above.
    abar is kept as given (not re-accumulated), so the marginals are exactly the checkpoint's."""
    abar = torch.as_tensor(alpha_bar, dtype=torch.float64).cpu()
    if abar.ndim != 1 or abar.shape[0] < 2 or abar[0] != 1 or not bool((abar[1:] < abar[:-1]).all()):
        raise ValueError("alpha_bar must be paper-indexed and decreasing: shape [T + 1] with alpha_bar[0] = 1")
    betas = torch.cat([torch.zeros(1, dtype=torch.float64), 1 - abar[1:] / abar[:-1]])
    k = abar.sqrt() * (1 - abar.sqrt())
    return Schedule(name, abar.shape[0] - 1, betas, 1 - betas, abar, k)
