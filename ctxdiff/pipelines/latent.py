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

from pathlib import Path

import torch

from ctxdiff.diffusion import classifier_free_guidance
from ctxdiff.diffusion.schedule import schedule_from_alpha_bar
from ctxdiff.errors import CtxdiffError
from ctxdiff.formats.latent_adapter import LatentAdapterFile
from ctxdiff.models.adapter import ContextAdapter
from ctxdiff.models.conditioning import TextCondition
from ctxdiff.models.latent import LatentModels, as_x0_predictor, load_sd
from ctxdiff.models.latent.lora import MergedLora, merge_loras
from ctxdiff.models.latent.prompt_weights import chunk_count, encode_prompts
from ctxdiff.pipelines.init_image import InitImage, mask_for, overlay, prepare
from ctxdiff.pipelines.text2image import finite_images, negative_prompts, run_sampler, seeded_noise
from ctxdiff.recipes import SampleConfig

SD_DEFAULTS = SampleConfig(sampler="ddim", steps=50, guidance=7.5, spacing="trailing")


# --------------------------------------------------------------------------- the pipeline


class LatentText2Image:
    """A Stable Diffusion backbone with an optional ContextDiff adapter, ready to sample.

    Build with `from_checkpoint`. `size` is the image (height, width) in pixels; `height` and
    `width` default to the U-Net's sample size times the VAE's downscale (512 for SD 1.x).
    """

    def __init__(self, models: LatentModels, adapter: ContextAdapter | None, defaults: SampleConfig = SD_DEFAULTS,
                 source: str = "", height: int | None = None, width: int | None = None) -> None:
        self.models, self.adapter, self.defaults, self.source = models, adapter, defaults, source
        self.loras: list[MergedLora] = []
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
                        vae_tiling: bool = False, loras: list[tuple[str | Path, float]] = ()) -> "LatentText2Image":
        """Load an SD checkpoint (file or diffusers folder) and, optionally, a latent adapter trained on it.

        `dtype` defaults to float16 on CUDA, float32 elsewhere; `vae_tiling` decodes in 512-pixel tiles.
        `loras`: (file, weight) pairs merged into the U-Net and text encoder (ctxdiff/models/latent/lora.py),
        after the adapter's backbone check (which reads the checkpoint's own weights); `pipe.loras` says what
        was merged.
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
            defaults = file.sample
        merged = merge_loras(models, list(loras)) if loras else []
        pipe = cls(models, adapter, defaults, str(sd_path), height, width)
        pipe.loras = merged
        return pipe

    @property
    def device(self) -> torch.device:
        return next(self.models.unet.parameters()).device

    @property
    def has_adapter(self) -> bool:
        return self.adapter is not None

    def encode(self, prompts: list[str]) -> TextCondition:
        """SD's text encoder: the U-Net's cross-attention context and the adapter's text tokens (float32).
        Plain text, truncated to 77 tokens (what training reads captions with)."""
        return self.models.text.encode(prompts).to(dtype=torch.float32)

    def encode_prompts(self, prompts: list[str], chunks: int | None = None) -> TextCondition:
        """Prompts as users write them: AUTOMATIC1111's weights, BREAK and 75-token chunks, at least `chunks`
        of 77 tokens (ctxdiff/models/latent/prompt_weights.py); equal to `encode` for plain short prompts."""
        return encode_prompts(self.models.text, prompts, chunks=chunks).to(dtype=torch.float32)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> diffusion latents scaling_factor * E(x): the encoder's mean (float32)."""
        vae = self.models.vae
        return vae.encode(images.to(self.device, next(vae.parameters()).dtype)).mean.float() * vae.config.scaling_factor

    @torch.no_grad()
    def sample_latents(self, prompts: list[str], seeds: list[int], params: SampleConfig, progress=None, *,
                       negative: list[str] | str | None = None, init: InitImage | None = None) -> torch.Tensor:
        """Latents z_0 [N, 4, H/8, W/8] (float32), one per (prompt, seed), independent of the batch.

        `negative`: the unconditional branch's text per prompt (None: "", today's sampling bit for bit); the
        adapter keeps the prompt's context. `init`: img2img / inpainting from the init's latents
        (ctxdiff/pipelines/init_image.py). Prompts that need more 77-token chunks than others sample apart."""
        if len(prompts) != len(seeds):
            raise ValueError("one seed per prompt")
        negative = negative_prompts(negative, prompts)
        if init is not None:
            init = init.resized(self.size).for_batch(len(prompts), self.device)
        text = self.models.text
        chunks = [max(chunk_count(text, p), chunk_count(text, n)) for p, n in zip(prompts, negative)]
        if len(set(chunks)) == 1:
            return self._sample_latents(prompts, seeds, negative, chunks[0], params, progress, init)
        out = None
        for n in sorted(set(chunks)):
            idx = [i for i, c in enumerate(chunks) if c == n]
            part = self._sample_latents([prompts[i] for i in idx], [seeds[i] for i in idx], [negative[i] for i in idx],
                                        n, params, progress, None if init is None else init.select(idx))
            out = part.new_empty(len(prompts), *part.shape[1:]) if out is None else out
            out[idx] = part
        return out

    def _sample_latents(self, prompts, seeds, negative, chunks: int, params: SampleConfig, progress,
                        init: InitImage | None) -> torch.Tensor:
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        down = self.models.config.vae.downscale
        shape = [self.models.config.unet.in_channels, self.size[0] // down, self.size[1] // down]
        x_T = seeded_noise(shape, generators, self.device)
        cond = self.encode_prompts(prompts, chunks)
        uncond = self.encode_prompts(negative if any(negative) else [""], chunks)
        x0_fn = classifier_free_guidance(self.x0_fn, uncond, params.guidance)
        adapter = self.adapter if params.adapter else None
        start = None
        if init is not None:  # Eq. 1 of the init's latents; the mask on the latent grid
            mask = None if init.mask is None else mask_for(init.mask, tuple(shape[1:]))
            x0_fn, x_T, start = prepare(x0_fn, x_T, self.sched, self.encode_images(init.images), init.strength, mask,
                                        adapter, cond)
        return run_sampler(params, x0_fn, x_T, self.sched, params.steps, adapter, cond, generators, progress,
                           start=start)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] (float32), tiled when the VAE's tiling is on."""
        vae = self.models.vae
        return vae.from_latents(latents.to(next(vae.parameters()).dtype)).float().clamp(-1, 1)

    def sample(self, prompts: list[str], seeds: list[int], params: SampleConfig, progress=None, *,
               negative: list[str] | str | None = None, init: InitImage | None = None) -> torch.Tensor:
        """Images in [-1, 1], [N, 3, H, W] (`ctxdiff.data.png.to_uint8` makes uint8 of them); `negative` and
        `init` as in `sample_latents`. Inpainting pastes the init back outside the mask (the VAE does not
        reproduce it)."""
        if init is not None:
            init = init.resized(self.size).for_batch(len(prompts), self.device)
        images = self.decode(self.sample_latents(prompts, seeds, params, progress, negative=negative, init=init))
        return finite_images(images if init is None else overlay(images, init), params)

    def total_steps(self, params: SampleConfig) -> int:
        """Denoiser evaluations per batch (for progress bars)."""
        return params.steps
