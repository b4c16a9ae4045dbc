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


class Method(str, Enum):
    edict = "edict"
    ddim = "ddim"


# Options `invert` and `edit` share.
MODEL = typer.Option(None, "--model", "-m",
                     help="Base model: a t2i bundle or a Stable Diffusion checkpoint (default: the tuned file's "
                          "base, else the bundled model).")
ADAPTER = typer.Option(None, "--adapter", help="A latent adapter file for a Stable Diffusion --model.")
LORA = typer.Option(None, "--lora", metavar="FILE[:WEIGHT]",
                    help="Stable Diffusion: merge a LoRA with this weight (default 1) into the base before "
                         "anything else; repeat for more. Recorded: tuned files and inversions need the same ones.")
TUNED = typer.Option(None, "--tuned", help="A tuned file from `ctxdiff tune-video`.")
FRAMES = typer.Option(None, "--frames", min=1, help="Frames to read (default: every frame from --start).")
STRIDE = typer.Option(None, "--stride", min=1, help="Take every n-th frame (default 1).")
START = typer.Option(None, "--start", min=0, help="First frame (default 0).")
CROP = typer.Option(False, "--crop", help="Take the centred square of the frames (default: letterbox the whole "
                                          "frame onto the model's square and size it back).")
WINDOW = typer.Option(16, "--window", min=0, help="Most frames per denoiser call: longer clips run in overlapping "
                                                 "windows sharing frame 0, in bounded memory (0: all at once).")
MAX_T = typer.Option(None, "--max-t", min=1, help="Highest inversion step (default: edict, the last step with "
                                                  "abar >= 1e-3; ddim, the spacing's own: T for trailing).")


def method_option(default: Method, why: str):
    return typer.Option(default, "--method", help="Inversion: edict (exact: sampling back returns the clip) or ddim "
                                                  f"(plain DDIM inversion, approximate); {why}.")
SPACING = typer.Option(Spacing.trailing, "--spacing", help="DDIM timestep spacing (trailing: up to t = T).")
REFINE = typer.Option(0, "--refine", min=0,
                      help="ddim: fixed-point iterations per inversion step (better reconstruction; keep 0 to edit).")
ATTENTION_ON_CPU = typer.Option(False, "--attention-on-cpu",
                                help="Keep stored attention maps in host memory (always, for Stable Diffusion).")

DEFAULT_CLIP = {"frames": None, "stride": 1, "start": 0}   # the whole clip


def clip_settings(frames: int | None, stride: int | None, start: int | None) -> dict:
    """frames/stride/start as given, else the whole clip (every frame from frame 0)."""
    given = {"frames": frames, "stride": stride, "start": start}
    return {k: given[k] if given[k] is not None else DEFAULT_CLIP[k] for k in DEFAULT_CLIP}


def inversion_params(vmodel, steps: int, method: "Method", max_t: int | None, spacing: "Spacing", refine: int,
                     adapter: bool, attention: bool, attention_on_cpu: bool, window: int):
    """The `InversionParams` of the shared options (EDICT stops where abar >= 1e-3 unless --max-t says)."""
    from ctxdiff.diffusion.samplers import highest_invertible_step
    from ctxdiff.formats.inversion import InversionParams

    if method is Method.edict and refine:
        raise UsageError("--refine is for --method ddim; EDICT is exact without it")
    if max_t is not None and max_t > vmodel.sched.T:
        raise UsageError(f"--max-t {max_t}: this model has {vmodel.sched.T} steps; pass at most {vmodel.sched.T}")
    if method is Method.edict and max_t is None:
        max_t = highest_invertible_step(vmodel.sched)
    if window and window < 4:
        raise UsageError(f"--window {window}: a window holds frame 0, 2 overlap frames and one of its own; pass "
                         ">= 4, or 0 for none")
    return InversionParams(steps=steps, spacing=spacing.value, refine=refine, adapter=adapter, attention=attention,
                           attention_on_cpu=attention_on_cpu or vmodel.backbone == "sd", method=method.value,
                           max_t=max_t, window=window or None)


def refuse_source_as_output(source: Path, out: Path) -> None:
    """The source clip is never overwritten."""
    if out.exists() and source.exists() and out.resolve() == source.resolve():
        raise UsageError(f"--out {out} is the source clip; write the edit elsewhere")


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


def check_sd_flags(model: Path | None, tuned: Path | None, adapter: Path | None,
                   loras: list[tuple[Path, float]]) -> None:
    """--adapter and --lora go with a Stable Diffusion --model; with a t2i bundle (given, or the bundled
    one when neither --model nor --tuned is) they are a usage error, as in `generate`. (A tuned file
    names its own base; its loader checks that one.)"""
    from ctxdiff.formats.latent_adapter import is_sd_model

    given = [flag for flag, value in (("--adapter", adapter), ("--lora", loras)) if value]
    if not given or (model is None and tuned is not None):
        return
    if model is not None and (not Path(model).exists() or is_sd_model(model)):
        return
    what = f"{model} is a ctxdiff t2i bundle" if model is not None else "the bundled model is a ctxdiff t2i bundle"
    raise UsageError(f"{', '.join(given)}: only for Stable Diffusion checkpoints; {what} (it carries its own "
                     "adapter and takes no LoRA)")


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
