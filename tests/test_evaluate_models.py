"""`ctxdiff evaluate` paths that run a model: bits/dim, the zero-shot protocol, the guidance sweep."""

import json

import pytest
import torch

from ctxdiff.cli import main
from ctxdiff.training.recipe import read_recipe
from ctxdiff.training.trainer import Trainer


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from conftest import TINY_RECIPE

    folder = tmp_path_factory.mktemp("model")
    recipe = folder / "r.yaml"
    recipe.write_text(TINY_RECIPE.format(output=folder / "run"))
    Trainer(read_recipe(recipe, ["train.steps=2"]), torch.device("cpu")).run()
    return folder / "run" / "model.safetensors"


def run_json(capsys, *args):
    assert main(["--json", *args]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_bpd_reports_the_bound_with_and_without_the_adapter(tiny_model, capsys):
    args = ["evaluate", "--metric", "bpd", "--model", str(tiny_model), "--data", "shapes", "-n", "4",
            "--bpd-timesteps", "5", "--batch-size", "4"]
    with_adapter = run_json(capsys, *args)
    without = run_json(capsys, *args, "--no-adapter")
    for record in (with_adapter, without):
        parts = record["prior_bpd"] + record["diffusion_bpd"] + record["decoder_bpd"]
        assert record["images"] == 4 and abs(parts - record["bits_per_dim"]) < 1e-6 * max(1, parts)
    assert with_adapter["adapter"] and not without["adapter"]


def test_zero_shot_protocol_generates_resumably_then_scores(tiny_model, tmp_path, capsys):
    prompts = tmp_path / "captions.txt"
    prompts.write_text("\n".join(f"a red circle number {i}" for i in range(6)))
    real = tmp_path / "real"
    assert main(["shapes", str(real), "--n", "4", "--size", "16"]) == 0
    fake = tmp_path / "fake"
    args = ["evaluate", "--metric", "fid", "--real", str(real), "--fake", str(fake), "--prompts", str(prompts),
            "-n", "5", "--model", str(tiny_model), "--steps", "2", "--features", "clip:tiny-clip:" + str(tiny_model)]
    first = run_json(capsys, *args)
    assert first["fake_images"] == 5 and first["fid"] >= 0
    kept = (fake / "00000.png").stat().st_mtime_ns
    second = run_json(capsys, *args)
    assert (fake / "00000.png").stat().st_mtime_ns == kept  # already made: not made again
    assert second["fid"] == pytest.approx(first["fid"])
    # a stranger in --fake would be counted by the metric: refused, nothing made or replaced
    (fake / "holiday.png").write_bytes((fake / "00001.png").read_bytes())
    assert main(["evaluate", *args[1:]]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds holiday.png, which this run did not make" in err
    (fake / "holiday.png").unlink()
    assert main(["evaluate", *args[1:], "--guidance", "9"]) == 1        # other settings than the images there
    assert "which this run did not make" in capsys.readouterr().err
    assert (fake / "00000.png").stat().st_mtime_ns == kept


def test_prompts_file_shorter_than_n_is_a_clear_error(tiny_model, tmp_path, capsys):
    prompts = tmp_path / "captions.txt"
    prompts.write_text("one\ntwo\n")
    assert main(["evaluate", "--metric", "fid", "--real", str(tmp_path), "--fake", str(tmp_path / "f"),
                 "--prompts", str(prompts), "-n", "3", "--model", str(tiny_model)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fewer than -n 3" in err


def test_guidance_sweep_writes_a_table_and_a_plot(tiny_model, tmp_path, capsys):
    prompts = tmp_path / "captions.txt"
    prompts.write_text("\n".join(f"a blue square {i}" for i in range(4)))
    real = tmp_path / "real"
    assert main(["shapes", str(real), "--n", "4", "--size", "16"]) == 0
    record = run_json(capsys, "evaluate", "--sweep", "guidance=1,3", "--real", str(real), "--fake",
                      str(tmp_path / "sweep"), "--prompts", str(prompts), "-n", "3", "--model", str(tiny_model),
                      "--steps", "2", "--features", "clip:tiny-clip:" + str(tiny_model),
                      "--clip-weights", str(tiny_model))
    assert [p["guidance"] for p in record["points"]] == [1.0, 3.0]
    assert (tmp_path / "sweep" / "sweep.png").exists()
    assert main(["evaluate", "--sweep", "eta=1", "--model", str(tiny_model)]) == 2
