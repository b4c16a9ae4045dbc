"""The whole clip at its own size (issue 19 item 3): every frame, the source's width x height and fps,
letterbox instead of a silent crop, windows that share frame 0, one-frame clips, the source's audio."""

from pathlib import Path

import av
import numpy as np
import pytest

from ctxdiff.data.video import FrameFit, read_video, sidecar_path, write_video
from ctxdiff.errors import CtxdiffError
from ctxdiff.formats.inversion import InversionParams
from ctxdiff.pipelines.video_edit import EditParams, edit_video, invert_video, read_clip, reconstruct
from tiny_video import shapes_frames, tiny_video_model, write_mp4_with_sound

SRC, TGT = "a red circle moving to the right", "a blue circle moving to the right"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_video_model(tmp_path_factory.mktemp("tiny"))


def stream_seconds(path: Path, kind: str) -> float | None:
    with av.open(str(path)) as container:
        streams = [s for s in container.streams if s.type == kind]
        return float(streams[0].duration * streams[0].time_base) if streams else None


# -- geometry -------------------------------------------------------------------------------------

def test_letterbox_keeps_the_whole_frame_and_comes_back_at_the_source_size():
    frames = shapes_frames(3, 24, 40)
    fit = FrameFit(24, 40, 16)
    square = fit.to_model(frames)
    assert square.shape == (3, 16, 16, 3) and fit.output_size == (24, 40)
    back = fit.to_source(square)
    assert back.shape == frames.shape
    assert np.abs(back.astype(float) - frames).mean() < 25   # blurred by 16 px, but every column is there
    assert np.array_equal(fit.to_source(square, frames), frames)   # detail: an unchanged clip is the source


def test_detail_adds_the_models_change_to_the_source():
    frames = np.random.default_rng(0).integers(60, 160, (2, 30, 20, 3)).astype(np.uint8)   # room to get bluer
    fit = FrameFit(30, 20, 16)
    changed = fit.to_model(frames).astype(int)
    changed[..., 2] += 40                                   # the model made everything bluer
    out = fit.to_source(np.clip(changed, 0, 255).astype(np.uint8), frames)
    gain = out[..., 2].astype(float) - frames[..., 2]
    assert out.shape == frames.shape and 20 < np.median(gain) <= 40
    assert np.array_equal(out[..., :2], frames[..., :2])


def test_crop_is_taken_only_when_asked_and_returns_the_centred_square():
    frames = shapes_frames(2, 24, 40)
    fit = FrameFit(24, 40, 16, crop=True)
    assert fit.output_size == (24, 24)
    out = fit.to_source(fit.to_model(frames), frames)
    assert np.array_equal(out, frames[:, :, 8:32])


# -- the whole clip, end to end (library) ---------------------------------------------------------

@pytest.mark.parametrize("height, width", [(32, 32), (24, 40)])
def test_a_whole_clip_is_edited_at_its_own_length_size_and_fps(model, tmp_path, height, width):
    source = write_mp4_with_sound(tmp_path / "clip.mp4", shapes_frames(10, height, width), fps=12)
    clip = read_clip(source, model.image_size)
    assert len(clip) == 10 and clip.fps == pytest.approx(12) and clip.video.frames.shape[1:3] == (height, width)
    inversion = invert_video(model, clip.model_video, SRC, InversionParams(steps=3, attention=True))
    edited = clip.to_source(edit_video(model, inversion, TGT, EditParams()).frames)
    out = write_video(tmp_path / "edited.mp4", edited, clip.fps, audio_of=clip.video)
    back = read_video(out)
    assert back.frames.shape == (10, height, width, 3) and back.fps == pytest.approx(12)
    assert stream_seconds(out, "audio") == pytest.approx(10 / 12, abs=0.1)
    import json
    assert json.loads(sidecar_path(out).read_text())["audio"] is True


def test_part_of_a_clip_keeps_its_rate_and_the_span_of_its_sound(tmp_path):
    source = write_mp4_with_sound(tmp_path / "clip.mp4", shapes_frames(24, 16, 16), fps=12)
    clip = read_clip(source, 16, frames=6, stride=2, start=4)
    assert len(clip) == 6 and clip.fps == pytest.approx(6) and clip.video.start_s == pytest.approx(4 / 12)
    out = write_video(tmp_path / "part.mp4", clip.video.frames, clip.fps, audio_of=clip.video)
    assert stream_seconds(out, "audio") == pytest.approx(1.0, abs=0.1)   # 6 frames every 2nd at 12 fps: 1 s


def test_windowed_editing_equals_unwindowed_where_the_clip_fits_one_window(model, tmp_path):
    clip = read_clip(write_mp4_with_sound(tmp_path / "c.mp4", shapes_frames(6, 16, 16), 8), model.image_size)
    results = {}
    for window in (None, 6, 16):
        for method in ("ddim", "edict"):
            params = InversionParams(steps=3, method=method, window=window, attention=True, max_t=90)
            inversion = invert_video(model, clip.model_video, SRC, params)
            results[window, method] = edit_video(model, inversion, TGT, EditParams()).frames
    for method in ("ddim", "edict"):
        assert np.array_equal(results[None, method], results[6, method])
        assert np.array_equal(results[None, method], results[16, method])


def test_a_long_clip_runs_in_bounded_windows_that_all_hold_frame_0(model, tmp_path):
    clip = read_clip(write_mp4_with_sound(tmp_path / "c.mp4", shapes_frames(11, 16, 16), 8), model.image_size)
    calls = []
    predict = model._predict

    def spy(x, cond, t, frames):
        calls.append((x.shape[0], frames))
        return predict(x, cond, t, frames)

    model._predict = spy
    try:
        params = InversionParams(steps=3, method="edict", window=5, attention=True, max_t=90)
        inversion = invert_video(model, clip.model_video, SRC, params)
        assert max(frames for _, frames in calls) == 5 and min(frames for _, frames in calls) >= 4
        calls.clear()
        edited = edit_video(model, inversion, TGT, EditParams()).frames
        assert max(frames for _, frames in calls) == 5 and max(batch for batch, _ in calls) == 10   # guided: 2 copies
        assert reconstruct(model, inversion).psnr == float("inf")   # exact in windows too
    finally:
        model._predict = predict
    assert edited.shape == (11, 16, 16, 3)
    windows = model.windows(11, 5)
    assert all(w.frames[0] == 0 for w in windows) and sorted(f for w in windows for f in w.own) == list(range(11))


def test_a_one_frame_clip_edits_as_an_image(model, tmp_path):
    source = write_mp4_with_sound(tmp_path / "one.mp4", shapes_frames(2, 20, 28)[:1], fps=10)
    clip = read_clip(source, model.image_size)
    assert len(clip) == 1
    inversion = invert_video(model, clip.model_video, SRC, InversionParams(steps=3, method="edict", attention=True))
    edited = clip.to_source(edit_video(model, inversion, TGT, EditParams()).frames)
    assert edited.shape == (1, 20, 28, 3)


# -- bad input ------------------------------------------------------------------------------------

def test_a_clip_larger_than_memory_allows_is_an_error_naming_frames(tmp_path):
    source = write_mp4_with_sound(tmp_path / "c.mp4", shapes_frames(8, 32, 32), 8)
    with pytest.raises(CtxdiffError, match="--frames"):
        read_clip(source, 16, max_bytes=3 * 32 * 32 * 3)
    assert len(read_clip(source, 16, frames=3, max_bytes=3 * 32 * 32 * 3)) == 3


def test_an_audio_only_file_is_an_error_not_a_traceback(tmp_path):
    source = write_mp4_with_sound(tmp_path / "sound.m4a", np.zeros((0, 16, 16, 3), np.uint8), 8, seconds_of_sound=1)
    with pytest.raises(CtxdiffError, match="no video stream"):
        read_clip(source, 16)
