"""One resolution of a cascade: the denoiser f_theta with its context-aware adapter r_phi."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ctxdiff.models.adapter import ContextAdapter
from ctxdiff.models.conditioning import TextCondition
from ctxdiff.models.unet import UNet


@dataclass
class Stage:
    """One resolution of the cascade: the denoiser f_theta and its adapter r_phi (None: r = 0)."""

    unet: UNet
    adapter: ContextAdapter | None

    def x0_fn(self, lowres: torch.Tensor | None = None, lowres_t: torch.Tensor | None = None,
              clip_x0: bool = True) -> Callable:
        """x0_fn(x_t, cond, t) for the samplers; a doubled (guided) batch repeats the low-res input."""

        def predict(x: torch.Tensor, cond: TextCondition, t: torch.Tensor) -> torch.Tensor:
            lr, lt = lowres, lowres_t
            if lr is not None and lr.shape[0] != x.shape[0]:
                repeat = x.shape[0] // lr.shape[0]
                lr, lt = lr.repeat(repeat, 1, 1, 1), lt.repeat(repeat)
            x0 = self.unet(x, t, cond, lowres=lr, lowres_t=lt)
            return x0.clamp(-1, 1) if clip_x0 else x0

        return predict
