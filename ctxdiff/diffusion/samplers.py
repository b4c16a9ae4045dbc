"""Sampling loops (k-diffusion style: one plain function per algorithm, one signature style).

`x0_fn(x_t, cond, t) -> x0_hat` is the denoiser and `adapter(x0, cond, t) -> r` the context-aware
adapter (None: r = 0). `timesteps` are paper steps: decreasing and ending at 0 for sampling
(see `timesteps_for`), increasing for inversion. `callback(step=, t=, x=, x0_hat=)` runs after
every step; `progress` is any object with an `advance()` method (the CLI passes a rich bar). `generator`
is a torch.Generator or a list of them, one per sample.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Callable

import torch

from ctxdiff.diffusion.process import ddim_invert_step, ddim_step, ddpm_step
from ctxdiff.diffusion.schedule import Schedule

SPACINGS = ("leading", "trailing", "linspace")


def timesteps_for(T: int, steps: int, spacing: str = "trailing") -> list[int]:
    """Decreasing paper steps for a `steps`-step sampler over a T-step schedule, ending at 0.

    In diffusers' terms (timestep tau = t - 1): `leading` tau = i*(T//steps); `trailing`
    tau = round(T - i*T/steps) - 1 (starts at t = T, recommended by Lin et al. 2024);
    `linspace` tau = round(linspace(0, T-1, steps)).
    """
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in 1..{T}, got {steps}")
    if spacing == "leading":
        ts = [i * (T // steps) + 1 for i in range(steps)]
    elif spacing == "trailing":
        ts = [round(T - i * T / steps) for i in range(steps)]
    elif spacing == "linspace":
        ts = torch.linspace(0, T - 1, steps, dtype=torch.float64).round().long().add(1).tolist()
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    return sorted(set(ts), reverse=True) + [0]


def classifier_free_guidance(x0_fn: Callable, uncond, scale: float) -> Callable:
    """Guide the x0 prediction: x0_hat = x0_u + w (x0_c - x0_u), in one batched call.

    `uncond` is the empty-prompt condition for one sample (batch 1) or for the whole batch.
    The adapter keeps the conditioning text of the sample being made (docs/math.md#classifier-free-guidance-on-x0).
    """
    if scale == 1.0:
        return x0_fn

    def guided(x: torch.Tensor, cond, t):
        u = uncond if len(uncond) == x.shape[0] else uncond.repeat_interleave(x.shape[0])
        t2 = torch.cat([t, t]) if isinstance(t, torch.Tensor) else t
        x0_u, x0_c = x0_fn(torch.cat([x, x]), type(cond).cat([u, cond]), t2).chunk(2)
        return x0_u + scale * (x0_c - x0_u)

    return guided


def _report(callback, progress, **state):
    if callback is not None:
        callback(**state)
    if progress is not None:
        progress.advance()


@torch.no_grad()
def sample_ddim(x0_fn: Callable, x_T: torch.Tensor, timesteps: list[int], sched: Schedule, *,
                adapter=None, cond=None, eta: float = 0.0, generator=None,
                callback=None, progress=None) -> torch.Tensor:
    """Context-aware DDIM sampling (Eq. 11; eta > 0 gives Eq. 9) along decreasing `timesteps`."""
    x = x_T
    for i, (t, s) in enumerate(pairwise(timesteps)):
        x0_hat = x0_fn(x, cond, _batch(t, x))
        noise = _noise_like(x, generator) if eta > 0 and s > 0 else None
        x = ddim_step(sched, x, t, s, x0_hat, adapter, cond, eta=eta, noise=noise)
        _report(callback, progress, step=i, t=t, x=x, x0_hat=x0_hat)
    return x


@torch.no_grad()
def sample_ddpm(x0_fn: Callable, x_T: torch.Tensor, timesteps: list[int], sched: Schedule, *,
                adapter=None, cond=None, variance: str = "posterior", generator=None,
                callback=None, progress=None) -> torch.Tensor:
    """Context-aware ancestral sampling (Eq. 7). Strided timesteps use Eq. 9 with eta = 1, which
    equals Eq. 3 for consecutive steps (Lemma 2), so any `timesteps_for` list works."""
    x = x_T
    for i, (t, s) in enumerate(pairwise(timesteps)):
        x0_hat = x0_fn(x, cond, _batch(t, x))
        noise = _noise_like(x, generator) if s > 0 else None
        if s == t - 1:
            x = ddpm_step(sched, x, t, x0_hat, adapter, cond, noise=noise, variance=variance)
        else:
            x = ddim_step(sched, x, t, s, x0_hat, adapter, cond, eta=1.0, noise=noise)
        _report(callback, progress, step=i, t=t, x=x, x0_hat=x0_hat)
    return x


@torch.no_grad()
def invert_ddim(x0_fn: Callable, x_start: torch.Tensor, timesteps: list[int], sched: Schedule, *,
                adapter=None, cond=None, refine: int = 0, callback=None, progress=None) -> list[torch.Tensor]:
    """Context-aware DDIM inversion along increasing `timesteps` [t_1, ..., t_N] (all >= 1).

    x_start is taken as x_{t_1} (the first step of the sampling schedule: from t = 0 the noise
    estimate is undefined, docs/math.md#ddim-inversion). Each jump uses x0_hat = f(x_s, c, s), the usual
    approximation; `refine` > 0 runs that many fixed-point iterations x_t <- invert(x_s;
    x0_hat = f(x_t, c, t)), which makes the DDIM sampler reproduce x_s exactly at convergence.
    Returns the trajectory [x_{t_1}, ..., x_{t_N}].
    """
    if timesteps[0] < 1:
        raise ValueError("inversion starts at the first sampling step t_1 >= 1, not at t = 0")
    trajectory = [x_start]
    x = x_start
    for i, (s, t) in enumerate(pairwise(timesteps)):
        x0_hat = x0_fn(x, cond, _batch(s, x))
        x_t = ddim_invert_step(sched, x, s, t, x0_hat, adapter, cond)
        for _ in range(refine):
            x_t = ddim_invert_step(sched, x, s, t, x0_fn(x_t, cond, _batch(t, x)), adapter, cond)
        x = x_t
        trajectory.append(x)
        _report(callback, progress, step=i, t=t, x=x, x0_hat=x0_hat)
    return trajectory


def _batch(t: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)


def _noise_like(x: torch.Tensor, generator) -> torch.Tensor:
    """Standard normal noise shaped like x. `generator` may be a list with one generator per
    sample, which makes each sample independent of the batch it is drawn in."""
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.randn(x.shape[1:], generator=g, device=g.device, dtype=x.dtype)
                            for g in generator]).to(x.device)
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
