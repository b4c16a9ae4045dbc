"""The CLI starts at once: `--help`, `--version` and shell completion never import torch (nor the
other heavy libraries); only running a command does. Times are measured by benchmarks/cli_start.py,
never asserted here."""

import os
import subprocess
import sys

import pytest

from ctxdiff import __version__

HEAVY = ("torch", "numpy", "PIL", "safetensors", "open_clip", "matplotlib", "av", "yaml")
COMMANDS = ("train", "tune-video", "generate", "edit", "invert", "evaluate", "shapes")


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **env})


def loaded_after(argv: list[str], **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run ctxdiff.cli.main(argv) in a fresh interpreter; the heavy modules it left loaded."""
    result = run_python(
        "import sys\nfrom ctxdiff.cli import main\ncode = main(%r)\n"
        "print('LOADED=' + ','.join(m for m in %r if m in sys.modules))\nsys.exit(code)" % (argv, HEAVY), **env)
    line = next(line for line in result.stdout.splitlines() if line.startswith("LOADED="))
    return result, [m for m in line.removeprefix("LOADED=").split(",") if m]


def test_importing_the_cli_loads_no_heavy_library():
    result = run_python("import sys, ctxdiff.cli\nprint([m for m in %r if m in sys.modules])" % (HEAVY,))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("argv", [["--help"], *([command, "--help"] for command in COMMANDS)],
                         ids=lambda argv: " ".join(argv))
def test_help_never_imports_torch(argv):
    result, loaded = loaded_after(argv)
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout and not loaded


def test_version_prints_the_version_without_importing_torch():
    result, loaded = loaded_after(["--version"])
    assert result.returncode == 0 and result.stdout.splitlines()[0] == f"ctxdiff {__version__}"
    assert not loaded


def test_shell_completion_never_imports_torch():
    result, loaded = loaded_after([], _CTXDIFF_COMPLETE="complete_bash", COMP_WORDS="ctxdiff generate --st",
                                  COMP_CWORD="2")
    assert result.returncode == 0, result.stderr
    assert "--steps" in result.stdout and not loaded
