"""The contextualized forward and reverse processes (ContextDiff, Eq. 1-11).

Every function takes tensors and callables only (no networks, no files):
- `adapter(x0, cond, t) -> r` is the context-aware adapter r_phi, shaped like x0; None means r = 0.
- `t`, `s` are paper steps (see schedule.py): a Python int or a LongTensor of shape [B].
The bias enters every equation as k_t r_phi(x0, c, t).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ctxdiff.diffusion.schedule import Schedule

Adapter = Callable[[torch.Tensor, object, torch.Tensor], torch.Tensor]


PREDICTION_TYPES = ("sample", "epsilon", "v_prediction")


def x0_from_output(prediction_type: str, out: torch.Tensor, x_t: torch.Tensor,
                   alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """x0_hat = f_theta(x_t, c, t) of Eq. 6 from a network output `out` under a parameterisation.

        sample:        x0_hat = out
        epsilon:       x0_hat = (x_t - sqrt(1 - abar_t) out) / sqrt(abar_t)
        v_prediction:  x0_hat = sqrt(abar_t) x_t - sqrt(1 - abar_t) out   (Salimans & Ho 2022)

    Under Eq. 1 the network sees x_t with the bias k_t r_t in it, so its epsilon/v target is the
    *effective* noise eps' = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t) (v: sqrt(abar_t) eps' -
    sqrt(1 - abar_t) x0); each formula inverts Eq. 1 exactly for that target, so Eq. 6's loss and
    every sampler stay in x0 terms. v_prediction is the identity on x_t at t -> 0 and a direct x0
    prediction at t -> T: its target has unit scale at every step. `alpha_bar_t` broadcasts
    against x_t; the arithmetic runs in x_t's dtype.
    """
    if prediction_type == "sample":
        return out
    a, s = (c.to(device=x_t.device, dtype=x_t.dtype) for c in (alpha_bar_t.sqrt(), (1 - alpha_bar_t).sqrt()))
    out = out.to(x_t.dtype)
    if prediction_type == "epsilon":
        return (x_t - s * out) / a
    if prediction_type == "v_prediction":
        return a * x_t - s * out
    raise ValueError(f"unknown prediction type {prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)}")


def _as_batch(t: int | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if isinstance(t, int):
        return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    return t


def context_bias(sched: Schedule, x0: torch.Tensor, t: int | torch.Tensor,
                 adapter: Optional[Adapter], cond) -> torch.Tensor | float:
    """k_t r_phi(x0, c, t): the mean shift of the marginal (Eq. 1). Zero without an adapter or at t = 0."""
    if adapter is None or (isinstance(t, int) and t == 0):
        return 0.0
    return sched.at("k", t, x0) * adapter(x0, cond, _as_batch(t, x0))


def context_biases(sched: Schedule, x0: torch.Tensor, t: int | torch.Tensor, s: int | torch.Tensor,
                   adapter: Optional[Adapter], cond) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """(k_t r_phi(x0, c, t), k_s r_phi(x0, c, s)) with one adapter call on the stacked batch
    (every step of Eq. 2, 3, 9, 11 and the inversion needs the bias at two steps of one x0)."""
    if adapter is None or not hasattr(type(cond), "cat") or (isinstance(s, int) and s == 0):
        return context_bias(sched, x0, t, adapter, cond), context_bias(sched, x0, s, adapter, cond)
    both = adapter(torch.cat([x0, x0]), type(cond).cat([cond, cond]),
                   torch.cat([_as_batch(t, x0), _as_batch(s, x0)]))
    r_t, r_s = both.chunk(2)
    return sched.at("k", t, x0) * r_t, sched.at("k", s, x0) * r_s


def q_sample(sched: Schedule, x0: torch.Tensor, t: int | torch.Tensor, adapter: Optional[Adapter] = None,
             cond=None, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Draw x_t ~ q(x_t | x_0, c) = N(sqrt(abar_t) x_0 + k_t r_t, (1 - abar_t) I)   (Eq. 1)."""
    noise = torch.randn_like(x0) if noise is None else noise
    abar = sched.at("alpha_bar", t, x0)
    return abar.sqrt() * x0 + context_bias(sched, x0, t, adapter, cond) + (1 - abar).sqrt() * noise


def q_transition(sched: Schedule, x_prev: torch.Tensor, x0: torch.Tensor, t: int | torch.Tensor,
                 adapter: Optional[Adapter] = None, cond=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of q(x_t | x_{t-1}, x_0, c)   (Eq. 2).

    mean = sqrt(alpha_t) x_{t-1} + k_t r_t - sqrt(alpha_t) k_{t-1} r_{t-1},  variance = beta_t.
    """
    alpha = sched.at("alphas", t, x0)
    bias_t, bias_prev = context_biases(sched, x0, t, t - 1, adapter, cond)
    return alpha.sqrt() * x_prev + bias_t - alpha.sqrt() * bias_prev, sched.at("betas", t, x0)


def posterior_variance(sched: Schedule, t: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t   (Eq. 3); 0 at t = 1."""
    abar, abar_prev = sched.at("alpha_bar", t, like), sched.at("alpha_bar", t - 1, like)
    return (1 - abar_prev) / (1 - abar) * sched.at("betas", t, like)


def q_posterior(sched: Schedule, x_t: torch.Tensor, x0: torch.Tensor, t: int | torch.Tensor,
                adapter: Optional[Adapter] = None, cond=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of q(x_{t-1} | x_t, x_0, c)   (Eq. 3, Proposition 1).

    mu~ = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x_0
        + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) (x_t - k_t r_t) + k_{t-1} r_{t-1}
    """
    abar, abar_prev = sched.at("alpha_bar", t, x0), sched.at("alpha_bar", t - 1, x0)
    alpha, beta = sched.at("alphas", t, x0), sched.at("betas", t, x0)
    coef_x0 = abar_prev.sqrt() * beta / (1 - abar)
    coef_xt = alpha.sqrt() * (1 - abar_prev) / (1 - abar)
    bias_t, bias_prev = context_biases(sched, x0, t, t - 1, adapter, cond)
    mean = coef_x0 * x0 + coef_xt * (x_t - bias_t) + bias_prev
    return mean, posterior_variance(sched, t, x0)


def _add_noise(mean: torch.Tensor, std: torch.Tensor, noise: Optional[torch.Tensor]) -> torch.Tensor:
    if not torch.any(std > 0):
        return mean
    return mean + std * (torch.randn_like(mean) if noise is None else noise)


def ddpm_step(sched: Schedule, x_t: torch.Tensor, t: int | torch.Tensor, x0_hat: torch.Tensor,
              adapter: Optional[Adapter] = None, cond=None, noise: Optional[torch.Tensor] = None,
              variance: str = "posterior") -> torch.Tensor:
    """Context-aware ancestral step x_t -> x_{t-1}   (Eq. 7).

    The mean is Eq. 3 with x_0 -> x0_hat and r -> r_phi(x0_hat, c, .); the variance is beta~_t
    (`variance="posterior"`) or beta_t (`"beta"`). At t = 1 no noise is added (x_0 = x0_hat).
    """
    mean, post_var = q_posterior(sched, x_t, x0_hat, t, adapter, cond)
    if variance == "posterior":
        var = post_var
    elif variance == "beta":
        var = sched.at("betas", t, x0_hat) * (sched.at("alpha_bar", t - 1, x0_hat) < 1)
    else:
        raise ValueError(f"variance must be 'posterior' or 'beta', got {variance!r}")
    return _add_noise(mean, var.sqrt(), noise)


def predicted_noise(sched: Schedule, x_t: torch.Tensor, t: int | torch.Tensor, x0_hat: torch.Tensor,
                    adapter: Optional[Adapter] = None, cond=None, bias_t=None) -> torch.Tensor:
    """eps_hat = (x_t - sqrt(abar_t) x0_hat - k_t r_phi(x0_hat, c, t)) / sqrt(1 - abar_t)   (Eq. 11); t >= 1.
    `bias_t` passes k_t r_phi(x0_hat, c, t) when it is already known."""
    abar = sched.at("alpha_bar", t, x0_hat)
    if bias_t is None:
        bias_t = context_bias(sched, x0_hat, t, adapter, cond)
    return (x_t - abar.sqrt() * x0_hat - bias_t) / (1 - abar).sqrt()


def ddim_sigma(sched: Schedule, t: int | torch.Tensor, s: int | torch.Tensor, eta: float,
               like: torch.Tensor) -> torch.Tensor:
    """sigma = eta sqrt((1 - abar_s)/(1 - abar_t)) sqrt(1 - abar_t/abar_s)   (Eq. 9)."""
    abar_t, abar_s = sched.at("alpha_bar", t, like), sched.at("alpha_bar", s, like)
    return eta * ((1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s)).sqrt()


def _jump(sched: Schedule, x_from: torch.Tensor, t_from, t_to, x0_hat: torch.Tensor, adapter, cond,
          sigma: torch.Tensor) -> torch.Tensor:
    """The mean of Eq. 9 for a jump t_from -> t_to (either direction; sigma = 0 for Eq. 11 and the inversion):
    sqrt(abar_to) x0_hat + k_to r_to + sqrt(1 - abar_to - sigma^2) eps_hat(x_from)."""
    bias_from, bias_to = context_biases(sched, x0_hat, t_from, t_to, adapter, cond)
    eps_hat = predicted_noise(sched, x_from, t_from, x0_hat, bias_t=bias_from)
    abar_to = sched.at("alpha_bar", t_to, x0_hat)
    return abar_to.sqrt() * x0_hat + bias_to + (1 - abar_to - sigma**2).clamp(min=0).sqrt() * eps_hat


def ddim_step(sched: Schedule, x_t: torch.Tensor, t: int | torch.Tensor, s: int | torch.Tensor,
              x0_hat: torch.Tensor, adapter: Optional[Adapter] = None, cond=None, eta: float = 0.0,
              noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Context-aware DDIM jump x_t -> x_s for any earlier step s < t   (Eq. 9; eta = 0 gives Eq. 11).

    x_s = sqrt(abar_s) x0_hat + k_s r_s + sqrt(1 - abar_s - sigma^2) eps_hat + sigma z,
    with eps_hat from `predicted_noise` and r_. = r_phi(x0_hat, c, .).
    """
    sigma = ddim_sigma(sched, t, s, eta, x0_hat)
    return _add_noise(_jump(sched, x_t, t, s, x0_hat, adapter, cond, sigma), sigma, noise)


def ddim_invert_step(sched: Schedule, x_s: torch.Tensor, s: int | torch.Tensor, t: int | torch.Tensor,
                     x0_hat: torch.Tensor, adapter: Optional[Adapter] = None, cond=None) -> torch.Tensor:
    """DDIM inversion x_s -> x_t (t > s >= 1): the exact inverse of Eq. 11 for a fixed x0_hat.

    eps_hat = (x_s - sqrt(abar_s) x0_hat - k_s r_s) / sqrt(1 - abar_s)
    x_t     = sqrt(abar_t) x0_hat + k_t r_t + sqrt(1 - abar_t) eps_hat
    """
    return _jump(sched, x_s, s, t, x0_hat, adapter, cond, sigma=torch.zeros((), dtype=x0_hat.dtype))


LOSS_WEIGHTINGS = ("constant", "snr", "snr_plus_one", "min_snr")


def loss_weights(sched: Schedule, t: torch.Tensor, weighting: str = "constant", gamma: float = 5.0) -> torch.Tensor:
    """lambda_t of Eq. 6 (on the x0 error). `constant`: 1 (the paper). `snr`: SNR_t (equals the
    epsilon-prediction loss). `snr_plus_one`: SNR_t + 1 (equals the v-prediction loss, Salimans &
    Ho 2022: a v-output net gets the same gradient scale at every t). `min_snr`: min(SNR_t, gamma)
    (Hang et al. 2023, for x0-prediction)."""
    if weighting == "constant":
        return torch.ones(t.shape, dtype=torch.float64, device=t.device)
    snr = sched.snr(t.cpu()).to(t.device)
    if weighting == "snr":
        return snr
    if weighting == "snr_plus_one":
        return snr + 1
    if weighting == "min_snr":
        return snr.clamp(max=gamma)
    raise ValueError(f"unknown loss weighting {weighting!r}; choose one of {', '.join(LOSS_WEIGHTINGS)}")


def sample_timesteps(n: int, T: int, generator: Optional[torch.Generator] = None, high_noise_share: float = 0.0,
                     high_noise_from: float = 0.9) -> torch.Tensor:
    """n training steps t in 1..T: uniform, except that a `high_noise_share` of them (each with
    that probability) is uniform over the steps above `high_noise_from` * T.

    At the highest noise levels x_t shows almost nothing of x_0, so the layout ("on the left") can
    only be learned there, from the text; uniform t gives those steps a few percent of the batch.
    Drawing more of them reweights Eq. 6 towards them (lambda_t times the sampling density)."""
    t = torch.randint(1, T + 1, (n,), generator=generator)
    if high_noise_share > 0:
        high = torch.randint(int(high_noise_from * T) + 1, T + 1, (n,), generator=generator)
        t = torch.where(torch.rand(n, generator=generator) < high_noise_share, high, t)
    return t


def diffusion_loss(sched: Schedule, x0_fn: Callable, x0: torch.Tensor, cond=None,
                   adapter: Optional[Adapter] = None, t: Optional[torch.Tensor] = None,
                   noise: Optional[torch.Tensor] = None, weighting: str = "constant",
                   gamma: float = 5.0) -> torch.Tensor:
    """L = E[lambda_t || x_0 - f_theta(x_t, c, t) ||^2]   (Eq. 6), x_t drawn by Eq. 1.

    x_t is reparameterised, so the gradient reaches the adapter only through x_t; the denoiser and
    the adapter are trained jointly. `t` defaults to uniform over 1..T. Returns the batch mean of
    the per-sample weighted mean squared error.
    """
    if t is None:
        t = sample_timesteps(x0.shape[0], sched.T).to(x0.device)
    x_t = q_sample(sched, x0, t, adapter, cond, noise)
    per_sample = (x0 - x0_fn(x_t, cond, t)).float().pow(2).flatten(1).mean(1)
    return (loss_weights(sched, t, weighting, gamma).to(per_sample) * per_sample).mean()
