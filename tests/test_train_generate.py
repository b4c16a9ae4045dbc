"""`ctxdiff train` and `ctxdiff generate` end to end on tiny configs (seconds on a CPU)."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ctxdiff.checkpoints import latest_checkpoint, load_bundle, load_training_state, save_training_state
from ctxdiff.cli import main
from ctxdiff.data.png import read_png_metadata
from ctxdiff.errors import CtxdiffError
from ctxdiff.pipelines.batch_generate import sample_uint8
from ctxdiff.pipelines.text2image import Text2Image
from ctxdiff.training.recipe import read_recipe
from ctxdiff.training.trainer import DenoisingObjective, Trainer


def trained(recipe_path, overrides=(), stop_after=None, resume=False):
    trainer = Trainer(read_recipe(recipe_path, list(overrides)), torch.device("cpu"), resume=resume)
    stop = (lambda: trainer.step >= stop_after) if stop_after else (lambda: False)
    return trainer, trainer.run(should_stop=stop)


def test_resume_after_interrupt_is_bit_identical(tiny_recipe):
    full, _ = trained(tiny_recipe("full"))
    part, result = trained(tiny_recipe("part"), stop_after=3)
    assert result.interrupted and result.step == 3
    resumed, result = trained(tiny_recipe("part"), resume=True)
    assert result.step == 6 and not result.interrupted
    for (name, a), (_, b) in zip(full.objective.state_dict().items(), resumed.objective.state_dict().items()):
        assert torch.equal(a, b), name
    for (name, a), (_, b) in zip(full.ema.shadow.state_dict().items(), resumed.ema.shadow.state_dict().items()):
        assert torch.equal(a, b), name


def test_training_writes_checkpoints_metrics_and_a_bundle(tiny_recipe, tmp_path):
    trainer, result = trained(tiny_recipe(), ["train.sample_every=3"])
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000004.pt", "step-00000006.pt"]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6] and all(np.isfinite(r["loss"]) for r in lines)
    assert (run / "samples" / "step-00000003.png").exists()
    bundle = load_bundle(run / "model.safetensors", kind="t2i")
    assert {"clip", "unet", "adapter"} <= set(bundle.tensors) and bundle.extra["step"] == 6


def test_a_bundle_takes_the_ema_weights_of_any_checkpoint_of_its_run(tiny_recipe, tmp_path):
    trained(tiny_recipe())
    run = tmp_path / "run"
    pipe = Text2Image.from_bundle(run / "model.safetensors")
    ema = load_training_state(run / "checkpoints" / "step-00000004.pt")["ema"]
    modules = {"unet.": pipe.base.unet, "adapter.": pipe.base.adapter}

    def matches() -> bool:
        return all(torch.equal(value, ema[prefix + name].to(value.dtype))
                   for prefix, module in modules.items() for name, value in module.state_dict().items())

    assert not matches()  # the bundle holds step 6
    pipe.load_base_checkpoint(run / "checkpoints" / "step-00000004.pt")
    assert matches()


def test_training_without_adapter_uses_the_same_path(tiny_recipe):
    trainer, result = trained(tiny_recipe(), ["model.adapter=null"])
    assert trainer.objective.adapter is None and np.isfinite(result.loss)


def test_starting_over_an_existing_run_is_refused(tiny_recipe):
    trained(tiny_recipe())
    with pytest.raises(CtxdiffError, match="--resume"):
        trained(tiny_recipe())


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_recipe, tmp_path, monkeypatch):
    original = DenoisingObjective.forward
    calls = {"n": 0}

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        loss = original(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(DenoisingObjective, "forward", flaky)
    with pytest.raises(CtxdiffError, match="step 3"):
        trained(tiny_recipe())
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step-00000002.pt"


def test_folder_dataset_skips_and_counts_bad_pairs(tiny_recipe, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
        if i != 1:
            (folder / f"{i}.txt").write_text(f"a picture number {i}")
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "broken.txt").write_text("a broken picture")
    trainer = Trainer(read_recipe(tiny_recipe(), [f"data.source={folder}"]), torch.device("cpu"))
    assert len(trainer.dataset) == 3
    assert trainer.dataset.skipped == {"without caption": 1, "unreadable": 1}


@pytest.mark.parametrize("override,key,width", [("model.unet.text_dim=24", "model.unet.text_dim", 32),
                                                ("model.adapter.text_dim=24", "model.adapter.text_dim", 32)])
def test_text_widths_that_are_not_the_clips_are_refused_naming_the_key(tiny_recipe, override, key, width):
    with pytest.raises(CtxdiffError, match=rf"^{key} is \d+, but the CLIP 'tiny-clip' .* width {width}.*set {key}: {width}$"):
        Trainer(read_recipe(tiny_recipe("widths"), [override]), torch.device("cpu"))


CLIP_RECIPE = """
output: {output}
model: {{clip: {{arch: tiny-clip}}}}
data: {{source: shapes, image_size: 16, shapes_count: 64, hard_negatives: true}}
train: {{stage: clip, steps: 4, batch_size: 4, warmup_steps: 1, checkpoint_every: 2, sample_every: 0}}
"""


def test_clip_stage_trains_on_twins_scores_them_and_refuses_to_start_over(tmp_path, capsys):
    recipe = tmp_path / "clip.yaml"
    recipe.write_text(CLIP_RECIPE.format(output=tmp_path / "clip"))
    assert main(["--json", "train", "--recipe", str(recipe)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    scores = json.loads((tmp_path / "clip" / "clip-eval.json").read_text())
    assert summary["step"] == 4 and 0 <= scores["twin_text/shape"] <= 1 and "text_to_image" in summary
    assert {k.split("/")[1] for k in scores if k.startswith("twin_image/")} == \
        {"colour", "shape", "size", "position", "relation", "background", "binding"}
    written = (tmp_path / "clip" / "clip.safetensors").read_bytes()
    assert main(["train", "--recipe", str(recipe)]) == 2            # a second start would overwrite the run
    assert "already holds a run" in capsys.readouterr().err
    assert (tmp_path / "clip" / "clip.safetensors").read_bytes() == written


def test_empty_or_captionless_dataset_is_a_clear_error(tiny_recipe, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", "--recipe", tiny_recipe(), "--set", f"data.source={empty}"]) == 1
    assert "no images" in capsys.readouterr().err
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(empty / "a.png")
    assert main(["train", "--recipe", tiny_recipe(), "--set", f"data.source={empty}"]) == 1
    assert "1 without caption" in capsys.readouterr().err


@pytest.fixture
def model_path(tiny_recipe, tmp_path):
    trained(tiny_recipe())
    return tmp_path / "run" / "model.safetensors"


def test_batched_sampling_gives_each_prompt_and_seed_its_own_image(model_path):
    pipe = Text2Image.from_bundle(model_path)
    prompts, seeds = ["a red circle", "a blue square", "a green cross"], [5, 6, 7]
    params = replace(pipe.defaults, steps=3)
    together = sample_uint8(pipe, prompts, seeds, params, batch_size=2)
    size = pipe.image_size
    assert together.shape == (3, size, size, 3) and together.dtype == np.uint8
    assert np.array_equal(together[2], sample_uint8(pipe, prompts[2:], seeds[2:], params)[0])
    assert not np.array_equal(together[0], together[1])


def cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "ctxdiff", *args], capture_output=True, text=True, input=stdin,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)


def test_generate_reads_stdin_and_prints_json_lines(model_path, tmp_path):
    out = tmp_path / "out"
    result = cli("--json", "generate", "-", "--model", str(model_path), "--seed", "7", "--out", str(out),
                 "--steps", "3", stdin="a red circle\n\na blue square on the left\n")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["prompt"] for r in records] == ["a red circle", "a blue square on the left"]
    assert [r["seed"] for r in records] == [7, 8]
    for record in records:
        meta = read_png_metadata(record["path"])
        assert meta["prompt"] == record["prompt"] and meta["seed"] == record["seed"] and meta["steps"] == 3
        assert Path(record["path"]).parent == out


def test_same_seed_and_parameters_give_the_same_image(model_path, tmp_path):
    """Exact on the CPU, whatever the batch; CUDA kernels may differ in the last bit between batch sizes."""
    paths = []
    for name, prompts in (("a", ["a red circle"]), ("b", ["a green cross", "a red circle"])):
        assert main(["--device", "cpu", "--json", "generate", *prompts, "--model", str(model_path), "--seed", "3", "--steps", "3",
                     "--out", str(tmp_path / name)]) == 0
        paths.append(sorted((tmp_path / name).glob("*.png")))
    one = np.asarray(Image.open(paths[0][0]))
    # the second run's red circle got seed 4 (second prompt): regenerate it alone with that seed
    assert main(["--device", "cpu", "generate", "a red circle", "--model", str(model_path), "--seed", "4",
                 "--steps", "3", "--out", str(tmp_path / "c")]) == 0
    again = np.asarray(Image.open(next((tmp_path / "c").glob("*.png"))))
    assert np.array_equal(again, np.asarray(Image.open(paths[1][1])))
    assert main(["--device", "cpu", "generate", "a red circle", "--model", str(model_path), "--seed", "3",
                 "--steps", "3", "--out", str(tmp_path / "d")]) == 0
    assert np.array_equal(one, np.asarray(Image.open(next((tmp_path / "d").glob("*.png")))))


def test_generate_refuses_to_overwrite_without_force(model_path, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.png").write_bytes(b"precious")
    assert main(["generate", "x", "--model", str(model_path), "--out", str(out), "--steps", "2"]) == 2
    assert (out / "keep.png").read_bytes() == b"precious" and "--force" in capsys.readouterr().err
    assert main(["generate", "x", "--model", str(model_path), "--out", str(out), "--steps", "2", "--force"]) == 0
    assert (out / "keep.png").read_bytes() == b"precious"


def test_prompt_file_with_blank_lines_and_hostile_prompts_stay_inside_out(model_path, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n../../escape attempt\n\n/etc/passwd\x07\n   \n")
    out = tmp_path / "out"
    assert main(["generate", "--from-file", str(prompts), "--model", str(model_path), "--out", str(out),
                 "--steps", "2", "--grid"]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert len(files) == 3 and "grid.png" in files
    assert all("/" not in f and ".." not in f for f in files)
    assert not (tmp_path.parent / "escape-attempt").exists()


def test_wrong_model_file_is_a_one_line_error(tmp_path, capsys):
    bogus = tmp_path / "m.safetensors"
    bogus.write_bytes(b"\x00" * 20)
    assert main(["generate", "x", "--model", str(bogus), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "m.safetensors" in err
    assert main(["generate", "x", "--model", str(tmp_path / "absent.safetensors"), "--out", str(tmp_path / "o")]) == 1


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(tiny_recipe, tmp_path):
    recipe = tiny_recipe("sig", "")
    proc = subprocess.Popen([sys.executable, "-m", "ctxdiff", "train", "--recipe", recipe, "--set", "train.steps=400",
                             "--set", "train.checkpoint_every=1000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    metrics = tmp_path / "sig" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err
    ckpt = latest_checkpoint(tmp_path / "sig" / "checkpoints")
    assert ckpt is not None and 2 <= int(ckpt.stem.split("-")[1]) < 400


def test_init_from_starts_a_run_from_a_bundles_weights(model_path, tiny_recipe):
    trainer = Trainer(read_recipe(tiny_recipe("again"), [f"model.init_from={model_path}"]), torch.device("cpu"))
    bundle = load_bundle(model_path, kind="t2i")
    for name, value in trainer.objective.unet.state_dict().items():
        assert torch.equal(value, bundle.tensors["unet"][name]), name
    for name, value in trainer.ema.shadow.adapter.state_dict().items():
        assert torch.equal(value, bundle.tensors["adapter"][name]), name


def test_a_v_prediction_recipe_trains_and_generates_with_the_recipe_schedule(tiny_recipe, tmp_path, capsys):
    v = ["model.unet.prediction_type=v_prediction", "diffusion.loss_weighting=min_snr"]
    trained(tiny_recipe(), v)
    bundle = load_bundle(tmp_path / "run" / "model.safetensors")
    assert bundle.configs["unet"]["prediction_type"] == "v_prediction" and bundle.configs["unet"]["schedule"] == "cosine"
    assert main(["generate", "a red circle", "--model", str(tmp_path / "run" / "model.safetensors"), "--steps", "2",
                 "--out", str(tmp_path / "out")]) == 0
    assert len(list((tmp_path / "out").glob("*.png"))) == 1
    capsys.readouterr()
    assert main(["train", "--recipe", tiny_recipe("bad"), *[a for o in v for a in ("--set", o)],
                 "--set", "model.unet.schedule=linear"]) != 0
    err = capsys.readouterr().err
    assert "make them agree" in err and "Traceback" not in err
    assert main(["train", "--recipe", tiny_recipe("eps"), "--set", "model.unet.prediction_type=epsilon"]) != 0
    assert "needs diffusion.loss_weighting snr or min_snr" in capsys.readouterr().err


def test_cosine_lr_schedule_warms_up_then_decays_to_zero_at_the_last_step(tiny_recipe, tmp_path):
    trained(tiny_recipe(), ["train.lr_schedule=cosine", "train.warmup_steps=2", "train.lr=0.001"])
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # the lr for the next step, logged after each: warmup ends at 2/2 after step 1; from step 2 on,
    # 0.5 (1 + cos(pi k / 4)) for k = 0..4 (the first, k = 0, is the full lr)
    expected = [0.001 * f for f in (1.0, 0.5 * (1 + np.cos(np.pi / 4)), 0.5, 0.5 * (1 + np.cos(3 * np.pi / 4)), 0.0)]
    assert lrs[1:] == pytest.approx(expected, abs=1e-12)


def test_resume_reads_an_older_checkpoints_model_config_with_todays_defaults_and_refuses_another(tiny_recipe):
    trained(tiny_recipe(), stop_after=3)
    path = latest_checkpoint(Path(read_recipe(tiny_recipe()).output) / "checkpoints")
    state = load_training_state(path)
    del state["recipe"]["model"]["adapter"]["bound"]   # written before the field existed
    save_training_state(path, state)
    resumed, result = trained(tiny_recipe(), resume=True)
    assert result.step == 6
    with pytest.raises(CtxdiffError, match="trained with another model;"):
        Trainer(read_recipe(tiny_recipe(), ["model.adapter.bound=1.0"]), torch.device("cpu"), resume=True)
