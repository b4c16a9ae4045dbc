"""The low-resolution condition of a super-resolution stage (Imagen's noise conditioning
augmentation): degrade, upsample, and noise the low-res image by a level in [0, 1]."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def downsample(images: torch.Tensor, size: int) -> torch.Tensor:
    """Anti-aliased bicubic resize of [-1, 1] images to size x size."""
    return F.interpolate(images, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)


def upsample(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic upsampling of [-1, 1] images to size x size (the SR U-Net's `lowres` input)."""
    return F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


def noise_augment(lowres: torch.Tensor, level: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Noise the low-res condition to `level` (per sample, in [0, 1]) on the continuous cosine
    schedule: sqrt(abar(l)) x + sqrt(1 - abar(l)) eps, abar(l) = cos^2((l + s)/(1 + s) pi/2)/cos^2(s/(1+s) pi/2)."""
    s = 0.008
    abar = (torch.cos((level + s) / (1 + s) * math.pi / 2) / math.cos(s / (1 + s) * math.pi / 2)) ** 2
    abar = abar.clamp(0, 1).reshape(-1, 1, 1, 1).to(lowres.dtype)
    return abar.sqrt() * lowres + (1 - abar).sqrt() * noise
