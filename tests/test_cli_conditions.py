"""`ctxdiff generate --class/--layout` and `ctxdiff evaluate --metric shapes` on class and layout
models (issue 21): end to end on tiny models trained here, the condition in the PNG metadata and
judged back from it, and the bad inputs as one line and a non-zero exit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from ctxdiff.cli import main
from ctxdiff.data.conditions import scene_layout
from ctxdiff.data.layouts import describe
from ctxdiff.data.png import read_png_metadata, save_png
from ctxdiff.shapes.judge import box_iou
from ctxdiff.shapes.render import render_scene
from ctxdiff.shapes.world import ShapesWorld
from conftest import TINY_RECIPE

CONDITIONS = {"class": {"kind": "class", "adapter_blocks": 1},
              "layout": {"kind": "layout", "max_objects": 2}}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """kind -> a two-step class or layout bundle of the tiny recipe."""
    from ctxdiff.recipes import from_dict
    from ctxdiff.training.recipe import Recipe
    from ctxdiff.training.trainer import Trainer

    root = tmp_path_factory.mktemp("condition-models")
    paths = {}
    for kind, condition in CONDITIONS.items():
        raw = yaml.safe_load(TINY_RECIPE.format(output=root / kind))
        raw["model"]["condition"] = condition
        raw["train"].update(steps=2, checkpoint_every=2)
        raw["preview_prompts"] = []
        paths[kind] = Trainer(from_dict(Recipe, raw), torch.device("cpu")).run().model_path
    return paths


def _generate(capsys, argv: list[str]) -> list[dict]:
    code = main(["--json", "-q", "--device", "cpu", "generate", *argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return [json.loads(line) for line in captured.out.splitlines()]


def _error(capsys, argv: list[str], command: str = "generate") -> tuple[int, str]:
    code = main(["-q", "--device", "cpu", command, *argv])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and "Traceback" not in err, (code, err)
    return code, err


def test_generate_class_writes_the_label_into_the_png_and_evaluate_judges_it(models, tmp_path, capsys):
    out = tmp_path / "class"
    records = _generate(capsys, ["--model", str(models["class"]), "--class", "red circle", "--class", "Blue  Square",
                                 "-n", "2", "--steps", "2", "--sr-steps", "2", "--seed", "5", "--out", str(out)])
    assert [r["prompt"] for r in records] == ["red circle"] * 2 + ["Blue Square"] * 2
    meta = read_png_metadata(records[2]["path"])
    assert meta["condition"] == {"kind": "class", "value": "Blue Square"} and meta["seed"] == records[2]["seed"]
    assert records[2]["path"].endswith(f"-blue-square-{meta['seed']}.png")
    assert main(["--json", "-q", "evaluate", "--metric", "shapes", "--images", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["condition"] == "class" and result["n"] == 4 and 0 <= result["colour"] <= 1


def test_generate_layout_inline_and_from_a_file_give_the_same_image(models, tmp_path, capsys):
    layout = [{"label": "red circle", "box": [0.1, 0.1, 0.5, 0.5]}, {"label": "blue square", "box": [0.5, 0.5, 0.9, 0.9]}]
    file = tmp_path / "layout.json"
    file.write_text(json.dumps(layout))
    common = ["--model", str(models["layout"]), "--steps", "2", "--sr-steps", "2", "--seed", "9"]
    inline = _generate(capsys, [*common, "--layout", "red circle@0.1,0.1,0.5,0.5;blue square@0.5,0.5,0.9,0.9",
                                "--out", str(tmp_path / "a")])
    from_file = _generate(capsys, [*common, "--layout", str(file), "--out", str(tmp_path / "b")])
    assert read_png_metadata(inline[0]["path"])["condition"] == {"kind": "layout", "value": layout}
    assert inline[0]["prompt"] == "red circle@0.1,0.1,0.5,0.5;blue square@0.5,0.5,0.9,0.9"
    assert inline[0]["path"].endswith("-red-circle-blue-square-9.png")
    from ctxdiff.data.images import read_image
    assert np.array_equal(read_image(inline[0]["path"]), read_image(from_file[0]["path"]))


def test_evaluate_judges_layouts_from_metadata_and_from_a_layouts_file(tmp_path, capsys):
    """Scenes the shapes world draws for their own layouts score 1 on colour, shape and placement;
    the same images judged against each other's boxes are misplaced."""
    folder = tmp_path / "drawn"
    folder.mkdir()
    world = ShapesWorld(seed=3, image_size=64)
    single = [s for s in (world.scene(i) for i in range(40)) if len(s.objects) == 1]
    scenes = next((a, b) for a in single for b in single
                  if box_iou(scene_layout(a)[0].box, scene_layout(b)[0].box) < 0.1)
    layouts = [describe(scene_layout(s)) for s in scenes]
    for i, (scene, layout) in enumerate(zip(scenes, layouts)):
        save_png(folder / f"{i}.png", render_scene(scene, 64), {"prompt": scene.caption,
                                                                "condition": {"kind": "layout", "value": layout}})
    assert main(["--json", "-q", "evaluate", "--metric", "shapes", "--images", str(folder)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["condition"] == "layout" and result["n"] == 2 and result["all"] == 1.0
    swapped = tmp_path / "swapped.json"
    swapped.write_text(json.dumps([[{**layouts[0][0], "box": layouts[1][0]["box"]}],
                                   [{**layouts[1][0], "box": layouts[0][0]["box"]}]]))
    assert main(["--json", "-q", "evaluate", "--metric", "shapes", "--images", str(folder),
                 "--layouts", str(swapped)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["colour"] == 1.0 and result["placed"] == 0.0 and result["iou"] < 0.1


@pytest.mark.parametrize("kind, argv, message", [
    ("class", ["a red circle"], "class-conditional model: pass --class LABEL"),
    ("class", ["--class", "red circel"], "did you mean 'red circle'"),
    ("class", ["--layout", "red circle@0,0,1,1"], "pass --class LABEL"),
    ("class", ["--class", "red circle", "--negative", "blue"], "--negative"),
    ("class", ["--class", "red circle", "extra prompt"], "pass only one of them"),
    ("layout", ["--layout", "red circle@0.5,0.5,0.2,0.9"], "is empty"),
    ("layout", ["--layout", "red circle@0,0,1.5,1"], "outside [0, 1]"),
    ("layout", ["--layout", "red circle@0,0,1,1;blue square@0,0,1,1;green cross@0,0,1,1"], "at most 2"),
    ("layout", ["--layout", "missing.json"], "cannot read the layout file"),
    ("layout", ["--class", "red circle"], "pass --layout"),
])
def test_bad_conditions_are_one_line_and_write_nothing(models, tmp_path, capsys, kind, argv, message):
    out = tmp_path / "out"
    code, err = _error(capsys, ["--model", str(models[kind]), "--steps", "2", "--out", str(out), *argv])
    assert code == 2 and message in err, err
    assert not out.exists()


def test_a_text_model_refuses_class_labels(tmp_path, capsys):
    from ctxdiff.formats.t2i import DEFAULT_MODEL

    if not DEFAULT_MODEL.exists():
        pytest.skip("the bundled model is not installed")
    code, err = _error(capsys, ["--class", "red circle", "--out", str(tmp_path / "o")])
    assert code == 2 and "text-conditional model: pass prompts" in err
