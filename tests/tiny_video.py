"""A tiny pixel video model for tests: any weights will do where a property holds for every model."""

from dataclasses import replace
from pathlib import Path

import torch

from ctxdiff.formats.t2i import save_t2i_bundle
from ctxdiff.models.adapter import ADAPTER_PRESETS, build_adapter
from ctxdiff.models.encoders import ClipConfig, load_clip
from ctxdiff.models.stage import Stage
from ctxdiff.models.unet import UNET_PRESETS, UNet
from ctxdiff.pipelines.video_model import VideoModel
from ctxdiff.recipes import DiffusionConfig


def tiny_video_bundle(folder: Path, seed: int = 0) -> Path:
    """An untrained 16x16 t2i bundle (tiny CLIP, U-Net, CLIP-branch adapter), weights perturbed."""
    torch.manual_seed(seed)
    clip = load_clip(ClipConfig(arch="tiny-clip"))
    unet = UNet(replace(UNET_PRESETS["tiny"], image_size=16, timesteps=100))
    adapter = build_adapter(replace(ADAPTER_PRESETS["tiny"], x_shape=(3, 16, 16), patch_size=4, timesteps=100), clip)
    with torch.no_grad():
        for p in [*unet.parameters(), *adapter.parameters()]:
            p.add_(0.05 * torch.randn_like(p))
    return save_t2i_bundle(folder / f"tiny-{seed}.safetensors", clip, {"": Stage(unet, adapter)},
                           {"diffusion": DiffusionConfig(schedule="cosine", timesteps=100)})


def tiny_video_model(folder: Path, seed: int = 0) -> VideoModel:
    return VideoModel.load(tiny_video_bundle(folder, seed))
