"""Video I/O (PyAV): real videos and frame folders in, mp4/gif/webm/folders out and back."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ctxdiff.data.images import fit_image
from ctxdiff.data.video import read_video, side_by_side, sidecar_path, video_prompt, write_video
from ctxdiff.errors import CtxdiffError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CAR_TURN = DATA / "videos" / "car-turn.mp4"
JEEP = DATA / "frames" / "jeep"
needs_data = pytest.mark.skipif(not CAR_TURN.is_file(), reason="shared test videos not present")


def moving_square(frames: int = 6, height: int = 32, width: int = 48) -> np.ndarray:
    video = np.full((frames, height, width, 3), 40, dtype=np.uint8)
    for i in range(frames):
        video[i, 8:20, 4 + 4 * i:16 + 4 * i] = (230, 60, 30)
    return video


@needs_data
def test_strided_read_of_car_turn_gives_square_frames_at_source_fps_over_stride():
    video = read_video(CAR_TURN, num_frames=8, stride=2, size=64)
    assert video.frames.shape == (8, 64, 64, 3) and video.frames.dtype == np.uint8
    assert video.fps == pytest.approx(5.0)
    assert video.source == CAR_TURN


@needs_data
def test_a_folder_of_frames_reads_as_a_video_in_sorted_order():
    video = read_video(JEEP)
    assert video.frames.shape == (8, 512, 512, 3)
    first = np.asarray(Image.open(JEEP / "00000.png").convert("RGB"))
    np.testing.assert_array_equal(video.frames[0], first)


@needs_data
def test_asking_more_frames_than_the_video_has_says_how_many_it_has():
    with pytest.raises(CtxdiffError, match="has 80 frames"):
        read_video(CAR_TURN, num_frames=200)


@pytest.mark.parametrize("name, tolerance", [("clip.mp4", 6), ("clip.gif", 6), ("clip.webm", 8), ("frames", 0)])
def test_written_video_reads_back_with_its_frames_size_and_fps(tmp_path, name, tolerance):
    frames = moving_square()
    path = write_video(tmp_path / name, frames, fps=5, metadata={"prompt": "a red square moving right", "seed": 3})
    back = read_video(path)
    assert back.frames.shape == frames.shape
    assert back.fps == pytest.approx(5.0)
    assert np.abs(back.frames.astype(int) - frames).mean() <= tolerance
    sidecar = json.loads(sidecar_path(path).read_text())
    assert sidecar["fps"] == 5 and sidecar["frames"] == 6 and sidecar["seed"] == 3
    assert video_prompt(path) == "a red square moving right"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_a_static_gif_keeps_every_frame(tmp_path):
    frames = np.repeat(moving_square(1), 5, axis=0)
    assert len(read_video(write_video(tmp_path / "still.gif", frames, fps=10))) == 5


def test_mp4_pads_odd_sizes_to_even(tmp_path):
    back = read_video(write_video(tmp_path / "odd.mp4", moving_square(height=31, width=45), fps=8))
    assert back.frames.shape[1:3] == (32, 46)


def test_rewriting_a_frame_folder_replaces_its_frames(tmp_path):
    write_video(tmp_path / "out", moving_square(6), fps=4)
    write_video(tmp_path / "out", moving_square(3), fps=4)
    assert len(list((tmp_path / "out").iterdir())) == 3


def test_unknown_output_suffix_is_refused(tmp_path):
    with pytest.raises(CtxdiffError, match="cannot write '.avi'"):
        write_video(tmp_path / "x.avi", moving_square(), fps=5)


def test_corrupt_video_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(CtxdiffError, match="cannot decode") as info:
        read_video(bad)
    assert "\n" not in str(info.value)


def test_missing_video_is_an_error(tmp_path):
    with pytest.raises(CtxdiffError, match="no such video"):
        read_video(tmp_path / "nothing.mp4")


def test_start_past_the_end_is_an_error(tmp_path):
    path = write_video(tmp_path / "f", moving_square(4), fps=5)
    with pytest.raises(CtxdiffError, match="has 4 frames; start 9"):
        read_video(path, start=9)


def test_frame_folder_with_mismatched_sizes_is_an_error(tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "00000.png")
    Image.new("RGB", (16, 12)).save(tmp_path / "00001.png")
    with pytest.raises(CtxdiffError, match="differs"):
        read_video(tmp_path)


def test_crop_keeps_the_centre_and_pad_adds_black_bars():
    image = np.zeros((20, 40, 3), dtype=np.uint8)
    image[:, 10:30] = 200                                   # the centre 20 columns are bright
    cropped = fit_image(image, (10, 10), "crop")
    assert cropped.shape == (10, 10, 3) and cropped.min() > 150
    padded = fit_image(image, (40, 40), "pad")
    assert padded.shape == (40, 40, 3)
    assert padded[:10].max() == 0 and padded[-10:].max() == 0 and padded[20, 20].min() > 150


def test_side_by_side_scales_the_second_video_to_the_first_height():
    a, b = moving_square(3, 32, 48), moving_square(3, 16, 16)
    assert side_by_side(a, b).shape == (3, 32, 48 + 32, 3)
