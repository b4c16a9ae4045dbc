"""The `ctxdiff` command: one module per subcommand, registered on one Typer app."""

from __future__ import annotations

import errno
import sys
from contextlib import contextmanager
from typing import Iterator

from ctxdiff.cli import evaluate, generate, shapes, train  # noqa: F401  (registers the subcommands)
from ctxdiff.cli import edit, invert, tune_video  # noqa: F401  (video editing subcommands)
from ctxdiff.cli.app import app, options
from ctxdiff.errors import CtxdiffError

__all__ = ["app", "main"]

INTERRUPTED = 130


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code (docs/exit-codes.md): 0 done; 1 a problem with files or
    data (a `CtxdiffError`, or an OSError such as a full disk); 2 a usage mistake (a `UsageError`, or
    click's own: an unknown option, a value out of range); 130 interrupted. Every failure is one line
    on stderr; `--debug` shows the traceback instead."""
    import typer

    from ctxdiff.cli.output import error

    click_error = _click_exception_class()

    try:
        with _warnings_as_lines():
            code = app(args=argv, prog_name="ctxdiff", standalone_mode=False)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except click_error as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":
            return 2                               # `ctxdiff` alone: the help is already printed
        error(_click_message(exc))
        return exc.exit_code
    except typer.Abort:                            # end of input at a prompt
        return 1
    except KeyboardInterrupt:
        return INTERRUPTED
    except CtxdiffError as exc:
        if options().debug:
            raise
        error(str(exc))
        return exc.exit_code
    except OSError as exc:                         # the disk filled, a file vanished mid-run, ...
        if options().debug:
            raise
        if exc.errno == errno.EPIPE:               # `ctxdiff ... | head`: the reader has gone
            return 1
        where = f"{exc.filename}: " if exc.filename else ""
        error(f"{where}{exc.strerror or exc}")
        return 1
    return code if isinstance(code, int) else 0


@contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """The library's warnings (a prompt truncated, a non-standard noise schedule) as the CLI's own
    one-line `warning:`, not Python's two lines with a source line."""
    import warnings

    from ctxdiff.cli.output import warn

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        warn(str(message))

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def _click_exception_class() -> type[Exception]:
    """click's ClickException (typer >= 0.26 vendors click as typer._click; older typer uses click)."""
    import typer

    return next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _click_message(exc: Exception) -> str:
    """click's usage error as one line, with where to find help."""
    message = " ".join(exc.format_message().split())
    ctx = getattr(exc, "ctx", None)
    if ctx is not None:
        message += f" (see '{ctx.command_path} --help')"
    return message


def entrypoint() -> None:
    sys.exit(main())
