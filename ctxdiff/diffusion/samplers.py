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

from ctxdiff.diffusion.process import context_biases, ddim_invert_step, ddim_step, ddpm_step, predicted_noise
from ctxdiff.diffusion.schedule import Schedule

SPACINGS = ("leading", "trailing", "linspace")
EDICT_MIX = 0.93   # Wallace et al. 2023's mixing weight p


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


def highest_invertible_step(sched: Schedule, min_alpha_bar: float = 1e-3) -> int:
    """The largest paper step t with abar_t >= `min_alpha_bar`: where an inversion can stop and still
    keep some of the signal (at t = T a cosine schedule's abar_T is ~0 and x_T would hold noise only)."""
    ok = (sched.alpha_bar >= min_alpha_bar).nonzero().flatten()
    return int(ok.max())


def inversion_timesteps(T: int, steps: int, spacing: str = "trailing", max_t: int | None = None) -> list[int]:
    """Increasing paper steps [t_1, ..., t_N] of a `steps`-step inversion: `timesteps_for`'s list
    without its final 0, laid over 0..max_t instead of 0..T when `max_t` is given (so t_N = max_t
    for "trailing")."""
    top = T if max_t is None else max_t
    if not 1 <= top <= T:
        raise ValueError(f"max_t must be in 1..{T}, got {max_t}")
    return timesteps_for(top, min(steps, top), spacing)[:-1][::-1]


def _edict_transfer(sched: Schedule, x0_fn: Callable, z: torch.Tensor, w: torch.Tensor, t: int, s: int,
                    adapter, cond, inverse: bool) -> torch.Tensor:
    """One EDICT half-step of chain z driven by chain w, in shifted coordinates (docs/math.md#exact-inversion):

        x0_hat = f(w, c, t),  b_u = k_u r_phi(x0_hat, c, u),  eps_hat = (w - sqrt(abar_t) x0_hat - b_t) / sqrt(1 - abar_t)
        forward (t -> s):  z' = b_s + a (z - b_t) + b eps_hat,   inverse: z = b_t + (z' - b_s - b eps_hat) / a

    with Song et al.'s a = sqrt(abar_s / abar_t), b = sqrt(1 - abar_s) - sqrt(abar_s (1 - abar_t) / abar_t).
    Every term but z depends on w only, so the half-step is an exactly invertible affine map of z."""
    x0_hat = x0_fn(w, cond, _batch(t, w))
    bias_t, bias_s = context_biases(sched, x0_hat, t, s, adapter, cond)
    eps_hat = predicted_noise(sched, w, t, x0_hat, bias_t=bias_t)
    abar_t, abar_s = float(sched.alpha_bar[t]), float(sched.alpha_bar[s])
    a = (abar_s / abar_t) ** 0.5
    b = (1 - abar_s) ** 0.5 - (abar_s * (1 - abar_t) / abar_t) ** 0.5
    if inverse:
        return bias_t + (z - bias_s - b * eps_hat) / a
    return bias_s + a * (z - bias_t) + b * eps_hat


def edict_step(sched: Schedule, x0_fn: Callable, x: torch.Tensor, y: torch.Tensor, t: int, s: int,
               adapter=None, cond=None, mix: float = EDICT_MIX, on_half=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Context-aware EDICT denoising step (x_t, y_t) -> (x_s, y_s) (Wallace et al. 2023):
    each chain takes an Eq. 11 step driven by the other's prediction, then the two are mixed with
    weight `mix`. With x = y the first half-step is exactly Eq. 11; with r = 0 it is EDICT.
    `on_half(chain)` runs before each half-step's denoiser call, naming the chain it moves ("x", "y")."""
    _half(on_half, "x")
    x_inter = _edict_transfer(sched, x0_fn, x, y, t, s, adapter, cond, inverse=False)
    _half(on_half, "y")
    y_inter = _edict_transfer(sched, x0_fn, y, x_inter, t, s, adapter, cond, inverse=False)
    x_s = mix * x_inter + (1 - mix) * y_inter
    return x_s, mix * y_inter + (1 - mix) * x_s


def edict_invert_step(sched: Schedule, x0_fn: Callable, x: torch.Tensor, y: torch.Tensor, s: int, t: int,
                      adapter=None, cond=None, mix: float = EDICT_MIX, on_half=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact inverse of `edict_step`: (x_s, y_s) -> (x_t, y_t), undoing its four lines in reverse
    (the same two denoiser calls, in the other order; `on_half` as in `edict_step`)."""
    y_inter = (y - (1 - mix) * x) / mix
    x_inter = (x - (1 - mix) * y_inter) / mix
    _half(on_half, "y")
    y_t = _edict_transfer(sched, x0_fn, y_inter, x_inter, t, s, adapter, cond, inverse=True)
    _half(on_half, "x")
    return _edict_transfer(sched, x0_fn, x_inter, y_t, t, s, adapter, cond, inverse=True), y_t


def _half(on_half, chain: str) -> None:
    if on_half is not None:
        on_half(chain)


@torch.no_grad()
def invert_edict(x0_fn: Callable, x_0: torch.Tensor, timesteps: list[int], sched: Schedule, *,
                 adapter=None, cond=None, mix: float = EDICT_MIX, on_half=None, callback=None,
                 progress=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Context-aware EDICT inversion (exact: `sample_edict` along the reversed list returns x_0 up to
    rounding, for any denoiser and adapter) along increasing `timesteps` [0, t_1, ..., t_N].

    Unlike `invert_ddim` it starts from the data itself at t = 0 (both chains x = y = x_0). Returns the
    pairs [(x, y) at 0, t_1, ..., t_N]; two denoiser calls per step, both at the upper step."""
    if timesteps[0] != 0:
        raise ValueError("EDICT inversion starts from the data at t = 0")
    x, y = x_start = (x_0, x_0.clone())
    trajectory = [x_start]
    for i, (s, t) in enumerate(pairwise(timesteps)):
        x, y = edict_invert_step(sched, x0_fn, x, y, s, t, adapter, cond, mix, on_half)
        trajectory.append((x, y))
        _report(callback, progress, step=i, t=t, x=x, x0_hat=None)
    return trajectory


@torch.no_grad()
def sample_edict(x0_fn: Callable, x_T: tuple[torch.Tensor, torch.Tensor], timesteps: list[int], sched: Schedule, *,
                 adapter=None, cond=None, mix: float = EDICT_MIX, on_half=None, callback=None,
                 progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Context-aware EDICT sampling from the pair x_T = (x, y) along decreasing `timesteps` ending at 0;
    returns (x_0, y_0). From an `invert_edict` pair under the same x0_fn it reproduces the data."""
    x, y = x_T
    for i, (t, s) in enumerate(pairwise(timesteps)):
        x, y = edict_step(sched, x0_fn, x, y, t, s, adapter, cond, mix, on_half)
        _report(callback, progress, step=i, t=t, x=x, x0_hat=None)
    return x, y


def _batch(t: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)


def _noise_like(x: torch.Tensor, generator) -> torch.Tensor:
    """Standard normal noise shaped like x. `generator` may be a list with one generator per
    sample, which makes each sample independent of the batch it is drawn in."""
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.randn(x.shape[1:], generator=g, device=g.device, dtype=x.dtype)
                            for g in generator]).to(x.device)
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
