"""`--lora FILE[:WEIGHT]` for tune-video, invert and edit on a Stable Diffusion base: merged into the
base, recorded in tuned files, inversions and edit sidecars, and a file made over other LoRAs refused
(tiny random SD-shaped checkpoints, 16x16 frames)."""

import json
import shutil

import numpy as np
import pytest
import safetensors.torch
import torch

from ctxdiff.checkpoints import load_bundle
from ctxdiff.cli import main
from ctxdiff.data.video import read_video, sidecar_path, write_video
from ctxdiff.formats.inversion import load_inversion
from ctxdiff.formats.model_ref import ModelRef
from ctxdiff.formats.tuned import TUNED_KIND
from ctxdiff.models.latent import save_compvis
from ctxdiff.pipelines.video import load_video_model
from ctxdiff.pipelines.video_edit import read_source
from ctxdiff.shapes.world import moving_shape_video
from ctxdiff.training.tune_video import TuneConfig, VideoTuner
from tiny_sd import tiny_sd_models

FRAMES = 4
SRC, TGT = "a red circle moving to the right", "a blue circle moving to the right"
# What the LoRA updates: the U-Net's self-attention queries (tuned too: a tuned file's queries must not
# get the update twice), its cross-attention keys and values, and the text encoder's value projections.
TARGETS = {"unet": ("attn1.to_q", "attn2.to_k", "attn2.to_v"), "text": ("self_attn.v_proj",)}
PREFIX = {"unet": "lora_unet_", "text": "lora_te_text_model_"}


def write_lora(path, seed: int, rank: int = 2):
    """A random kohya-layout LoRA for the tiny SD model, large enough to change what it draws."""
    models = tiny_sd_models(0)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for part, model in (("unet", models.unet), ("text", models.text)):
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.endswith(TARGETS[part]):
                key = PREFIX[part] + name.replace(".", "_")
                out_features, in_features = module.weight.shape
                state[f"{key}.lora_down.weight"] = torch.randn(rank, in_features, generator=g) / in_features ** 0.5
                state[f"{key}.lora_up.weight"] = torch.randn(out_features, rank, generator=g)
    safetensors.torch.save_file(state, str(path))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd")
    return {"sd": save_compvis(folder / "sd.safetensors", tiny_sd_models(0)),
            "lora": write_lora(folder / "style.safetensors", 1),
            "other": write_lora(folder / "other.safetensors", 2)}


@pytest.fixture
def video(tmp_path):
    clip = moving_shape_video(SRC, frames=FRAMES, size=16, seed=7)
    return write_video(tmp_path / "red-circle", clip.frames, fps=8, metadata={"prompt": SRC})


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def recorded(path, weight: float) -> list[dict]:
    ref = ModelRef.of(path)
    return [{"path": ref.path, "sha256": ref.sha256, "weight": weight}]


def tune(files, video, run, *lora: str) -> object:
    argv = ["tune-video", str(video), "--model", str(files["sd"]), "--steps", "1", "--lr", "1e-3", "--out", str(run)]
    assert main([*argv, *[arg for spec in lora for arg in ("--lora", spec)]]) == 0
    return run / "tuned.safetensors"


def test_tune_invert_edit_with_a_lora_record_it_in_every_file(files, video, tmp_path, capsys):
    spec = f"{files['lora']}:0.8"
    tuned = tune(files, video, tmp_path / "tune", spec)
    assert load_bundle(tuned, kind=TUNED_KIND).extra["loras"] == recorded(files["lora"], 0.8)
    inv = tmp_path / "red.inversion.safetensors"
    assert main(["invert", str(video), "--tuned", str(tuned), "--lora", spec, "--steps", "3", "--attention",
                 "--no-check", "--out", str(inv)]) == 0
    assert [vars(lora) for lora in load_inversion(inv).loras] == recorded(files["lora"], 0.8)
    out = tmp_path / "blue"
    assert main(["--json", "edit", str(video), "--tuned", str(tuned), "--lora", spec, "--inversion", str(inv),
                 "--tgt", TGT, "--out", str(out)]) == 0
    assert last_json(capsys)["frames"] == FRAMES
    assert read_video(out).frames.shape == (FRAMES, 16, 16, 3)
    assert json.loads(sidecar_path(out).read_text())["loras"] == recorded(files["lora"], 0.8)


def test_a_lora_changes_the_edit(files, video, tmp_path):
    outs = {}
    for name, lora in (("plain", []), ("lora", ["--lora", str(files["lora"])])):
        outs[name] = tmp_path / name
        assert main(["edit", str(video), "--model", str(files["sd"]), *lora, "--steps", "3", "--tgt", TGT,
                     "--out", str(outs[name])]) == 0
    plain, styled = (read_video(outs[name]).frames.astype(int) for name in ("plain", "lora"))
    assert np.abs(plain - styled).mean() > 1.0
    again = tmp_path / "plain-again"
    assert main(["edit", str(video), "--model", str(files["sd"]), "--steps", "3", "--tgt", TGT,
                 "--out", str(again)]) == 0
    assert np.array_equal(read_video(again).frames, read_video(outs["plain"]).frames)   # the change is the LoRA's


def test_a_tuned_file_keeps_its_queries_over_the_merged_lora(files, video, tmp_path):
    """The tuned queries were tuned over the merged weights: loading the tuned file with the same LoRA
    gives the tuned model back, not the LoRA's update added a second time."""
    model = load_video_model(files["sd"], loras=[(files["lora"], 1.0)])
    clip = read_source(video, FRAMES, 1, 0, model.image_size)
    VideoTuner(model, clip, SRC, TuneConfig(steps=1, lr=1e-3), tmp_path / "run").run()
    loaded = load_video_model(None, tmp_path / "run" / "tuned.safetensors", loras=[(files["lora"], 1.0)])
    state = loaded.unet.state_dict()
    for name, tensor in model.unet.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    plain = load_video_model(files["sd"]).unet.state_dict()
    assert any(not torch.equal(plain[name], state[name]) for name in state if "attn2.to_k" in name)   # merged


@pytest.mark.parametrize("lora", [[], ["--lora", "{other}"], ["--lora", "{lora}:0.5"]],
                         ids=["none", "other-file", "other-weight"])
def test_a_tuned_file_over_other_loras_is_refused(files, video, tmp_path, capsys, lora):
    tuned = tune(files, video, tmp_path / "tune", str(files["lora"]))
    capsys.readouterr()
    given = [arg.format(**{k: str(v) for k, v in files.items()}) for arg in lora]
    assert main(["edit", str(video), "--tuned", str(tuned), *given, "--steps", "2", "--tgt", TGT,
                 "--out", str(tmp_path / "x")]) == 1
    err = one_line_error(capsys)
    assert "tuned with the LoRA style.safetensors x1" in err and f"--lora {files['lora']}:1" in err


def test_a_moved_lora_of_the_same_content_is_the_same_lora(files, video, tmp_path, capsys):
    tuned = tune(files, video, tmp_path / "tune", str(files["lora"]))
    moved = shutil.copy(files["lora"], tmp_path / "renamed.safetensors")
    assert main(["edit", str(video), "--tuned", str(tuned), "--lora", f"{moved}:1.0", "--steps", "2", "--tgt", TGT,
                 "--out", str(tmp_path / "x")]) == 0


def test_an_inversion_over_other_loras_is_refused(files, video, tmp_path, capsys):
    inv = tmp_path / "red.inversion.safetensors"
    assert main(["invert", str(video), "--model", str(files["sd"]), "--lora", str(files["lora"]), "--steps", "2",
                 "--no-check", "--out", str(inv)]) == 0
    capsys.readouterr()
    assert main(["edit", str(video), "--model", str(files["sd"]), "--inversion", str(inv), "--tgt", TGT,
                 "--out", str(tmp_path / "x")]) == 1
    assert "inverted with the LoRA style.safetensors x1, not with no LoRA" in one_line_error(capsys)


def test_resuming_a_tuning_with_other_loras_is_refused(files, video, tmp_path, capsys):
    run = tmp_path / "tune"
    tune(files, video, run, str(files["lora"]))
    capsys.readouterr()
    assert main(["tune-video", str(video), "--model", str(files["sd"]), "--steps", "2", "--lr", "1e-3",
                 "--out", str(run), "--resume"]) == 1
    assert "another base model, LoRAs" in one_line_error(capsys)


@pytest.mark.parametrize("command", [["tune-video"], ["invert"], ["edit", "--tgt", TGT]], ids=lambda c: c[0])
@pytest.mark.parametrize("model", ["bundled", "given"])
def test_lora_with_a_t2i_bundle_is_a_one_line_usage_error(files, video, tmp_path, capsys, command, model):
    from ctxdiff.formats.t2i import DEFAULT_MODEL

    base = ["--model", str(DEFAULT_MODEL)] if model == "given" else []
    assert main([command[0], str(video), *command[1:], *base, "--lora", str(files["lora"]),
                 "--out", str(tmp_path / "x")]) == 2
    assert "--lora: only for Stable Diffusion checkpoints" in one_line_error(capsys)
