"""`ctxdiff train` with a `latent:` recipe section: a context-aware adapter over a frozen Stable Diffusion.

Eq. 6 in latent space: z_0 = scaling_factor * (a sample of the VAE encoding of the image),
z_t = sqrt(abar_t) z_0 + k_t r_phi(z_0, c, t) + sqrt(1 - abar_t) eps (Eq. 1, the checkpoint's
schedule), L = lambda_t ||z_0 - f(z_t, c, t)||^2 with f the frozen SD U-Net read as an x0-predictor
of z_t (ctxdiff/pipelines/latent.py explains why the U-Net sees z_t, bias included). Only the
adapter is trained; the gradient reaches it through the U-Net's input.

The pieces of the pixel trainer are reused: EMA, per-step seeding (`step_seed`: t, noise, the VAE
sample and condition dropout of step k come from a generator seeded by (seed, k); the data order
from `batch_stream`), so `--resume` continues bit-identically; checkpoints hold adapter, EMA,
optimizer, LR schedule and step; a non-finite loss stops without saving. One process (no DDP).
Output: <output>/adapter.safetensors (the EMA adapter, "latent-adapter" kind) and, every
`train.sample_every` steps, a preview grid in <output>/samples/.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from ctxdiff.checkpoints import rotate_checkpoints, save_training_state, training_state_path
from ctxdiff.data.datasets import open_dataset
from ctxdiff.diffusion import diffusion_loss, sample_timesteps
from ctxdiff.errors import UsageError
from ctxdiff.formats.latent_adapter import check_adapter_fits, save_latent_adapter
from ctxdiff.models.adapter import build_adapter
from ctxdiff.models.encoders import load_clip
from ctxdiff.models.latent import load_sd
from ctxdiff.pipelines.latent import SD_DEFAULTS, LatentText2Image
from ctxdiff.recipes import to_dict
from ctxdiff.training.recipe import Recipe
from ctxdiff.training.trainer import (EMA, TrainLoop, _autocast, batch_stream, check_run_folder, lr_scheduler,
                                      step_seed)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class LatentAdapterTrainer(TrainLoop):
    """One run of adapter training over an SD backbone; the interface of `Trainer` (step, on_step, run)."""

    def __init__(self, recipe: Recipe, device: torch.device, resume: bool = False,
                 on_step: Callable[[dict], None] | None = None, log: Callable[[str], None] = lambda _: None) -> None:
        if recipe.latent is None:
            raise UsageError("latent adapter training needs a `latent:` recipe section (latent.sd_checkpoint)")
        self.recipe, self.device, self.resume, self.on_step, self.log = recipe, device, resume, on_step, log
        cfg, latent = recipe.train, recipe.latent
        _check_recipe(recipe)
        self.out = Path(recipe.output)
        self.ckpt_dir = self.out / "checkpoints"
        self.model_path = self.out / "adapter.safetensors"
        check_run_folder(self.out, self.ckpt_dir, resume)

        self.models = load_sd(latent.sd_checkpoint, prediction_type=latent.prediction_type, use_ema=latent.use_ema,
                              device=device, dtype=_DTYPES[cfg.precision])
        for module in (self.models.unet, self.models.vae, self.models.text):
            module.requires_grad_(False)
        size = recipe.data.image_size
        self.pipe = LatentText2Image(self.models, None, source=latent.sd_checkpoint, height=size, width=size)
        _check_backbone(recipe, self.pipe)
        adapter_cfg = recipe.model.adapter
        check_adapter_fits(adapter_cfg, self.models)
        torch.manual_seed(cfg.seed)   # adapter init and a weightless CLIP (tests): the same on resume
        self.clip = load_clip(recipe.model.clip, device) if adapter_cfg.image_branch == "clip" else None
        if self.clip is not None and self.clip.image_dim != adapter_cfg.image_dim:
            raise UsageError(f"model.adapter.image_dim is {adapter_cfg.image_dim}, but model.clip's image tokens "
                             f"are {self.clip.image_dim} wide; set model.adapter.image_dim: {self.clip.image_dim}")
        self.adapter = build_adapter(adapter_cfg, self.clip, self.models.vae).to(device).train()
        self.ema = EMA(self.adapter, cfg.ema_decay, cfg.ema_warmup)
        self.optimizer = torch.optim.AdamW(self.adapter.parameters(), lr=cfg.lr, betas=tuple(cfg.adam_betas),
                                           weight_decay=cfg.weight_decay)
        self.scheduler = lr_scheduler(self.optimizer, cfg)
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16")
        self.step = 0
        if resume:
            self._load_latest()
        self.dataset = open_dataset(recipe.data.source, recipe.data.image_size, caption_key=recipe.data.caption_key,
                                    shapes_count=recipe.data.shapes_count, shapes_seed=recipe.data.shapes_seed)
        self._stream = None

    # ----------------------------------------------------------------- files

    def _load_latest(self) -> None:
        state, path = self.resume_state()
        self.adapter.load_state_dict(state["adapter"])
        self.restore_loop_state(state, path)

    def save_checkpoint(self) -> Path:
        state = {"adapter": self.adapter.state_dict(), **self.loop_state()}
        path = save_training_state(training_state_path(self.ckpt_dir, self.step), state)
        rotate_checkpoints(self.ckpt_dir, keep_last=self.recipe.train.keep_last)
        self.export()
        return path

    def export(self, path: Path | None = None) -> Path:
        """Write the EMA adapter as a "latent-adapter" file that names its backbone."""
        r = self.recipe
        dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[r.export_dtype]
        return save_latent_adapter(path or self.out / "adapter.safetensors", self.ema.shadow, self.clip,
                                   r.latent.sd_checkpoint, self.models, r.sample,
                                   extra={"step": self.step, "recipe": to_dict(r)}, dtype=dtype)

    # ------------------------------------------------------------------ loop

    def _latents(self, images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """z_0 = scaling_factor * (mean + std * noise) of the VAE encoding (float32), noise from the step's seed."""
        vae = self.models.vae
        with torch.no_grad():
            posterior = vae.encode(images.to(self.device, next(vae.parameters()).dtype))
            z = posterior.mean.float() + posterior.std.float() * noise.to(self.device)
        return z * vae.config.scaling_factor

    def train_step(self) -> float:
        """One optimizer step of Eq. 6 on the global batch; returns its mean loss."""
        cfg, r = self.recipe.train, self.recipe
        gen = torch.Generator().manual_seed(step_seed(cfg.seed, self.step))
        torch.manual_seed(step_seed(cfg.seed, self.step) + 1)  # dropout layers
        if self._stream is None:
            self._stream = batch_stream(self.dataset, cfg.seed, self.step, cfg.batch_size, cfg.num_workers)
        images, captions = next(self._stream)
        n, down = images.shape[0], self.models.config.vae.downscale
        latent_shape = (n, self.models.config.vae.latent_channels, images.shape[2] // down, images.shape[3] // down)
        d = r.diffusion
        t = sample_timesteps(n, self.pipe.sched.T, gen, d.high_noise_share, d.high_noise_from)
        noise = torch.randn(latent_shape, generator=gen)
        vae_noise = torch.randn(latent_shape, generator=gen)
        dropped = torch.rand(n, generator=gen) < r.diffusion.cond_drop_prob
        micro = n // cfg.grad_accum
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for k in range(cfg.grad_accum):
            part = slice(k * micro, (k + 1) * micro)
            texts = ["" if dropped[i] else captions[i] for i in range(part.start, part.stop)]
            z0 = self._latents(images[part], vae_noise[part])
            cond = self.pipe.encode(texts)
            with _autocast(cfg.precision, self.device):
                loss = diffusion_loss(self.pipe.sched, self.pipe.x0_fn, z0, cond, self.adapter,
                                      t=t[part].to(self.device), noise=noise[part].to(self.device),
                                      weighting=r.diffusion.loss_weighting, gamma=r.diffusion.min_snr_gamma)
            self.check_finite(loss)
            self.scaler.scale(loss / cfg.grad_accum).backward()
            total += loss.detach() / cfg.grad_accum
        self.optimizer_step(self.adapter.parameters())
        self.ema.update(self.adapter, self.step)
        self.step += 1
        return float(total)

    def preview(self, count: int = 4) -> Path:
        """A grid of samples with the EMA adapter (DDIM, at most 20 steps) at the training resolution."""
        prompts = self.preview_prompts(count)
        pipe = LatentText2Image(self.models, self.ema.shadow, SD_DEFAULTS, self.pipe.source, *self.pipe.size)
        params = replace(self.recipe.sample,
                         steps=min(20, self.recipe.sample.steps))
        return self.write_preview(pipe.sample(prompts, list(range(len(prompts))), params), prompts)


def _check_recipe(recipe: Recipe) -> None:
    """Recipe settings that have no meaning over a frozen SD backbone are refused, not ignored."""
    cfg = recipe.train
    if recipe.model.adapter is None:
        raise UsageError("model.adapter: a latent recipe trains an adapter; set model.adapter (x_shape: [4, H/8, W/8])")
    if cfg.stage != "base":
        raise UsageError(f"train.stage={cfg.stage} does not apply to a latent adapter; remove it (or set base)")
    if cfg.gradient_checkpointing:
        raise UsageError("train.gradient_checkpointing is not supported for latent adapters; set it to false")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("latent adapter training runs in one process; start it without torchrun")
    if cfg.batch_size % cfg.grad_accum:
        raise UsageError(f"train.batch_size={cfg.batch_size} must divide evenly into {cfg.grad_accum} "
                         "accumulation step(s)")


def _check_backbone(recipe: Recipe, pipe: LatentText2Image) -> None:
    """The recipe's diffusion schedule and adapter size must be the backbone's."""
    sched, diffusion = pipe.models.scheduler, recipe.diffusion
    if (diffusion.schedule, diffusion.timesteps) != (sched.beta_schedule, sched.num_train_timesteps):
        raise UsageError(f"diffusion.schedule/timesteps are {diffusion.schedule}/{diffusion.timesteps}, but "
                         f"{recipe.latent.sd_checkpoint} was trained with {sched.beta_schedule}/"
                         f"{sched.num_train_timesteps}; set diffusion.schedule: {sched.beta_schedule} and "
                         f"diffusion.timesteps: {sched.num_train_timesteps}")
    down = pipe.models.config.vae.downscale
    side = recipe.data.image_size // down
    expected = (pipe.models.config.vae.latent_channels, side, side)
    if recipe.data.image_size % down or recipe.model.adapter.x_shape != expected:
        raise UsageError(f"model.adapter.x_shape is {list(recipe.model.adapter.x_shape)}, but data.image_size "
                         f"{recipe.data.image_size} gives latents {list(expected)} (image size / {down}); "
                         f"set model.adapter.x_shape: {list(expected)} and a data.image_size divisible by {down}")
