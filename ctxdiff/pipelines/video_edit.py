"""Text-guided video editing with ContextDiff (paper Sec. 4.2): context-aware DDIM inversion of the
source video under the source prompt, then adapter-biased DDIM sampling under the target prompt
with classifier-free guidance and FateZero attention fusion (pipelines/attention_control.py).

Inversion (docs/math.md#ddim-inversion): the source frames are taken as x_{t_1}, the first
step of the sampling schedule, and pushed up to x_{t_N} with

    eps_hat = (x_s - sqrt(abar_s) x0_hat - k_s r_phi(x0_hat, c_src, s)) / sqrt(1 - abar_s)
    x_t     = sqrt(abar_t) x0_hat + k_t r_phi(x0_hat, c_src, t) + sqrt(1 - abar_t) eps_hat

(the inverse of Eq. 11; `refine` fixed-point iterations make it exact for the model). Editing
runs Eq. 11 back down from x_{t_N} with x0_hat guided by the target prompt (x0_u + w (x0_c - x0_u))
and the bias r_phi(x0_hat, c_tgt, .) of the target prompt: the adapter moves the trajectory
toward the target context. No model code here: the denoiser, adapter and text encoder come from
a `VideoDenoiser` (pixel, or Stable Diffusion, where frames are VAE latents).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ctxdiff.data.video import Video
from ctxdiff.diffusion import classifier_free_guidance, invert_ddim, sample_ddim
from ctxdiff.diffusion.samplers import invert_edict, inversion_timesteps, sample_edict
from ctxdiff.errors import CtxdiffError
from ctxdiff.formats.inversion import Inversion, InversionParams
from ctxdiff.metrics.fidelity import psnr, ssim
from ctxdiff.models.latent.text import EOT_ID
from ctxdiff.pipelines.attention_control import (AttentionEditor, AttentionRecorder, FusionPlan, align_tokens,
                                                 attention_side, blend_mask)
from ctxdiff.pipelines.edit_mask import (MASK_SOURCES, SourceKeeper, at_grid, diffedit_map, dilate, sample_kept,
                                        threshold_map)
from ctxdiff.pipelines.video_clip import SourceClip, read_clip, read_source  # noqa: F401 (the commands' readers)
from ctxdiff.pipelines.video_denoiser import VideoDenoiser

CROSS_MODES = ("replace", "refine")
NEGATIVES = ("empty", "source")   # what guidance steers away from (source: negative-prompt inversion, Miyake et al. 2023)
CHAIN_DTYPE = torch.float64   # EDICT's chains: its steps divide by p and sqrt(abar_t), so float32 drifts (~1e-3)
MODEL_DTYPE = torch.float32   # what `to_model` gives and the denoisers and adapters read


def _called_in(fn, dtype: torch.dtype):
    """fn(x, cond, t) called with x in the networks' `dtype`, answering in EDICT's CHAIN_DTYPE."""
    if fn is None:
        return None
    return lambda x, cond, t: fn(x.to(dtype), cond, t).to(CHAIN_DTYPE)


@torch.no_grad()
def invert_video(model: VideoDenoiser, video: Video, prompt: str, params: InversionParams,
                 progress=None) -> Inversion:
    """Invert `video` (frames at the model's size) under `prompt`, without guidance: plain DDIM
    (the frames taken as x_{t_1}) or EDICT (exact, from the frames at t = 0), up to `params.max_t`."""
    frames = len(video)
    x0 = model.to_model(video.frames)
    timesteps = inversion_timesteps(model.sched.T, params.steps, params.spacing, params.max_t)
    recorder = AttentionRecorder(model.grid_size, params.attention_on_cpu, frames=frames) if params.attention else None
    x0_fn = model.x0_fn(frames, on_call=(lambda t: setattr(recorder, "t", t)) if recorder else None,
                        on_window=(lambda w: setattr(recorder, "window", w)) if recorder else None,
                        window=params.window)
    cond = model.encode(prompt, frames)
    use_adapter = params.adapter and model.adapter is not None
    adapter = model.adapter_fn(frames, use_adapter, params.window)
    partner = None
    with model.unet.controlled(recorder):
        if params.method == "edict":   # both denoiser calls of a step run at its upper step: maps at t_1..t_N
            pairs = invert_edict(_called_in(x0_fn, MODEL_DTYPE), x0.to(CHAIN_DTYPE), [0, *timesteps], model.sched,
                                 adapter=_called_in(adapter, MODEL_DTYPE), cond=cond, mix=params.mix,
                                 on_half=(lambda c: setattr(recorder, "chain", c)) if recorder else None,
                                 progress=progress)[1:]
            trajectory, partner = [x for x, _ in pairs], pairs[-1][1].cpu()
        else:
            trajectory = invert_ddim(x0_fn, x0, timesteps, model.sched, adapter=adapter, cond=cond,
                                     refine=params.refine, progress=progress)
        if recorder is not None and not recorder.has_step(timesteps[-1]):
            x0_fn(trajectory[-1].to(MODEL_DTYPE), cond, torch.full((frames,), timesteps[-1], device=model.device))
    return Inversion(torch.stack(trajectory).cpu(), timesteps, video.frames, video.fps, prompt,
                     InversionParams(**{**asdict(params), "adapter": use_adapter}), model.base, model.tuned,
                     str(Path(video.source).resolve()), recorder.maps if recorder is not None else None, partner)


def inversion_calls(params: InversionParams) -> int:
    """Progress-bar steps of an inversion with `params` (one per sampler step)."""
    steps = params.steps if params.max_t is None else min(params.steps, params.max_t)
    return steps if params.method == "edict" else steps - 1


def sampling_calls(params: InversionParams) -> int:
    """Progress-bar steps of one sampling pass back from an inversion with `params`."""
    return params.steps if params.max_t is None else min(params.steps, params.max_t)


def sample_back(model: VideoDenoiser, inversion: Inversion, x0_fn, cond, adapter, progress=None,
                callback=None, on_half=None, keeper: SourceKeeper | None = None) -> torch.Tensor:
    """Run the inversion's own sampler (Eq. 11, or EDICT's coupled chains) from its top step to t = 0;
    `on_half(chain)`: EDICT's half-steps (attention fusion takes the maps of the same chain); `keeper`:
    local blending after every step (pipelines/edit_mask.py; `callback` is not called then)."""
    start = inversion.start(model.device)
    if keeper is not None:
        edict = inversion.params.method == "edict"
        if edict:
            start = tuple(z.to(CHAIN_DTYPE) for z in start)
            x0_fn, adapter = _called_in(x0_fn, MODEL_DTYPE), _called_in(adapter, MODEL_DTYPE)
        return sample_kept(x0_fn, start, inversion.sampling_steps, model.sched, keeper, adapter=adapter, cond=cond,
                           method=inversion.params.method, mix=inversion.params.mix, on_half=on_half,
                           progress=progress)
    if inversion.params.method == "edict":
        start = tuple(z.to(CHAIN_DTYPE) for z in start)
        return sample_edict(_called_in(x0_fn, MODEL_DTYPE), start, inversion.sampling_steps, model.sched,
                            adapter=_called_in(adapter, MODEL_DTYPE), cond=cond, mix=inversion.params.mix, progress=progress,
                            callback=callback, on_half=on_half)[0]
    return sample_ddim(x0_fn, start, inversion.sampling_steps, model.sched, adapter=adapter, cond=cond,
                       progress=progress, callback=callback)


def check_inversion(model: VideoDenoiser, inversion: Inversion, name: str) -> None:
    """Refuse an inversion made with another base model or tuned file than `model`'s."""
    tuned_now = model.tuned.sha256 if model.tuned else None
    tuned_then = inversion.tuned.sha256 if inversion.tuned else None
    if inversion.model.sha256 != model.base.sha256 or tuned_now != tuned_then:
        made_with = inversion.model.path + (f" tuned by {inversion.tuned.path}" if inversion.tuned else "")
        raise CtxdiffError(f"{name}: inverted with {made_with}, not with this model; pass the same --model/--tuned, "
                           "or invert again")


@dataclass
class Reconstruction:
    """Sampling back from x_{t_N} under the inversion's prompt, without guidance."""

    frames: np.ndarray
    latent_error: float    # mean |x_{t_1} sampled back - source x_{t_1}| in the denoiser's units
    pixel_error: float     # mean |output - source| in 0..255
    psnr: float            # dB against the source (inf: every pixel back)
    ssim: float


@torch.no_grad()
def reconstruct(model: VideoDenoiser, inversion: Inversion, progress=None) -> Reconstruction:
    frames = len(inversion.frames)
    descending = inversion.sampling_steps
    states: dict[int, torch.Tensor] = {}
    window = inversion.params.window
    x = sample_back(model, inversion, model.x0_fn(frames, window=window), model.encode(inversion.prompt, frames),
                    model.adapter_fn(frames, inversion.params.adapter, window), progress=progress,
                    callback=lambda step, x, **_: states.__setitem__(step + 1, x))
    at_t1 = states.get(len(descending) - 2, inversion.trajectory[-1].to(model.device))
    out = model.to_frames(x.float())
    diff = out.astype(np.float64) - inversion.frames
    return Reconstruction(out, float((at_t1.cpu() - inversion.trajectory[0]).abs().mean()), float(np.abs(diff).mean()),
                          psnr(out, inversion.frames), ssim(out, inversion.frames))


@dataclass(frozen=True)
class EditParams:
    """Editing settings: guidance 7.5 and FateZero's fusion defaults (anchors.md)."""

    guidance: float = 7.5
    self_replace: float = 0.5       # fraction of steps with stored self-attention (0.5 shape .. 0.9 style)
    cross_replace: float = 0.8      # fraction of steps with stored cross-attention
    cross_mode: str = "replace"     # "replace" (equal token counts) or "refine"
    blend_threshold: float = 0.3
    fusion: bool = True             # False: no attention fusion (Tune-A-Video style editing)
    adapter: bool = True
    negative: str = "source"        # guidance away from: "source" (the source prompt) or "empty" (classifier-free)
    mask_from: str = "attention"    # the blend mask: "attention" (FateZero), "attention-span" or "diffedit" (edit_mask.py)
    keep_source: bool = False       # local blending: the source's inverted state outside the mask at every step

    def __post_init__(self) -> None:
        if self.mask_from not in MASK_SOURCES:
            raise ValueError(f"mask_from must be one of {', '.join(MASK_SOURCES)}, got {self.mask_from!r}")
        if self.negative not in NEGATIVES:
            raise ValueError(f"negative must be one of {', '.join(NEGATIVES)}, got {self.negative!r}")
        if self.cross_mode not in CROSS_MODES:
            raise ValueError(f"cross_mode must be one of {', '.join(CROSS_MODES)}, got {self.cross_mode!r}")
        for name in ("self_replace", "cross_replace", "blend_threshold"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


@dataclass
class EditResult:
    frames: np.ndarray             # uint8 [F, H, W, 3]
    cross_mode: str | None         # the mode used (None without fusion)
    blend_fraction: float | None   # share of pixels the blend mask keeps for editing
    notes: list[str] = field(default_factory=list)
    edited_region: np.ndarray | None = None   # bool [F, H, W]: the blend mask at the frames' size (None: none)


def edit_scores(model: VideoDenoiser, frames: np.ndarray, prompt: str, source: np.ndarray | None = None,
                edited_region: np.ndarray | None = None) -> dict:
    """Text alignment with `prompt` and, for two frames or more, temporal consistency (both pairings),
    on the model's CLIP (metrics/video.py; left out for a model without one); with the `source` frames
    (same size), PSNR and SSIM against them, within the pixels outside `edited_region` too
    ("psnr_kept", "ssim_kept"), and the warp error by the source's flow (metrics/fidelity.py)."""
    from ctxdiff.metrics.clip_score import embed_images, embed_prompts
    from ctxdiff.metrics.fidelity import fidelity_scores
    from ctxdiff.metrics.video import text_alignment, video_scores

    record: dict = {"frames": len(frames)}
    if model.clip is not None and len(frames) >= 2:
        record = video_scores(model.clip, frames, prompt)
    elif model.clip is not None:
        record["text_alignment"] = text_alignment(embed_images(model.clip, list(frames)),
                                                  embed_prompts(model.clip, [prompt])[0])
    if source is not None:
        keep = None if edited_region is None else ~np.asarray(edited_region, dtype=bool)
        record.update(fidelity_scores(frames, source, keep))
    return record


def region_at(mask: torch.Tensor | None, height: int, width: int) -> np.ndarray | None:
    """A blend mask [F, S, S] (bool) at the frames' size [F, height, width] (nearest)."""
    if mask is None:
        return None
    grid = torch.nn.functional.interpolate(mask[:, None].float().cpu(), size=(height, width), mode="nearest")
    return grid[:, 0].numpy() > 0.5


def token_ids(model: VideoDenoiser, prompt: str) -> list[int]:
    """The prompt's token ids from the start token to the (first) end-of-text token."""
    ids = model.tokenize([prompt])[0].tolist()
    return ids[:ids.index(EOT_ID) + 1]


def resolve_cross_mode(mode: str, source_ids: list[int], target_ids: list[int]) -> tuple[str, str | None]:
    """Replace needs prompts of equal token count; otherwise refine, with a note saying so."""
    if mode == "replace" and len(source_ids) != len(target_ids):
        return "refine", (f"cross-attention replace needs prompts of equal token count (source {len(source_ids)}, "
                          f"target {len(target_ids)}); using refine")
    return mode, None


def diffedit_mask(model: VideoDenoiser, inversion: Inversion, target: str, threshold: float,
                  use_adapter: bool) -> torch.Tensor:
    """DiffEdit's mask [F, S, S] of the inversion's frames between its prompt and `target` (edit_mask.py),
    at the denoiser's grid, grown by one cell."""
    frames, window = len(inversion.frames), inversion.params.window
    scaled = diffedit_map(model.x0_fn(frames, window=window), model.to_model(inversion.frames),
                          model.encode(inversion.prompt, frames), model.encode(target, frames), model.sched,
                          adapter=model.adapter_fn(frames, use_adapter, window))
    return threshold_map(scaled, threshold)


def source_states(model: VideoDenoiser, inversion: Inversion) -> dict[int, torch.Tensor]:
    """The source's state at each sampling step: the inversion's trajectory at t_1..t_N, the frames at 0."""
    states = {t: inversion.trajectory[i] for i, t in enumerate(inversion.timesteps)}
    states[0] = model.to_model(inversion.frames).cpu()
    return states


@torch.no_grad()
def edit_video(model: VideoDenoiser, inversion: Inversion, target: str, params: EditParams,
               progress=None) -> EditResult:
    """Sample from the inversion's x_{t_N} under `target` with guidance, the adapter and fusion; with
    `params.keep_source`, the source's own states outside the blend mask (edit_mask.py)."""
    use_adapter = params.adapter and model.adapter is not None
    if use_adapter != inversion.params.adapter:
        raise CtxdiffError(f"the inversion was made {'with' if inversion.params.adapter else 'without'} the adapter; "
                           "edit with the same adapter setting (--no-adapter), or invert again")
    frames = len(inversion.frames)
    descending = inversion.sampling_steps
    cond = model.encode(target, frames)
    editor, mode, notes, mask = None, None, [], None
    if params.mask_from == "diffedit":
        mask = diffedit_mask(model, inversion, target, params.blend_threshold, use_adapter)
    if params.fusion:
        if not inversion.attention:
            raise CtxdiffError("this inversion holds no attention maps; invert with --attention, or edit with "
                               "--no-fusion")
        source_ids, target_ids = token_ids(model, inversion.prompt), token_ids(model, target)
        mode, note = resolve_cross_mode(params.cross_mode, source_ids, target_ids)
        notes += [note] if note else []
        first = model.first_token_column
        alignment = align_tokens(source_ids, target_ids, first + cond.tokens.shape[1], mode, first)
        maps = inversion.attention if inversion.params.attention_on_cpu else \
            {k: v.to(model.device) for k, v in inversion.attention.items()}
        if params.mask_from == "attention":
            mask = blend_mask(maps, alignment.edited, params.blend_threshold, model.device)
        elif params.mask_from == "attention-span":
            mask = blend_mask(maps, alignment.edited, params.blend_threshold, model.device, span=True)
            mask = None if mask is None else dilate(mask)
            if mask is None and params.keep_source:   # no word edited: nothing to change, keep every cell
                mask = torch.zeros((frames, attention_side(maps), attention_side(maps)), dtype=torch.bool,
                                   device=model.device)
        fused = None if mask is None else at_grid(mask, attention_side(maps)).to(model.device)
        editor = AttentionEditor(maps, descending[:-1], FusionPlan(params.self_replace, params.cross_replace, mode),
                                 alignment, fused, frames, model.device)
    fraction = float(mask.float().mean()) if mask is not None else None
    keeper = SourceKeeper(source_states(model, inversion), mask) if params.keep_source and mask is not None else None
    window = inversion.params.window
    x0_fn = model.x0_fn(frames, on_call=(lambda t: setattr(editor, "t", t)) if editor else None,
                        on_window=(lambda w: setattr(editor, "window", w)) if editor else None, window=window)
    negative = model.text([""] if params.negative == "empty" else [inversion.prompt])
    guided = classifier_free_guidance(x0_fn, negative, params.guidance)
    with model.unet.controlled(editor):
        x = sample_back(model, inversion, guided, cond, model.adapter_fn(frames, use_adapter, window),
                        progress=progress, on_half=(lambda c: setattr(editor, "chain", c)) if editor else None,
                        keeper=keeper)
    out = model.to_frames(x.float())
    return EditResult(out, mode, fraction, notes, region_at(mask, *out.shape[1:3]))
