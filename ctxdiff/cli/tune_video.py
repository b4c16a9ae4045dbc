"""`ctxdiff tune-video VIDEO --prompt "..."`: one-shot tuning of the video model on its source video."""

from __future__ import annotations

from pathlib import Path

import typer

from ctxdiff.cli.app import app, options
from ctxdiff.cli.common import (check_finite, check_output, check_run_start, check_seed, graceful_interrupt,
                                lora_specs, model_files, pick_device)
from ctxdiff.cli.output import emit_json, info, print_table, progress_bar, warn
from ctxdiff.cli.video_common import (ADAPTER, CROP, FRAMES, LORA, START, STRIDE, check_sd_flags, source_prompt)


@app.command("tune-video")
def tune_video(
    video: Path = typer.Argument(..., help="Source video: mp4/webm/gif/mov, or a folder of frames."),
    prompt: str = typer.Option(None, "--prompt", "-p", help="Source prompt (default: the video sidecar's 'prompt')."),
    model: Path = typer.Option(None, "--model", "-m", help="Base model: a t2i bundle (default: the bundled shapes "
                                                         "model) or a Stable Diffusion checkpoint."),
    adapter: Path = ADAPTER,
    lora: list[str] = LORA,
    out: Path = typer.Option(None, "--out", "-o", help="Run folder (default: runs/tune-<video name>)."),
    recipe: Path = typer.Option(None, "--recipe", "-r", help="YAML of tuning settings (see recipes/video-tune.yaml)."),
    set_: list[str] = typer.Option(None, "--set", help="Override a setting: --set lr=3e-5 (repeatable)."),
    steps: int = typer.Option(None, "--steps", min=1, help="Optimizer steps (default 500)."),
    frames: int = FRAMES,
    stride: int = STRIDE,
    start: int = START,
    crop: bool = CROP,
    lr: float = typer.Option(None, "--lr", min=0.0, callback=check_finite, help="AdamW learning rate (Tab. 8: 1e-5)."),
    seed: int = typer.Option(None, "--seed", callback=check_seed,
                             help="Seed of the diffusion steps and noise, 0 .. 2**64-1 (default 0; recorded)."),
    no_adapter: bool = typer.Option(False, "--no-adapter",
                                    help="Tune without the adapter (the Tune-A-Video baseline)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out exactly."),
    force: bool = typer.Option(False, "--force", help="Start the run in --out over: remove the files a run writes "
                                                      "there first (never the folder's other files)."),
) -> None:
    """One-shot tuning on a source video: adapter, attention queries and temporal layers (Tab. 8).

    Reads every frame of the clip by default, as `edit` and `invert` do; each step trains on frame 0
    and a run of consecutive frames drawn per step (`window_frames`, default 8: the low end of Tab.
    8's 8..24; --set window_frames=N), so memory does not grow with the clip's length. Frames are
    letterboxed onto the model's square unless --crop."""
    from ctxdiff.pipelines.video_edit import read_source
    from ctxdiff.pipelines.video import load_video_model
    from ctxdiff.training.tune_video import VideoTuner, load_tune_config

    config = load_tune_config(recipe, set_ or [], steps=steps, frames=frames, stride=stride, start=start, lr=lr,
                              seed=seed, adapter=False if no_adapter else None)
    text = source_prompt(prompt, video)
    run = out or Path("runs") / f"tune-{video.stem or video.name}"
    check_output(run, "folder")
    if not force:
        check_run_start(run, resume, force)          # refused before the model loads
    loras = lora_specs(lora)
    check_sd_flags(model, None, adapter, loras)
    device = pick_device()
    with model_files(model, adapter):
        vmodel = load_video_model(model, None, device, adapter, window=config.window, loras=loras)
    clip = read_source(video, config.frames, config.stride, config.start, vmodel.image_size, crop=crop)
    if force:
        check_run_start(run, resume, force)          # replaces a run's files only once all else is known good
    tuner = VideoTuner(vmodel, clip, text, config, run, resume=resume, log=info)
    if config.adapter and vmodel.adapter is None:
        warn("the base model has no adapter; tuning without one")
    with progress_bar("tune-video", config.steps, ("loss",)) as bar:
        bar.advance(tuner.step)
        with graceful_interrupt() as stop:
            result = tuner.run(should_stop=stop, on_step=lambda record: bar.advance(loss=record["loss"]))
    summary = {"tuned": str(result.tuned_path), "step": result.step, "loss": result.loss, "prompt": text,
               "frames": len(clip), "base_model": vmodel.base.path, "checkpoints": str(tuner.ckpt_dir),
               "interrupted": result.interrupted}
    emit_json(summary)
    if result.interrupted:
        info(f"interrupted at step {result.step}; checkpoint saved. Continue with the same command and --resume")
        raise typer.Exit(130)
    if not options().json:
        print_table("tuning finished", ["step", "loss", "frames", "tuned file"],
                    [[result.step, result.loss, len(clip), result.tuned_path]])
