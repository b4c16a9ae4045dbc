"""Tiny random Stable-Diffusion-shaped models for tests (seconds on a CPU): U-Net latents 8x8 ->
16x16 images (the VAE halves once); text width 64."""

import torch

from ctxdiff.models.latent import (LatentModels, LatentSDConfig, LatentTextConfig, LatentTextEncoder, LatentUNet,
                                   LatentUNetConfig, LatentVAE, LatentVAEConfig, SchedulerInfo)

TINY_SD = LatentSDConfig(
    LatentUNetConfig(block_out_channels=(32, 64), layers_per_block=1, attention_levels=(True, False),
                     num_attention_heads=8, cross_attention_dim=64, sample_size=8),
    LatentVAEConfig(block_out_channels=(32, 32), layers_per_block=1),
    LatentTextConfig(width=64, layers=2, heads=1, intermediate_size=128))


def tiny_sd_models(seed: int, config: LatentSDConfig = TINY_SD, prediction_type: str = "epsilon") -> LatentModels:
    torch.manual_seed(seed)
    return LatentModels(LatentUNet(config.unet).eval(), LatentVAE(config.vae).eval(),
                        LatentTextEncoder(config.text).eval(), config, prediction_type, SchedulerInfo())
