"""The bundled model says what it cannot draw (issue 22 item 3): a model trained on the shapes world
warns, once per prompt, about the words of a prompt it has no meaning for, says how to pass a real
checkpoint, and still writes the image; the --json line carries the warnings."""

import json

import pytest

from ctxdiff.cli import main
from ctxdiff.formats.t2i import DEFAULT_MODEL, trained_on

needs_bundled = pytest.mark.skipif(not DEFAULT_MODEL.exists(), reason="the bundled model is not installed")


@needs_bundled
def test_the_bundled_model_records_that_it_was_trained_on_the_shapes_world():
    assert trained_on(DEFAULT_MODEL) == "shapes"


def test_a_file_that_records_no_recipe_was_trained_on_nothing_known(tmp_path):
    from cli_fuzz import tiny_bundle

    assert trained_on(tiny_bundle(tmp_path / "plain.safetensors", 0)) is None
    assert trained_on(tiny_bundle(tmp_path / "own.safetensors", 0, {"recipe": {"data": {"source": "my/pics"}}})) == "my/pics"
    assert trained_on(tmp_path / "missing.safetensors") is None
    (tmp_path / "text.safetensors").write_text("not a model")
    assert trained_on(tmp_path / "text.safetensors") is None


@needs_bundled
def test_a_prompt_outside_the_shapes_world_warns_once_and_the_image_is_still_written(tmp_path, capsys):
    argv = ["--json", "generate", "a cat in armor", "a red circle", "a cat in armor", "--steps", "1", "--sr-steps", "1",
            "--seed", "3", "--out", str(tmp_path)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["prompt"] for r in records] == ["a cat in armor", "a red circle", "a cat in armor"]
    assert len(list(tmp_path.glob("*.png"))) == 3
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, captured.err
    (warning,) = warnings
    assert "'a cat in armor'" in warning and "'cat', 'armor'" in warning
    assert "the bundled model only knows the shapes world" in warning and "--model" in warning
    assert records[0]["warnings"] == [warning.removeprefix("warning: ")] == records[2]["warnings"]
    assert records[1]["warnings"] == []


@needs_bundled
def test_quiet_keeps_the_warning_in_the_json_line(tmp_path, capsys):
    assert main(["--json", "-q", "generate", "a dog", "--steps", "1", "--sr-steps", "1", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err
    (record,) = [json.loads(line) for line in captured.out.splitlines()]
    assert "'dog'" in record["warnings"][0]


def test_a_model_that_records_no_shapes_training_does_not_warn(tmp_path, capsys):
    from cli_fuzz import tiny_bundle

    model = tiny_bundle(tmp_path / "plain.safetensors", 0)
    assert main(["--json", "generate", "a cat in armor", "-m", str(model), "--steps", "1", "--out", str(tmp_path / "o")]) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err and json.loads(captured.out)["warnings"] == []


def test_a_model_trained_on_the_shapes_world_names_itself(tmp_path, capsys):
    from cli_fuzz import tiny_bundle

    model = tiny_bundle(tmp_path / "mine.safetensors", 0, {"recipe": {"data": {"source": "shapes"}}})
    assert main(["generate", "a castle", "-m", str(model), "--steps", "1", "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert f"{model} was trained on the shapes world" in err and "'castle'" in err
