"""Stable Diffusion made a video model (Tune-A-Video / FateZero's setting, ContextDiff Sec. 4.2), in
latent space: frames are encoded by the VAE (the mean of the encoding times the scaling factor),
tuned, inverted and edited as latent videos [F, 4, H/8, W/8], and decoded at the end.

- The SD U-Net is inflated like a pixel one (models/inflate.py: sparse-causal `attn1`, temporal
  attention after each transformer block, zero-initialised) and read as an x0-predictor with the
  bias inside its input, exactly as for images (`EpsToX0`, pipelines/latent.py).
- The adapter: a latent adapter file (`--adapter`, trained by `ctxdiff train` with a `latent:`
  recipe) inflated with temporal causal attention; or, when tuning without one, a new
  spatio-temporal adapter on latent patches whose output starts at zero (plain SD at step 0) and
  is trained on the source video with the rest of the tuned parameters, as the paper does.
- LoRAs (`loras`) are merged into the SD U-Net and text encoder after the adapter file's backbone check
  and before inflating, so a tuned file's query projections (tuned over the merged weights) replace
  the merged ones; tuned files and inversions record them (formats/lora_ref.py).
- Tuning uses SD's own loss weighting (the epsilon loss = Eq. 6's x0 loss times SNR_t).
- Cross-attention columns are SD's 77 token positions (no null key): the start token is column 0.
- Scores (text alignment, temporal consistency) need a CLIP with an image tower; SD has none, so
  they are computed with the adapter's CLIP when it has one and are otherwise left out.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ctxdiff.checkpoints import load_bundle, load_module_state
from ctxdiff.data.png import to_uint8
from ctxdiff.diffusion.schedule import schedule_from_alpha_bar
from ctxdiff.errors import CtxdiffError
from ctxdiff.formats.latent_adapter import LatentAdapterFile, check_adapter_fits
from ctxdiff.formats.lora_ref import LoraRef, check_loras, read_lora_records
from ctxdiff.formats.model_ref import ModelRef
from ctxdiff.formats.tuned import TUNED_KIND, check_base, default_base, load_tuned_unet, tuned_on
from ctxdiff.models.adapter import AdapterConfig, ContextAdapter, image_branch
from ctxdiff.models.conditioning import TextCondition
from ctxdiff.models.encoders import ClipConfig, ClipEncoders, load_clip
from ctxdiff.models.inflate import InflateConfig, VideoUNet
from ctxdiff.models.latent import LatentModels, as_x0_predictor, load_sd
from ctxdiff.models.latent.lora import merge_loras, read_lora
from ctxdiff.models.temporal import fixed_init
from ctxdiff.models.video_adapter import VideoAdapter, VideoAdapterConfig
from ctxdiff.pipelines.video_denoiser import VideoDenoiser, frames_to_tensor
from ctxdiff.recipes import DiffusionConfig, from_dict

VAE_BATCH = 4   # frames per VAE call (bounds the encoder's and decoder's activation memory)


@dataclass
class LatentVideoModel(VideoDenoiser):
    """An inflated Stable Diffusion backbone with an optional spatio-temporal adapter: build with `load`."""

    models: LatentModels
    unet: VideoUNet
    adapter: VideoAdapter | None
    adapter_clip: ClipEncoders | None   # the CLIP of an adapter with image_branch "clip"
    base: ModelRef
    tuned: ModelRef | None = None
    tuned_on: dict | None = None
    adapter_ref: ModelRef | None = None
    loras: tuple[LoraRef, ...] = ()

    backbone = "sd"
    first_token_column = 0
    clamp_x0 = False

    def __post_init__(self) -> None:
        abar = self.models.scheduler.alphas_cumprod()
        self.sched = schedule_from_alpha_bar(abar, self.models.scheduler.beta_schedule)
        self.diffusion = DiffusionConfig(timesteps=self.sched.T, loss_weighting="snr")
        self._x0 = as_x0_predictor(self.unet.unet, abar, self.models.prediction_type)

    @property
    def grid_size(self) -> int:
        return self.models.config.unet.sample_size

    @property
    def image_size(self) -> int:
        return self.grid_size * self.models.config.vae.downscale

    @property
    def clip(self) -> ClipEncoders | None:
        """The CLIP that scores edits (None: SD brings no image tower)."""
        return self.adapter_clip

    def text(self, prompts: list[str]) -> TextCondition:
        return self.models.text.encode(prompts).to(dtype=torch.float32)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.models.text.tokenize(prompts)

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.models.vae, self.models.text] + ([self.adapter_clip.clip] if self.adapter_clip else [])

    @torch.no_grad()
    def to_model(self, frames: np.ndarray) -> torch.Tensor:
        vae = self.models.vae
        dtype = next(vae.parameters()).dtype
        x = frames_to_tensor(frames, self.device)
        return torch.cat([vae.encode(part.to(dtype)).mean.float() * vae.config.scaling_factor
                          for part in x.split(VAE_BATCH)])

    @torch.no_grad()
    def to_frames(self, x: torch.Tensor) -> np.ndarray:
        vae = self.models.vae
        dtype = next(vae.parameters()).dtype
        return np.concatenate([to_uint8(vae.from_latents(part.to(dtype)).float().clamp(-1, 1))
                               for part in x.split(VAE_BATCH)])

    def _predict(self, x: torch.Tensor, cond: TextCondition, t: torch.Tensor, frames: int) -> torch.Tensor:
        self.unet.set_frames(frames, x.shape[0])
        return self._x0(x, cond, t)

    def new_adapter(self, window: int) -> VideoAdapter:
        """A spatio-temporal adapter on latent patches (16 x 16 tokens at SD's sample size), as wide as
        the U-Net's first level, with a zero-initialised output: r = 0 until it is tuned."""
        c = self.models.config
        side, width = c.unet.sample_size, c.unet.block_out_channels[0]
        config = AdapterConfig(x_shape=(c.unet.in_channels, side, side), patch_size=max(1, side // 16), width=width,
                               heads=8 if width % 8 == 0 else 1, blocks=4, text_dim=c.text.width,
                               timesteps=self.sched.T)
        with fixed_init():
            return VideoAdapter(VideoAdapterConfig(config, window)).to(self.device)

    def add_to_tuned_file(self, modules: dict, configs: dict, extra: dict) -> None:
        extra["prediction_type"] = self.models.prediction_type
        if self.adapter is not None and self.adapter_clip is not None:
            modules["clip"] = self.adapter_clip.clip
            configs["clip"] = replace(self.adapter_clip.config, weights=None,
                                      context_length=self.adapter_clip.context_length)

    @classmethod
    def load(cls, model: str | Path | None = None, tuned: str | Path | None = None,
             device: str | torch.device = "cpu", adapter: str | Path | None = None,
             inflate: InflateConfig = InflateConfig(), window: int = 3,
             loras: list[tuple[str | Path, float]] = ()) -> "LatentVideoModel":
        """The SD checkpoint `model` (default: the one the tuned file was tuned on) with the LoRAs
        `loras` ((file, weight) pairs) merged, inflated, with the tuned file's tensors (refused when it
        was tuned over other LoRAs), or with the latent adapter file `adapter` inflated (window frames)."""
        bundle = load_bundle(tuned, kind=TUNED_KIND) if tuned is not None else None
        recorded = ModelRef(**bundle.extra["base_model"]) if bundle is not None else None
        if bundle is not None and adapter is not None:
            raise CtxdiffError(f"{tuned}: a tuned file carries its own adapter; drop --adapter")
        if model is None and recorded is None:
            raise CtxdiffError("pass --model (a Stable Diffusion checkpoint file or diffusers folder)")
        path = Path(model) if model is not None else default_base(tuned, recorded)
        if not path.exists():
            raise CtxdiffError(f"{path}: no such Stable Diffusion checkpoint; pass --model FILE")
        ref = check_base(tuned, recorded, path)
        lora_files = [(read_lora(lora), float(weight)) for lora, weight in loras]
        lora_refs = tuple(LoraRef.of(lora.path, weight) for lora, weight in lora_files)
        if bundle is not None:
            check_loras(str(tuned), read_lora_records(bundle.extra.get("loras")), lora_refs, "tuned", "tune")
        device = torch.device(device)
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        file = LatentAdapterFile.read(adapter) if adapter is not None else None
        prediction_type = bundle.extra.get("prediction_type") if bundle is not None else None
        models = load_sd(path, prediction_type=prediction_type or (file.prediction_type if file else None),
                         device=device, dtype=dtype)
        video_adapter, clip = None, None
        if file is not None:   # before inflating: the backbone's fingerprint is that of the 2D U-Net
            image: ContextAdapter = file.build(models, path, device)
            clip = image.image_encoder.clip if image.config.image_branch == "clip" else None
            video_adapter = VideoAdapter.from_image_adapter(image, window)
        merge_loras(models, lora_files)
        if bundle is not None:
            inflate = from_dict(InflateConfig, bundle.configs["inflate"], "inflate")
        unet = VideoUNet(models.unet, inflate).eval()
        if bundle is not None and bundle.configs.get("video_adapter") is not None:
            config = from_dict(VideoAdapterConfig, bundle.configs["video_adapter"], "video_adapter")
            check_adapter_fits(config.adapter, models)
            if config.adapter.image_branch == "clip":
                clip = load_clip(from_dict(ClipConfig, bundle.configs["clip"], "clip"), device)
                load_module_state(clip.clip, bundle.tensors["clip"], f"{tuned} clip")
            video_adapter = VideoAdapter(config, image_branch(config.adapter, clip, models.vae)).to(device)
            load_module_state(video_adapter, bundle.tensors["adapter"], f"{tuned} adapter")
        if bundle is not None:
            load_tuned_unet(unet, bundle.tensors.get("unet", {}), f"{tuned} unet")
        return cls(models, unet, video_adapter.eval() if video_adapter is not None else None, clip, ref,
                   ModelRef.of(tuned) if tuned is not None else None, tuned_on(bundle),
                   ModelRef.of(adapter) if adapter is not None else None, lora_refs)
