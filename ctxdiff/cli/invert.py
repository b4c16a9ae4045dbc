"""`ctxdiff invert VIDEO|IMAGE --prompt "..."`: context-aware DDIM inversion, saved for `ctxdiff edit`."""

from __future__ import annotations

from pathlib import Path

import typer

from ctxdiff.cli.app import app, options
from ctxdiff.cli.common import check_steps, model_files, pick_device
from ctxdiff.cli.output import emit_json, print_table, progress_bar, warn
from ctxdiff.cli.video_common import (ADAPTER, ATTENTION_ON_CPU, FRAMES, MODEL, REFINE, SPACING, START, STRIDE, TUNED,
                                      Spacing, check_adapter_flag, clip_settings, refuse_existing, source_prompt)


@app.command()
def invert(
    source: Path = typer.Argument(..., help="Video file, folder of frames, or one image."),
    prompt: str = typer.Option(None, "--prompt", "-p",
                               help="Source prompt (default: the tuned file's, or the video sidecar's)."),
    model: Path = MODEL,
    tuned: Path = TUNED,
    adapter: Path = ADAPTER,
    out: Path = typer.Option(None, "--out", "-o",
                             help="Inversion file (default: <source name>.inversion.safetensors)."),
    steps: int = typer.Option(20, "--steps", min=1, help="DDIM steps (paper: T = 20)."),
    frames: int = FRAMES,
    stride: int = STRIDE,
    start: int = START,
    spacing: Spacing = SPACING,
    refine: int = REFINE,
    attention: bool = typer.Option(False, "--attention",
                                   help="Store the low-resolution attention maps (for edit's fusion)."),
    attention_on_cpu: bool = ATTENTION_ON_CPU,
    no_adapter: bool = typer.Option(False, "--no-adapter", help="Invert with r = 0 (plain DDIM inversion)."),
    no_check: bool = typer.Option(False, "--no-check", help="Skip sampling back (no reconstruction error)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing inversion file."),
) -> None:
    """Invert a video (or image) with context-aware DDIM and print the reconstruction error."""
    from ctxdiff.pipelines.video_edit import InversionParams, invert_video, read_source, reconstruct
    from ctxdiff.formats.inversion import save_inversion
    from ctxdiff.pipelines.video import load_video_model

    path = out or Path(f"{source.stem or source.name}.inversion.safetensors")
    refuse_existing(path, force)
    check_adapter_flag(model, tuned, adapter)
    device = pick_device()
    with model_files(model, tuned, adapter):
        vmodel = load_video_model(model, tuned, device, adapter)
    check_steps(steps, vmodel.sched.T)
    text = source_prompt(prompt, source, (vmodel.tuned_on or {}).get("prompt"))
    if no_adapter and vmodel.adapter is None:
        warn("this model has no adapter; --no-adapter changes nothing")
    clip = read_source(source, **clip_settings(vmodel.tuned_on, frames, stride, start), size=vmodel.image_size)
    params = InversionParams(steps=steps, spacing=spacing.value, refine=refine, adapter=not no_adapter,
                             attention=attention, attention_on_cpu=attention_on_cpu or vmodel.backbone == "sd")
    with progress_bar("invert", (steps - 1) + (0 if no_check else steps)) as bar:
        inversion = invert_video(vmodel, clip, text, params, progress=bar)
        check = None if no_check else reconstruct(vmodel, inversion, progress=bar)
    save_inversion(path, inversion)
    record = {"inversion": str(path), "source": str(source), "prompt": text, "frames": len(clip),
              "steps": len(inversion.timesteps), "refine": refine, "adapter": inversion.params.adapter,
              "attention_maps": len(inversion.attention or {})}
    if check is not None:
        record.update(latent_error=check.latent_error, reconstruction_error=check.pixel_error, psnr_db=check.psnr)
    emit_json(record)
    if not options().json:
        columns = ["frames", "steps", "refine"] + ([] if check is None else ["latent error", "pixel error (0-255)",
                                                                            "PSNR dB"]) + ["file"]
        row = [len(clip), len(inversion.timesteps), refine]
        row += [] if check is None else [check.latent_error, check.pixel_error, check.psnr]
        print_table("inversion", columns, [row + [path]])
