"""Output conventions: people read stderr (tables, progress), pipelines read stdout (JSON lines)."""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from ctxdiff.cli.app import options

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress


@lru_cache(maxsize=None)
def _stderr() -> Console:
    """The console on stderr, made at first use (`--version` and completion never import rich)."""
    from rich.console import Console

    return Console(stderr=True, highlight=False, emoji=False)


def error(message: str) -> None:
    """One line, no traceback. (Messages are never read as rich markup: a prompt or path holding
    "[/]" prints as it is.)"""
    _stderr().print(f"[bold red]error:[/] {_escape(message)}", markup=True, soft_wrap=True)


def warn(message: str) -> None:
    if not options().quiet:
        _stderr().print(f"[yellow]warning:[/] {_escape(message)}", markup=True, soft_wrap=True)


def info(message: str) -> None:
    if not options().quiet:
        _stderr().print(message, markup=False, soft_wrap=True)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def emit_json(record: dict[str, Any]) -> None:
    """One JSON object per line on stdout (only with --json)."""
    if options().json:
        sys.stdout.write(json.dumps(record, default=str) + "\n")
        sys.stdout.flush()


def print_table(title: str, columns: list[str], rows: Iterable[Iterable[Any]]) -> None:
    """A rich table on stderr for people (suppressed by --quiet)."""
    if options().quiet:
        return
    from rich.table import Table

    from rich.text import Text

    table = Table(title=Text(title))
    for column in columns:
        table.add_column(Text(column))
    for row in rows:
        table.add_row(*[Text(_fmt(v)) for v in row])
    _stderr().print(table)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


@contextmanager
def progress_bar(description: str, total: int, fields: Iterable[str] = ()) -> Iterator["ProgressHandle"]:
    """A rich progress bar on stderr; `handle.advance(**fields)` updates it. Silent with --quiet.
    When stderr is not a terminal (logs, pipelines) it prints a plain line every 5% instead."""
    if options().quiet:
        yield ProgressHandle(None, None)
        return
    if not _stderr().is_terminal:
        yield LineProgress(description, total)
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn()]
    columns += [TextColumn(f"{name}={{task.fields[{name}]}}") for name in fields]
    progress = Progress(*columns, console=_stderr(), transient=False)
    with progress:
        task = progress.add_task(description, total=total, **{name: "-" for name in fields})
        yield ProgressHandle(progress, task)


class ProgressHandle:
    def __init__(self, progress: Progress | None, task) -> None:
        self._progress, self._task = progress, task

    def advance(self, n: int = 1, **fields: Any) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=n, **{k: _fmt(v) for k, v in fields.items()})

    def callback(self, **_: Any) -> None:
        """Use as a sampler callback: one tick per step."""
        self.advance()


class LineProgress(ProgressHandle):
    """Progress for a log file: `description 120/2000 (6%) 00:01:23 loss=0.1`, every 5%."""

    def __init__(self, description: str, total: int) -> None:
        super().__init__(None, None)
        self.description, self.total, self.done = description, max(total, 1), 0
        self.every, self.started = max(1, self.total // 20), time.perf_counter()

    def advance(self, n: int = 1, **fields: Any) -> None:
        before, self.done = self.done, self.done + n
        if self.done // self.every > before // self.every or self.done == self.total:
            elapsed = time.strftime("%H:%M:%S", time.gmtime(time.perf_counter() - self.started))
            extra = " ".join(f"{k}={_fmt(v)}" for k, v in fields.items())
            _stderr().print(f"{self.description} {self.done}/{self.total} ({100 * self.done // self.total}%) "
                            f"{elapsed} {extra}".rstrip(), markup=False, soft_wrap=True)
