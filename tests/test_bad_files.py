"""Bad files a user may hand ctxdiff (issue 18): recipes that repeat a key or expand without bound,
recipes that could never be sampled, model files whose metadata or weights are damaged. Each is one
clear line and a non-zero exit, never a traceback nor silent nonsense."""

import json
import math

import pytest
import safetensors.torch
import torch

from ctxdiff.checkpoints import load_module_state, save_bundle
from ctxdiff.cli import main
from ctxdiff.errors import CtxdiffError, UsageError
from ctxdiff.formats.t2i import DEFAULT_MODEL, T2IFile
from ctxdiff.recipes import MAX_RECIPE_NODES
from ctxdiff.training.recipe import read_recipe


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_a_key_given_twice_is_refused_instead_of_the_second_winning(tiny_recipe):
    path = tiny_recipe(extra="train:\n  batch_size: 64\n")   # a second top-level `train:`
    with pytest.raises(UsageError, match=r"duplicate key 'train' \(first on line \d+\); keep one"):
        read_recipe(path)


def test_nested_aliases_are_refused_before_they_expand(tmp_path, capsys):
    levels = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    levels += [f"{b}: &{b} [{', '.join(['*' + a] * 9)}]" for a, b in zip("abcdefg", "bcdefgh")]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(levels) + "\ntrain: {steps: *h}\n")   # 9^8 = 43M values once expanded
    assert 9 ** 8 > MAX_RECIPE_NODES
    assert main(["train", "--recipe", str(path)]) == 2
    err = one_line_error(capsys)
    assert "aliases" in err and len(err) < 400


def test_ordinary_aliases_still_read(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("preview_prompts: &p [a red circle]\nsample: {steps: 10}\n")
    assert read_recipe(path).preview_prompts == ("a red circle",)


@pytest.mark.parametrize("override,message", [
    ("sample.steps=1000", r"sample\.steps is 1000, more than diffusion\.timesteps 100"),
    ("diffusion.timesteps=200", r"model\.unet\.timesteps is 100 but diffusion\.timesteps is 200"),
])
def test_a_recipe_that_could_not_be_sampled_is_refused_before_training(tiny_recipe, override, message):
    with pytest.raises(UsageError, match=message):
        read_recipe(tiny_recipe(), [override])


def _bundle_with(path, configs, tensors=None):
    tensors = tensors or {"clip": {"w": torch.zeros(2)}}
    return save_bundle(path, tensors, configs, kind="t2i")


@pytest.mark.parametrize("configs,tensors,what", [
    ({}, None, "it has no clip config, unet config, diffusion config, unet tensors"),
    ([1, 2], None, "its configs are a list, not a mapping"),
    ({"clip": {}, "unet": {}, "diffusion": {}}, {"other": {"w": torch.zeros(2)}}, "it has no clip tensors, unet tensors"),
    ({"clip": {"arch": 7}, "unet": {}, "diffusion": {}}, {"clip": {"w": torch.zeros(1)}, "unet": {"w": torch.zeros(1)}},
     "its configs do not read"),
])
def test_a_t2i_bundle_with_damaged_metadata_names_the_file(tmp_path, capsys, configs, tensors, what):
    path = _bundle_with(tmp_path / "bad.safetensors", configs, tensors)
    with pytest.raises(CtxdiffError, match="not a usable t2i bundle") as info:
        T2IFile.read(path)
    assert what in str(info.value) and str(path) in str(info.value)
    assert main(["generate", "a red circle", "-m", str(path), "--out", str(tmp_path / "out")]) == 1
    assert "not a usable t2i bundle" in one_line_error(capsys)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_weights_that_are_not_finite_are_refused_at_load():
    module = torch.nn.Linear(2, 2)
    state = {"weight": torch.tensor([[1.0, math.nan], [0.0, 1.0]]), "bias": torch.zeros(2)}
    with pytest.raises(CtxdiffError, match=r"m: 1 weight tensors hold NaN or inf \(weight\)"):
        load_module_state(module, state, "m")
    load_module_state(module, {"weight": torch.eye(2), "bias": torch.zeros(2)}, "m")   # finite: loads


@pytest.mark.skipif(not DEFAULT_MODEL.exists(), reason="the bundled model is not installed")
def test_a_bundle_whose_weights_turned_nan_is_refused_not_drawn_black(tmp_path, capsys):
    tensors = safetensors.torch.load_file(str(DEFAULT_MODEL))
    with safetensors.safe_open(str(DEFAULT_MODEL), framework="pt") as f:
        metadata = f.metadata()
    key = next(k for k in tensors if k.startswith("unet.") and tensors[k].is_floating_point())
    tensors[key] = torch.full_like(tensors[key], math.nan)
    broken = tmp_path / "nan.safetensors"
    safetensors.torch.save_file(tensors, str(broken), metadata=metadata)
    assert json.loads(metadata["configs"])["unet"]
    assert main(["generate", "a red circle", "-m", str(broken), "--out", str(tmp_path / "out")]) == 1
    assert "NaN or inf" in one_line_error(capsys)


@pytest.mark.skipif(not DEFAULT_MODEL.exists(), reason="the bundled model is not installed")
def test_a_sample_that_is_not_finite_is_an_error_not_a_black_png():
    from dataclasses import replace

    from ctxdiff.pipelines.text2image import Text2Image

    pipe = Text2Image.from_bundle(DEFAULT_MODEL)
    # guidance inf itself is refused by SampleConfig; 1e38 is finite but overflows float32 while sampling
    params = replace(pipe.defaults, steps=2, sr_steps=2, guidance=1e38)
    with pytest.raises(CtxdiffError, match=r"sampling gave NaN or inf values \(guidance 1e\+38"):
        pipe.sample(["a red circle"], [0], params)


def test_training_never_starts_over_a_users_files_and_force_replaces_a_runs(tiny_recipe, tmp_path, capsys):
    """A folder holding a user's recipe.yaml, model.safetensors and metrics.jsonl but no checkpoints:
    `train` refuses it (exit 2) and leaves every byte; check_run_folder(force=True), as `--force`
    calls it, removes what a run writes there, so the new run replaces its log instead of appending."""
    from pathlib import Path

    from ctxdiff.training.trainer import check_run_folder

    out = tmp_path / "run"
    out.mkdir()
    mine = {"recipe.yaml": b"my recipe", "model.safetensors": b"my model", "metrics.jsonl": b"my log\n",
            "notes.txt": b"keep"}
    for name, data in mine.items():
        (out / name).write_bytes(data)
    assert main(["train", "--recipe", tiny_recipe()]) == 2
    assert "holds files this run did not write" in one_line_error(capsys)
    assert all((out / name).read_bytes() == data for name, data in mine.items())
    check_run_folder(out, out / "checkpoints", resume=False, force=True)
    assert sorted(p.name for p in Path(out).iterdir()) == ["notes.txt"]


def test_an_output_folder_that_is_a_file_is_a_usage_error(tiny_recipe, tmp_path, capsys):
    (tmp_path / "run").write_text("a file")
    assert main(["train", "--recipe", tiny_recipe()]) == 2
    assert "is not a folder" in one_line_error(capsys) and (tmp_path / "run").read_text() == "a file"


def test_resume_falls_back_to_the_last_good_checkpoint_and_stays_exact(tiny_recipe):
    from pathlib import Path

    from ctxdiff.training.trainer import Trainer

    def run(name, stop_after=None, resume=False, log=lambda _: None):
        trainer = Trainer(read_recipe(tiny_recipe(name)), torch.device("cpu"), resume=resume, log=log)
        trainer.run(should_stop=(lambda: trainer.step >= stop_after) if stop_after else (lambda: False))
        return trainer

    full = run("full")
    run("part", stop_after=4)                       # checkpoints at steps 2 and 4 (checkpoint_every: 2)
    latest = Path(read_recipe(tiny_recipe("part")).output) / "checkpoints" / "step-00000004.pt"
    latest.write_bytes(latest.read_bytes()[:1000])   # a truncated newest checkpoint
    notes = []
    resumed = run("part", resume=True, log=notes.append)
    assert any("skipped the damaged step-00000004.pt; resuming from step-00000002.pt" in n for n in notes)
    for (name, a), (_, b) in zip(full.objective.state_dict().items(), resumed.objective.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_temp_file_left_by_a_killed_write_is_removed_by_the_next_write(tmp_path):
    from ctxdiff.checkpoints import atomic_write

    target = tmp_path / "model.safetensors"
    stale = tmp_path / ".model.safetensors.k3j4l5.tmp"     # what a kill -9 mid-write leaves
    other = tmp_path / ".other.safetensors.abc.tmp"
    stale.write_bytes(b"half")
    other.write_bytes(b"not ours")
    atomic_write(target, lambda temp: temp.write_bytes(b"done"))
    assert target.read_bytes() == b"done" and not stale.exists() and other.exists()


def test_a_base_model_is_recorded_by_absolute_path_and_found_beside_a_moved_tuned_file(tmp_path, monkeypatch):
    from ctxdiff.formats.model_ref import ModelRef
    from ctxdiff.formats.tuned import default_base

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "base.safetensors").write_bytes(b"weights")
    monkeypatch.chdir(tmp_path / "a")
    ref = ModelRef.of("base.safetensors")                      # given relative, as a user types it
    assert ref.path == str(tmp_path / "a" / "base.safetensors")
    moved = tmp_path / "b"
    (tmp_path / "a").rename(moved)                             # the user moves the folder elsewhere
    monkeypatch.chdir(tmp_path)
    assert default_base(moved / "tuned.safetensors", ref) == moved / "base.safetensors"
    (moved / "base.safetensors").write_bytes(b"other weights")  # same name, other content: not it
    with pytest.raises(CtxdiffError, match="nor beside the tuned file"):
        default_base(moved / "tuned.safetensors", ref)


def test_text_that_is_not_utf8_names_the_file_and_line(tmp_path, tiny_recipe, capsys):
    from ctxdiff.data.images import read_prompt_lines

    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("a red circle\nun cercle bleu \xe9t\xe9\n".encode("latin-1"))
    with pytest.raises(CtxdiffError, match=r"prompts\.txt, line 2, column 16: the prompts file is not UTF-8 text "
                                           r"\(byte 0xe9\); save it as UTF-8"):
        read_prompt_lines(prompts)
    data = tmp_path / "pics"
    data.mkdir()
    from PIL import Image
    Image.new("RGB", (16, 16), (200, 0, 0)).save(data / "a.png")
    (data / "a.txt").write_bytes(b"a \xff\xfe circle")
    assert main(["train", "--recipe", tiny_recipe(), "--set", f"data.source={data}"]) == 1
    err = one_line_error(capsys)
    assert "a.txt, line 1, column 3: the caption file is not UTF-8" in err
