"""Text-to-video editing end to end on tiny models: tune-video, invert, edit (library and CLI)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_video

from ctxdiff.checkpoints import load_bundle
from ctxdiff.cli import main
from ctxdiff.data.video import read_video, sidecar_path, write_video
from ctxdiff.formats import tuned
from ctxdiff.formats.inversion import InversionParams
from ctxdiff.formats.inversion import load_inversion, save_inversion
from ctxdiff.formats.model_ref import ModelRef
from ctxdiff.formats.tuned import TUNED_KIND
from ctxdiff.pipelines.video_edit import invert_video, read_source, reconstruct
from ctxdiff.pipelines.video_model import VideoModel
from ctxdiff.recipes import SampleConfig
from ctxdiff.shapes.judge import judge
from ctxdiff.shapes.world import moving_shape_video
from ctxdiff.training.recipe import read_recipe
from ctxdiff.training.trainer import Trainer
from ctxdiff.training.tune_video import TuneConfig, VideoTuner

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CAR_TURN = DATA / "videos" / "car-turn.mp4"
JEEP = DATA / "frames" / "jeep"
needs_data = pytest.mark.skipif(not CAR_TURN.is_file(), reason="shared test videos not present")
JEEP_PROMPT = "a silver jeep driving down a curvy road in the countryside"

SRC, TGT = "a red circle moving to the right", "a blue circle moving to the right"
COLOURS = ("red", "blue", "green", "yellow")
SCENE = "a large {colour} circle moving to the {direction} on a gray background"


def tiny_bundle(path: Path, seed: int) -> Path:
    return tiny_video.tiny_bundle(path, seed, noise=0.02, sample=SampleConfig(steps=4))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tiny")
    return {"a": tiny_bundle(folder / "a.safetensors", 0), "b": tiny_bundle(folder / "b.safetensors", 1)}


SHAPES_RECIPE = """
output: {output}
model:
  clip: {{arch: tiny-clip}}
  unet: {{image_size: 16, base_channels: 16, channel_mults: [1, 2], num_res_blocks: 1, attention_levels: [1],
          heads: 2, text_dim: 32, pooled_dim: 32, timesteps: 100}}
  adapter: {{x_shape: [3, 16, 16], patch_size: 4, width: 32, heads: 2, blocks: 1, text_dim: 32, timesteps: 100}}
diffusion: {{schedule: cosine, timesteps: 100, cond_drop_prob: 0.1}}
data: {{source: {data}, image_size: 16}}
train: {{steps: {steps}, batch_size: {batch}, lr: {lr}, warmup_steps: 20, ema_decay: 0.99, checkpoint_every: {steps},
         keep_last: 1, sample_every: 0, log_every: 50, seed: 0}}
sample: {{steps: 10, guidance: 3.0}}
"""
SHAPES_TRAINING = {"steps": 1000, "batch": 8, "lr": 0.003}


@pytest.fixture(scope="module")
def shapes_model(tmp_path_factory) -> Path:
    """A tiny model trained once per test session by `Trainer` on a narrow moving-shapes world:
    large circles of four colours moving left or right on gray, captioned 'a <colour> circle moving
    to the <direction>' (16x16 frames, fixed seeds)."""
    folder = tmp_path_factory.mktemp("shapes")
    data = folder / "data"
    data.mkdir()
    n = 0
    for colour in COLOURS:
        for direction in ("right", "left"):
            for seed in range(16):
                clip = moving_shape_video(SCENE.format(colour=colour, direction=direction), frames=8, size=16,
                                          seed=100 + seed)
                for frame in clip.frames[::2]:
                    Image.fromarray(frame).save(data / f"{n:05d}.png")
                    (data / f"{n:05d}.txt").write_text(f"a {colour} circle moving to the {direction}")
                    n += 1
    recipe = folder / "recipe.yaml"
    recipe.write_text(SHAPES_RECIPE.format(output=folder / "run", data=data, **SHAPES_TRAINING))
    Trainer(read_recipe(recipe), torch.device("cpu")).run()
    return folder / "run" / "model.safetensors"


def source_clip(folder: Path, seed: int = 7) -> tuple[Path, np.ndarray]:
    """'a red circle moving to the right' as a lossless folder of 8 frames; returns (path, centres)."""
    clip = moving_shape_video(SCENE.format(colour="red", direction="right"), frames=8, size=16, seed=seed)
    return write_video(folder / "red-circle", clip.frames, fps=8, metadata={"prompt": SRC}), clip.centres


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# -- the shapes world: tune, invert, edit ---------------------------------------------------------

def test_tuned_edit_of_a_red_circle_turns_it_blue_along_the_same_path(shapes_model, tmp_path, capsys):
    """tune-video, then edit with the CLI defaults (T = 20 DDIM steps to t = T, guidance 7.5 away from
    the source prompt, fusion, adapter): blue in >= 80% of frames and x-path correlation >= 0.9 (0.956
    here; 0.993 guiding away from ""). The path is kept by this model, not by the method: the same
    recipe trained on 2 threads ran the mirrored path (-0.69) with these settings, and DDIM stopped at
    t = 95 kept one model's path (0.98) and mirrored the other's (-0.96) (issue 19)."""
    video, centres = source_clip(tmp_path)
    assert main(["tune-video", str(video), "--model", str(shapes_model), "--steps", "20", "--lr", "1e-4",
                 "--stride", "1", "--out", str(tmp_path / "tune")]) == 0
    tuned = tmp_path / "tune" / "tuned.safetensors"
    out = tmp_path / "blue"
    assert main(["--json", "edit", str(video), "--tuned", str(tuned), "--tgt", TGT, "--out", str(out)]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["source_prompt"] == SRC and record["cross_mode"] == "replace" and record["frames"] == 8
    edited = read_video(out).frames
    verdicts = [judge(frame, TGT) for frame in edited]
    blue = np.mean([bool(v.colour) for v in verdicts])
    xs = np.array([v.detections[0].cx if v.detections[0] is not None else np.nan for v in verdicts])
    found = ~np.isnan(xs)
    path_correlation = np.corrcoef(xs[found], centres[found, 0])[0, 1]
    print(f"shapes edit: blue in {blue:.0%} of frames, centroid correlation {path_correlation:.3f}, "
          f"text alignment {record['text_alignment']:.3f}")
    assert blue >= 0.8 and found.sum() >= 6 and path_correlation >= 0.9


def test_inversion_round_trip_is_small_and_refine_repairs_trailing_spacing(shapes_model, tmp_path):
    video, _ = source_clip(tmp_path)
    model = VideoModel.load(shapes_model)
    clip = read_source(video, 8, 1, 0, model.image_size)
    runs = {("leading", 0, True): None, ("leading", 0, False): None, ("trailing", 0, True): None,
            ("trailing", 1, True): None}
    for spacing, refine, adapter in runs:
        params = InversionParams(steps=10, spacing=spacing, refine=refine, adapter=adapter)
        runs[spacing, refine, adapter] = reconstruct(model, invert_video(model, clip, SRC, params))
    print({k: (round(r.latent_error, 4), round(r.pixel_error, 2), round(r.psnr, 1)) for k, r in runs.items()})
    assert runs["leading", 0, True].psnr > 25 and runs["leading", 0, False].psnr > 20
    assert runs["trailing", 1, True].pixel_error < 0.5 * runs["trailing", 0, True].pixel_error
    assert runs["trailing", 1, True].latent_error < 0.7 * runs["trailing", 0, True].latent_error


# -- tuning ---------------------------------------------------------------------------------------

def test_tuning_trains_only_queries_temporal_layers_and_adapter_and_saves_only_them(tiny, tmp_path):
    model = VideoModel.load(tiny["a"])
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    clip = read_source(source_clip(tmp_path)[0], 4, 2, 0, model.image_size)
    VideoTuner(model, clip, SRC, TuneConfig(steps=2, lr=1e-2, checkpoint_every=1), tmp_path / "run").run()
    tunable = set(model.unet.tunable_state())
    changed = {k for k, v in model.unet.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed <= tunable
    bundle = load_bundle(tmp_path / "run" / "tuned.safetensors", kind=TUNED_KIND)
    assert set(bundle.tensors) == {"unet", "adapter"} and set(bundle.tensors["unet"]) == tunable
    assert bundle.extra["base_model"]["sha256"] == ModelRef.of(tiny["a"]).sha256
    assert bundle.extra["prompt"] == SRC and bundle.configs["tune"]["frames"] == 4
    reloaded = VideoModel.load(None, tmp_path / "run" / "tuned.safetensors")
    for name, tensor in model.unet.state_dict().items():
        assert torch.equal(tensor, reloaded.unet.state_dict()[name]), name
    assert (tmp_path / "run" / "tuned.safetensors").stat().st_size < 0.5 * tiny["a"].stat().st_size


def test_resumed_tuning_is_bit_identical(tiny, tmp_path):
    clip_path = source_clip(tmp_path)[0]
    config = TuneConfig(steps=4, lr=1e-2, frames=4, checkpoint_every=2)

    def tuner(run, resume=False):
        model = VideoModel.load(tiny["a"])
        return VideoTuner(model, read_source(clip_path, 4, 2, 0, 16), SRC, config, tmp_path / run, resume=resume)

    tiny_video.assert_resume_is_exact(tuner)


def test_tune_video_cli_refuses_an_existing_run_and_resumes_it(tiny, tmp_path, capsys):
    video = source_clip(tmp_path)[0]
    args = ["tune-video", str(video), "--model", str(tiny["a"]), "--frames", "4", "--out", str(tmp_path / "run")]
    assert main([*args, "--steps", "2"]) == 0
    capsys.readouterr()
    assert main([*args, "--steps", "3"]) == 2
    assert "--resume" in one_line_error(capsys)
    assert main(["--json", *args, "--steps", "3", "--resume"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 3


# -- inversion files ------------------------------------------------------------------------------

def test_inversion_file_keeps_trajectory_frames_and_attention_maps(tiny, tmp_path):
    model = VideoModel.load(tiny["a"])
    clip = read_source(source_clip(tmp_path)[0], 4, 2, 0, model.image_size)
    inversion = invert_video(model, clip, SRC, InversionParams(steps=5, attention=True))
    assert inversion.timesteps == [20, 40, 60, 80, 100] and inversion.trajectory.shape == (5, 4, 3, 16, 16)
    assert torch.equal(inversion.trajectory[0], torch.from_numpy(clip.frames).permute(0, 3, 1, 2).float() / 127.5 - 1)
    assert {k.split(".", 1)[0] for k in inversion.attention} == {f"t{t:05d}" for t in inversion.timesteps}
    back = load_inversion(save_inversion(tmp_path / "inv.safetensors", inversion))
    assert torch.equal(back.trajectory, inversion.trajectory) and np.array_equal(back.frames, clip.frames)
    assert back.attention.keys() == inversion.attention.keys() and back.prompt == SRC and back.fps == 4.0


def test_edit_reuses_an_inversion_file_from_invert(tiny, tmp_path, capsys):
    video = source_clip(tmp_path)[0]
    inv = tmp_path / "red.inversion.safetensors"
    assert main(["--json", "invert", str(video), "--model", str(tiny["a"]), "--steps", "4", "--frames", "4",
                 "--stride", "2", "--attention", "--out", str(inv)]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["prompt"] == SRC and record["attention_maps"] > 0
    assert {"latent_error", "reconstruction_error", "psnr_db"} <= set(record)
    out = tmp_path / "edit.gif"
    assert main(["edit", str(video), "--model", str(tiny["a"]), "--inversion", str(inv), "--tgt", TGT,
                 "--out", str(out), "--side-by-side"]) == 0
    back = read_video(out)
    assert back.frames.shape == (4, 16, 32, 3) and back.fps == pytest.approx(4.0)


def test_an_image_inverts_and_edits_as_a_one_frame_video(tiny, tmp_path, capsys):
    image = tmp_path / "red.png"
    Image.fromarray(moving_shape_video(SCENE.format(colour="red", direction="right"), 8, 48, 7).frames[0]).save(image)
    assert main(["--json", "invert", str(image), "--model", str(tiny["a"]), "--prompt", SRC, "--steps", "3",
                 "--out", str(tmp_path / "red.inv.safetensors")]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["frames"] == 1 and record["psnr_db"] > 0
    assert main(["--json", "edit", str(image), "--model", str(tiny["a"]), "--src", SRC, "--tgt", TGT, "--steps", "3",
                 "--out", str(tmp_path / "blue")]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["frames"] == 1 and "text_alignment" in record and "temporal_consistency_all_pairs" not in record
    assert read_video(tmp_path / "blue").frames.shape == (1, 48, 48, 3)   # at the image's own size


# -- real videos ----------------------------------------------------------------------------------

@needs_data
@pytest.mark.parametrize("source, stride, name, fps, side", [(CAR_TURN, 2, "car.mp4", 5.0, 480),
                                                            (JEEP, 1, "jeep", 8.0, 512)])
def test_real_videos_go_through_invert_edit_and_write(tiny, tmp_path, capsys, source, stride, name, fps, side):
    """Written at the source's size and rate (the 16 px model's frames sized back); 8 frames of each."""
    out = tmp_path / name
    assert main(["--json", "edit", str(source), "--model", str(tiny["a"]), "--src", JEEP_PROMPT,
                 "--tgt", JEEP_PROMPT.replace("silver", "red"), "--steps", "3", "--frames", "8",
                 "--stride", str(stride), "--out", str(out)]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    back = read_video(out)
    assert back.frames.shape == (8, side, side, 3) and back.fps == pytest.approx(fps)
    assert record["frames"] == 8 and 0 < record["temporal_consistency_all_pairs"] <= 1
    assert {"psnr", "ssim", "warp_error"} <= set(record)
    assert json.loads(sidecar_path(out).read_text())["prompt"] == JEEP_PROMPT.replace("silver", "red")


# -- bad input ------------------------------------------------------------------------------------

def test_a_corrupt_video_is_a_one_line_error(tiny, tmp_path, capsys):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    assert main(["invert", str(bad), "--model", str(tiny["a"]), "--prompt", SRC]) == 1
    assert "cannot decode" in one_line_error(capsys)


def test_a_video_without_frames_is_a_one_line_error(tiny, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["edit", str(empty), "--model", str(tiny["a"]), "--src", SRC, "--tgt", TGT]) == 1
    assert "no images in this folder" in one_line_error(capsys)


def test_asking_more_frames_than_the_video_has_is_a_one_line_error(tiny, tmp_path, capsys):
    video = source_clip(tmp_path)[0]
    assert main(["tune-video", str(video), "--model", str(tiny["a"]), "--frames", "9", "--out",
                 str(tmp_path / "run")]) == 1
    assert "has 8 frames" in one_line_error(capsys)


def test_a_tuned_file_for_another_base_model_is_refused(tiny, tmp_path, capsys):
    video = source_clip(tmp_path)[0]
    assert main(["tune-video", str(video), "--model", str(tiny["a"]), "--frames", "4", "--steps", "1",
                 "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert main(["edit", str(video), "--model", str(tiny["b"]), "--tuned", str(tmp_path / "run" / "tuned.safetensors"),
                 "--tgt", TGT]) == 1
    assert "tuned for another base model" in one_line_error(capsys)


def test_prompts_of_different_lengths_fall_back_from_replace_to_refine_with_a_warning(tiny, tmp_path, capsys):
    video = source_clip(tmp_path)[0]
    out = tmp_path / "big-blue"
    assert main(["--json", "edit", str(video), "--model", str(tiny["a"]), "--frames", "4", "--steps", "3",
                 "--tgt", "a big blue circle moving to the right", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "equal token count" in captured.err and "using refine" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["cross_mode"] == "refine"


def test_without_model_and_without_the_bundled_default_the_error_names_what_to_pass(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tuned, "DEFAULT_MODEL", tmp_path / "absent.safetensors")
    video = source_clip(tmp_path)[0]
    assert main(["edit", str(video), "--tgt", TGT]) == 1
    assert "--model" in one_line_error(capsys)


def test_an_existing_output_is_not_replaced_without_force(tiny, tmp_path, capsys):
    video = source_clip(tmp_path)[0]
    out = tmp_path / "taken.mp4"
    out.write_bytes(b"keep")
    assert main(["edit", str(video), "--model", str(tiny["a"]), "--tgt", TGT, "--out", str(out)]) == 2
    assert "--force" in one_line_error(capsys) and out.read_bytes() == b"keep"
