"""Helpers shared by subcommands: device choice, interrupt handling, output folders (no torch at import)."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from ctxdiff.cli.app import options
from ctxdiff.errors import UsageError

if TYPE_CHECKING:
    import torch


def pick_device() -> torch.device:
    """--device auto|cpu|cuda|cuda:N; auto takes CUDA when present. (torch is imported here, not at the
    top: `--help`, `--version` and completion never load it.)"""
    import torch

    name = options().device
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here; use --device cpu")
    return device


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


def parse_sets(values: list[str] | None) -> list[str]:
    return list(values or [])


def ensure_writable_folder(folder: Path, force: bool) -> None:
    """Refuse to write into a folder that holds files unless --force."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder}: exists and is not a folder; choose another --out")
    if folder.exists() and any(folder.iterdir()) and not force:
        raise UsageError(f"{folder}: the folder already holds files; choose another --out, or pass --force "
                         "(existing files with the same names are then replaced)")
