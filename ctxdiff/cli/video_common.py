"""What `tune-video`, `invert` and `edit` share: which frames to read and which prompt describes them."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from ctxdiff.cli.common import check_output
from ctxdiff.errors import UsageError


class Spacing(str, Enum):
    leading = "leading"
    trailing = "trailing"
    linspace = "linspace"


# Options `invert` and `edit` share.
MODEL = typer.Option(None, "--model", "-m",
                     help="Base model: a t2i bundle or a Stable Diffusion checkpoint (default: the tuned file's "
                          "base, else the bundled model).")
ADAPTER = typer.Option(None, "--adapter", help="A latent adapter file for a Stable Diffusion --model.")
TUNED = typer.Option(None, "--tuned", help="A tuned file from `ctxdiff tune-video`.")
FRAMES = typer.Option(None, "--frames", min=1, help="Frames to read (default: as tuned, else 8).")
STRIDE = typer.Option(None, "--stride", min=1, help="Take every n-th frame (default: as tuned, else 2).")
START = typer.Option(None, "--start", min=0, help="First frame (default: as tuned, else 0).")
SPACING = typer.Option(Spacing.trailing, "--spacing", help="DDIM timestep spacing (trailing: up to t = T).")
REFINE = typer.Option(0, "--refine", min=0,
                      help="Inversion fixed-point iterations per step (better reconstruction; keep 0 to edit).")
ATTENTION_ON_CPU = typer.Option(False, "--attention-on-cpu",
                                help="Keep stored attention maps in host memory (always, for Stable Diffusion).")

DEFAULT_CLIP = {"frames": 8, "stride": 2, "start": 0}   # Tab. 8: 8 frames, sampling rate 2


def clip_settings(tuned_on: dict | None, frames: int | None, stride: int | None, start: int | None) -> dict:
    """frames/stride/start as given, else those the tuned file was tuned on, else Tab. 8's."""
    base = {**DEFAULT_CLIP, **{k: v for k, v in (tuned_on or {}).items() if k in DEFAULT_CLIP}}
    given = {"frames": frames, "stride": stride, "start": start}
    return {k: given[k] if given[k] is not None else base[k] for k in DEFAULT_CLIP}


def source_prompt(given: str | None, source: Path, *fallbacks: str | None, flag: str = "--prompt") -> str:
    """The source prompt: as given, else the first fallback (a tuned file's, an inversion's), else the
    'prompt' of the video's sidecar JSON; a usage error when there is none."""
    from ctxdiff.data.video import video_prompt

    if given is not None and not given.strip():
        raise UsageError(f"{flag} is empty: pass \"what the video shows\", or leave {flag} out to use the recorded one")
    for prompt in (given, *fallbacks):
        if prompt:
            return prompt
    recorded = video_prompt(source) if source.exists() else None
    if recorded:
        return recorded
    raise UsageError(f"no source prompt for {source}: pass {flag} \"what the video shows\"")


def check_adapter_flag(model: Path | None, tuned: Path | None, adapter: Path | None) -> None:
    """--adapter goes with a Stable Diffusion --model; with a t2i bundle (given, or the bundled one
    when neither --model nor --tuned is) it is a usage error, as in `generate`. (A tuned file names
    its own base; its loader checks that one.)"""
    from ctxdiff.formats.latent_adapter import is_sd_model

    if adapter is None or (model is None and tuned is not None):
        return
    if model is not None and (not Path(model).exists() or is_sd_model(model)):
        return
    what = f"{model} is a ctxdiff t2i bundle" if model is not None else "the bundled model is a ctxdiff t2i bundle"
    raise UsageError(f"--adapter: only for Stable Diffusion checkpoints; {what} (it carries its own adapter)")


VIDEO_SUFFIXES = (".mp4", ".webm", ".gif")


def check_video_output(path: Path, force: bool) -> None:
    """An edited video's --out: .mp4, .webm, .gif or a folder of frames (no suffix), writable, not
    replacing anything without --force; a usage error (exit 2) before any work."""
    from ctxdiff.data.video import WRITABLE

    folder = path.is_dir() or not path.suffix
    if not folder and path.suffix.lower() not in VIDEO_SUFFIXES:
        raise UsageError(f"--out {path}: cannot write '{path.suffix}' videos; write one of: {', '.join(WRITABLE)}")
    check_output(path, "folder" if folder else "file", force=force, empty=folder)


def refuse_existing(path: Path, force: bool) -> None:
    """A file output (an inversion): writable, and not replacing one without --force."""
    check_output(path, "file", force=force)
