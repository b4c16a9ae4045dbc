"""The `ctxdiff` command: one module per subcommand, registered on one Typer app."""

from __future__ import annotations

import sys

from ctxdiff.cli import evaluate, generate, shapes, train  # noqa: F401  (registers the subcommands)
from ctxdiff.cli import edit, invert, tune_video  # noqa: F401  (video editing subcommands)
from ctxdiff.cli.app import app, options
from ctxdiff.errors import CtxdiffError

__all__ = ["app", "main"]


def main(argv: list[str] | None = None) -> int:
    """Run the CLI. A `CtxdiffError` prints one line and exits 1 (2 for usage); click's own usage
    errors exit 2; `--debug` shows the traceback instead."""
    from ctxdiff.cli.output import error

    try:
        app(args=argv, prog_name="ctxdiff", standalone_mode=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except CtxdiffError as exc:
        if options().debug:
            raise
        error(str(exc))
        return exc.exit_code
    return 0


def entrypoint() -> None:
    sys.exit(main())
