"""`tune-video` reads the whole clip, as `edit` and `invert` do, and trains each step on a window of it:
frame 0 (the sparse-causal anchor) and a run of consecutive frames drawn from the step's seeded
generator, so memory does not grow with the clip and a resumed run goes on exactly."""

import json

import pytest
import torch

import tiny_video
from ctxdiff.checkpoints import load_bundle
from ctxdiff.cli import main
from ctxdiff.cli.video_common import DEFAULT_CLIP
from ctxdiff.data.video import write_video
from ctxdiff.formats.tuned import TUNED_KIND
from ctxdiff.pipelines.video_edit import read_source
from ctxdiff.pipelines.video_model import VideoModel
from ctxdiff.shapes.world import moving_shape_video
from ctxdiff.training import tune_video
from ctxdiff.training.tune_video import TuneConfig, VideoTuner, load_tune_config, tuning_window

SRC = tiny_video.SRC
LONG = 20


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_video.tiny_bundle(tmp_path_factory.mktemp("tiny") / "tiny.safetensors", 0)


def shapes_clip(folder, frames: int):
    """A lossless folder of `frames` shapes-world frames moving right, captioned in its sidecar."""
    clip = moving_shape_video(SRC, frames=frames, size=16, seed=7)
    return write_video(folder / f"clip-{frames}", clip.frames, fps=8, metadata={"prompt": SRC})


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def tune(tiny, clip, run, *extra: str) -> dict:
    assert main(["--json", "tune-video", str(clip), "--model", str(tiny), "--steps", "2", "--lr", "1e-3",
                 "--out", str(run), *extra]) == 0
    return load_bundle(run / "tuned.safetensors", kind=TUNED_KIND).configs["tune"]


def recorded_steps(monkeypatch, tuner: VideoTuner) -> tuple[list, list]:
    """[(window, x0 the loss got)] of each step `tuner` takes from now on, and the frames of each
    denoiser call."""
    steps, windows, calls = [], [], []
    window_of, loss, predict = tune_video.tuning_window, tune_video.diffusion_loss, tuner.model._predict
    monkeypatch.setattr(tune_video, "tuning_window", lambda *a: windows.append(window_of(*a)) or windows[-1])
    monkeypatch.setattr(tuner.model, "_predict", lambda x, c, t, frames: calls.append(frames) or predict(x, c, t, frames))

    def recording_loss(sched, x0_fn, x0, *args, **kwargs):
        steps.append((windows[-1], x0.clone()))
        return loss(sched, x0_fn, x0, *args, **kwargs)

    monkeypatch.setattr(tune_video, "diffusion_loss", recording_loss)
    return steps, calls


def test_tuning_defaults_read_the_whole_clip_as_edit_and_invert_do():
    config = TuneConfig()
    assert {"frames": config.frames, "stride": config.stride, "start": config.start} == DEFAULT_CLIP
    assert load_tune_config("recipes/video-tune.yaml") == config           # the shipped recipe keeps step


def test_tune_video_reads_every_frame_of_the_clip_by_default(tiny, tmp_path, capsys):
    tuned = tune(tiny, shapes_clip(tmp_path, LONG), tmp_path / "run")
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["frames"] == LONG and record["step"] == 2
    assert (tuned["frames"], tuned["stride"], tuned["start"], tuned["window_frames"]) == (LONG, 1, 0, 8)


def test_frames_stride_and_start_take_part_of_the_clip_as_for_edit(tiny, tmp_path, capsys):
    tuned = tune(tiny, shapes_clip(tmp_path, LONG), tmp_path / "run", "--frames", "6", "--stride", "2",
                 "--start", "3")
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["frames"] == 6
    assert (tuned["frames"], tuned["stride"], tuned["start"]) == (6, 2, 3)


def test_each_step_trains_on_frame_0_and_a_drawn_run_of_the_window_size(tiny, tmp_path, monkeypatch):
    model = VideoModel.load(tiny)
    clip = read_source(shapes_clip(tmp_path, LONG), None, 1, 0, model.image_size)
    tuner = VideoTuner(model, clip, SRC, TuneConfig(steps=6, lr=1e-3, window_frames=5, checkpoint_every=10),
                       tmp_path / "run")
    steps, calls = recorded_steps(monkeypatch, tuner)
    tuner.run()
    assert len(steps) == 6
    for window, x0 in steps:
        frames = window.frames
        assert len(frames) == 5 and frames[0] == 0 and 1 <= frames[1] <= LONG - 4
        assert list(frames[1:]) == list(range(frames[1], frames[1] + 4))           # contiguous, in the clip
        assert torch.equal(x0, tuner.x0[list(frames)])                              # what the loss trains on
    assert calls and set(calls) == {5}                     # the denoiser never sees more than the window
    assert len({window.frames[1] for window, _ in steps}) > 1                       # the start is drawn


def test_window_starts_cover_the_clip_and_a_short_clip_draws_nothing():
    gen = torch.Generator().manual_seed(0)
    starts = {tuning_window(LONG, 5, gen).frames[1] for _ in range(400)}
    assert starts == set(range(1, LONG - 3))
    state = gen.get_state()
    assert tuning_window(5, 5, gen).frames == (0, 1, 2, 3, 4) and torch.equal(gen.get_state(), state)


def test_resumed_windowed_tuning_is_bit_identical(tiny, tmp_path):
    clip_path = shapes_clip(tmp_path, LONG)
    config = TuneConfig(steps=4, lr=1e-2, window_frames=4, checkpoint_every=2)

    def tuner(run, resume=False):
        model = VideoModel.load(tiny)
        return VideoTuner(model, read_source(clip_path, None, 1, 0, 16), SRC, config, tmp_path / run, resume=resume)

    tiny_video.assert_resume_is_exact(tuner)


def test_a_clip_shorter_than_the_window_trains_on_all_its_frames(tiny, tmp_path, monkeypatch, capsys):
    clip = shapes_clip(tmp_path, 3)
    assert tune(tiny, clip, tmp_path / "cli")["frames"] == 3
    model = VideoModel.load(tiny)
    tuner = VideoTuner(model, read_source(clip, None, 1, 0, model.image_size), SRC, TuneConfig(steps=2, lr=1e-3),
                       tmp_path / "run")
    steps, _ = recorded_steps(monkeypatch, tuner)
    tuner.run()
    assert [window.frames for window, _ in steps] == [(0, 1, 2)] * 2


def test_a_window_of_fewer_than_2_frames_is_a_one_line_usage_error(tiny, tmp_path, capsys):
    assert main(["tune-video", str(shapes_clip(tmp_path, 3)), "--model", str(tiny), "--set", "window_frames=1",
                 "--out", str(tmp_path / "run")]) == 2
    assert "window_frames must be >= 2" in one_line_error(capsys)
