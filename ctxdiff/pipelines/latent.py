"""Text-to-image with ContextDiff over a pretrained Stable Diffusion backbone, in latent space.

The math (tests/test_latent_contextdiff.py checks each line):

- Eq. 1 on SD latents z = scaling_factor * VAE(x), with the checkpoint's own schedule abar:
      z_t = sqrt(abar_t) z_0 + k_t r_phi(z_0, c, t) + sqrt(1 - abar_t) eps.
- f_theta(z_t, c, t) is the frozen SD U-Net read as an x0-predictor *of z_t itself* (`EpsToX0`):
  its epsilon (or v) output is taken as the effective noise eps' = eps + k_t r_t / sqrt(1 - abar_t),
  which inverts Eq. 1 exactly. With r = 0 that is SD's own parameterisation, so a zero-initialised
  adapter starts at plain SD, and sampling with r = 0 is plain DDIM (equal to diffusers'
  DDIMScheduler, trailing spacing).
- The adapter is trained by Eq. 6 *through* the frozen U-Net (ctxdiff/training/latent_adapter.py):
  the gradient reaches phi through z_t, the U-Net's input, so the adapter learns the
  context-aware shift of the trajectory that the frozen predictor turns into better x0 estimates.
- Rejected: showing the U-Net z_t - k_t r_t (a "debiased" input). With the true r_t(z_0) removed,
  neither the U-Net's input sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps nor x0_hat depends on phi, so
  dL/dphi = 0 identically, whether the U-Net is frozen or trained jointly; and while sampling,
  with r taken at x0_hat, z_t - k_t r(x0_hat) follows plain DDIM exactly: the adapter would do nothing.

Sampling is Eq. 11 (DDIM; eta > 0: Eq. 9) or Eq. 7 (DDPM) with classifier-free guidance on x0,
which for an epsilon model equals guidance on eps; the adapter runs on the guided x0_hat with
the sample's own prompt. Latents are float32; the backbone runs in its dtype (fp16 on GPUs).

A latent adapter file (kind "latent-adapter", written by `ctxdiff train` with a `latent:`
recipe section) holds the adapter, its config, the CLIP of image_branch "clip", the sampling
defaults, and the backbone it was trained on: its path then and a fingerprint of its weights
(ctxdiff/models/latent/fingerprint.py). An adapter for another backbone is refused.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import safetensors
import torch

from ctxdiff.checkpoints import load_bundle, load_module_state, save_bundle
from ctxdiff.diffusion import classifier_free_guidance
from ctxdiff.diffusion.schedule import schedule_from_alpha_bar
from ctxdiff.errors import CtxdiffError
from ctxdiff.models.adapter import AdapterConfig, ContextAdapter
from ctxdiff.models.conditioning import TextCondition
from ctxdiff.models.encoders import ClipConfig, ClipEncoders, load_clip
from ctxdiff.models.latent import LatentModels, LatentVAE, as_x0_predictor, load_sd
from ctxdiff.models.latent.fingerprint import Fingerprint, fingerprint
from ctxdiff.pipelines.text2image import SamplingParams, run_sampler, seeded_noise
from ctxdiff.recipes import SampleConfig, from_dict

ADAPTER_KIND = "latent-adapter"
SD_DEFAULTS = SamplingParams(sampler="ddim", steps=50, guidance=7.5, spacing="trailing")
_SD_KIND = "sd-compvis"   # what `save_compvis` writes


class DecodedClipTokens:
    """The image branch "clip" on latents: CLIP patch tokens of the VAE decoding of z (faithful to
    the paper's image CLIP, which sees pixels). Eq. 9/11 stack one x0_hat twice (the bias at t and
    at s, `context_biases`), so a batch whose halves are equal is decoded once."""

    def __init__(self, vae: LatentVAE, clip: ClipEncoders) -> None:
        self.vae, self.clip = vae, clip

    def __deepcopy__(self, memo) -> "DecodedClipTokens":
        return self   # frozen and shared: an EMA copy of the adapter uses the same VAE and CLIP

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        half = z.shape[0] // 2
        if z.shape[0] % 2 == 0 and half and torch.equal(z[:half], z[half:]):
            tokens = self._encode(z[:half])
            return torch.cat([tokens, tokens])
        return self._encode(z)

    def _encode(self, z: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vae.parameters()).dtype
        return self.clip.encode_image(self.vae.from_latents(z.to(dtype)).float())[0]


def build_latent_adapter(config: AdapterConfig, vae: LatentVAE, clip: ClipEncoders | None) -> ContextAdapter:
    """r_phi on latents: image_branch "patch" embeds the latent patches itself (fast); "clip" adds the
    CLIP tokens of the decoded image (faithful; needs `clip`)."""
    if config.image_branch == "clip" and clip is None:
        raise CtxdiffError("image_branch 'clip' needs a CLIP image tower (model.clip)")
    encoder = DecodedClipTokens(vae, clip) if config.image_branch == "clip" else None
    return ContextAdapter(config, image_encoder=encoder)


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


# --------------------------------------------------------------------------- adapter files


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
        adapter = build_latent_adapter(self.adapter, models.vae, clip)
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


# --------------------------------------------------------------------------- the pipeline


class LatentText2Image:
    """A Stable Diffusion backbone with an optional ContextDiff adapter, ready to sample.

    Build with `from_checkpoint`. `size` is the image (height, width) in pixels; `height` and
    `width` default to the U-Net's sample size times the VAE's downscale (512 for SD 1.x).
    """

    def __init__(self, models: LatentModels, adapter: ContextAdapter | None, defaults: SamplingParams = SD_DEFAULTS,
                 source: str = "", height: int | None = None, width: int | None = None) -> None:
        self.models, self.adapter, self.defaults, self.source = models, adapter, defaults, source
        abar = models.scheduler.alphas_cumprod()
        self.sched = schedule_from_alpha_bar(abar, models.scheduler.beta_schedule)
        self.x0_fn = as_x0_predictor(models.unet, abar, models.prediction_type)
        down = models.config.vae.downscale
        side = models.config.unet.sample_size * down
        self.size = (height or side, width or side)
        if any(side < down or side % down for side in self.size):
            raise CtxdiffError(f"image size {self.size[0]}x{self.size[1]} must be a positive multiple of {down} "
                               "pixels (the VAE's downscale)")

    @classmethod
    def from_checkpoint(cls, sd_path: str | Path, adapter_path: str | Path | None = None, *,
                        device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                        height: int | None = None, width: int | None = None,
                        vae_tiling: bool = False) -> "LatentText2Image":
        """Load an SD checkpoint (file or diffusers folder) and, optionally, a latent adapter trained on it.

        `dtype` defaults to float16 on CUDA, float32 elsewhere; `vae_tiling` decodes in 512-pixel tiles.
        """
        device = torch.device(device)
        dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        file = LatentAdapterFile.read(adapter_path) if adapter_path is not None else None
        models = load_sd(sd_path, prediction_type=file.prediction_type if file else None, device=device, dtype=dtype)
        if vae_tiling:
            models.vae.enable_tiling()
        adapter, defaults = None, SD_DEFAULTS
        if file is not None:
            adapter = file.build(models, sd_path, device)
            defaults = SamplingParams.from_sample_config(file.sample, SD_DEFAULTS.lowres_noise_level)
        return cls(models, adapter, defaults, str(sd_path), height, width)

    @property
    def device(self) -> torch.device:
        return next(self.models.unet.parameters()).device

    @property
    def has_adapter(self) -> bool:
        return self.adapter is not None

    def encode(self, prompts: list[str]) -> TextCondition:
        """SD's text encoder: the U-Net's cross-attention context and the adapter's text tokens (float32)."""
        return self.models.text.encode(prompts).to(dtype=torch.float32)

    @torch.no_grad()
    def sample_latents(self, prompts: list[str], seeds: list[int], params: SamplingParams,
                       progress=None) -> torch.Tensor:
        """Latents z_0 [N, 4, H/8, W/8] (float32), one per (prompt, seed), independent of the batch."""
        if len(prompts) != len(seeds):
            raise ValueError("one seed per prompt")
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        down = self.models.config.vae.downscale
        shape = [self.models.config.unet.in_channels, self.size[0] // down, self.size[1] // down]
        x_T = seeded_noise(shape, generators, self.device)
        x0_fn = classifier_free_guidance(self.x0_fn, self.encode([""]), params.guidance)
        adapter = self.adapter if params.adapter else None
        return run_sampler(params, x0_fn, x_T, self.sched, params.steps, adapter, self.encode(prompts), generators,
                           progress)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] (float32), tiled when the VAE's tiling is on."""
        vae = self.models.vae
        return vae.from_latents(latents.to(next(vae.parameters()).dtype)).float().clamp(-1, 1)

    def sample(self, prompts: list[str], seeds: list[int], params: SamplingParams, progress=None) -> torch.Tensor:
        """Images in [-1, 1], [N, 3, H, W] (`ctxdiff.data.png.to_uint8` makes uint8 of them)."""
        return self.decode(self.sample_latents(prompts, seeds, params, progress))

    def total_steps(self, params: SamplingParams) -> int:
        """Denoiser evaluations per batch (for progress bars)."""
        return params.steps
