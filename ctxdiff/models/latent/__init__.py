"""The latent (Stable Diffusion 1.x/2.x) backbone: U-Net, VAE, CLIP text, checkpoint loading.

`load_sd(path)` reads a CompVis single file or a diffusers folder; `as_x0_predictor` turns the
U-Net's epsilon or v output into the x0 prediction the ContextDiff core works with.
"""

from __future__ import annotations

import torch
from torch import nn

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
    """x0_fn(x_t, cond, t, bias=None) -> x0_hat for a U-Net trained to predict epsilon or v.

    Timesteps: `t` is the paper step in 1..T (a number or [B]); the U-Net is called with the
    diffusers timestep tau = t - 1. `alphas_cumprod` is paper-indexed, [T + 1] with abar_0 = 1
    (`SchedulerInfo.alphas_cumprod()`).

        epsilon:       x0_hat = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t)
        v_prediction:  x0_hat = sqrt(abar_t) x - sqrt(1 - abar_t) v

    with x = x_t - bias. `bias` is the adapter's mean shift k_t r_t: ContextDiff's marginal is
    x_t = sqrt(abar_t) x0 + k_t r_t + sqrt(1 - abar_t) eps (math.md, Eq. 1), so removing the shift
    first gives the bias-free x_t a pretrained SD U-Net was trained on; both the U-Net's input and
    the inversion use it. bias=None (or r = 0) is plain Stable Diffusion.
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

    def forward(self, x_t: torch.Tensor, cond: TextCondition | torch.Tensor, t: torch.Tensor | int,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        t = torch.as_tensor(t).cpu().long()
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        if bool(((t < 1) | (t >= self.abar.shape[0])).any()):
            raise ValueError(f"paper steps must lie in 1..{self.abar.shape[0] - 1}, got {t.tolist()}")
        abar = self.abar[t].view(-1, *[1] * (x_t.ndim - 1))
        a, s = (c.to(device=x_t.device, dtype=x_t.dtype) for c in (abar.sqrt(), (1 - abar).sqrt()))
        x = x_t if bias is None else x_t - bias
        context = cond.tokens if isinstance(cond, TextCondition) else cond
        out = self.unet(x, (t - 1).to(x_t.device), context)
        return (x - s * out) / a if self.prediction_type == "epsilon" else a * x - s * out


def as_x0_predictor(unet: nn.Module, alphas_cumprod: torch.Tensor, prediction_type: str) -> EpsToX0:
    """The x0_fn(x_t, cond, t, bias=None) of an SD U-Net; see `EpsToX0` for conventions."""
    return EpsToX0(unet, alphas_cumprod, prediction_type)
