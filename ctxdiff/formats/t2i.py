"""The t2i bundle (kind "t2i", written by `ctxdiff train`): the modules `clip`, `unet`, `adapter` and,
for a cascade, `sr_unet`, `sr_adapter`, with their configs, the noise process (`diffusion`) and the
sampling defaults (`sample`), so `--model file.safetensors` is all a user passes."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import torch

from ctxdiff.checkpoints import save_bundle
from ctxdiff.models.encoders import ClipEncoders
from ctxdiff.models.stage import Stage

BUNDLE_KIND = "t2i"
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "assets" / "shapes-default.safetensors"


def save_t2i_bundle(path: str | Path, clip: ClipEncoders, stages: dict[str, Stage], configs: dict,
                    extra: dict | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write a t2i bundle; `stages` maps '' (base) and 'sr_' to their stage."""
    modules: dict[str, torch.nn.Module] = {"clip": clip.clip}
    all_configs = {"clip": replace(clip.config, weights=None), **configs}
    for prefix, stage in stages.items():
        modules[f"{prefix}unet"] = stage.unet
        all_configs[f"{prefix}unet"] = stage.unet.config
        all_configs[f"{prefix}adapter"] = stage.adapter.config if stage.adapter is not None else None
        if stage.adapter is not None:
            modules[f"{prefix}adapter"] = stage.adapter
    return save_bundle(path, modules, {k: asdict(v) if hasattr(v, "__dataclass_fields__") else v
                                       for k, v in all_configs.items()}, kind=BUNDLE_KIND, dtype=dtype, extra=extra)
