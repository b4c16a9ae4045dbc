"""The latent (Stable Diffusion 1.x/2.x) backbone: U-Net, VAE, CLIP text, checkpoint loading.

`load_sd(path)` reads a CompVis single file or a diffusers folder; `as_x0_predictor` turns the
U-Net's epsilon or v output into the x0 prediction the ContextDiff core works with.
"""

from __future__ import annotations

import torch
from torch import nn

from ctxdiff.diffusion.process import x0_from_output
from ctxdiff.models.conditioning import TextCondition
from ctxdiff.models.latent.loader import (
    PREDICTION_TYPES, LatentModels, LatentSDConfig, SchedulerInfo, load_sd, save_compvis,
)
from ctxdiff.models.latent.text import LatentTextConfig, LatentTextEncoder, tokenize
from ctxdiff.models.latent.unet import LatentUNet, LatentUNetConfig
from ctxdiff.models.latent.vae import LatentDistribution, LatentVAE, LatentVAEConfig

__all__ = [
    "EpsToX0", "LatentDistribution", "LatentModels", "LatentSDConfig", "LatentTextConfig", "LatentTextEncoder",
    "LatentUNet", "LatentUNetConfig", "LatentVAE", "LatentVAEConfig", "PREDICTION_TYPES", "SchedulerInfo",
    "as_x0_predictor", "load_sd", "save_compvis", "tokenize",
]


class EpsToX0(nn.Module):
    """x0_fn(x_t, cond, t) -> x0_hat for a U-Net trained to predict epsilon or v (Eq. 6's f_theta).

    Timesteps: `t` is the paper step in 1..T (a number or [B]); the U-Net is called with the
    diffusers timestep tau = t - 1. `alphas_cumprod` is paper-indexed, [T + 1] with abar_0 = 1
    (`SchedulerInfo.alphas_cumprod()`). A fractional t (Euler and Heun on Karras sigmas) reads
    abar with log sigma linear between the two steps around it, as `diffusion.solvers.sigma_at`
    does, and gives the U-Net the fractional tau (diffusers' Euler schedulers do the same).

        epsilon:       x0_hat = (x_t - sqrt(1 - abar_t) out) / sqrt(abar_t)
        v_prediction:  x0_hat = sqrt(abar_t) x_t - sqrt(1 - abar_t) out

    Under ContextDiff's marginal x_t = sqrt(abar_t) x0 + k_t r_t + sqrt(1 - abar_t) eps (Eq. 1)
    the U-Net sees x_t itself, bias included, and its output is read as the *effective* noise
    eps' = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t) = eps + k_t r_t / sqrt(1 - abar_t) (for v:
    sqrt(abar_t) eps' - sqrt(1 - abar_t) x0): both formulas above invert Eq. 1 exactly for that
    target, and Eq. 6's loss is (1 - abar_t) / abar_t ||eps' - out||^2. With r = 0, eps' = eps is
    Stable Diffusion's own target, so a pretrained U-Net is the r = 0 solution and a zero-initialised
    adapter starts from plain SD. The adapter learns through x_t (the gradient of Eq. 6 reaches
    r_phi through the U-Net's input), which is why the U-Net must not be shown x_t - k_t r_t: with
    the true r_t(x_0) removed, neither the U-Net's input nor x0_hat depends on phi, the gradient to
    the adapter is identically zero, frozen U-Net or not (ctxdiff/pipelines/latent.py).

    The U-Net runs in its own dtype (fp16 on GPUs); the conversion runs in x_t's (float32 latents).
    """

    def __init__(self, unet: nn.Module, alphas_cumprod: torch.Tensor, prediction_type: str):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
        if abar.ndim != 1 or abar.shape[0] < 2 or abar[0] != 1:
            raise ValueError("alphas_cumprod must be paper-indexed: shape [T + 1] with alphas_cumprod[0] = 1")
        self.unet = unet
        self.prediction_type = prediction_type
        self.abar = abar  # float64 on the CPU on purpose: not a buffer, so .half() cannot round it

    def forward(self, x_t: torch.Tensor, cond: TextCondition | torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        t = torch.as_tensor(t).cpu()
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        if bool(((t < 1) | (t > self.abar.shape[0] - 1)).any()):
            raise ValueError(f"paper steps must lie in 1..{self.abar.shape[0] - 1}, got {t.tolist()}")
        if t.is_floating_point() and bool((t != t.round()).any()):
            abar = self._abar_between(t.double())
        else:
            t = t.round().long()
            abar = self.abar[t]
        abar = abar.view(-1, *[1] * (x_t.ndim - 1))
        context = cond.tokens if isinstance(cond, TextCondition) else cond
        weight = next(self.unet.parameters(), None) if isinstance(self.unet, nn.Module) else None
        dtype = x_t.dtype if weight is None else weight.dtype
        out = self.unet(x_t.to(dtype), (t - 1).to(x_t.device), context.to(dtype))
        return x0_from_output(self.prediction_type, out, x_t, abar)

    def _abar_between(self, t: torch.Tensor) -> torch.Tensor:
        """abar at fractional paper steps: log sigma (sigma^2 = (1 - abar) / abar) linear in t."""
        log_sigma = 0.5 * torch.log((1 - self.abar[1:]) / self.abar[1:])      # steps 1..T
        low = t.floor().long().clamp(1, len(log_sigma))
        high = (low + 1).clamp(max=len(log_sigma))
        w = t - low
        mixed = (1 - w) * log_sigma[low - 1] + w * log_sigma[high - 1]
        return 1 / (1 + torch.exp(2 * mixed))


def as_x0_predictor(unet: nn.Module, alphas_cumprod: torch.Tensor, prediction_type: str) -> EpsToX0:
    """The x0_fn(x_t, cond, t) of an SD U-Net; see `EpsToX0` for conventions."""
    return EpsToX0(unet, alphas_cumprod, prediction_type)
