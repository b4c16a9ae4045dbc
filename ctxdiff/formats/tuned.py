"""The one-shot tuned video file (kind "video-tuned", written by `ctxdiff tune-video`): only the tuned
tensors (attention query projections, temporal layers, adapter) and a reference to its base model
(`ModelRef`: the base file's path and the SHA-256 of its bytes, of its model parts for a diffusers
folder), with the LoRAs merged into that base (`LoraRef`s). Loading it over another base model, or
over other LoRAs, is refused."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ctxdiff.checkpoints import load_module_state, save_bundle
from ctxdiff.errors import CtxdiffError
from ctxdiff.formats.lora_ref import lora_records
from ctxdiff.formats.model_ref import ModelRef
from ctxdiff.formats.t2i import DEFAULT_MODEL
from ctxdiff.models.inflate import VideoUNet

if TYPE_CHECKING:
    from ctxdiff.pipelines.video_denoiser import VideoDenoiser

TUNED_KIND = "video-tuned"


def check_base(tuned, recorded: ModelRef | None, path: Path) -> ModelRef:
    """The reference of the base model at `path`, refused if the tuned file was tuned on another."""
    ref = ModelRef.of(path)
    if recorded is not None and recorded.sha256 != ref.sha256:
        raise CtxdiffError(f"{tuned}: tuned for another base model ({recorded.path}, sha256 "
                           f"{recorded.sha256[:12]}), not {path} (sha256 {ref.sha256[:12]}); pass --model "
                           f"{recorded.path} or tune again")
    return ref


def tuned_on(bundle) -> dict | None:
    """What a tuned file was tuned on: prompt, video, frames, stride, start (None: no tuned file)."""
    if bundle is None:
        return None
    tune = bundle.configs.get("tune", {})
    return {"prompt": bundle.extra.get("prompt"), "video": bundle.extra.get("video"),
            **{k: tune[k] for k in ("frames", "stride", "start") if k in tune}}


def default_base(tuned, recorded: ModelRef | None) -> Path:
    """The base model of a run without --model: the one the tuned file records (where it was, or
    beside the tuned file), else the bundled default model."""
    if recorded is not None:
        found = recorded.locate(beside=tuned)
        if found is None:
            raise CtxdiffError(f"{tuned}: its base model {recorded.path} is not there, nor beside the tuned file; "
                               f"pass --model FILE (the model with sha256 {recorded.sha256[:12]})")
        return found
    if not DEFAULT_MODEL.is_file():
        raise CtxdiffError(f"no --model given and the bundled default model is missing ({DEFAULT_MODEL}); "
                           "pass --model FILE (a t2i bundle written by `ctxdiff train`)")
    return DEFAULT_MODEL


def load_tuned_unet(unet: VideoUNet, state: dict[str, torch.Tensor], name: str) -> None:
    if not state:
        raise CtxdiffError(f"{name}: no tuned U-Net tensors in this file; write it again with `ctxdiff tune-video`")
    _, unexpected = load_module_state(unet, state, name, strict=False)
    if unexpected:
        raise CtxdiffError(f"{name}: {len(unexpected)} tensors do not belong to the inflated U-Net "
                           f"({', '.join(unexpected[:3])}); the file was tuned with another architecture")


def save_tuned(path: str | Path, model: VideoDenoiser, tune_config, prompt: str, video: str, step: int) -> Path:
    """Write the tuned tensors of `model` and the references to its base model and the LoRAs merged into
    it (kind "video-tuned")."""
    modules: dict = {"unet": {name: p.detach() for name, p in model.unet.tunable_state().items()}}
    if model.adapter is not None:
        modules["adapter"] = model.adapter
    configs = {"inflate": model.unet.config, "tune": tune_config,
               "video_adapter": model.adapter.config if model.adapter is not None else None}
    extra = {"base_model": asdict(model.base), "loras": lora_records(model.loras), "backbone": model.backbone,
             "prompt": prompt, "video": video, "step": step}
    model.add_to_tuned_file(modules, configs, extra)
    return save_bundle(path, modules, configs, kind=TUNED_KIND, extra=extra)
