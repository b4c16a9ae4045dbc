"""`ctxdiff edit VIDEO --src "..." --tgt "..."`: text-guided video editing (invert, then sample)."""

from __future__ import annotations

from dataclasses import asdict
from enum import Enum
from pathlib import Path

import typer

from ctxdiff.cli.app import app, options
from ctxdiff.cli.common import check_finite, check_steps, lora_specs, model_files, pick_device
from ctxdiff.cli.generate import safe_stem
from ctxdiff.cli.output import emit_json, print_table, progress_bar, warn
from ctxdiff.cli.video_common import (ADAPTER, ATTENTION_ON_CPU, CROP, FRAMES, LORA, MAX_T, MODEL, REFINE, SPACING,
                                      START, STRIDE, TUNED, WINDOW, Method, Spacing, check_sd_flags,
                                      check_video_output, clip_settings, inversion_params, method_option,
                                      refuse_source_as_output, source_prompt)
from ctxdiff.errors import UsageError


class CrossMode(str, Enum):
    replace = "replace"
    refine = "refine"


class Negative(str, Enum):
    source = "source"
    empty = "empty"


class MaskFrom(str, Enum):
    attention = "attention"
    attention_span = "attention-span"
    diffedit = "diffedit"


@app.command()
def edit(
    video: Path = typer.Argument(..., help="Source video file, folder of frames, or one image."),
    tgt: str = typer.Option(..., "--tgt", "-t", help="Target prompt: what the edited video should show."),
    src: str = typer.Option(None, "--src", "-s", help="Source prompt (default: the inversion's or tuned file's)."),
    model: Path = MODEL,
    tuned: Path = TUNED,
    adapter: Path = ADAPTER,
    lora: list[str] = LORA,
    inversion_file: Path = typer.Option(None, "--inversion", help="Reuse an inversion from `ctxdiff invert`."),
    out: Path = typer.Option(None, "--out", "-o", help="Edited video: .mp4, .webm, .gif or a folder "
                                                       "(default: edits/<name>-<target>.mp4)."),
    side_by_side_: bool = typer.Option(False, "--side-by-side", help="Write source and edit next to each other."),
    steps: int = typer.Option(20, "--steps", min=1, help="Inversion steps when inverting here (paper: T = 20)."),
    guidance: float = typer.Option(7.5, "--guidance", "-g", min=0.0, callback=check_finite, help="Guidance weight."),
    negative: Negative = typer.Option(Negative.source, "--negative",
                                      help="What guidance steers away from: the source prompt (an edit to the source "
                                           "prompt returns the clip) or the empty prompt (classifier-free)."),
    self_replace: float = typer.Option(0.5, "--self-replace", min=0.0, max=1.0,
                                       help="Fraction of steps with stored self-attention."),
    cross_replace: float = typer.Option(0.8, "--cross-replace", min=0.0, max=1.0,
                                        help="Fraction of steps with stored cross-attention."),
    cross_mode: CrossMode = typer.Option(CrossMode.replace, "--cross-mode",
                                         help="replace (prompts of equal token count) or refine."),
    blend_threshold: float = typer.Option(0.3, "--blend-threshold", min=0.0, max=1.0,
                                          help="Threshold of the blend mask (chosen on tuning clips: 0.3 for "
                                               "diffedit, 0.7 for attention-span)."),
    mask_from: MaskFrom = typer.Option(MaskFrom.attention, "--mask-from",
                                       help="The blend mask: the source prompt's cross-attention on the edited "
                                            "words scaled to max 1 (attention, FateZero) or to [0, 1] per frame "
                                            "(attention-span), or where the two prompts' predictions differ "
                                            "(diffedit, DiffEdit)."),
    keep_source: bool = typer.Option(False, "--keep-source",
                                     help="Outside the blend mask, put back the source's inverted state at every "
                                          "step (local blending): what the mask leaves out stays the source."),
    no_fusion: bool = typer.Option(False, "--no-fusion", help="No attention fusion (Tune-A-Video style)."),
    no_adapter: bool = typer.Option(False, "--no-adapter", help="r = 0 in inversion and sampling (the baseline)."),
    frames: int = FRAMES,
    stride: int = STRIDE,
    start: int = START,
    crop: bool = CROP,
    no_detail: bool = typer.Option(False, "--no-detail", help="Size the model's frames back as they are (default: "
                                                              "add the model's change to the source frames, which "
                                                              "keeps what the edit leaves alone at full resolution)."),
    method: Method = method_option(Method.ddim, "default ddim: EDICT's edits kept the source's path less often"),
    max_t: int = MAX_T,
    spacing: Spacing = SPACING,
    refine: int = REFINE,
    window: int = WINDOW,
    attention_on_cpu: bool = ATTENTION_ON_CPU,
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
) -> None:
    """Edit a video to match the target prompt, every frame at the source's size and fps by default;
    prints text alignment, temporal consistency, PSNR/SSIM against the source and the warp error."""
    from ctxdiff.data.video import side_by_side, write_video
    from ctxdiff.formats.lora_ref import check_loras, lora_records
    from ctxdiff.pipelines.video import load_video_model
    from ctxdiff.pipelines.video_edit import (EditParams, check_inversion, edit_scores, edit_video, inversion_calls,
                                              invert_video, read_clip, sampling_calls)

    if not tgt.strip():
        raise UsageError("--tgt is empty: pass the target prompt, what the edited video should show")
    if src is not None and not src.strip():
        raise UsageError("--src is empty: pass \"what the video shows\", or leave --src out to use the recorded one")
    path = out or Path("edits") / f"{video.stem or video.name}-{safe_stem(tgt)}.mp4"
    refuse_source_as_output(video, path)
    check_video_output(path, force)
    loras = lora_specs(lora)
    check_sd_flags(model, tuned, adapter, loras)
    device = pick_device()
    with model_files(model, tuned, adapter):
        vmodel = load_video_model(model, tuned, device, adapter, loras=loras)
    if inversion_file is None:
        check_steps(steps, vmodel.sched.T)
    if no_adapter and vmodel.adapter is None:
        warn("this model has no adapter; --no-adapter changes nothing")
    if keep_source and no_fusion and mask_from != MaskFrom.diffedit:
        raise UsageError(f"--keep-source with --no-fusion has no mask: --mask-from {mask_from.value} needs the "
                         "attention maps; pass --mask-from diffedit, or drop --no-fusion")
    params = EditParams(guidance, self_replace, cross_replace, cross_mode.value, blend_threshold, not no_fusion,
                        not no_adapter, negative.value, mask_from.value, keep_source)
    if inversion_file is not None:
        inversion = _read_inversion(inversion_file)
        check_inversion(vmodel, inversion, str(inversion_file))
        check_loras(str(inversion_file), inversion.loras, vmodel.loras, "inverted", "invert")
        if Path(inversion.source) != video.resolve():
            raise UsageError(f"{inversion_file}: inverts {inversion.source}, not {video}; pass that video or "
                             "invert again")
        if src and src != inversion.prompt:
            raise UsageError(f"{inversion_file}: inverted with the prompt {inversion.prompt!r}, not {src!r}; "
                             "drop --src or invert again")
        _check_clip_flags(inversion_file, len(inversion.frames), frames, stride, start)
        text = inversion.prompt
        selection = inversion.clip or {"frames": len(inversion.frames), "stride": 1, "start": 0, "crop": False}
        clip = read_clip(video, vmodel.image_size, selection["frames"], selection["stride"], selection["start"],
                         selection["crop"])
        if inversion.clip is None or len(clip) != len(inversion.frames):   # written before clips were recorded
            clip = _model_sized(inversion)
        total = sampling_calls(inversion.params)
    else:
        text = source_prompt(src, video, (vmodel.tuned_on or {}).get("prompt"), flag="--src")
        selection = {**clip_settings(frames, stride, start), "crop": crop}
        clip = read_clip(video, vmodel.image_size, **selection)
        iparams = inversion_params(vmodel, steps, method, max_t, spacing, refine, params.adapter, params.fusion,
                                   attention_on_cpu, window)
        total = inversion_calls(iparams) + sampling_calls(iparams)
    with progress_bar("edit", total) as bar:
        if inversion_file is None:
            inversion = invert_video(vmodel, clip.model_video, text, iparams, progress=bar)
        result = edit_video(vmodel, inversion, tgt, params, progress=bar)
    for note in result.notes:
        warn(note)
    edited, source_frames = clip.to_source(result.frames, detail=not no_detail), clip.source_frames()
    region = clip.region_to_source(result.edited_region)
    scores = edit_scores(vmodel, edited, tgt, source_frames, region)
    shown = side_by_side(source_frames, edited) if side_by_side_ else edited
    metadata = {"prompt": tgt, "source_prompt": text, "source": inversion.source, **asdict(params),
                "inversion": asdict(inversion.params), "clip": selection, "detail": not no_detail,
                "cross_mode": result.cross_mode, "model": vmodel.base.path, "loras": lora_records(vmodel.loras),
                "tuned": vmodel.tuned.path if vmodel.tuned else None,
                "scores": {k: v for k, v in scores.items() if k != "frames"}}
    write_video(path, shown, clip.fps, metadata, audio_of=clip.video)
    record = {"out": str(path), "prompt": tgt, "source_prompt": text, "frames": len(edited), "fps": clip.fps,
              "width": edited.shape[2], "height": edited.shape[1], "method": inversion.params.method,
              "cross_mode": result.cross_mode, "mask_from": params.mask_from, "keep_source": params.keep_source,
              "blend_fraction": result.blend_fraction, "adapter": params.adapter,
              **{k: v for k, v in scores.items() if k != "frames"}}
    emit_json(record)
    if not options().json:
        names = {"text_alignment": "text alignment",
                 "temporal_consistency_all_pairs": "temporal consistency (all pairs)",
                 "temporal_consistency_consecutive": "temporal consistency (consecutive)",
                 "psnr": "PSNR dB vs source", "ssim": "SSIM vs source", "psnr_kept": "PSNR dB outside the mask",
                 "warp_error": "warp error"}
        shown_scores = {label: scores[key] for key, label in names.items() if key in scores}
        print_table(f"edited {len(edited)} frames of {edited.shape[2]}x{edited.shape[1]} at {clip.fps:g} fps -> "
                    f"{path}", list(shown_scores), [list(shown_scores.values())])


def _model_sized(inversion):
    """The clip of an inversion that records no frame selection: its own frames, at the model's size."""
    from ctxdiff.data.video import FrameFit, Video
    from ctxdiff.pipelines.video_clip import SourceClip

    side = inversion.frames.shape[1]
    return SourceClip(Video(inversion.frames, inversion.fps, Path(inversion.source)), FrameFit(side, side, side))



def _check_clip_flags(path: Path, inverted: int, frames: int | None, stride: int | None, start: int | None) -> None:
    """With --inversion the frames are the inversion's: --frames of another length is a usage error;
    --stride and --start, which it does not record, are a note that they change nothing."""
    if frames is not None and frames != inverted:
        raise UsageError(f"--frames {frames}: {path} inverts {inverted} frames; drop --frames, or invert "
                         f"again with --frames {frames}")
    ignored = [flag for flag, value in (("--stride", stride), ("--start", start)) if value is not None]
    if ignored:
        warn(f"{' and '.join(ignored)}: ignored with --inversion (its {inverted} frames were chosen when inverting)")


def _read_inversion(path: Path):
    """An inversion file from `ctxdiff invert`; one whose records do not read is a damaged file (exit 1)."""
    from ctxdiff.errors import CtxdiffError
    from ctxdiff.formats.inversion import load_inversion

    with model_files(path):
        try:
            return load_inversion(path)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CtxdiffError(f"{path}: not a usable inversion file (its records do not read: {exc!r}); invert "
                               "again with `ctxdiff invert`") from None
