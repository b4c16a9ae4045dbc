"""The t2i bundle (kind "t2i", written by `ctxdiff train`): the modules `clip`, `unet`, `adapter` and,
for a cascade, `sr_unet`, `sr_adapter`, with their configs, the noise process (`diffusion`) and the
sampling defaults (`sample`), so `--model file.safetensors` is all a user passes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ctxdiff.checkpoints import load_bundle, save_bundle
from ctxdiff.errors import CtxdiffError, UsageError
from ctxdiff.models.adapter import AdapterConfig
from ctxdiff.models.conditions import ConditionConfig
from ctxdiff.models.encoders import ClipConfig, ClipEncoders
from ctxdiff.models.stage import Stage
from ctxdiff.models.unet import UNetConfig
from ctxdiff.recipes import DiffusionConfig, SampleConfig, from_dict

BUNDLE_KIND = "t2i"
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "assets" / "shapes-default.safetensors"


def save_t2i_bundle(path: str | Path, clip: ClipEncoders, stages: dict[str, Stage], configs: dict,
                    extra: dict | None = None, dtype: torch.dtype | None = None,
                    condition: torch.nn.Module | None = None) -> Path:
    """Write a t2i bundle; `stages` maps '' (base) and 'sr_' to their stage. `condition`: the
    `ConditionEncoder` of a class or layout model (module and config `condition`, with its labels)."""
    modules: dict[str, torch.nn.Module] = {"clip": clip.clip}
    all_configs = {"clip": replace(clip.config, weights=None), **configs}
    if condition is not None:
        modules["condition"], all_configs["condition"] = condition, condition.config
    for prefix, stage in stages.items():
        modules[f"{prefix}unet"] = stage.unet
        all_configs[f"{prefix}unet"] = stage.unet.config
        all_configs[f"{prefix}adapter"] = stage.adapter.config if stage.adapter is not None else None
        if stage.adapter is not None:
            modules[f"{prefix}adapter"] = stage.adapter
    return save_bundle(path, modules, {k: asdict(v) if hasattr(v, "__dataclass_fields__") else v
                                       for k, v in all_configs.items()}, kind=BUNDLE_KIND, dtype=dtype, extra=extra)


@dataclass
class T2IFile:
    """A read t2i bundle, validated: the configs of every module as dataclasses, and the tensors."""

    path: Path
    clip: ClipConfig
    stages: dict[str, tuple[UNetConfig, AdapterConfig | None]]   # '' (base) and, for a cascade, 'sr_'
    diffusion: DiffusionConfig
    sample: SampleConfig
    tensors: dict[str, dict[str, torch.Tensor]]
    condition: ConditionConfig | None = None   # a class or layout model's condition (None: text)

    @classmethod
    def read(cls, path: str | Path) -> "T2IFile":
        """Read and check `path` (kind, configs against today's dataclasses, the tensors every
        module needs); what is wrong is a CtxdiffError naming the file (exit 1)."""
        path = Path(path)
        bundle = load_bundle(path, kind=BUNDLE_KIND)
        configs, tensors = bundle.configs, bundle.tensors
        if not isinstance(configs, dict):
            raise _damaged(path, f"its configs are a {type(configs).__name__}, not a mapping")
        missing = [f"{name} config" for name in ("clip", "unet", "diffusion") if name not in configs]
        missing += [f"{name} tensors" for name in ("clip", "unet") if name not in tensors]
        if missing:
            raise _damaged(path, f"it has no {', '.join(missing)}")
        try:
            stages = {prefix: (from_dict(UNetConfig, configs[f"{prefix}unet"], f"{prefix}unet"),
                               None if configs.get(f"{prefix}adapter") is None else
                               from_dict(AdapterConfig, configs[f"{prefix}adapter"], f"{prefix}adapter"))
                      for prefix in ("", "sr_") if f"{prefix}unet" in tensors}
            sample = from_dict(SampleConfig, configs.get("sample", {}), "sample")
            if sample.lowres_noise_level is None:   # the level its SR stage was trained with
                sample = replace(sample, lowres_noise_level=float(configs.get("lowres_noise_level", 0.2)))
            condition = (None if configs.get("condition") is None else
                         from_dict(ConditionConfig, configs["condition"], "condition"))
            file = cls(path, from_dict(ClipConfig, configs["clip"], "clip"), stages,
                       from_dict(DiffusionConfig, configs["diffusion"], "diffusion"), sample, tensors, condition)
        except (UsageError, KeyError, TypeError, ValueError) as e:
            raise _damaged(path, f"its configs do not read ({str(e).split('; fix the recipe')[0]})") from None
        for prefix, (_, adapter) in stages.items():
            if adapter is not None and f"{prefix}adapter" not in tensors:
                raise _damaged(path, f"it has a {prefix}adapter config but no {prefix}adapter tensors")
        if file.condition is not None and "condition" not in tensors:
            raise _damaged(path, "it has a condition config but no condition tensors")
        return file


def _damaged(path: Path, what: str) -> CtxdiffError:
    return CtxdiffError(f"{path}: not a usable t2i bundle: {what}; write it again with `ctxdiff train`, "
                        "or pass another --model")


def trained_on(path: str | Path) -> str | None:
    """The `data.source` of the recipe a t2i bundle was trained with ("shapes" for the shapes world,
    else a folder, manifest or shards), read from its header alone; None when the file does not
    record one (or cannot be read: its loader names what is wrong)."""
    import json

    import safetensors

    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        extra = json.loads(metadata.get("extra", "{}"))
    except (OSError, safetensors.SafetensorError, ValueError):
        return None
    source = _get(_get(_get(extra, "recipe"), "data"), "source")
    return source if isinstance(source, str) else None


def _get(mapping: object, key: str) -> object:
    return mapping.get(key) if isinstance(mapping, dict) else None
