"""CLI conventions: help, version, one-line errors with the right exit codes, fresh completions."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ctxdiff import __version__
from ctxdiff.cli import main
from ctxdiff.cli.completions import GENERATORS, SHELLS

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "ctxdiff", *args], capture_output=True, text=True, input=stdin,
                          env=env, timeout=120)


def test_help_lists_the_subcommands():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("train", "generate", "evaluate"):
        assert command in result.stdout


def test_version_prints_the_package_version():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"ctxdiff {__version__}"


def test_unknown_recipe_key_is_a_one_line_usage_error(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  stpes: 3\n")
    assert main(["train", "--recipe", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.stpes" in err and "train.steps" in err and "Traceback" not in err


def test_bad_set_override_is_a_one_line_usage_error(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  steps: 3\n")
    assert main(["train", "--recipe", str(recipe), "--set", "train.steps=many"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.steps" in err
    assert main(["train", "--recipe", str(recipe), "--set", "nonsense"]) == 2


def test_missing_recipe_file_is_a_one_line_error(tmp_path, capsys):
    assert main(["train", "--recipe", str(tmp_path / "absent.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "absent.yaml" in err


def test_print_recipe_shows_the_resolved_values(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  steps: 3\n")
    assert main(["train", "--recipe", str(recipe), "--set", "train.lr=3e-4", "--print-recipe"]) == 0
    out = capsys.readouterr().out
    assert "steps: 3" in out and "lr: 0.0003" in out


def test_unknown_option_exits_2_without_traceback():
    result = run_cli("generate", "--no-such-flag")
    assert result.returncode == 2 and "Traceback" not in result.stderr


@pytest.mark.parametrize("shell", sorted(SHELLS))
def test_committed_completion_scripts_are_fresh(shell):
    committed = (ROOT / "completions" / SHELLS[shell]).read_text()
    assert committed == GENERATORS[shell](), (
        f"completions/{SHELLS[shell]} is stale: run `python -m ctxdiff.cli.completions completions/`")


def test_bash_completion_script_parses():
    result = subprocess.run(["bash", "-n", str(ROOT / "completions" / SHELLS["bash"])], capture_output=True)
    assert result.returncode == 0, result.stderr


def _generate_json_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 0, capsys.readouterr().err
    (line,) = capsys.readouterr().out.splitlines()
    return line


def test_global_options_after_the_subcommand_give_the_same_json_line(tmp_path, capsys):
    same = ["a red circle", "--steps", "2", "--sr-steps", "2", "--seed", "5", "--out", str(tmp_path), "--force"]
    before = _generate_json_line(capsys, ["--json", "--quiet", "--device", "cpu", "generate", *same])
    after = _generate_json_line(capsys, ["generate", *same, "--json", "-q", "--device", "cpu"])
    assert after == before and json.loads(after)["prompt"] == "a red circle"


def test_a_global_flag_after_double_dash_is_a_prompt(tmp_path, capsys):
    line = _generate_json_line(capsys, ["--json", "-q", "generate", "--steps", "2", "--sr-steps", "2", "--seed", "5",
                                        "--out", str(tmp_path), "--", "--json"])
    assert json.loads(line)["prompt"] == "--json"


def test_every_subcommand_accepts_the_global_options():
    import typer.main

    from ctxdiff.cli import app

    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        names = {n for param in command.params for n in getattr(param, "opts", [])}
        assert {"--json", "--device", "--quiet", "-q", "--debug"} <= names, name


def test_debug_after_the_subcommand_shows_the_traceback(tmp_path):
    from ctxdiff.errors import CtxdiffError

    with pytest.raises(CtxdiffError, match="absent.yaml"):
        main(["train", "--recipe", str(tmp_path / "absent.yaml"), "--debug"])


def _generated(capsys, argv: list[str]) -> tuple[dict, dict]:
    """The JSON record and the PNG metadata of the one image `ctxdiff --json generate ...` makes."""
    from ctxdiff.data.png import read_png_metadata

    record = json.loads(_generate_json_line(capsys, ["--json", "-q", "generate", *argv]))
    return record, read_png_metadata(record["path"])


def test_generate_records_no_adapter_for_an_sd_checkpoint_without_one(tmp_path, capsys):
    from ctxdiff.models.latent import save_compvis
    from tiny_sd import tiny_sd_models

    sd = save_compvis(tmp_path / "tiny-sd.safetensors", tiny_sd_models(0))
    for extra in ([], ["--no-adapter"]):
        record, meta = _generated(capsys, ["a red circle", "--model", str(sd), "--steps", "2", "--seed", "1",
                                           "--out", str(tmp_path / "out"), "--force", *extra])
        assert record["adapter"] is False and meta["adapter"] is False and "adapter_file" not in record


def test_generate_records_the_bundled_adapter_only_when_it_runs(tmp_path, capsys):
    common = ["a red circle", "--steps", "2", "--sr-steps", "2", "--seed", "1", "--out", str(tmp_path), "--force"]
    record, meta = _generated(capsys, common)
    assert record["adapter"] is True and meta["adapter"] is True
    record, meta = _generated(capsys, [*common, "--no-adapter"])
    assert record["adapter"] is False and meta["adapter"] is False
