"""The `ctxdiff` command: one module per subcommand, registered on one Typer app."""

from __future__ import annotations

import sys

from ctxdiff.cli.app import app, options
from ctxdiff.errors import CtxdiffError

__all__ = ["app", "main"]


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user-facing failures print one line and exit 1 (2 for usage), no traceback."""
    from ctxdiff.cli.output import error

    try:
        app(args=argv, prog_name="ctxdiff", standalone_mode=False)
    except CtxdiffError as exc:
        if options().debug:
            raise
        error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        error("interrupted")
        return 130
    except Exception as exc:  # click usage errors and aborts
        import click

        if isinstance(exc, click.exceptions.Exit):
            return exc.exit_code
        if isinstance(exc, click.ClickException):
            exc.show()
            return exc.exit_code
        if isinstance(exc, click.exceptions.Abort):
            error("aborted")
            return 1
        raise
    return 0


def entrypoint() -> None:
    sys.exit(main())
