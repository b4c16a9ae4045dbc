"""`ctxdiff tune-video`: one-shot tuning on the source video with its source prompt (paper Sec. 4.2,
Appendix C Tab. 8; Tune-A-Video's choice of trainable parameters).

Trained: the video adapter r_phi (all of it), the query projections of the U-Net's spatial self-
and cross-attention, and the temporal attention layers; the rest of the U-Net and the CLIP stay
frozen. The loss is Eq. 6 on the step's frames, one diffusion step t per step (shared by its frames):

    L = || x_0 - f_theta(sqrt(abar_t) x_0 + k_t r_phi(x_0, c, t) + sqrt(1 - abar_t) eps, c, t) ||^2

The whole clip is read (as `edit` and `invert` read it), and each step trains on a window of it,
so memory does not grow with its length: the clip's first frame, the sparse-causal anchor every frame
attends to (as in the windows of inversion and editing, `pipelines/video_denoiser.frame_windows`),
and a run of consecutive frames from a start the step draws (`tuning_window`); a clip of at most
`window_frames` frames trains on all of them at every step.

Exact resume, as in `ctxdiff train`: step k draws its window, t and eps from a generator seeded by
(seed, k) and seeds the dropout layers from it too, so a run resumed from the checkpoint of step k
goes on exactly as the uninterrupted run. A checkpoint holds the tuned tensors, the optimizer and
the step.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from ctxdiff.checkpoints import (capture_rng_state, load_latest_good_state, rotate_checkpoints,
                                 save_training_state, training_state_path)
from ctxdiff.data.video import Video
from ctxdiff.diffusion import diffusion_loss
from ctxdiff.errors import CtxdiffError
from ctxdiff.formats.tuned import save_tuned
from ctxdiff.pipelines.video_denoiser import FrameWindow, VideoDenoiser
from ctxdiff.recipes import apply_overrides, check_finite_fields, check_seed_range, from_dict, read_recipe_data, to_dict
from ctxdiff.training.trainer import step_seed
from ctxdiff.training.trainer import check_run_folder

TUNED_FILE = "tuned.safetensors"
# Settings that may change when a run is resumed (the others must match the checkpoint's).
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "keep_last", "log_every")


@dataclass(frozen=True)
class TuneConfig:
    """One-shot tuning hyper-parameters; defaults from the paper's Tab. 8 where it gives them."""

    steps: int = 500                           # Tune-A-Video's default (Tab. 8 gives none)
    lr: float = 1e-5                           # Tab. 8
    weight_decay: float = 1e-2                 # Tab. 8
    adam_betas: tuple[float, float] = (0.9, 0.999)   # Tab. 8
    grad_clip: float | None = 1.0  # max global grad norm; null: no clipping
    frames: int | None = None  # frames read from the clip (null: every frame from start)
    stride: int = 1  # read every n-th frame (Tab. 8's "sampling rate" is 2)
    start: int = 0  # first source frame taken
    window_frames: int = 8  # frames per optimizer step: frame 0 and a run of consecutive frames
                            # drawn per step (Tab. 8: 8..24)
    gradient_checkpointing: bool = True        # Tab. 8 "use checkpoint"
    adapter: bool = True                       # False: tune without the adapter (the Tune-A-Video baseline)
    window: int = 3                            # Tab. 8: frames of the adapter's temporal causal attention
    checkpoint_every: int = 100  # steps between training states
    keep_last: int = 2  # training states kept; the newest by step
    log_every: int = 10  # steps between lines of metrics.jsonl
    seed: int = 0  # of windows, noise, timesteps and dropout: a run is a function of it

    def __post_init__(self) -> None:
        check_finite_fields(self, "lr", "weight_decay", "adam_betas", "grad_clip")
        check_seed_range(self.seed)
        if not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas must be in [0, 1), got {self.adam_betas}")
        for name in ("steps", "stride", "window", "checkpoint_every", "keep_last", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.frames is not None and self.frames < 1:
            raise ValueError(f"frames must be >= 1 or null (every frame), got {self.frames}")
        if self.window_frames < 2:
            raise ValueError(f"window_frames must be >= 2 (frame 0 and one of the others), got {self.window_frames}")
        if self.start < 0:
            raise ValueError(f"start must be >= 0, got {self.start}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"lr must be > 0 and weight_decay >= 0, got {self.lr} and {self.weight_decay}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0 or null, got {self.grad_clip}")


def load_tune_config(recipe: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                     **flags) -> TuneConfig:
    """Tuning settings: the defaults, then a YAML file of TuneConfig keys, then `--set key=value`
    overrides, then the command-line flags that were given (None: not given)."""
    data = read_recipe_data(recipe) if recipe is not None else {}
    data = apply_overrides(data, overrides)
    data.update({key: value for key, value in flags.items() if value is not None})
    return from_dict(TuneConfig, data)


def tuning_window(total: int, size: int, gen: torch.Generator) -> FrameWindow:
    """The frames one tuning step trains on: every frame of a clip of at most `size` (no draw), else
    frame 0 and the size - 1 consecutive frames from a start drawn by `gen` in 1 .. total - size + 1."""
    if total <= size:
        return FrameWindow(tuple(range(total)))
    start = int(torch.randint(1, total - size + 2, (1,), generator=gen))
    return FrameWindow((0, *range(start, start + size - 1)))


@dataclass
class TuneResult:
    step: int
    loss: float
    tuned_path: Path
    interrupted: bool


class VideoTuner:
    """One tuning run of `model` on `video` (frames at the model's size) with its source `prompt`.

    The run folder `out` holds checkpoints/, metrics.jsonl and tuned.safetensors. `config.frames`
    is taken from the clip (an image source gives one frame), so the tuned file records what was read.
    Each step trains on `window_frames` of them (`tuning_window`; the whole clip when it is shorter).
    """

    def __init__(self, model: VideoDenoiser, video: Video, prompt: str, config: TuneConfig, out: str | Path,
                 resume: bool = False, log: Callable[[str], None] = lambda _: None) -> None:
        config = replace(config, frames=len(video))
        self.model, self.prompt, self.config, self.log = model, prompt, config, log
        self.video_source = str(Path(video.source).resolve())
        self.out = Path(out)
        self.ckpt_dir = self.out / "checkpoints"
        self._check_output(resume)
        if not config.adapter:
            model.adapter = None
        elif model.adapter is None:
            model.adapter = model.new_adapter(config.window)
        for module in model.frozen_modules():
            module.requires_grad_(False)
        model.unet.requires_grad_(False)
        model.unet.set_gradient_checkpointing(config.gradient_checkpointing)
        self.params = list(model.unet.tunable_state().values())
        if model.adapter is not None:
            self.params += list(model.adapter.parameters())
        # A half-precision U-Net (SD on CUDA) runs under autocast; the tuned tensors are float32 master
        # weights while tuning (AdamW on fp16 weights underflows: its eps 1e-8 rounds to 0) and fp16
        # losses are scaled.
        self.dtype = model.unet.unet.conv_in.weight.dtype
        for p in self.params:
            p.data = p.data.float()
            p.requires_grad_(True)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, betas=tuple(config.adam_betas),
                                           weight_decay=config.weight_decay)
        self.x0 = model.to_model(video.frames)
        self.window_frames = min(len(video), config.window_frames)
        with torch.no_grad():
            self.cond = model.encode(prompt, self.window_frames)
        self.step = 0
        if resume:
            self._load_latest()

    # ----------------------------------------------------------------- files

    def _check_output(self, resume: bool) -> None:
        check_run_folder(self.out, self.ckpt_dir, resume)

    def _identity(self) -> dict:
        """What a checkpoint must share with this run to be resumed by it."""
        config = {k: v for k, v in to_dict(self.config).items() if k not in RESUMABLE_CHANGES}
        adapter = self.model.adapter
        return {"config": config, "base_sha256": self.model.base.sha256, "prompt": self.prompt,
                "loras": sorted([lora.sha256, lora.weight] for lora in self.model.loras),
                "video": self.video_source, "adapter": asdict(adapter.config) if adapter is not None else None,
                "adapter_sha256": self.model.adapter_ref.sha256 if self.model.adapter_ref is not None else None}

    def _load_latest(self) -> None:
        state, path = load_latest_good_state(self.ckpt_dir, self.log)
        if state.get("identity") != self._identity():
            raise CtxdiffError(f"{path}: this checkpoint was tuned with another base model, LoRAs, adapter, video, "
                               "prompt or settings; "
                               "resume with the command that started the run")
        self.model.unet.load_state_dict(state["unet"], strict=False)
        if self.model.adapter is not None:
            self.model.adapter.load_state_dict(state["adapter"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.log(f"resumed from {path} at step {self.step}")

    def save_checkpoint(self) -> Path:
        adapter = self.model.adapter.state_dict() if self.model.adapter is not None else None
        state = {"unet": {k: v.detach().clone() for k, v in self.model.unet.tunable_state().items()},
                 "adapter": adapter, "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                 "step": self.step,
                 "rng": capture_rng_state(), "identity": self._identity()}
        path = save_training_state(training_state_path(self.ckpt_dir, self.step), state)
        rotate_checkpoints(self.ckpt_dir, keep_last=self.config.keep_last)
        self.export()
        return path

    def export(self) -> Path:
        return save_tuned(self.out / TUNED_FILE, self.model, self.config, self.prompt, self.video_source, self.step)

    # ------------------------------------------------------------------ loop

    def train_step(self) -> float:
        """One AdamW step on Eq. 6 for the step's window of the clip; returns the loss."""
        model, seed, n = self.model, step_seed(self.config.seed, self.step), self.window_frames
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed + 1)  # dropout layers
        window = tuning_window(len(self.x0), n, gen)
        x0 = self.x0[list(window.frames)]
        t = torch.randint(1, model.sched.T + 1, (1,), generator=gen).repeat(n).to(model.device)
        noise = torch.randn(x0.shape, generator=gen).to(model.device)
        model.unet.train()
        if model.adapter is not None:
            model.adapter.train()
        with torch.autocast(model.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            loss = diffusion_loss(model.sched, model.x0_fn(n, clamp=False), x0, self.cond,
                                  model.adapter_fn(n), t=t, noise=noise,
                                  weighting=model.diffusion.loss_weighting, gamma=model.diffusion.min_snr_gamma)
        if not torch.isfinite(loss):
            raise CtxdiffError(f"the loss became {loss.item()} at step {self.step + 1}; stopped without saving it "
                               f"(the last good checkpoint is kept in {self.ckpt_dir}); lower the learning rate")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.config.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        return float(loss.detach())

    def run(self, should_stop: Callable[[], bool] = lambda: False,
            on_step: Callable[[dict], None] | None = None) -> TuneResult:
        self.out.mkdir(parents=True, exist_ok=True)
        loss, cfg = math.nan, self.config
        try:
            while self.step < cfg.steps:
                loss = self.train_step()
                record = {"step": self.step, "loss": loss}
                if on_step is not None:
                    on_step(record)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    with open(self.out / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(record) + "\n")
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                    self.save_checkpoint()
                if should_stop():
                    self.save_checkpoint()
                    return TuneResult(self.step, loss, self.out / TUNED_FILE, interrupted=True)
        finally:
            self.end_tuning()
        return TuneResult(self.step, loss, self.out / TUNED_FILE, interrupted=False)

    def end_tuning(self) -> None:
        """Put the model back for inference: the tuned tensors in the U-Net's own precision (they are
        float32 master weights while tuning), U-Net and adapter in eval mode. `run` ends with it;
        call it after driving `train_step` directly."""
        for p in self.model.unet.tunable_state().values():
            p.data = p.data.to(self.dtype)
        self.model.unet.eval()
        if self.model.adapter is not None:
            self.model.adapter.eval()
