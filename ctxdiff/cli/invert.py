"""`ctxdiff invert VIDEO|IMAGE --prompt "..."`: context-aware inversion (EDICT, exact; or DDIM), saved for
`ctxdiff edit`."""

from __future__ import annotations

from pathlib import Path

import typer

from ctxdiff.cli.app import app, options
from ctxdiff.cli.common import check_steps, lora_specs, model_files, pick_device
from ctxdiff.cli.output import emit_json, print_table, progress_bar, warn
from ctxdiff.cli.video_common import (ADAPTER, ATTENTION_ON_CPU, CROP, FRAMES, LORA, MAX_T, MODEL, REFINE, SPACING,
                                      START, STRIDE, TUNED, WINDOW, Method, Spacing, check_sd_flags, clip_settings,
                                      inversion_params, method_option, refuse_existing, source_prompt)


@app.command()
def invert(
    source: Path = typer.Argument(..., help="Video file, folder of frames, or one image."),
    prompt: str = typer.Option(None, "--prompt", "-p",
                               help="Source prompt (default: the tuned file's, or the video sidecar's)."),
    model: Path = MODEL,
    tuned: Path = TUNED,
    adapter: Path = ADAPTER,
    lora: list[str] = LORA,
    out: Path = typer.Option(None, "--out", "-o",
                             help="Inversion file (default: <source name>.inversion.safetensors)."),
    steps: int = typer.Option(20, "--steps", min=1, help="Inversion steps (paper: T = 20)."),
    frames: int = FRAMES,
    stride: int = STRIDE,
    start: int = START,
    crop: bool = CROP,
    method: Method = method_option(Method.edict, "default edict"),
    max_t: int = MAX_T,
    spacing: Spacing = SPACING,
    refine: int = REFINE,
    window: int = WINDOW,
    attention: bool = typer.Option(False, "--attention",
                                   help="Store the low-resolution attention maps (for edit's fusion)."),
    attention_on_cpu: bool = ATTENTION_ON_CPU,
    no_adapter: bool = typer.Option(False, "--no-adapter", help="Invert with r = 0 (plain DDIM inversion)."),
    no_check: bool = typer.Option(False, "--no-check", help="Skip sampling back (no reconstruction error)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing inversion file."),
) -> None:
    """Invert a video (or image), every frame by default, and print how well sampling back returns it."""
    from ctxdiff.formats.inversion import save_inversion
    from ctxdiff.metrics.fidelity import psnr, ssim
    from ctxdiff.pipelines.video import load_video_model
    from ctxdiff.pipelines.video_edit import inversion_calls, invert_video, read_clip, reconstruct, sampling_calls

    path = out or Path(f"{source.stem or source.name}.inversion.safetensors")
    refuse_existing(path, force)
    loras = lora_specs(lora)
    check_sd_flags(model, tuned, adapter, loras)
    device = pick_device()
    with model_files(model, tuned, adapter):
        vmodel = load_video_model(model, tuned, device, adapter, loras=loras)
    check_steps(steps, vmodel.sched.T)
    text = source_prompt(prompt, source, (vmodel.tuned_on or {}).get("prompt"))
    if no_adapter and vmodel.adapter is None:
        warn("this model has no adapter; --no-adapter changes nothing")
    selection = clip_settings(frames, stride, start)
    clip = read_clip(source, vmodel.image_size, **selection, crop=crop)
    params = inversion_params(vmodel, steps, method, max_t, spacing, refine, not no_adapter, attention,
                              attention_on_cpu, window)
    with progress_bar("invert", inversion_calls(params) + (0 if no_check else sampling_calls(params))) as bar:
        inversion = invert_video(vmodel, clip.model_video, text, params, progress=bar)
        check = None if no_check else reconstruct(vmodel, inversion, progress=bar)
    inversion.clip, inversion.loras = {**selection, "crop": crop}, vmodel.loras
    save_inversion(path, inversion)
    record = {"inversion": str(path), "source": str(source), "prompt": text, "frames": len(clip), "fps": clip.fps,
              "width": clip.fit.output_size[1], "height": clip.fit.output_size[0], "method": params.method,
              "steps": len(inversion.timesteps), "max_t": inversion.timesteps[-1], "refine": refine,
              "adapter": inversion.params.adapter, "attention_maps": len(inversion.attention or {})}
    if check is not None:
        out, source_frames = clip.to_source(check.frames), clip.source_frames()
        record.update(latent_error=check.latent_error, reconstruction_error=check.pixel_error,
                      psnr_model_db=check.psnr, ssim_model=check.ssim, psnr_db=psnr(out, source_frames),
                      ssim=ssim(out, source_frames))
    emit_json(record)
    if not options().json:
        columns = ["frames", "method", "steps"] + ([] if check is None else [
            "latent error", "PSNR dB (model size)", "PSNR dB (output size)", "SSIM"]) + ["file"]
        row = [len(clip), params.method, len(inversion.timesteps)]
        row += [] if check is None else [check.latent_error, check.psnr, record["psnr_db"], record["ssim"]]
        print_table("inversion", columns, [row + [path]])
