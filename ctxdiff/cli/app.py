"""The Typer app and the global options every subcommand shares.

The global options (`--json`, `--device`, `--quiet`/`-q`, `--debug`) are accepted before the
subcommand (`ctxdiff --json generate ...`, the app's callback) and after it (`ctxdiff generate ...
--json`): `app.command()` adds the same options to every command's own signature, and the values
given there are merged into the one `GlobalOptions` that `options()` returns.

Why options on every command rather than moving flags to the front of argv in `main()`: click then
parses them as it parses every other option, so `ctxdiff generate -- --json` keeps "--json" as a
prompt, `--tgt --json` keeps it as the value of --tgt, `-qn 2` and `--device=cpu` work, and
`--help` and the completion scripts list them per command. A pre-pass over argv would have to
re-implement click's parsing (which options take values, `--`, grouped short flags) to get those
right, and would silently diverge from it.
"""

from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

import typer

from ctxdiff import __version__
from ctxdiff.errors import UsageError

PANEL = "Global options (also before the subcommand)"


class _App(typer.Typer):
    """A Typer app whose every command also takes the global options (see the module docstring)."""

    def command(self, *args: Any, **kwargs: Any) -> Callable[[Callable], Callable]:
        register = super().command(*args, **kwargs)

        def decorator(fn: Callable) -> Callable:
            register(with_global_options(fn))
            return fn          # the module keeps the plain function, callable without the globals

        return decorator


app = _App(
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
    """Options given before or after the subcommand; read by every subcommand through `options()`."""

    device: str = "auto"
    json: bool = False
    quiet: bool = False
    debug: bool = False


_OPTIONS = GlobalOptions()

DEVICE_HELP = "auto | cpu | cuda | cuda:N | mps"
JSON_HELP = "Machine-readable JSON lines on stdout; people's output goes to stderr."
QUIET_HELP = "No progress bars or tables."
DEBUG_HELP = "Show the full traceback of a failure."

_DEVICE_NAME = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def check_device_name(name: str) -> None:
    """A --device value ctxdiff can run on at all (without importing torch): auto, cpu, cuda, cuda:N
    or mps; `meta`, `xla`, ... are usage errors."""
    if not _DEVICE_NAME.fullmatch(name):
        raise UsageError(f"--device {name!r}: not a device ctxdiff runs on; use auto, cpu, cuda or cuda:N")


def options() -> GlobalOptions:
    return _OPTIONS


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"ctxdiff {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP, envvar="CTXDIFF_DEVICE"),
    json: bool = typer.Option(False, "--json", help=JSON_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
    debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP),
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
) -> None:
    _OPTIONS.device, _OPTIONS.json, _OPTIONS.quiet, _OPTIONS.debug = device, json, quiet, debug


# The same options on each command; defaults that mean "not given here", so a value given before the
# subcommand stands unless this one is given (a flag is on when given in either place).
_COMMAND_OPTIONS = {
    "global_device": (Optional[str], typer.Option(None, "--device", help=DEVICE_HELP, rich_help_panel=PANEL)),
    "global_json": (bool, typer.Option(False, "--json", help=JSON_HELP, rich_help_panel=PANEL)),
    "global_quiet": (bool, typer.Option(False, "--quiet", "-q", help=QUIET_HELP, rich_help_panel=PANEL)),
    "global_debug": (bool, typer.Option(False, "--debug", help=DEBUG_HELP, rich_help_panel=PANEL)),
}


def with_global_options(fn: Callable) -> Callable:
    """`fn` with the global options appended to its parameters; they are merged into `options()`
    before `fn` runs and are not passed on to it."""
    signature = inspect.signature(fn, eval_str=True)
    clash = set(signature.parameters) & set(_COMMAND_OPTIONS)
    if clash:
        raise TypeError(f"{fn.__name__}: parameter names reserved for the global options: {sorted(clash)}")
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
             for name, (annotation, default) in _COMMAND_OPTIONS.items()]

    @functools.wraps(fn)
    def command(*args: Any, **kwargs: Any) -> Any:
        device = kwargs.pop("global_device", None)
        if device is not None:
            _OPTIONS.device = device
        _OPTIONS.json |= kwargs.pop("global_json", False)
        _OPTIONS.quiet |= kwargs.pop("global_quiet", False)
        _OPTIONS.debug |= kwargs.pop("global_debug", False)
        check_device_name(_OPTIONS.device)                 # every command, before any work
        return fn(*args, **kwargs)

    command.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *extra])
    command.__annotations__ = {**{p.name: p.annotation for p in signature.parameters.values()},
                               **{name: annotation for name, (annotation, _) in _COMMAND_OPTIONS.items()},
                               "return": signature.return_annotation}
    return command
