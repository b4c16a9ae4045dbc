"""`ctxdiff train`: the denoiser f_theta and the adapter r_phi trained jointly by Eq. 6.

Exact resume: every random draw of step k (diffusion step t, noise, condition dropout, dropout
layers) comes from a generator seeded by (seed, k), and the data order is a pure function of
(seed, k) (`batch_indices`), so a run resumed from the checkpoint of step k continues exactly
as the uninterrupted run would. A checkpoint holds model, EMA, optimizer, LR schedule and step.

Multi-GPU / multi-node: launch with `torchrun`; `train.batch_size` is the global batch. Every
rank draws the randomness of the whole global batch and keeps its slice, so N ranks compute
the same update as one process on the combined batch. Rank 0 writes all files.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from ctxdiff.checkpoints import (capture_rng_state, latest_checkpoint, load_latest_good_state, rotate_checkpoints,
                                 save_training_state, training_state_path)
from ctxdiff.data.conditions import open_condition_dataset
from ctxdiff.data.datasets import ShardStream, batch_indices, collate, open_dataset
from ctxdiff.data.png import grid, save_png, to_uint8
from ctxdiff.diffusion import diffusion_loss, make_schedule, sample_timesteps
from ctxdiff.errors import CtxdiffError, UsageError
from ctxdiff.formats.t2i import save_t2i_bundle
from ctxdiff.models.adapter import build_adapter
from ctxdiff.models.conditions import ConditionedAdapter, ConditionEncoder, complete_config, describe
from ctxdiff.data.layouts import parse_layout
from ctxdiff.models.encoders import load_clip
from ctxdiff.models.stage import Stage
from ctxdiff.models.unet import UNet, UNetConfig
from ctxdiff.pipelines.lowres import downsample, noise_augment, upsample
from ctxdiff.pipelines.text2image import Text2Image
from ctxdiff.recipes import SampleConfig, TrainConfig, dump_recipe, from_dict, to_dict
from ctxdiff.training.recipe import Recipe


@dataclass
class TrainResult:
    step: int
    loss: float
    model_path: Path
    interrupted: bool


class EMA:
    """Exponential moving average of a module's weights; decay min(decay, (1 + n)/(10 + n)) with warm-up."""

    def __init__(self, module: nn.Module, decay: float, warmup: bool) -> None:
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)
        self.decay, self.warmup = decay, warmup

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay
        for ema_p, p in zip(self.shadow.parameters(), module.parameters()):
            ema_p.lerp_(p.detach(), 1 - decay)
        for ema_b, b in zip(self.shadow.buffers(), module.buffers()):
            ema_b.copy_(b)


class DenoisingObjective(nn.Module):
    """Eq. 6 as one module (what DistributedDataParallel wraps): f_theta and r_phi jointly, and for
    a class or layout model its `condition` encoder, which then encodes the raw conditions here."""

    def __init__(self, unet: UNet, adapter: nn.Module | None, recipe: Recipe,
                 condition: ConditionEncoder | None = None) -> None:
        super().__init__()
        self.unet, self.adapter = unet, adapter
        if condition is not None:   # (a text model's state_dict, and so its checkpoints, stay as they were)
            self.condition = condition
        self.sched = make_schedule(recipe.diffusion.schedule, recipe.diffusion.timesteps)
        self.weighting, self.gamma = recipe.diffusion.loss_weighting, recipe.diffusion.min_snr_gamma

    def forward(self, x0, cond, t, noise, lowres=None, lowres_t=None) -> torch.Tensor:
        if hasattr(self, "condition"):
            cond = self.condition.encode(cond, x0.device)

        def x0_fn(x, c, tt):
            return self.unet(x, tt, c, lowres=lowres, lowres_t=lowres_t)

        return diffusion_loss(self.sched, x0_fn, x0, cond, self.adapter, t=t, noise=noise,
                              weighting=self.weighting, gamma=self.gamma)


def _unet_config(recipe: Recipe) -> UNetConfig:
    """The recipe's U-Net config with the run's gradient checkpointing and, for epsilon/v outputs,
    the noise schedule its output is read under (`diffusion.schedule`: they must agree)."""
    config, d = recipe.model.unet, recipe.diffusion
    if recipe.train.gradient_checkpointing:
        config = replace(config, gradient_checkpointing=True)
    if config.prediction_type == "sample":
        return config
    if config.prediction_type == "epsilon" and d.loss_weighting == "constant":
        raise UsageError("model.unet.prediction_type epsilon needs diffusion.loss_weighting snr or min_snr: the "
                         "constant weight on the x0 error weights the epsilon error by (1 - abar)/abar, which "
                         "explodes as t -> T")
    if config.schedule not in (None, d.schedule) or config.timesteps != d.timesteps:
        raise UsageError(f"model.unet reads its {config.prediction_type} output under schedule "
                         f"{config.schedule!r} with {config.timesteps} steps, but diffusion is {d.schedule!r} with "
                         f"{d.timesteps}; make them agree (or leave model.unet.schedule unset)")
    return replace(config, schedule=d.schedule)


def _check_widths(recipe: Recipe, clip) -> None:
    """The U-Net's and the adapter's text (and image) widths must be the CLIP's: UsageError naming the key.
    (A class or layout model's text widths are its condition encoder's; only the image width is checked.)"""
    model = recipe.model
    widths = [("model.unet.text_dim", model.unet.text_dim, clip.text_dim, "text token"),
              ("model.unet.pooled_dim", model.unet.pooled_dim, clip.embed_dim, "pooled embedding")]
    if model.condition is not None:
        widths = []
    if model.adapter is not None and model.condition is None:
        widths.append(("model.adapter.text_dim", model.adapter.text_dim, clip.text_dim, "text token"))
    if model.adapter is not None:
        if model.adapter.image_branch == "clip":
            widths.append(("model.adapter.image_dim", model.adapter.image_dim, clip.image_dim, "image token"))
    for key, width, expected, what in widths:
        if width != expected:
            raise UsageError(f"{key} is {width}, but the CLIP '{clip.config.arch}' gives {what}s of width "
                             f"{expected}; set {key}: {expected}")


class _StepBatches:
    """Batch sampler: the index lists of steps start, start + 1, ... (a pure function of the step)."""

    def __init__(self, length: int, seed: int, start: int, batch_size: int) -> None:
        self.length, self.seed, self.start, self.batch_size = length, seed, start, batch_size

    def __iter__(self):
        step = self.start
        while True:
            yield batch_indices(self.length, self.seed, step, self.batch_size)
            step += 1


def _batched(stream, size: int):
    while True:
        yield collate([next(stream) for _ in range(size)])


def batch_stream(dataset, seed: int, start_step: int, batch_size: int, num_workers: int = 0):
    """(images, captions) of the global batches of steps start_step, start_step + 1, ...: a pure
    function of (seed, step) for map-style datasets, the shard order for a ShardStream."""
    if isinstance(dataset, ShardStream):
        stream = iter(dataset)
        for _ in range(start_step * batch_size):  # resume: pass over what was read
            next(stream)
        return _batched(stream, batch_size)
    order = _StepBatches(len(dataset), seed, start_step, batch_size)
    return iter(DataLoader(dataset, batch_sampler=order, num_workers=num_workers, collate_fn=collate,
                           persistent_workers=False))


RUN_OUTPUTS = ("checkpoints", "samples", "metrics.jsonl", "recipe.yaml", "model.safetensors", "clip.safetensors",
               "adapter.safetensors", "clip-eval.json", "tuned.safetensors")   # what a run writes in its folder


def check_run_folder(out: Path, ckpt_dir: Path, resume: bool, force: bool = False) -> None:
    """A new run starts in a new or empty folder, never over files it did not write (`force`:
    remove what a run writes there first, RUN_OUTPUTS: replace, never append); --resume needs
    the folder of a run, with checkpoints."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a folder; choose another output folder")
    existing = latest_checkpoint(ckpt_dir) if ckpt_dir.is_dir() else None
    if resume:
        if existing is None:
            raise CtxdiffError(f"{ckpt_dir}: no checkpoint to resume from; run without --resume to start")
        return
    if force and out.is_dir():
        for name in RUN_OUTPUTS:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        return
    if existing is not None:
        raise UsageError(f"{out} already holds a run (checkpoint {existing.name}); pass --resume to continue it, "
                         "--force to start it over, or choose another output folder")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held:
        shown = ", ".join(held[:4]) + (f" and {len(held) - 4} more" if len(held) > 4 else "")
        raise UsageError(f"{out}: the folder holds files this run did not write ({shown}); choose an empty or new "
                         "output folder, or pass --force to replace a run's files there")


def _init_from_bundle(path: str, prefix: str, unet: UNet, adapter: nn.Module | None) -> None:
    """Start from the `prefix` stage of a t2i bundle (names of missing or mismatched tensors are listed)."""
    from ctxdiff.checkpoints import load_bundle, load_module_state

    bundle = load_bundle(path, kind="t2i")
    for name, module in ((f"{prefix}unet", unet), (f"{prefix}adapter", adapter)):
        if module is None:
            continue
        if name not in bundle.tensors:
            raise CtxdiffError(f"{path}: model.init_from has no '{name}' weights for this stage")
        load_module_state(module, bundle.tensors[name], f"{path} {name}")


RESUME_MUST_MATCH = ("model", "data", "diffusion", "latent", "train.stage", "train.layout_loss")


def recipe_changes(saved: dict | None, recipe: Recipe) -> list[str]:
    """The keys of RESUME_MUST_MATCH (what decides the function being trained) in which `recipe`
    differs from a checkpoint's recorded recipe, read through today's dataclasses (a field added
    since, like `adapter.bound`, takes its default: the behaviour the run had)."""
    try:
        then = to_dict(from_dict(Recipe, saved or {}))
    except CtxdiffError:   # a key that no longer exists
        return ["recipe"]
    now = to_dict(recipe)

    def at(tree: dict, key: str):
        for part in key.split("."):
            tree = tree.get(part) if isinstance(tree, dict) else None
        return tree

    return [key for key in RESUME_MUST_MATCH if at(then, key) != at(now, key)]


def lr_factor(step: int, warmup: int, steps: int, schedule: str) -> float:
    """The learning rate at optimizer step `step` over its peak: linear warmup over `warmup` steps,
    then constant or a half cosine that reaches 0 at `steps`."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def lr_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """`train.lr_schedule` (null: cosine for the clip stage, as open_clip, constant otherwise)."""
    schedule = cfg.lr_schedule or ("cosine" if cfg.stage == "clip" else "constant")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg.warmup_steps, cfg.steps, schedule))


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + 17) % (2**63 - 1)


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: torch.device) -> torch.device:
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE set); gloo on CPU, nccl on CUDA."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def _autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise UsageError("train.precision=fp16 needs a CUDA device; use bf16 on the CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


class TrainLoop:
    """The loop every trainer shares: steps, JSONL metrics, previews, checkpoints, a graceful stop.

    A subclass sets recipe, out, ckpt_dir, step, optimizer, scheduler, scaler, ema (None: no EMA),
    model_path, on_step and `writer` (whether this process writes files), and provides train_step,
    preview and save_checkpoint.
    """

    writer = True

    def run(self, should_stop: Callable[[], bool] = lambda: False) -> TrainResult:
        cfg = self.recipe.train
        if self.writer:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "recipe.yaml").write_text(dump_recipe(self.recipe))
        loss = math.nan
        started, first_step = time.perf_counter(), self.step
        while self.step < cfg.steps:
            loss = self.train_step()
            record = {"step": self.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0],
                      "it_per_s": (self.step - first_step) / max(time.perf_counter() - started, 1e-9)}
            if self.on_step is not None:
                self.on_step(record)
            if self.writer and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                with open(self.out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            if cfg.sample_every and self.step % cfg.sample_every == 0:
                self.preview()
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                self.save_checkpoint()
            if should_stop():
                self.save_checkpoint()
                return TrainResult(self.step, loss, self.model_path, interrupted=True)
        return TrainResult(self.step, loss, self.model_path, interrupted=False)

    def check_finite(self, loss: torch.Tensor) -> None:
        """A non-finite loss stops the run before the update: the last good checkpoint stays."""
        if not torch.isfinite(loss):
            raise CtxdiffError(f"the loss became {loss.item()} at step {self.step + 1}; stopped without saving it "
                               f"(the last good checkpoint is kept in {self.ckpt_dir}); lower train.lr, "
                               "or use train.precision=fp32")

    def loop_state(self) -> dict:
        """What every checkpoint holds besides the model: EMA (None without), optimizer, LR schedule, scaler, step."""
        return {"ema": None if self.ema is None else self.ema.shadow.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "step": self.step,
                "rng": capture_rng_state(), "recipe": to_dict(self.recipe)}

    def resume_state(self) -> tuple[dict, Path]:
        """The latest checkpoint of this run, refused if it was trained with another model, data,
        noise process or stage (`recipe_changes`); train.steps, lr and the like may change."""
        state, path = load_latest_good_state(self.ckpt_dir, self.log)
        changed = recipe_changes(state.get("recipe"), self.recipe)
        if changed:
            raise CtxdiffError(f"{path}: this checkpoint was trained with another {', '.join(changed)}; resume "
                               "with the recipe that started the run")
        return state, path

    def restore_loop_state(self, state: dict, path: Path) -> None:
        if self.ema is not None:
            self.ema.shadow.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.log(f"resumed from {path} at step {self.step}")

    def preview_prompts(self, count: int) -> list[str]:
        """The recipe's preview prompts, else the first captions of the dataset."""
        if self.recipe.preview_prompts:
            return list(self.recipe.preview_prompts)
        if isinstance(self.dataset, ShardStream):
            return ["" for _ in range(count)]
        return [self.dataset[i][1] for i in range(min(count, len(self.dataset)))]

    def write_preview(self, images: torch.Tensor, prompts: list[str]) -> Path:
        """<output>/samples/step-NNNNNNNN.png: the grid of a preview."""
        path = self.out / "samples" / f"step-{self.step:08d}.png"
        return save_png(path, grid(to_uint8(images)), {"step": self.step, "prompts": prompts})

    def optimizer_step(self, parameters) -> None:
        """Unscale, clip, step (AMP-aware), advance the LR schedule."""
        if self.recipe.train.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(parameters, self.recipe.train.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()


class Trainer(TrainLoop):
    """One training run of a base or super-resolution stage from a recipe."""

    def __init__(self, recipe: Recipe, device: torch.device, resume: bool = False,
                 on_step: Callable[[dict], None] | None = None, log: Callable[[str], None] = lambda _: None) -> None:
        self.recipe, self.resume, self.on_step, self.log = recipe, resume, on_step, log
        self.device = init_distributed(device)
        self.rank, self.world = _dist()
        self.writer = self.rank == 0
        cfg = recipe.train
        if cfg.batch_size % (self.world * cfg.grad_accum):
            raise UsageError(f"train.batch_size={cfg.batch_size} must divide evenly over {self.world} process(es) "
                             f"x {cfg.grad_accum} accumulation step(s)")
        self.out = Path(recipe.output)
        self.ckpt_dir = self.out / "checkpoints"
        self.model_path = self.out / "model.safetensors"
        self._check_output()

        torch.manual_seed(cfg.seed)  # a CLIP without weights (tests) is random: make it the same on resume
        self.clip = load_clip(recipe.model.clip, self.device)
        _check_widths(recipe, self.clip)
        unet_cfg = _unet_config(recipe)
        self.dataset = self._open_dataset(unet_cfg.image_size)
        unet = UNet(unet_cfg)
        adapter = build_adapter(recipe.model.adapter, self.clip) if recipe.model.adapter is not None else None
        condition = None
        if recipe.model.condition is not None:
            condition_cfg = complete_config(recipe.model.condition, self.dataset.labels, unet_cfg.text_dim,
                                            unet_cfg.pooled_dim)
            condition = ConditionEncoder(condition_cfg)
            adapter = None if adapter is None else ConditionedAdapter(adapter, condition_cfg)
        if recipe.model.init_from:
            _init_from_bundle(recipe.model.init_from, "sr_" if cfg.stage == "sr" else "", unet, adapter)
        self.objective = DenoisingObjective(unet, adapter, recipe, condition).to(self.device)
        self.ema = EMA(self.objective, cfg.ema_decay, cfg.ema_warmup)
        self.model = self.objective
        if self.world > 1:
            self.model = nn.parallel.DistributedDataParallel(
                self.objective, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        params = [p for p in self.objective.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay)
        self.scheduler = lr_scheduler(self.optimizer, cfg)
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16")
        self.step = 0
        if resume:
            self._load_latest()
        self.stage = cfg.stage
        if self.stage == "sr" and not unet_cfg.lowres_cond:
            raise UsageError("train.stage=sr needs a super-resolution U-Net (model.unet.lowres_cond: true)")
        self._stream = None

    def _open_dataset(self, size: int):
        d, condition = self.recipe.data, self.recipe.model.condition
        if condition is not None:
            return open_condition_dataset(condition.kind, d.source, size, shapes_count=d.shapes_count,
                                          shapes_seed=d.shapes_seed, max_objects=condition.max_objects)
        return open_dataset(d.source, size, caption_key=d.caption_key, shapes_count=d.shapes_count,
                            shapes_seed=d.shapes_seed)

    @property
    def condition(self) -> ConditionEncoder | None:
        """The EMA condition encoder of a class or layout model (None: text)."""
        return getattr(self.ema.shadow, "condition", None)

    # ----------------------------------------------------------------- files

    def _check_output(self) -> None:
        check_run_folder(self.out, self.ckpt_dir, self.resume)

    def _load_latest(self) -> None:
        state, path = self.resume_state()
        self.objective.load_state_dict(state["model"])
        self.restore_loop_state(state, path)

    def _check_ranks_agree(self) -> None:
        """All ranks must hold the same weights (a cheap fingerprint, compared at every checkpoint)."""
        fingerprint = torch.stack([p.detach().double().sum() for p in self.objective.parameters()]).to(self.device)
        gathered = [torch.empty_like(fingerprint) for _ in range(self.world)]
        dist.all_gather(gathered, fingerprint)
        if any(not torch.equal(gathered[0], other) for other in gathered[1:]):
            raise CtxdiffError(f"ranks disagree on the weights at step {self.step}; training stopped")

    def save_checkpoint(self) -> Path | None:
        if self.world > 1:
            self._check_ranks_agree()
        if self.rank == 0:
            state = {"model": self.objective.state_dict(), **self.loop_state()}
            save_training_state(training_state_path(self.ckpt_dir, self.step), state)
            rotate_checkpoints(self.ckpt_dir, keep_last=self.recipe.train.keep_last)
            self.export()
        if self.world > 1:
            dist.barrier()
        return latest_checkpoint(self.ckpt_dir)

    def ema_stage(self) -> Stage:
        return Stage(self.ema.shadow.unet, self.ema.shadow.adapter)

    def export(self, path: Path | None = None) -> Path:
        """Write the EMA weights as a t2i bundle (a cascade when this is an SR stage over a base model)."""
        path = path or self.out / "model.safetensors"
        r = self.recipe
        configs = {"diffusion": r.diffusion, "sample": r.sample, "lowres_noise_level": r.train.lowres_noise_level}
        extra = {"step": self.step, "recipe": to_dict(r)}
        if self.stage == "sr":
            base = self._base_pipeline()
            stages = {"": base.base, "sr_": self.ema_stage()}
        else:
            stages = {"": self.ema_stage()}
        dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[r.export_dtype]
        return save_t2i_bundle(path, self.clip, stages, configs, extra, dtype=dtype, condition=self.condition)

    def _base_pipeline(self) -> Text2Image:
        if not self.recipe.model.base_model:
            raise UsageError("train.stage=sr needs model.base_model: the base t2i bundle to join into a cascade")
        return Text2Image.from_bundle(self.recipe.model.base_model, self.device)

    # ------------------------------------------------------------------ data

    def _global_batch(self) -> tuple[torch.Tensor, list[str]]:
        """The global batch of the current step (the same on every rank; each keeps its slice)."""
        if self._stream is None:
            cfg = self.recipe.train
            self._stream = batch_stream(self.dataset, cfg.seed, self.step, cfg.batch_size, cfg.num_workers)
        return next(self._stream)

    # ------------------------------------------------------------------ loop

    def train_step(self) -> float:
        """One optimizer step on the global batch; returns its mean loss (all ranks)."""
        cfg, r = self.recipe.train, self.recipe
        gen = torch.Generator().manual_seed(step_seed(cfg.seed, self.step))
        torch.manual_seed(step_seed(cfg.seed, self.step) + 1)  # dropout layers
        x0, captions = self._global_batch()
        n = x0.shape[0]
        d = r.diffusion
        t = sample_timesteps(n, d.timesteps, gen, d.high_noise_share, d.high_noise_from)
        noise = torch.randn(x0.shape, generator=gen)
        dropped = torch.rand(n, generator=gen) < r.diffusion.cond_drop_prob
        lowres = lowres_t = None
        if self.stage == "sr":
            lowres_t = torch.rand(n, generator=gen)  # Imagen: uniform augmentation level while training
            lowres = noise_augment(upsample(downsample(x0, r.model.lowres_size), x0.shape[-1]), lowres_t,
                                   torch.randn(x0.shape, generator=gen))
        per_rank = n // self.world
        mine = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
        micro = per_rank // cfg.grad_accum
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for k in range(cfg.grad_accum):
            part = slice(mine.start + k * micro, mine.start + (k + 1) * micro)
            if self.recipe.model.condition is not None:   # labels or layouts, encoded in the objective
                cond = [None if dropped[i] else captions[i] for i in range(part.start, part.stop)]
            else:
                texts = ["" if dropped[i] else captions[i] for i in range(part.start, part.stop)]
                with torch.no_grad():
                    cond = self.clip.encode_text(texts)
            sync = self.model.no_sync() if self.world > 1 and k < cfg.grad_accum - 1 else nullcontext()
            with sync, _autocast(cfg.precision, self.device):
                loss = self.model(x0[part].to(self.device), cond, t[part].to(self.device), noise[part].to(self.device),
                                  None if lowres is None else lowres[part].to(self.device),
                                  None if lowres_t is None else lowres_t[part].to(self.device))
            self.check_finite(loss)
            self.scaler.scale(loss / cfg.grad_accum).backward()
            total += loss.detach() / cfg.grad_accum
        self.optimizer_step(self.objective.parameters())
        self.ema.update(self.objective, self.step)
        self.step += 1
        if self.world > 1:
            dist.all_reduce(total)
            total /= self.world
        return float(total)

    @torch.no_grad()
    def preview(self, count: int = 8) -> Path | None:
        """A grid of EMA samples (DDIM, 20 steps) so a user sees early whether training works."""
        if self.rank != 0:
            return None
        prompts = self.preview_prompts(count)
        if self.condition is not None and self.condition.config.kind == "layout":   # recipe prompts: inline layouts
            prompts = [parse_layout(p) if isinstance(p, str) else p for p in prompts]
        if self.stage == "sr":
            pipe = self._base_pipeline()
            pipe.sr = self.ema_stage()
        else:
            pipe = Text2Image(self.clip, self.ema_stage(), None, self.recipe.diffusion,
                              SampleConfig(), "preview", condition=self.condition)
        sample = self.recipe.sample
        params = replace(sample, lowres_noise_level=sample.lowres_noise_level if sample.lowres_noise_level is not None
                         else self.recipe.train.lowres_noise_level, steps=min(20, self.recipe.sample.steps), sr_steps=min(20, self.recipe.sample.sr_steps))
        return self.write_preview(pipe.sample(prompts, list(range(len(prompts))), params), [describe(p) for p in prompts])
