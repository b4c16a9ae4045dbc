"""The Typer app and the global options every subcommand shares."""

from __future__ import annotations

from dataclasses import dataclass

import typer

from ctxdiff import __version__

app = typer.Typer(
    name="ctxdiff",
    help="ContextDiff: diffusion models with a cross-modal context-aware adapter "
    "(text-to-image, text-guided video editing).",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@dataclass
class GlobalOptions:
    """Options given before the subcommand; read by every subcommand through `options()`."""

    device: str = "auto"
    json: bool = False
    quiet: bool = False
    debug: bool = False


_OPTIONS = GlobalOptions()


def options() -> GlobalOptions:
    return _OPTIONS


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"ctxdiff {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N", envvar="CTXDIFF_DEVICE"),
    json: bool = typer.Option(False, "--json", help="Machine-readable JSON lines on stdout; people's output goes to stderr."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or tables."),
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of a failure."),
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
) -> None:
    _OPTIONS.device, _OPTIONS.json, _OPTIONS.quiet, _OPTIONS.debug = device, json, quiet, debug
