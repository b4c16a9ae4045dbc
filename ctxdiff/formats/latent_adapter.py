"""The latent adapter file (kind "latent-adapter", written by `ctxdiff train` with a `latent:` recipe
section): the adapter, its config, the CLIP of image_branch "clip", the sampling defaults, and the
Stable Diffusion backbone it was trained on: its path then and a fingerprint of its weights
(ctxdiff/models/latent/fingerprint.py). An adapter for another backbone is refused. `is_sd_model`
tells a Stable Diffusion checkpoint from a ctxdiff bundle by its header alone."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import safetensors
import torch

from ctxdiff.checkpoints import load_bundle, load_module_state, save_bundle
from ctxdiff.errors import CtxdiffError
from ctxdiff.models.adapter import AdapterConfig, ContextAdapter, build_adapter
from ctxdiff.models.encoders import ClipConfig, ClipEncoders, load_clip
from ctxdiff.models.latent import LatentModels
from ctxdiff.models.latent.fingerprint import Fingerprint, fingerprint
from ctxdiff.recipes import SampleConfig, from_dict

ADAPTER_KIND = "latent-adapter"
_SD_KIND = "sd-compvis"   # what `save_compvis` writes


def backbone_fingerprint(models: LatentModels) -> Fingerprint:
    return fingerprint({"unet": models.unet, "vae": models.vae, "text": models.text})


def check_adapter_fits(config: AdapterConfig, models: LatentModels) -> None:
    """The adapter's channels, text width and timesteps must be the backbone's (CtxdiffError naming the field)."""
    wanted = {"x_shape[0]": (config.x_shape[0], models.config.vae.latent_channels),
              "text_dim": (config.text_dim, models.config.text.width),
              "timesteps": (config.timesteps, models.scheduler.num_train_timesteps)}
    wrong = [f"{name} is {have}, the backbone needs {need}" for name, (have, need) in wanted.items() if have != need]
    if wrong:
        raise CtxdiffError(f"the adapter does not fit this Stable Diffusion backbone: {'; '.join(wrong)}")


@dataclass
class LatentAdapterFile:
    """A read "latent-adapter" file: what it needs from a backbone, and its weights."""

    path: Path
    adapter: AdapterConfig
    clip: ClipConfig | None
    backbone_path: str
    prediction_type: str
    fingerprint: Fingerprint
    sample: SampleConfig
    tensors: dict[str, dict[str, torch.Tensor]]

    @classmethod
    def read(cls, path: str | Path) -> "LatentAdapterFile":
        path = Path(path)
        bundle = load_bundle(path)
        if bundle.kind != ADAPTER_KIND:
            raise CtxdiffError(f"{path}: is a {bundle.kind!r} bundle, not a latent adapter; pass a file written by "
                               "`ctxdiff train` with a `latent:` recipe section")
        try:
            c = bundle.configs
            backbone = c["backbone"]
            return cls(path, from_dict(AdapterConfig, c["adapter"], "adapter"),
                       None if c["clip"] is None else from_dict(ClipConfig, c["clip"], "clip"),
                       backbone["path"], backbone["prediction_type"],
                       Fingerprint(backbone["architecture"], bundle.tensors["backbone"]["probe"]),
                       from_dict(SampleConfig, c["sample"], "sample"), bundle.tensors)
        except (KeyError, TypeError, CtxdiffError) as e:
            raise CtxdiffError(f"{path}: incomplete latent adapter file ({e}); write it again") from e

    def build(self, models: LatentModels, sd_path: str | Path, device: str | torch.device) -> ContextAdapter:
        """The adapter over `models`, refused unless they are the backbone it was trained on."""
        own = backbone_fingerprint(models)
        if not own.same_weights(self.fingerprint):
            what = "weights" if own.same_architecture(self.fingerprint) else "architecture"
            raise CtxdiffError(f"{self.path}: this adapter was trained on another Stable Diffusion backbone "
                               f"({self.backbone_path}); {sd_path} has other {what}. Pass the checkpoint it was "
                               "trained on with --model, or train an adapter for this one")
        check_adapter_fits(self.adapter, models)
        clip = None
        if self.clip is not None:
            clip = load_clip(self.clip, device)
            load_module_state(clip.clip, self.tensors["clip"], f"{self.path}: clip")
        adapter = build_adapter(self.adapter, clip, models.vae)
        load_module_state(adapter, self.tensors["adapter"], f"{self.path}: adapter")
        return adapter.to(device).eval()


def save_latent_adapter(path: str | Path, adapter: ContextAdapter, clip: ClipEncoders | None, backbone_path: str,
                        models: LatentModels, sample: SampleConfig, extra: dict | None = None,
                        dtype: torch.dtype | None = None) -> Path:
    """Write a "latent-adapter" file: adapter (+ CLIP of the "clip" branch), sampling defaults, backbone reference."""
    mark = backbone_fingerprint(models)
    modules = {"adapter": adapter, "backbone": {"probe": mark.probe}}
    if clip is not None:
        modules["clip"] = clip.clip
    configs = {"adapter": asdict(adapter.config),
               "clip": None if clip is None else asdict(replace(clip.config, weights=None,
                                                                context_length=clip.context_length)),
               "backbone": {"path": str(backbone_path), "architecture": mark.architecture,
                            "prediction_type": models.prediction_type},
               "sample": asdict(sample)}
    return save_bundle(path, modules, configs, kind=ADAPTER_KIND, dtype=dtype, extra=extra)


def is_sd_model(path: str | Path) -> bool:
    """Whether `--model` is for `load_sd` (a folder, any file but .safetensors, a .safetensors without
    ctxdiff metadata or written by `save_compvis`) rather than a ctxdiff t2i bundle. Cheap: reads only
    a safetensors header. A latent adapter passed as the model is a CtxdiffError."""
    path = Path(path)
    if path.is_dir() or path.suffix.lower() != ".safetensors":
        return True   # load_sd reads a .ckpt/.pt/.bin or names what is wrong with the file
    if not path.is_file():
        return False  # the bundle loader names the missing file
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except safetensors.SafetensorError:
        return False   # the bundle loader reports the corrupt file
    if metadata.get("kind") == ADAPTER_KIND:
        raise CtxdiffError(f"{path}: is a latent adapter, not a model; pass it with --adapter and its Stable "
                           "Diffusion checkpoint with --model")
    return "ctxdiff_version" not in metadata or metadata.get("kind") == _SD_KIND
