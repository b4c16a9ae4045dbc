"""Text-to-image with ContextDiff: a base stage and an optional super-resolution stage, each a
U-Net denoiser with its context-aware adapter, sampled with DDIM/DDPM and classifier-free guidance.

A t2i bundle (written by `ctxdiff train`) holds the modules `clip`, `unet`, `adapter` and, for a
cascade, `sr_unet`, `sr_adapter`, with their configs, so `--model file.safetensors` is all a
user passes.
"""

from __future__ import annotations

import difflib
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from ctxdiff.checkpoints import load_module_state, load_training_state
from ctxdiff.diffusion import classifier_free_guidance, make_schedule, sample_ddim, sample_ddpm, timesteps_for
from ctxdiff.diffusion.schedule import Schedule
from ctxdiff.diffusion.solvers import SOLVERS, sample_solver
from ctxdiff.errors import CtxdiffError, UsageError
from ctxdiff.formats.t2i import T2IFile
from ctxdiff.models.adapter import ContextAdapter, build_adapter
from ctxdiff.models.conditioning import TextCondition
from ctxdiff.models.conditions import Condition, ConditionedAdapter, ConditionEncoder
from ctxdiff.models.encoders import ClipEncoders, load_clip
from ctxdiff.models.stage import Stage
from ctxdiff.models.unet import UNet
from ctxdiff.pipelines.init_image import InitImage, mask_for, prepare, start_timesteps
from ctxdiff.pipelines.lowres import downsample, noise_augment, upsample
from ctxdiff.recipes import DiffusionConfig, SampleConfig



class Text2Image:
    """The cascade, ready to sample. Build with `from_bundle`.

    `condition`: the `ConditionEncoder` of a class or layout model (paper Sec. 4.3); its
    `sample` then takes class labels or layouts (`ctxdiff.data.layouts`) where a text model takes
    prompts. None: a text model (the CLIP encodes the prompts)."""

    def __init__(self, clip: ClipEncoders, base: Stage, sr: Stage | None, diffusion: DiffusionConfig,
                 defaults: SampleConfig, source: str = "", condition: ConditionEncoder | None = None) -> None:
        self.clip, self.base, self.sr, self.diffusion = clip, base, sr, diffusion
        self.condition = condition
        self.sched: Schedule = make_schedule(diffusion.schedule, diffusion.timesteps)
        self.defaults, self.source = defaults, source

    @property
    def device(self) -> torch.device:
        return next(self.base.unet.parameters()).device

    @property
    def image_size(self) -> int:
        return (self.sr or self.base).unet.config.image_size

    @classmethod
    def from_bundle(cls, path: str | Path, device: str | torch.device = "cpu") -> "Text2Image":
        file = T2IFile.read(path)
        clip = load_clip(replace(file.clip, weights=None), device)
        load_module_state(clip.clip, file.tensors["clip"], f"{file.path} clip")
        condition = None
        if file.condition is not None:
            condition = ConditionEncoder(file.condition)
            load_module_state(condition, file.tensors["condition"], f"{file.path} condition")
            condition = condition.to(device).eval()

        def stage(prefix: str) -> Stage | None:
            if prefix not in file.stages:
                return None
            unet_config, adapter_config = file.stages[prefix]
            unet = UNet(unet_config)
            load_module_state(unet, file.tensors[f"{prefix}unet"], f"{file.path} {prefix}unet")
            adapter = None
            if adapter_config is not None:
                adapter = build_adapter(adapter_config, clip)
                if file.condition is not None:
                    adapter = ConditionedAdapter(adapter, file.condition)
                load_module_state(adapter, file.tensors[f"{prefix}adapter"], f"{file.path} {prefix}adapter")
            return Stage(unet.to(device).eval(), adapter.to(device).eval() if adapter else None)

        return cls(clip, stage(""), stage("sr_"), file.diffusion, file.sample, str(file.path), condition)

    def load_base_checkpoint(self, path: str | Path) -> None:
        """Put the EMA weights of a training checkpoint (`runs/.../checkpoints/step-*.pt`) of this
        bundle's base stage into its U-Net, adapter and (class or layout model) condition encoder:
        a bundle at any step of its run."""
        ema = load_training_state(path)["ema"]
        for prefix, module in (("unet.", self.base.unet), ("adapter.", self.base.adapter),
                               ("condition.", self.condition)):
            if module is not None:
                load_module_state(module, {k[len(prefix):]: v for k, v in ema.items() if k.startswith(prefix)},
                                  f"{path} {prefix[:-1]}")

    @property
    def condition_kind(self) -> str:
        """What `sample` takes: "text" (prompts), "class" (labels) or "layout" (layouts)."""
        return "text" if self.condition is None else self.condition.config.kind

    @property
    def labels(self) -> tuple[str, ...]:
        """The labels a class or layout model knows (empty for a text model)."""
        return () if self.condition is None else self.condition.config.labels

    def encode(self, prompts: list[str] | list[Condition]) -> TextCondition:
        """Prompts through the CLIP; for a class or layout model, labels or layouts (None: dropped)
        through its condition encoder (an unknown label is a UsageError naming the close ones)."""
        if self.condition is not None:
            return self.condition.encode(prompts, self.device)
        return self.clip.encode_text(prompts)

    @torch.no_grad()
    def sample(self, prompts: list[str] | list[Condition], seeds: list[int], params: SampleConfig, progress=None, *,
               negative: list[str] | str | None = None, init: InitImage | None = None) -> torch.Tensor:
        """Images in [-1, 1], [N, 3, H, W], one per (prompt, seed); each image depends only on its
        own prompt, seed and `params`, not on the batch it is made in. A class or layout model
        (`condition_kind`) takes labels or layouts as its prompts.

        `negative`: the unconditional branch's text per prompt (one for all, or None: "", today's sampling bit
        for bit); the adapter keeps the prompt. `init`: img2img / inpainting (ctxdiff/pipelines/init_image.py),
        resized to the model's size with a warning; each stage blends at its own size."""
        if len(prompts) != len(seeds):
            raise ValueError("one seed per prompt")
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        cond = self.encode(prompts)
        if self.condition is not None and negative is not None:
            raise UsageError(f"negative prompts are for text models; this model takes {self.condition_kind} "
                             "conditions (guidance is against the dropped condition)")
        negative = negative_prompts(negative, prompts)
        uncond = self.encode(negative) if any(negative) else self.encode([None] if self.condition is not None else [""])
        base_size = self.base.unet.config.image_size
        channels = self.base.unet.config.in_channels
        if init is not None:
            init = init.resized((self.image_size, self.image_size)).for_batch(len(prompts), self.device)
        base_init = init if init is None or base_size == self.image_size else InitImage(
            downsample(init.images, base_size), init.strength,
            None if init.mask is None else mask_for(init.mask, (base_size, base_size)))
        x_T = seeded_noise([channels, base_size, base_size], generators, self.device)
        images = self._run_stage(self.base, x_T, cond, uncond, params, params.steps, generators, progress,
                                 init=base_init)
        if self.sr is not None:
            size = self.sr.unet.config.image_size
            lowres = upsample(images, size)
            noise_level = params.lowres_noise_level
            if noise_level is None:   # the model's own (the level its SR stage was trained with)
                noise_level = self.defaults.lowres_noise_level
            level = torch.full((len(prompts),), noise_level, device=self.device)
            lowres = noise_augment(lowres, level, seeded_noise(list(lowres.shape[1:]), generators, self.device))
            x_T = seeded_noise([channels, size, size], generators, self.device)
            images = self._run_stage(self.sr, x_T, cond, uncond, params, params.sr_steps, generators, progress,
                                     lowres=lowres, lowres_t=level, init=init)
        return finite_images(images, params)

    def _run_stage(self, stage: Stage, x_T, cond, uncond, params: SampleConfig, steps: int, generators,
                   progress, lowres=None, lowres_t=None, init: InitImage | None = None) -> torch.Tensor:
        x0_fn = classifier_free_guidance(stage.x0_fn(lowres, lowres_t), uncond, params.guidance)
        adapter = stage.adapter if params.adapter else None
        start = None
        if init is not None:  # img2img / inpainting at this stage's size (Eq. 1 of the init)
            x0_fn, x_T, start = prepare(x0_fn, x_T, self.sched, init.images, init.strength, init.mask, adapter, cond)
        return run_sampler(params, x0_fn, x_T, self.sched, steps, adapter, cond, generators, progress, start=start)

    @property
    def has_adapter(self) -> bool:
        return self.base.adapter is not None

    def total_steps(self, params: SampleConfig) -> int:
        """Denoiser evaluations per batch (for progress bars)."""
        return params.steps + (params.sr_steps if self.sr is not None else 0)


def run_sampler(params: SampleConfig, x0_fn: Callable, x_T: torch.Tensor, sched: Schedule, steps: int,
                adapter: ContextAdapter | None, cond: TextCondition, generators, progress=None,
                start: int | None = None) -> torch.Tensor:
    """`params.sampler` over `steps` steps of `sched`, from x_T: DDIM (Eq. 9/11), DDPM (Eq. 7), or a
    context-aware solver of ctxdiff.diffusion.solvers (dpmpp-2m, dpmpp-2m-sde, euler, euler-a, heun,
    unipc; a "-karras" suffix selects Karras sigmas). `params.eta` applies to DDIM only."""
    timesteps = timesteps_for(sched.T, steps, params.spacing)
    if start is not None:  # img2img: from paper step `start`, the grid's steps below it
        if params.sampler.endswith("-karras") and start < sched.T:
            raise UsageError(f"{params.sampler} places its Karras sigmas over the whole range, so it cannot start "
                             f"an init image at step {start} of {sched.T}; use {params.sampler.removesuffix('-karras')}"
                             " or strength 1")
        timesteps = start_timesteps(timesteps, start)
    if params.sampler == "ddim":
        return sample_ddim(x0_fn, x_T, timesteps, sched, adapter=adapter, cond=cond, eta=params.eta,
                           generator=generators, progress=progress)
    if params.sampler == "ddpm":
        return sample_ddpm(x0_fn, x_T, timesteps, sched, adapter=adapter, cond=cond,
                           generator=generators, progress=progress)
    karras = params.sampler.endswith("-karras")
    name = params.sampler.removesuffix("-karras")
    if name not in SOLVERS:
        choices = ("ddim", "ddpm", *SOLVERS, *(f"{s}-karras" for s in SOLVERS))
        close = difflib.get_close_matches(params.sampler, choices, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UsageError(f"unknown sampler {params.sampler!r}; {hint}choose one of {', '.join(choices)}")
    return sample_solver(name, x0_fn, x_T, timesteps, sched, adapter=adapter, cond=cond, karras=karras,
                         generator=generators, progress=progress)


def negative_prompts(negative: list[str] | str | None, prompts: list[str]) -> list[str]:
    """One negative prompt per prompt: None gives "" (no negative), a string or a list of one serves all."""
    if negative is None:
        return [""] * len(prompts)
    negative = [negative] if isinstance(negative, str) else list(negative)
    if len(negative) == 1:
        return negative * len(prompts)
    if len(negative) != len(prompts):
        raise UsageError(f"{len(negative)} negative prompts for {len(prompts)} prompts; give one, or one per prompt")
    return negative


def finite_images(images: torch.Tensor, params: SampleConfig) -> torch.Tensor:
    """`images`, or a CtxdiffError when sampling gave NaN or inf (never a black PNG)."""
    if not torch.isfinite(images).all():
        raise CtxdiffError(f"sampling gave NaN or inf values (guidance {params.guidance}, {params.steps} steps of "
                           f"{params.sampler}); lower --guidance, or check the model with a known prompt")
    return images


def seeded_noise(shape: list[int], generators: list[torch.Generator], device) -> torch.Tensor:
    """Standard normal [N, *shape], sample i drawn (on the CPU) from generators[i] alone."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)
