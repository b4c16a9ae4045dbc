"""Text-to-image with ContextDiff: a base stage and an optional super-resolution stage, each a
U-Net denoiser with its context-aware adapter, sampled with DDIM/DDPM and classifier-free guidance.

A t2i bundle (written by `ctxdiff train`) holds the modules `clip`, `unet`, `adapter` and, for a
cascade, `sr_unet`, `sr_adapter`, with their configs, so `--model file.safetensors` is all a
user passes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from ctxdiff.checkpoints import load_bundle, load_module_state, load_training_state, save_bundle
from ctxdiff.diffusion import classifier_free_guidance, make_schedule, sample_ddim, sample_ddpm, timesteps_for
from ctxdiff.diffusion.schedule import Schedule
from ctxdiff.errors import CtxdiffError, UsageError
from ctxdiff.models.adapter import AdapterConfig, ContextAdapter
from ctxdiff.models.conditioning import TextCondition
from ctxdiff.models.encoders import ClipConfig, ClipEncoders, load_clip
from ctxdiff.models.unet import UNet, UNetConfig
from ctxdiff.pipelines.lowres import noise_augment, upsample
from ctxdiff.recipes import DiffusionConfig, SampleConfig, from_dict

BUNDLE_KIND = "t2i"
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "assets" / "shapes-default.safetensors"


@dataclass
class Stage:
    """One resolution of the cascade: the denoiser f_theta and its adapter r_phi (None: r = 0)."""

    unet: UNet
    adapter: ContextAdapter | None

    def x0_fn(self, lowres: torch.Tensor | None = None, lowres_t: torch.Tensor | None = None,
              clip_x0: bool = True) -> Callable:
        """x0_fn(x_t, cond, t) for the samplers; a doubled (guided) batch repeats the low-res input."""

        def predict(x: torch.Tensor, cond: TextCondition, t: torch.Tensor) -> torch.Tensor:
            lr, lt = lowres, lowres_t
            if lr is not None and lr.shape[0] != x.shape[0]:
                repeat = x.shape[0] // lr.shape[0]
                lr, lt = lr.repeat(repeat, 1, 1, 1), lt.repeat(repeat)
            x0 = self.unet(x, t, cond, lowres=lr, lowres_t=lt)
            return x0.clamp(-1, 1) if clip_x0 else x0

        return predict


@dataclass(frozen=True)
class SamplingParams:
    """Everything that decides an image besides prompt and seed (recorded in each PNG)."""

    sampler: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    guidance: float = 5.0
    spacing: str = "trailing"
    sr_steps: int = 25
    lowres_noise_level: float = 0.2
    adapter: bool = True

    @classmethod
    def from_sample_config(cls, config: SampleConfig, lowres_noise_level: float) -> "SamplingParams":
        return cls(config.sampler, config.steps, config.eta, config.guidance, config.spacing, config.sr_steps,
                   lowres_noise_level)


class Text2Image:
    """The cascade, ready to sample. Build with `from_bundle`."""

    def __init__(self, clip: ClipEncoders, base: Stage, sr: Stage | None, diffusion: DiffusionConfig,
                 defaults: SamplingParams, source: str = "") -> None:
        self.clip, self.base, self.sr, self.diffusion = clip, base, sr, diffusion
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
        path = Path(path)
        bundle = load_bundle(path, kind=BUNDLE_KIND)
        configs = bundle.configs
        clip_config = from_dict(ClipConfig, configs["clip"], "clip")
        clip = load_clip(replace(clip_config, weights=None), device)
        load_module_state(clip.clip, bundle.tensors["clip"], f"{path} clip")

        def stage(prefix: str) -> Stage | None:
            if f"{prefix}unet" not in bundle.tensors:
                return None
            unet = UNet(from_dict(UNetConfig, configs[f"{prefix}unet"], f"{prefix}unet"))
            load_module_state(unet, bundle.tensors[f"{prefix}unet"], f"{path} {prefix}unet")
            adapter = None
            if configs.get(f"{prefix}adapter") is not None:
                adapter = build_adapter(from_dict(AdapterConfig, configs[f"{prefix}adapter"], f"{prefix}adapter"), clip)
                load_module_state(adapter, bundle.tensors[f"{prefix}adapter"], f"{path} {prefix}adapter")
            return Stage(unet.to(device).eval(), adapter.to(device).eval() if adapter else None)

        base = stage("")
        if base is None:
            raise CtxdiffError(f"{path}: this t2i bundle has no base U-Net ('unet' tensors); "
                               "pass a bundle written by `ctxdiff train` for the base stage")
        defaults = SamplingParams.from_sample_config(from_dict(SampleConfig, configs.get("sample", {}), "sample"),
                                                     float(configs.get("lowres_noise_level", 0.2)))
        return cls(clip, base, stage("sr_"), from_dict(DiffusionConfig, configs["diffusion"], "diffusion"),
                   defaults, str(path))

    def load_base_checkpoint(self, path: str | Path) -> None:
        """Put the EMA weights of a training checkpoint (`runs/.../checkpoints/step-*.pt`) of this
        bundle's base stage into its U-Net and adapter: a bundle at any step of its run."""
        ema = load_training_state(path)["ema"]
        for prefix, module in (("unet.", self.base.unet), ("adapter.", self.base.adapter)):
            if module is not None:
                load_module_state(module, {k[len(prefix):]: v for k, v in ema.items() if k.startswith(prefix)},
                                  f"{path} {prefix[:-1]}")

    def encode(self, prompts: list[str]) -> TextCondition:
        return self.clip.encode_text(prompts)

    @torch.no_grad()
    def sample(self, prompts: list[str], seeds: list[int], params: SamplingParams, progress=None,
               guide: Callable | None = None) -> torch.Tensor:
        """Images in [-1, 1], [N, 3, H, W], one per (prompt, seed); each image depends only on its
        own prompt, seed and `params`, not on the batch it is made in. `guide(x0_fn, cond) -> x0_fn`,
        if given, wraps each stage's guided denoiser (e.g. CLIP guidance: benchmarks/clip_guidance_probe.py)."""
        if len(prompts) != len(seeds):
            raise ValueError("one seed per prompt")
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        cond = self.encode(prompts)
        uncond = self.encode([""])
        base_size = self.base.unet.config.image_size
        channels = self.base.unet.config.in_channels
        x_T = seeded_noise([channels, base_size, base_size], generators, self.device)
        images = self._run_stage(self.base, x_T, cond, uncond, params, params.steps, generators, progress,
                                 guide=guide)
        if self.sr is not None:
            size = self.sr.unet.config.image_size
            lowres = upsample(images, size)
            level = torch.full((len(prompts),), params.lowres_noise_level, device=self.device)
            lowres = noise_augment(lowres, level, seeded_noise(list(lowres.shape[1:]), generators, self.device))
            x_T = seeded_noise([channels, size, size], generators, self.device)
            images = self._run_stage(self.sr, x_T, cond, uncond, params, params.sr_steps, generators, progress,
                                     lowres=lowres, lowres_t=level, guide=guide)
        return images

    def _run_stage(self, stage: Stage, x_T, cond, uncond, params: SamplingParams, steps: int, generators,
                   progress, lowres=None, lowres_t=None, guide: Callable | None = None) -> torch.Tensor:
        x0_fn = classifier_free_guidance(stage.x0_fn(lowres, lowres_t), uncond, params.guidance)
        if guide is not None:
            x0_fn = guide(x0_fn, cond)
        return run_sampler(params, x0_fn, x_T, self.sched, steps, stage.adapter if params.adapter else None, cond,
                           generators, progress)

    @property
    def has_adapter(self) -> bool:
        return self.base.adapter is not None

    def total_steps(self, params: SamplingParams) -> int:
        """Denoiser evaluations per batch (for progress bars)."""
        return params.steps + (params.sr_steps if self.sr is not None else 0)


def run_sampler(params: SamplingParams, x0_fn: Callable, x_T: torch.Tensor, sched: Schedule, steps: int,
                adapter: ContextAdapter | None, cond: TextCondition, generators, progress=None) -> torch.Tensor:
    """`params.sampler` (DDIM, Eq. 9/11, or DDPM, Eq. 7) over `steps` steps of `sched`, from x_T."""
    timesteps = timesteps_for(sched.T, steps, params.spacing)
    if params.sampler == "ddim":
        return sample_ddim(x0_fn, x_T, timesteps, sched, adapter=adapter, cond=cond, eta=params.eta,
                           generator=generators, progress=progress)
    if params.sampler == "ddpm":
        return sample_ddpm(x0_fn, x_T, timesteps, sched, adapter=adapter, cond=cond,
                           generator=generators, progress=progress)
    raise UsageError(f"unknown sampler {params.sampler!r}; choose ddim or ddpm")


def build_adapter(config: AdapterConfig, clip: ClipEncoders) -> ContextAdapter:
    """The adapter with its image branch: CLIP patch tokens of x0 (faithful) or its own patch embedding."""
    encoder = (lambda x: clip.encode_image(x)[0]) if config.image_branch == "clip" else None
    return ContextAdapter(config, image_encoder=encoder)


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


def seeded_noise(shape: list[int], generators: list[torch.Generator], device) -> torch.Tensor:
    """Standard normal [N, *shape], sample i drawn (on the CPU) from generators[i] alone."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)
