"""The video commands on whole clips (issue 19): every frame at the source's size, fps and sound by
default, an exact inversion, `edit --tgt SRC` returning the clip, and the source never overwritten."""

import json

import av
import numpy as np
import pytest

from ctxdiff.cli import main
from ctxdiff.data import video as video_io
from ctxdiff.data.video import read_video, sidecar_path
from tiny_video import SRC, shapes_frames, tiny_video_bundle, write_mp4_with_sound

TGT = "a blue circle moving to the right"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_video_bundle(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def clip(tmp_path):
    """A 24x40 mp4 of 10 frames at 12 fps with a sound track."""
    return write_mp4_with_sound(tmp_path / "wide.mp4", shapes_frames(10, 24, 40), fps=12)


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_invert_takes_every_frame_and_edict_gives_every_pixel_back(tiny, clip, tmp_path, capsys):
    assert main(["--json", "invert", str(clip), "--model", str(tiny), "--prompt", SRC, "--steps", "4",
                 "--out", str(tmp_path / "inv.safetensors")]) == 0
    record = last_json(capsys)
    assert record["frames"] == 10 and (record["width"], record["height"]) == (40, 24) and record["method"] == "edict"
    assert record["psnr_model_db"] == float("inf") and record["psnr_db"] == float("inf") and record["ssim"] == 1.0


def test_edit_writes_the_whole_clip_at_its_size_fps_and_sound(tiny, clip, tmp_path, capsys):
    out = tmp_path / "blue.mp4"
    assert main(["--json", "edit", str(clip), "--model", str(tiny), "--src", SRC, "--tgt", TGT, "--steps", "3",
                 "--out", str(out)]) == 0
    record = last_json(capsys)
    back = read_video(out)
    assert record["method"] == "ddim" and json.loads(sidecar_path(out).read_text())["inversion"]["max_t"] is None
    assert back.frames.shape == (10, 24, 40, 3) and back.fps == pytest.approx(12)
    assert (record["width"], record["height"], record["frames"]) == (40, 24, 10)
    assert {"psnr", "ssim", "warp_error", "text_alignment"} <= set(record)
    sidecar = json.loads(sidecar_path(out).read_text())
    assert sidecar["audio"] is True and "warp_error" in sidecar["scores"]
    with av.open(str(out)) as container:
        assert [s.type for s in container.streams] == ["video", "audio"]


def test_an_exact_edit_to_the_source_prompt_returns_the_clip_and_crop_asks_for_a_square(tiny, clip, tmp_path, capsys):
    same = tmp_path / "same"
    assert main(["--json", "edit", str(clip), "--model", str(tiny), "--src", SRC, "--tgt", SRC, "--steps", "4",
                 "--method", "edict", "--out", str(same)]) == 0
    record = last_json(capsys)
    assert record["method"] == "edict" and record["psnr"] > 40   # guided (7.5), fused, at 24x40
    square = tmp_path / "square"
    assert main(["--json", "edit", str(clip), "--model", str(tiny), "--src", SRC, "--tgt", TGT, "--steps", "3",
                 "--frames", "4", "--stride", "2", "--crop", "--out", str(square)]) == 0
    assert read_video(square).frames.shape == (4, 24, 24, 3) and last_json(capsys)["fps"] == pytest.approx(6)


def test_the_source_is_never_overwritten(tiny, clip, capsys):
    before = clip.read_bytes()
    assert main(["edit", str(clip), "--model", str(tiny), "--src", SRC, "--tgt", TGT, "--out", str(clip),
                 "--force"]) == 2
    assert "source clip" in one_line_error(capsys) and clip.read_bytes() == before


def test_a_clip_larger_than_memory_allows_names_frames(tiny, clip, monkeypatch, capsys):
    monkeypatch.setattr(video_io, "available_memory", lambda: 2 * 24 * 40 * 3 * 3)
    assert main(["invert", str(clip), "--model", str(tiny), "--prompt", SRC, "--no-check"]) == 1
    assert "--frames" in one_line_error(capsys)


def test_a_one_frame_clip_edits_as_an_image(tiny, tmp_path, capsys):
    one = write_mp4_with_sound(tmp_path / "one.mp4", shapes_frames(2, 20, 28)[:1], fps=10)
    assert main(["--json", "edit", str(one), "--model", str(tiny), "--src", SRC, "--tgt", TGT, "--steps", "3",
                 "--out", str(tmp_path / "one-blue")]) == 0
    assert last_json(capsys)["frames"] == 1 and read_video(tmp_path / "one-blue").frames.shape == (1, 20, 28, 3)
    assert np.isfinite(json.loads(sidecar_path(tmp_path / "one-blue").read_text())["scores"]["psnr"])
