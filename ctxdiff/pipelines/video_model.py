"""A text-to-image model made a video model: the inflated U-Net (models/inflate.py), the
spatio-temporal adapter (models/video_adapter.py), the model's text encoder and noise schedule.

`VideoDenoiser` is what tuning, inversion and editing use; `VideoModel` is the pixel one (the base
stage of a t2i bundle; the super-resolution stage of a cascade is not used), `LatentVideoModel`
(pipelines/latent_video.py) the Stable Diffusion one, in latent space. `load_video_model` picks.
A one-shot tuned file (kind "video-tuned", written by `ctxdiff tune-video`) holds only the tuned
tensors (attention query projections, temporal layers, adapter) and a reference to its base model:
the base file's path and the SHA-256 of its bytes (of its model parts, for a diffusers folder).
Loading it over another base model is refused.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ctxdiff.checkpoints import load_bundle, load_module_state, save_bundle
from ctxdiff.data.png import to_uint8
from ctxdiff.diffusion import make_schedule
from ctxdiff.diffusion.schedule import Schedule
from ctxdiff.errors import CtxdiffError
from ctxdiff.models.conditioning import TextCondition
from ctxdiff.models.encoders import ClipEncoders
from ctxdiff.models.inflate import InflateConfig, VideoUNet
from ctxdiff.models.video_adapter import VideoAdapter, VideoAdapterConfig
from ctxdiff.pipelines.text2image import DEFAULT_MODEL, Text2Image
from ctxdiff.recipes import DiffusionConfig, from_dict

TUNED_KIND = "video-tuned"


@dataclass(frozen=True)
class ModelRef:
    """A model file (or diffusers folder) by path and content (SHA-256 of its bytes)."""

    path: str
    sha256: str

    @classmethod
    def of(cls, path: str | Path) -> "ModelRef":
        """A file, or a diffusers folder by the files of its model parts (hidden entries skipped;
        symlinked files, as in the Hugging Face cache, are read through their links)."""
        path = Path(path)
        if not path.exists():
            raise CtxdiffError(f"{path}: no such model file or folder")
        if path.is_dir():
            files = sorted(f for f in path.rglob("*") if f.is_file() and f.relative_to(path).parts[0] in
                           DIFFUSERS_PARTS and not any(part.startswith(".") for part in f.relative_to(path).parts))
            names = tuple(str(f.relative_to(path)) for f in files)
        else:
            files, names = [path], (path.name,)
        stamps = tuple((name, str(f.resolve()), f.stat().st_mtime_ns, f.stat().st_size) for name, f in zip(names, files))
        return cls(str(path), _sha256(stamps))


DIFFUSERS_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "model_index.json")


@lru_cache(maxsize=16)
def _sha256(stamps: tuple[tuple[str, str, int, int], ...]) -> str:
    """SHA-256 of the files' bytes (and, for a folder, their names in it); cached per mtime and size."""
    digest = hashlib.sha256()
    for name, resolved, _, _ in stamps:
        if len(stamps) > 1:
            digest.update(name.encode() + b"\0")
        with open(resolved, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def frames_to_tensor(frames: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> float [F, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.array(frames, dtype=np.uint8)).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1


class VideoDenoiser:
    """What tuning, inversion and editing need from a video model (pixel or latent).

    Subclasses set `unet`, `adapter`, `sched`, `diffusion` (the loss weighting of tuning), `base`,
    `tuned`, `tuned_on`, and define how frames enter and leave the denoiser's space, the text
    encoder, and the denoiser call `_predict`.
    """

    unet: VideoUNet
    adapter: VideoAdapter | None
    clip: ClipEncoders | None       # scores edits (text alignment, temporal consistency); None: no scores
    sched: Schedule
    diffusion: DiffusionConfig
    base: ModelRef
    tuned: ModelRef | None
    tuned_on: dict | None           # the tuned file's prompt, video, frames, stride and start
    adapter_ref: ModelRef | None = None   # the adapter file the adapter came from (None: the base model's)
    backbone = "pixel"              # what a tuned file records ("pixel" or "sd")
    clamp_x0 = True                 # x0_hat lies in [-1, 1] (pixels; latents are not clamped)
    first_token_column = 1          # cross-attention column of the start token (pixel U-Nets: after a null key)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def image_size(self) -> int:
        """The side of the (square) frames the model reads and writes, in pixels."""
        raise NotImplementedError

    @property
    def grid_size(self) -> int:
        """The side of the denoiser's input (pixels, or latent cells)."""
        raise NotImplementedError

    def text(self, prompts: list[str]) -> TextCondition:
        """The text condition of each prompt."""
        raise NotImplementedError

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def frozen_modules(self) -> list[torch.nn.Module]:
        """The modules tuning never trains (text and image encoders)."""
        raise NotImplementedError

    def to_model(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 frames [F, H, W, 3] -> x_0 in the denoiser's space [F, C, h, w]."""
        raise NotImplementedError

    def to_frames(self, x: torch.Tensor) -> np.ndarray:
        """x_0 in the denoiser's space -> uint8 frames [F, H, W, 3]."""
        raise NotImplementedError

    def _predict(self, x: torch.Tensor, cond: TextCondition, t: torch.Tensor, frames: int) -> torch.Tensor:
        """x0_hat for x_t of F-frame videos at paper steps t."""
        raise NotImplementedError

    def new_adapter(self, window: int) -> VideoAdapter | None:
        """The adapter tuning trains when the model has none (None: tune without one)."""
        return None

    def add_to_tuned_file(self, modules: dict, configs: dict, extra: dict) -> None:
        """What a tuned file of this backbone holds beyond the tuned tensors (nothing, for pixel models)."""

    def encode(self, prompt: str, frames: int) -> TextCondition:
        """The condition of one prompt, repeated for each of `frames` frames."""
        return self.text([prompt]).repeat_interleave(frames)

    def x0_fn(self, frames: int, clamp: bool = True, on_call: Callable[[int], None] | None = None) -> Callable:
        """x0_fn(x_t, cond, t) for the samplers on F-frame videos; `on_call(t)` runs before each
        call (attention controllers learn the step from it). `clamp` keeps pixel x0_hat in [-1, 1]."""

        def predict(x: torch.Tensor, cond: TextCondition, t: torch.Tensor) -> torch.Tensor:
            if on_call is not None:
                on_call(int(t.reshape(-1)[0]))
            x0 = self._predict(x, cond, t, frames)
            return x0.clamp(-1, 1) if clamp and self.clamp_x0 else x0

        return predict

    def adapter_fn(self, frames: int, enabled: bool = True) -> Callable | None:
        """adapter(x0, cond, t) for the samplers (None: r = 0)."""
        if self.adapter is None or not enabled:
            return None
        adapter = self.adapter
        return lambda x0, cond, t: adapter(x0, cond, t, frames)


@dataclass
class VideoModel(VideoDenoiser):
    """A pixel t2i model made a video model: build with `load`."""

    clip: ClipEncoders
    unet: VideoUNet
    adapter: VideoAdapter | None
    diffusion: DiffusionConfig
    base: ModelRef
    tuned: ModelRef | None = None
    tuned_on: dict | None = None

    def __post_init__(self) -> None:
        self.sched: Schedule = make_schedule(self.diffusion.schedule, self.diffusion.timesteps)

    @property
    def image_size(self) -> int:
        return self.unet.unet.config.image_size

    @property
    def grid_size(self) -> int:
        return self.image_size

    def text(self, prompts: list[str]) -> TextCondition:
        return self.clip.encode_text(prompts)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.clip.tokenize(prompts)

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.clip.clip]

    def to_model(self, frames: np.ndarray) -> torch.Tensor:
        return frames_to_tensor(frames, self.device)

    def to_frames(self, x: torch.Tensor) -> np.ndarray:
        return to_uint8(x)

    def _predict(self, x: torch.Tensor, cond: TextCondition, t: torch.Tensor, frames: int) -> torch.Tensor:
        return self.unet(x, t, cond, frames)

    @classmethod
    def load(cls, model: str | Path | None = None, tuned: str | Path | None = None,
             device: str | torch.device = "cpu", inflate: InflateConfig = InflateConfig(),
             window: int = 3) -> "VideoModel":
        """The base stage of the t2i bundle `model` (default: the tuned file's base model, else the
        bundled default model), inflated, with the tensors of the tuned file `tuned` if given."""
        bundle = load_bundle(tuned, kind=TUNED_KIND) if tuned is not None else None
        recorded = ModelRef(**bundle.extra["base_model"]) if bundle is not None else None
        path = Path(model) if model is not None else _default_base(tuned, recorded)
        if not path.is_file():
            raise CtxdiffError(f"{path}: no such model file; pass --model FILE (a t2i bundle written by "
                               "`ctxdiff train`)")
        ref = check_base(tuned, recorded, path)
        pipe = Text2Image.from_bundle(path, device)
        if bundle is not None:
            inflate = from_dict(InflateConfig, bundle.configs["inflate"], "inflate")
        unet = VideoUNet(pipe.base.unet, inflate).eval()
        adapter = None
        if bundle is not None and bundle.configs.get("video_adapter") is not None:
            config = from_dict(VideoAdapterConfig, bundle.configs["video_adapter"], "video_adapter")
            adapter = VideoAdapter(config, _image_encoder(pipe.clip, config)).to(device)
            load_module_state(adapter, bundle.tensors["adapter"], f"{tuned} adapter")
        elif bundle is None and pipe.base.adapter is not None:
            adapter = VideoAdapter.from_image_adapter(pipe.base.adapter, window)
        if bundle is not None:
            load_tuned_unet(unet, bundle.tensors.get("unet", {}), f"{tuned} unet")
        return cls(pipe.clip, unet, adapter.eval() if adapter is not None else None, pipe.diffusion, ref,
                   ModelRef.of(tuned) if tuned is not None else None, tuned_on(bundle))


def load_video_model(model: str | Path | None = None, tuned: str | Path | None = None,
                     device: str | torch.device = "cpu", adapter: str | Path | None = None,
                     window: int = 3) -> VideoDenoiser:
    """A pixel `VideoModel` for a t2i bundle, a `LatentVideoModel` for a Stable Diffusion checkpoint
    (`model`, or the one the tuned file was tuned on); `adapter`: a latent adapter file (SD only);
    `window`: the temporal causal window of an adapter inflated here."""
    from ctxdiff.pipelines.latent import is_sd_model
    from ctxdiff.pipelines.latent_video import LatentVideoModel

    if model is not None and not Path(model).exists():
        raise CtxdiffError(f"{model}: no such model file or folder; pass --model (a t2i bundle or a Stable "
                           "Diffusion checkpoint)")
    bundle = load_bundle(tuned, kind=TUNED_KIND) if tuned is not None else None
    if bundle is not None:
        latent = bundle.extra.get("backbone", "pixel") == "sd"
    else:
        latent = model is not None and is_sd_model(model)
    if latent:
        return LatentVideoModel.load(model, tuned, device, adapter, window=window)
    if adapter is not None:
        raise CtxdiffError("--adapter is for Stable Diffusion models (a latent adapter file); a ctxdiff t2i "
                           "bundle carries its own adapter")
    return VideoModel.load(model, tuned, device, window=window)


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


def _default_base(tuned, recorded: ModelRef | None) -> Path:
    if recorded is not None:
        if not Path(recorded.path).is_file():
            raise CtxdiffError(f"{tuned}: its base model {recorded.path} is not there; pass --model FILE "
                               f"(the t2i bundle with sha256 {recorded.sha256[:12]})")
        return Path(recorded.path)
    if not DEFAULT_MODEL.is_file():
        raise CtxdiffError(f"no --model given and the bundled default model is missing ({DEFAULT_MODEL}); "
                           "pass --model FILE (a t2i bundle written by `ctxdiff train`)")
    return DEFAULT_MODEL


def _image_encoder(clip: ClipEncoders, config: VideoAdapterConfig):
    return (lambda x: clip.encode_image(x)[0]) if config.adapter.image_branch == "clip" else None


def load_tuned_unet(unet: VideoUNet, state: dict[str, torch.Tensor], name: str) -> None:
    if not state:
        raise CtxdiffError(f"{name}: no tuned U-Net tensors in this file; write it again with `ctxdiff tune-video`")
    _, unexpected = load_module_state(unet, state, name, strict=False)
    if unexpected:
        raise CtxdiffError(f"{name}: {len(unexpected)} tensors do not belong to the inflated U-Net "
                           f"({', '.join(unexpected[:3])}); the file was tuned with another architecture")


def save_tuned(path: str | Path, model: VideoDenoiser, tune_config, prompt: str, video: str, step: int) -> Path:
    """Write the tuned tensors of `model` and the reference to its base model (kind "video-tuned")."""
    modules: dict = {"unet": {name: p.detach() for name, p in model.unet.tunable_state().items()}}
    if model.adapter is not None:
        modules["adapter"] = model.adapter
    configs = {"inflate": model.unet.config, "tune": tune_config,
               "video_adapter": model.adapter.config if model.adapter is not None else None}
    extra = {"base_model": asdict(model.base), "backbone": model.backbone, "prompt": prompt, "video": video,
             "step": step}
    model.add_to_tuned_file(modules, configs, extra)
    return save_bundle(path, modules, configs, kind=TUNED_KIND, extra=extra)
