"""Context-aware fast solvers: DPM-Solver++ 2M (and its SDE form), Euler, Euler ancestral, Heun, UniPC.

Under Eq. 1 the shifted variable y_t = x_t - k_t r_t is a standard diffusion of x0
(docs/math.md#the-shift-identity), so every solver of the standard reverse process becomes
context-aware one step at a time (docs/math.md#context-aware-solvers-in-shifted-coordinates):
the state is x; a step from grid point i to i + 1 evaluates x0_hat = x0_fn(x, c, t_i) (the network
sees x, bias included) and the bias k r_phi(x0_hat, c, .) at both points (one stacked adapter call),
steps y_i = x - k_i r_i with the solver's own rule and maps back, x_{i+1} = y_{i+1} + k_{i+1} r_{i+1}.
Multistep solvers keep the past x0_hat as their history; Heun's second stage and UniPC's
corrector see the network at their own y translated by the step's first prediction; the stochastic
ones add their noise to y. With r = 0 each is the diffusers scheduler of the same name, step for
step (tests/test_solvers.py); Euler is exactly Eq. 11 (DDIM) with the adapter too.

The sigma grid. Each solver steps on sigma = sqrt((1 - abar) / abar) (the k-diffusion/diffusers
variable; abar = 1 / (1 + sigma^2), k = sqrt(abar)(1 - sqrt(abar)) is a function of sigma alone), with
paper steps for the networks (1..T, docs/math.md#notation-and-indexing; the final point is t = 0,
sigma = 0). Without `karras` the grid is `timesteps` (a `timesteps_for` list) and sigma_i is the
schedule's sigma at t_i. With `karras` only the number of steps N = len(timesteps) - 1 is used:
Karras et al. (2022) sigmas, rho = 7, from sigma(T) to sigma(1) (the full range, as diffusers'
DPMSolverMultistep/UniPCMultistep and k-diffusion/A1111 do, and diffusers' Euler/Heun with their
default "linspace" spacing), then 0. Their paper steps come from `t_from_sigma` (diffusers'
`_sigma_to_t`: linear interpolation of log sigma between discrete steps, + 1):
dpmpp-2m, dpmpp-2m-sde and unipc round them to integer steps and keep the Karras sigmas for their
own arithmetic (as diffusers does; the networks stay on the steps they were trained at); euler,
euler-a and heun call the networks at the fractional step (as diffusers' EulerDiscrete/HeunDiscrete
do). Networks must then accept a float t: the pixel U-Net and the adapter embed t continuously
(`ctxdiff.models.layers.TimestepEmbedding`), so a fractional step interpolates in embedding space;
an epsilon/v wrapper must convert with the sigma of that step (`sigma_at`).

Signatures follow samplers.py: `x0_fn(x_t, cond, t) -> x0_hat`, `adapter(x0, cond, t) -> r` (None: r = 0),
`callback(step=, t=, x=, x0_hat=)` after each step (t is the step's first network time, x the state
after the step, x0_hat its first prediction), `progress.advance()` once per step, `generator` a
torch.Generator or one per sample. Heun calls the network twice per step except on the last one
(2N - 1 calls for N steps, as diffusers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ctxdiff.diffusion.samplers import _noise_like, _report
from ctxdiff.diffusion.schedule import Schedule

KARRAS_RHO = 7.0


# --------------------------------------------------------------------------- the sigma grid


def discrete_sigmas(sched: Schedule) -> torch.Tensor:
    """sigma_t = sqrt((1 - abar_t) / abar_t) for t = 1..T (float64 [T]; index tau = t - 1, diffusers' `sigmas`)."""
    abar = sched.alpha_bar[1:]
    return ((1 - abar) / abar).sqrt()


def t_from_sigma(sched: Schedule, sigma: float) -> float:
    """The fractional paper step whose noise level is `sigma`: diffusers' `_sigma_to_t` (log sigma
    interpolated linearly between discrete steps, clamped to 1..T) in paper steps (tau + 1)."""
    log_sigmas = discrete_sigmas(sched).log()
    if len(log_sigmas) < 2:
        return 1.0
    log_sigma = math.log(max(sigma, 1e-10))
    dists = log_sigma - log_sigmas
    low = int(torch.cumsum((dists >= 0).long(), 0).argmax().clamp(max=len(log_sigmas) - 2))
    lo, hi = float(log_sigmas[low]), float(log_sigmas[low + 1])
    w = min(max((lo - log_sigma) / (lo - hi), 0.0), 1.0)
    return (1 - w) * low + w * (low + 1) + 1


def sigma_at(sched: Schedule, t: float) -> float:
    """The noise level at a (fractional) paper step t in 1..T: the inverse of `t_from_sigma`
    (log sigma linear between discrete steps). At an integer t it is the schedule's sigma_t."""
    log_sigmas = discrete_sigmas(sched).log()
    tau = min(max(float(t) - 1, 0.0), len(log_sigmas) - 1.0)
    low = min(int(math.floor(tau)), len(log_sigmas) - 1)
    w = tau - low
    high = min(low + 1, len(log_sigmas) - 1)
    return math.exp((1 - w) * float(log_sigmas[low]) + w * float(log_sigmas[high]))


def karras_sigmas(sched: Schedule, n: int, rho: float = KARRAS_RHO) -> list[float]:
    """n noise levels of Karras et al. (2022), Eq. 5, from sigma(T) down to sigma(1):
    (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho (diffusers' `_convert_to_karras`)."""
    sigmas = discrete_sigmas(sched)
    lo, hi = float(sigmas[0]) ** (1 / rho), float(sigmas[-1]) ** (1 / rho)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    return ((hi + ramp * (lo - hi)) ** rho).tolist()


@dataclass(frozen=True)
class SolverGrid:
    """Where a solver evaluates: noise levels `sigmas` (decreasing, N + 1 of them, the last 0) and
    the paper step `times[i]` the networks are called with at sigmas[i] (times[N] = 0, the data)."""

    sigmas: list[float]
    times: list[int | float]

    def __len__(self) -> int:
        return len(self.sigmas) - 1


def solver_grid(sched: Schedule, timesteps: list[int], karras: bool = False,
                integer_times: bool = False) -> SolverGrid:
    """The grid of a solver over `timesteps` (decreasing paper steps ending at 0, `timesteps_for`).

    Without `karras`: sigma_i = sigma(t_i), times = timesteps. With `karras`: N = len(timesteps) - 1
    Karras sigmas from sigma(T) to sigma(1) and 0, times `t_from_sigma` of each, rounded to integer
    steps when `integer_times` (see the module docstring for which solver does which)."""
    if len(timesteps) < 2 or timesteps[-1] != 0 or any(b >= a for a, b in zip(timesteps, timesteps[1:])):
        raise ValueError(f"timesteps must decrease and end at 0, got {list(timesteps)}")
    if not karras:
        sigmas = discrete_sigmas(sched)
        return SolverGrid([float(sigmas[t - 1]) for t in timesteps[:-1]] + [0.0], list(timesteps))
    sigmas = karras_sigmas(sched, len(timesteps) - 1)
    times: list[int | float] = [t_from_sigma(sched, s) for s in sigmas]
    if integer_times:
        times = [int(torch.tensor(t - 1, dtype=torch.float64).round()) + 1 for t in times]  # half to even, as numpy
    return SolverGrid(sigmas + [0.0], times + [0])


def _alpha(sigma: float) -> float:
    """sqrt(abar) of noise level sigma: 1 / sqrt(1 + sigma^2)."""
    return 1 / math.sqrt(1 + sigma * sigma)


def _k(sigma: float) -> float:
    """The bias scale k = sqrt(abar)(1 - sqrt(abar)) at noise level sigma (0 at sigma = 0)."""
    a = _alpha(sigma)
    return a * (1 - a)


def _times(t: int | float, x: torch.Tensor) -> torch.Tensor:
    """Network time for the batch: LongTensor at integer steps (as sample_ddim), float32 between them."""
    if float(t).is_integer():
        return torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
    return torch.full((x.shape[0],), float(t), dtype=torch.float32, device=x.device)


def _biases(adapter, cond, x0: torch.Tensor, grid: SolverGrid, i: int):
    """(k_i r_phi(x0, c, t_i), k_{i+1} r_phi(x0, c, t_{i+1})) with one stacked adapter call (0.0 without an
    adapter; no call for the final point, where k = 0)."""
    if adapter is None:
        return 0.0, 0.0
    t, s = grid.times[i], grid.times[i + 1]
    k_t, k_s = _k(grid.sigmas[i]), _k(grid.sigmas[i + 1])
    if k_s == 0:
        return k_t * adapter(x0, cond, _times(t, x0)), 0.0
    if not hasattr(type(cond), "cat"):
        return k_t * adapter(x0, cond, _times(t, x0)), k_s * adapter(x0, cond, _times(s, x0))
    tt, ts = _times(t, x0), _times(s, x0)
    if tt.dtype != ts.dtype:
        tt, ts = tt.float(), ts.float()
    r_t, r_s = adapter(torch.cat([x0, x0]), type(cond).cat([cond, cond]), torch.cat([tt, ts])).chunk(2)
    return k_t * r_t, k_s * r_s


# --------------------------------------------------------------------------- the solvers


@torch.no_grad()
def sample_euler(x0_fn: Callable, x_T: torch.Tensor, timesteps: list[int], sched: Schedule, *,
                 adapter=None, cond=None, karras: bool = False, generator=None,
                 callback=None, progress=None) -> torch.Tensor:
    """Euler's method on the probability-flow ODE in sigma (Karras et al. 2022, Alg. 1 without churn;
    diffusers' EulerDiscreteScheduler), in y: with z = y / sqrt(abar),
    z_{i+1} = z_i + (sigma_{i+1} - sigma_i)(z_i - x0_hat)/sigma_i. On integer steps it is Eq. 11 exactly."""
    return _euler(x0_fn, x_T, solver_grid(sched, timesteps, karras), adapter, cond, False, generator, callback,
                  progress)


@torch.no_grad()
def sample_euler_ancestral(x0_fn: Callable, x_T: torch.Tensor, timesteps: list[int], sched: Schedule, *,
                           adapter=None, cond=None, karras: bool = False, generator=None,
                           callback=None, progress=None) -> torch.Tensor:
    """Ancestral Euler ("Euler a"; k-diffusion's sample_euler_ancestral, diffusers'
    EulerAncestralDiscreteScheduler), in y: an Euler step down to
    sigma_down = sqrt(sigma_{i+1}^2 - sigma_up^2), then fresh noise of std
    sigma_up = sqrt(sigma_{i+1}^2 (sigma_i^2 - sigma_{i+1}^2) / sigma_i^2) (in z = y / sqrt(abar))."""
    return _euler(x0_fn, x_T, solver_grid(sched, timesteps, karras), adapter, cond, True, generator, callback,
                  progress)


def _euler(x0_fn, x, grid, adapter, cond, ancestral: bool, generator, callback, progress) -> torch.Tensor:
    """The Euler loop of both; `ancestral`: fresh noise of std sigma_up after each step."""
    for i in range(len(grid)):
        sigma, sigma_next = grid.sigmas[i], grid.sigmas[i + 1]
        x0_hat = x0_fn(x, cond, _times(grid.times[i], x))
        bias, bias_next = _biases(adapter, cond, x0_hat, grid, i)
        sigma_up = math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) if ancestral else 0.0
        sigma_down = math.sqrt(sigma_next**2 - sigma_up**2) if ancestral else sigma_next
        z = (x - bias) / _alpha(sigma)
        z = z + (sigma_down - sigma) * (z - x0_hat) / sigma
        if ancestral and sigma_next > 0:
            z = z + sigma_up * _noise_like(x, generator)
        x = z * _alpha(sigma_next) + bias_next
        _report(callback, progress, step=i, t=grid.times[i], x=x, x0_hat=x0_hat)
    return x


@torch.no_grad()
def sample_heun(x0_fn: Callable, x_T: torch.Tensor, timesteps: list[int], sched: Schedule, *,
                adapter=None, cond=None, karras: bool = False, generator=None,
                callback=None, progress=None) -> torch.Tensor:
    """Heun's second-order method in sigma (Karras et al. 2022, Alg. 1; diffusers' HeunDiscreteScheduler),
    in y. The second stage is shown to the network at its Euler point translated by the step's first
    prediction, x' = y' + k_{i+1} r_phi(x0_hat, c, t_{i+1}); the last step (to sigma = 0) is Euler."""
    grid = solver_grid(sched, timesteps, karras)
    x = x_T
    for i in range(len(grid)):
        sigma, sigma_next = grid.sigmas[i], grid.sigmas[i + 1]
        x0_hat = x0_fn(x, cond, _times(grid.times[i], x))
        bias, bias_next = _biases(adapter, cond, x0_hat, grid, i)
        z = (x - bias) / _alpha(sigma)
        d = (z - x0_hat) / sigma
        z_next = z + (sigma_next - sigma) * d
        if sigma_next > 0:
            x0_second = x0_fn(z_next * _alpha(sigma_next) + bias_next, cond, _times(grid.times[i + 1], x))
            d_second = (z_next - x0_second) / sigma_next
            z_next = z + (sigma_next - sigma) * (d + d_second) / 2
        x = z_next * _alpha(sigma_next) + bias_next
        _report(callback, progress, step=i, t=grid.times[i], x=x, x0_hat=x0_hat)
    return x


def _dpmpp_2m(x0_fn, x_T, timesteps, sched, adapter, cond, karras, generator, callback, progress, sde: bool):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2; midpoint form) and its SDE variant, as diffusers'
    DPMSolverMultistepScheduler computes them (VP form: alpha = sqrt(abar), s = sqrt(1 - abar),
    lambda = log(alpha / s)). First order on the first and the last step (lower_order_final)."""
    grid = solver_grid(sched, timesteps, karras, integer_times=True)
    x, prev_x0, prev_lam = x_T, None, None
    for i in range(len(grid)):
        sigma, sigma_next = grid.sigmas[i], grid.sigmas[i + 1]
        x0_hat = x0_fn(x, cond, _times(grid.times[i], x))
        bias, bias_next = _biases(adapter, cond, x0_hat, grid, i)
        y = x - bias
        if sigma_next == 0:
            y = x0_hat  # the final jump: alpha = 1, s = 0, exp(-h) = 0
        else:
            alpha_t, s_t = _alpha(sigma), sigma * _alpha(sigma)
            alpha_n, s_n = _alpha(sigma_next), sigma_next * _alpha(sigma_next)
            lam, lam_n = math.log(alpha_t) - math.log(s_t), math.log(alpha_n) - math.log(s_n)
            h = lam_n - lam
            d = x0_hat
            if prev_x0 is not None:  # D0 + D1 / 2 with D1 = (m0 - m1) / r0, r0 = h_0 / h
                d = x0_hat + 0.5 * (x0_hat - prev_x0) * h / (lam - prev_lam)
            if sde:
                y = (s_n / s_t * math.exp(-h)) * y + (alpha_n * -math.expm1(-2.0 * h)) * d \
                    + s_n * math.sqrt(-math.expm1(-2.0 * h)) * _noise_like(x, generator)
            else:
                y = (s_n / s_t) * y - (alpha_n * math.expm1(-h)) * d
            prev_lam = lam
        prev_x0 = x0_hat
        x = y + bias_next
        _report(callback, progress, step=i, t=grid.times[i], x=x, x0_hat=x0_hat)
    return x


@torch.no_grad()
def sample_dpmpp_2m(x0_fn: Callable, x_T: torch.Tensor, timesteps: list[int], sched: Schedule, *,
                    adapter=None, cond=None, karras: bool = False, generator=None,
                    callback=None, progress=None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022; "DPM++ 2M"; diffusers' DPMSolverMultistepScheduler with
    algorithm_type dpmsolver++, solver_order 2), in y:
    y_{i+1} = (s_{i+1}/s_i) y_i - alpha_{i+1}(e^{-h} - 1)(x0_i + (x0_i - x0_{i-1}) / (2 r)), r = h_{i-1}/h_i."""
    return _dpmpp_2m(x0_fn, x_T, timesteps, sched, adapter, cond, karras, generator, callback, progress, sde=False)


@torch.no_grad()
def sample_dpmpp_2m_sde(x0_fn: Callable, x_T: torch.Tensor, timesteps: list[int], sched: Schedule, *,
                        adapter=None, cond=None, karras: bool = False, generator=None,
                        callback=None, progress=None) -> torch.Tensor:
    """SDE-DPM-Solver++(2M) ("DPM++ 2M SDE"; diffusers' algorithm_type sde-dpmsolver++, midpoint), in y:
    y_{i+1} = (s_{i+1}/s_i) e^{-h} y_i + alpha_{i+1}(1 - e^{-2h}) D + s_{i+1} sqrt(1 - e^{-2h}) z."""
    return _dpmpp_2m(x0_fn, x_T, timesteps, sched, adapter, cond, karras, generator, callback, progress, sde=True)


def _unipc_rhos(h: float, rks: list[float], order: int, corrector: bool) -> tuple[float, list[float]]:
    """B(h) and the rho coefficients of UniP-p / UniC-p (Zhao et al. 2023, bh2, data prediction), exactly as
    diffusers' UniPCMultistepScheduler computes them. `rks` are the history's r_k (without the final 1)."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = math.expm1(hh)
    rows, b, factorial = [], [], 1
    nodes = rks + [1.0]
    for i in range(1, order + 1):
        rows.append([rk ** (i - 1) for rk in nodes])
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R = torch.tensor(rows, dtype=torch.float64)
    bb = torch.tensor(b, dtype=torch.float64)
    if corrector:
        rhos = [0.5] if order == 1 else torch.linalg.solve(R, bb).tolist()
    elif not rks:
        rhos = []
    else:
        rhos = [0.5] if order == 2 else torch.linalg.solve(R[:-1, :-1], bb[:-1]).tolist()
    return b_h, rhos


@torch.no_grad()
def sample_unipc(x0_fn: Callable, x_T: torch.Tensor, timesteps: list[int], sched: Schedule, *,
                 adapter=None, cond=None, karras: bool = False, generator=None,
                 callback=None, progress=None) -> torch.Tensor:
    """UniPC (Zhao et al. 2023; diffusers' UniPCMultistepScheduler: bh2, data prediction, order 2,
    lower_order_final), in y. The network's prediction at each new point also drives the corrector
    UniC, which refines that point before the next predictor UniP leaves it: the corrected y is in
    the previous step's translation (it is computed from the previous y), maps back to x with it and
    is re-translated with the new prediction, as every step is."""
    grid = solver_grid(sched, timesteps, karras, integer_times=True)
    n = len(grid)
    lams = [math.log(_alpha(s)) - math.log(s * _alpha(s)) if s > 0 else math.inf for s in grid.sigmas]
    alphas = [_alpha(s) for s in grid.sigmas]
    noise_std = [s * _alpha(s) for s in grid.sigmas]
    x = x_T
    history: list[torch.Tensor] = []   # x0_hat at grid points 0..i
    last_y, last_bias_next, last_order = None, 0.0, 0
    for i in range(n):
        x0_hat = x0_fn(x, cond, _times(grid.times[i], x))
        bias, bias_next = _biases(adapter, cond, x0_hat, grid, i)
        if last_y is not None and i < n - 1:  # UniC-p at point i from point i-1 (unused before the final jump)
            h = lams[i] - lams[i - 1]
            m0 = history[-1]
            rks = [(lams[i - 1 - k] - lams[i - 1]) / h for k in range(1, last_order)]
            b_h, rhos = _unipc_rhos(h, rks, last_order, corrector=True)
            y_c = (noise_std[i] / noise_std[i - 1]) * last_y - (alphas[i] * math.expm1(-h)) * m0
            res = rhos[-1] * (x0_hat - m0)
            for k, rk in enumerate(rks, start=1):
                res = res + rhos[k - 1] * (history[-1 - k] - m0) / rk
            x = y_c - (alphas[i] * b_h) * res + last_bias_next   # the corrected point, back in x
        history.append(x0_hat)
        y = x - bias
        order = min(2, n - i, i + 1)
        if grid.sigmas[i + 1] == 0:
            y_next = x0_hat  # UniP-1 to sigma = 0 returns the prediction
        else:  # UniP-p from point i to i+1
            h = lams[i + 1] - lams[i]
            rks = [(lams[i - k] - lams[i]) / h for k in range(1, order)]
            b_h, rhos = _unipc_rhos(h, rks, order, corrector=False)
            y_next = (noise_std[i + 1] / noise_std[i]) * y - (alphas[i + 1] * math.expm1(-h)) * x0_hat
            for k, rk in enumerate(rks, start=1):
                y_next = y_next - (alphas[i + 1] * b_h * rhos[k - 1]) * (history[-1 - k] - x0_hat) / rk
        last_y, last_bias_next, last_order = y, bias_next, order
        x = y_next + bias_next
        _report(callback, progress, step=i, t=grid.times[i], x=x, x0_hat=x0_hat)
    return x


SOLVERS: dict[str, Callable] = {
    "dpmpp-2m": sample_dpmpp_2m,
    "dpmpp-2m-sde": sample_dpmpp_2m_sde,
    "euler": sample_euler,
    "euler-a": sample_euler_ancestral,
    "heun": sample_heun,
    "unipc": sample_unipc,
}


def sample_solver(name: str, x0_fn: Callable, x_T: torch.Tensor, timesteps: list[int], sched: Schedule, *,
                  adapter=None, cond=None, karras: bool = False, generator=None,
                  callback=None, progress=None) -> torch.Tensor:
    """Run the context-aware solver `name` (one of `SOLVERS`) along `timesteps`; see the module docstring."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {', '.join(SOLVERS)}")
    return SOLVERS[name](x0_fn, x_T, timesteps, sched, adapter=adapter, cond=cond, karras=karras,
                         generator=generator, callback=callback, progress=progress)
