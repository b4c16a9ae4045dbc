"""The variational bound in bits/dim (paper Eq. 4, Appendix A.2-A.3; Ho et al. 2020, Sec. 3.3).

    -log p(x_0|c) <= KL(q(x_T|x_0,c) || N(0, I))                           prior
                   + sum_{t=2}^T KL(q(x_{t-1}|x_t,x_0,c) || p(x_{t-1}|x_t,c))  diffusion
                   - log p(x_0 | x_1, c)                                      decoder

p(x_{t-1}|x_t,c) is Eq. 7 with the posterior variance beta~_t, so each diffusion term is
||mu~(x_t, x_0, r(x_0)) - mu~(x_t, x0_hat, r(x0_hat))||^2 / (2 beta~_t) for one draw of x_t.
The decoder is Ho et al.'s discretised Gaussian over 256 bins on [-1, 1] with mean
x0_hat(x_1) and variance beta_1. With r == 0 this is exactly the DDPM bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ctxdiff.diffusion.process import context_bias, q_posterior, q_sample
from ctxdiff.diffusion.schedule import Schedule


@dataclass
class BitsPerDim:
    """Per-sample terms of the bound, each in bits/dim; `total` is their sum."""

    prior: torch.Tensor
    diffusion: torch.Tensor
    decoder: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        return self.prior + self.diffusion + self.decoder


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretized_gaussian_nll(x0: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """-log P(x0) per element for a Gaussian discretised to `bins` bins on [-1, 1] (edges open)."""
    half = 1.0 / (bins - 1)
    upper = _approx_std_normal_cdf((x0 + half - mean) / std)
    lower = _approx_std_normal_cdf((x0 - half - mean) / std)
    upper = torch.where(x0 > 1 - 1e-3, torch.ones_like(upper), upper)
    lower = torch.where(x0 < -1 + 1e-3, torch.zeros_like(lower), lower)
    return -(upper - lower).clamp(min=1e-12).log()


def gaussian_kl(mean_q, var_q, mean_p, var_p) -> torch.Tensor:
    """KL(N(mean_q, var_q) || N(mean_p, var_p)) per element."""
    return 0.5 * (torch.log(var_p / var_q) + (var_q + (mean_q - mean_p) ** 2) / var_p - 1.0)


@torch.no_grad()
def variational_bound(sched: Schedule, x0_fn: Callable, x0: torch.Tensor, cond=None, adapter=None,
                      num_timesteps: Optional[int] = None,
                      generator: Optional[torch.Generator] = None) -> BitsPerDim:
    """Bits/dim of the bound for data x0 in [-1, 1] (one draw of x_t per diffusion term). The
    networks see inputs in x0's dtype; the terms are computed in float64.

    `num_timesteps` = None sums all T - 1 diffusion terms; an integer n estimates the sum without
    bias from n steps drawn uniformly from 2..T (scaled by (T - 1) / n).
    """
    dtype = x0.dtype  # networks run in the data's dtype; the bound is accumulated in float64
    x0 = x0.double()
    network, x0_fn = x0_fn, lambda x, c, t: network(x.to(dtype), c, t).double()
    if adapter is not None:
        adapter_net, adapter = adapter, lambda x, c, t: adapter_net(x.to(dtype), c, t).double()
    dims = x0[0].numel()
    to_bits = 1.0 / (dims * math.log(2.0))

    def per_sample(v):
        return v.flatten(1).sum(1) * to_bits

    T = sched.T
    abar_T = sched.at("alpha_bar", T, x0)
    prior_mean = abar_T.sqrt() * x0 + context_bias(sched, x0, T, adapter, cond)
    prior = per_sample(gaussian_kl(prior_mean, 1 - abar_T, torch.zeros_like(x0), torch.ones_like(x0)))

    if num_timesteps is None:
        steps, scale = range(2, T + 1), 1.0
    else:
        steps = (torch.randint(2, T + 1, (num_timesteps,), generator=generator) if T >= 2 else torch.zeros(0)).tolist()
        scale = (T - 1) / max(num_timesteps, 1)
    diffusion = torch.zeros(x0.shape[0], dtype=torch.float64, device=x0.device)
    for t in steps:
        x_t = q_sample(sched, x0, t, adapter, cond, noise=_randn(x0, generator))
        mean_q, var = q_posterior(sched, x_t, x0, t, adapter, cond)
        x0_hat = x0_fn(x_t, cond, torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device))
        mean_p, _ = q_posterior(sched, x_t, x0_hat, t, adapter, cond)
        diffusion += per_sample((mean_q - mean_p) ** 2 / (2 * var)) * scale

    x_1 = q_sample(sched, x0, 1, adapter, cond, noise=_randn(x0, generator))
    x0_hat = x0_fn(x_1, cond, torch.ones(x0.shape[0], dtype=torch.long, device=x0.device))
    decoder = per_sample(discretized_gaussian_nll(x0, x0_hat, sched.at("betas", 1, x0).sqrt()))
    return BitsPerDim(prior, diffusion, decoder)


def _randn(like: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Noise drawn on the generator's device (a CPU generator serves CUDA data too), moved to the data's."""
    device = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=device).to(like.device)
