"""What every subcommand checks the same way, before any work (no torch at import): output paths,
devices, seeds, numbers, text read from stdin; and interrupt handling.

The exit-code rule these follow (docs/exit-codes.md): 1 for a problem with files or data, 2 for a
usage mistake (a bad option value, conflicting flags, an output path that cannot be used).
"""

from __future__ import annotations

import math
import os
import re
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Literal

import typer

from ctxdiff.cli.app import check_device_name, options
from ctxdiff.errors import UsageError

if TYPE_CHECKING:
    import torch

# --------------------------------------------------------------------------- devices

def pick_device() -> torch.device:
    """The one place --device is resolved: auto takes CUDA when present; a device that is not here
    (cuda without CUDA, cuda:N past the last GPU, mps without Apple's GPU) is a usage error. (torch
    is imported here, not at the top: `--help`, `--version` and completion never load it.)"""
    import torch

    name = options().device
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UsageError("--device mps: no Apple GPU (MPS) is available here; use --device cpu")
        return torch.device("mps")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA device is available here; use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UsageError(f"--device {name}: there is no such GPU here ({count} found: cuda:0 .. cuda:{count - 1})")
    return device


# --------------------------------------------------------------------------- seeds and numbers

SEED_LIMIT = 2**64          # seeds are 0 .. 2**64 - 1 (what torch.Generator takes)


def check_seed(value: int | None) -> int | None:
    """A click callback: a seed in 0 .. 2**64-1, or None (random, and recorded)."""
    if value is not None and not 0 <= value < SEED_LIMIT:
        raise typer.BadParameter(f"seeds are 0 .. 2**64-1 ({SEED_LIMIT - 1}), not {value}")
    return value


def image_seed(first: int, index: int) -> int:
    """The seed of image `index` of a run that starts at `first`: first + index, wrapping past 2**64 - 1."""
    return (first + index) % SEED_LIMIT


def check_finite(value: float | None) -> float | None:
    """A click callback: a float option must be a number (not nan, inf or -inf)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"must be a finite number, not {value}")
    return value


def check_steps(value: int | None, timesteps: int, flag: str = "--steps") -> None:
    """Sampling or inversion steps of a model with `timesteps` diffusion steps: at most T (exit 2)."""
    if value is not None and value > timesteps:
        raise UsageError(f"{flag} {value}: more than the model's {timesteps} diffusion steps; pass at most {timesteps}")


# --------------------------------------------------------------------------- output paths

PathKind = Literal["folder", "file"]


def check_output(path: Path, kind: PathKind, *, force: bool = False, flag: str = "--out",
                 empty: bool = False, replace: bool = True) -> Path:
    """The one rule for every output path, checked before any work; what breaks it is a usage error
    (exit 2), so nothing is computed that cannot be written and no file is lost:

    - a file where a folder is wanted (`kind` "folder"), a folder or device where a file is wanted;
    - an existing file (`replace`), or a folder that holds anything (`empty`), without --force;
    - a path that cannot be created or written: under an existing file, in /proc, in a folder
      without write permission (tried by creating and removing a temporary file there).
    """
    path = Path(path)
    try:
        exists = path.exists() or path.is_symlink()
        is_dir = path.is_dir()
    except (OSError, ValueError) as exc:      # ValueError: a NUL character in the path
        raise UsageError(f"{flag} {path!r}: cannot be used ({getattr(exc, 'strerror', None) or exc}); choose another "
                         f"{flag}") from None
    if exists:
        if kind == "folder" and not is_dir:
            raise UsageError(f"{flag} {path}: exists and is not a folder; choose another {flag}")
        if kind == "file" and is_dir:
            raise UsageError(f"{flag} {path}: exists and is a folder, not a file; choose another {flag}")
        if kind == "file" and not path.is_file():
            raise UsageError(f"{flag} {path}: is not a regular file; choose another {flag}")
        if kind == "file" and replace and not force:
            raise UsageError(f"{flag} {path}: already exists; choose another {flag}, or pass --force to replace it")
        if kind == "folder" and empty and not force and any(path.iterdir()):
            raise UsageError(f"{flag} {path}: the folder already holds files; choose another {flag}, or pass --force "
                             "(files with the same names are then replaced)")
    _check_creatable(path if kind == "folder" and exists else path.parent, path, flag)
    return path


def _check_creatable(folder: Path, path: Path, flag: str) -> None:
    """`folder` (or its nearest existing parent, where the missing ones would be made) is a folder
    in which a file can be created."""
    folder = Path(os.path.abspath(folder))
    existing = next((p for p in (folder, *folder.parents) if os.path.lexists(p)), Path("/"))
    if not existing.is_dir():
        raise UsageError(f"{flag} {path}: cannot be created: {existing} is a file, not a folder; choose another {flag}")
    try:
        handle, probe = tempfile.mkstemp(prefix=".ctxdiff-write-test-", dir=existing)
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot write in {existing} ({exc.strerror or exc}); choose another "
                         f"{flag}") from None
    os.close(handle)
    os.unlink(probe)


def check_run_start(out: Path, resume: bool, force: bool) -> None:
    """A run folder (`train`, `tune-video`), checked before any work: new or empty, or this run's
    with --resume (`training.trainer.check_run_folder`). --force first removes what a run writes
    there (checkpoints, log, model files: replace, never append), but only when nothing else is
    there, so the new run can start: a refused --force deletes nothing."""
    from ctxdiff.training.trainer import RUN_OUTPUTS, check_run_folder

    if not force:
        check_run_folder(out, out / "checkpoints", resume)
        return
    if resume:
        raise UsageError("--force starts the run over and --resume continues it; pass one of them")
    others = sorted(p.name for p in out.iterdir() if p.name not in RUN_OUTPUTS) if out.is_dir() else []
    if others:
        shown = ", ".join(others[:4]) + (f" and {len(others) - 4} more" if len(others) > 4 else "")
        raise UsageError(f"{out}: the folder holds files no run writes ({shown}); --force replaces only a run's "
                         "files: choose an empty or new output folder")
    check_run_folder(out, out / "checkpoints", resume=False, force=True)


# --------------------------------------------------------------------------- model files

_RECIPE_HINT = re.compile(r"; (fix the recipe or pass --set|add it or pass --set) \S+$")


@contextmanager
def model_files(*paths: Path | None) -> Iterator[None]:
    """Loading model files named on the command line: what is wrong inside one (a config that does
    not read, an unknown architecture) is a problem with the file (exit 1), not a usage mistake,
    and the user has no recipe or --set to fix here, so `recipes.from_dict`'s "fix the recipe or
    pass --set" becomes "write the file again". Wrap only the library's loading, not flag checks."""
    from ctxdiff.errors import CtxdiffError

    try:
        yield
    except UsageError as exc:
        message = str(exc)
        if _RECIPE_HINT.search(message) or "recipe key" in message:
            named = ", ".join(str(p) for p in paths if p is not None) or "the model file"
            detail = _RECIPE_HINT.sub("", message).replace("recipe key", "key")
            message = f"{named}: a config inside the file does not read ({detail}); write the file again, or pass another one"
        raise CtxdiffError(message) from None


# --------------------------------------------------------------------------- text from stdin

def read_stdin(what: str = "prompt input") -> str:
    """All of stdin as UTF-8 text (`ctxdiff.data.images.decode_text`)."""
    import sys

    from ctxdiff.data.images import decode_text

    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:             # a text stream without bytes underneath (tests' StringIO)
        return sys.stdin.read()
    return decode_text(buffer.read(), "stdin", what)


# --------------------------------------------------------------------------- interrupts

class StopFlag:
    """Set by the first Ctrl-C (the work stops at the next safe point); a second one aborts at once."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self) -> bool:
        return self.requested


@contextmanager
def graceful_interrupt() -> Iterator[StopFlag]:
    flag = StopFlag()

    def handler(signum, frame):
        if flag.requested:
            raise KeyboardInterrupt
        flag.requested = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


# --------------------------------------------------------------------------- sampling choices

def check_sampler(value: str | None) -> str | None:
    """A click callback: a sampler name of `SampleConfig.SAMPLERS` (ctxdiff.recipes, imported only when the
    flag is given), or None (the model's); an unknown name is one line naming the close match, in
    SampleConfig's words (A1111's spellings such as 'DPM++ 2M Karras' find theirs)."""
    if value is None:
        return None
    from ctxdiff.recipes import SampleConfig

    try:
        return SampleConfig(sampler=value).sampler
    except ValueError as exc:
        raise typer.BadParameter(str(exc).removeprefix("sampler ")) from None


def check_strength(value: float | None) -> float | None:
    """A click callback: img2img strength in (0, 1], or None (the default)."""
    if value is not None and not (math.isfinite(value) and 0 < value <= 1):
        raise typer.BadParameter(f"must lie in (0, 1] (the share of the steps that repaint --init-image; 1: from "
                                 f"noise), not {value}")
    return value


def lora_specs(specs: list[str] | None) -> list[tuple[Path, float]]:
    """The (file, weight) pairs of the --lora FILE[:WEIGHT] options (generate and the video commands)."""
    from ctxdiff.models.latent.lora import parse_lora_spec

    return [parse_lora_spec(spec) for spec in specs or []]
