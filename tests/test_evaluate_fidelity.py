"""`ctxdiff evaluate --metric fidelity|psnr|ssim|warp-error` (issue 19 item 4): an edited video against
its source, named by --source or found in the sidecar `ctxdiff edit` writes; bad pairs one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ctxdiff.cli import main
from ctxdiff.data.video import write_video
from ctxdiff.shapes.world import moving_shape_video


@pytest.fixture
def source(tmp_path):
    frames = moving_shape_video("a red circle moving to the right", frames=10, size=48, seed=3).frames
    return write_video(tmp_path / "source", frames, 8.0), frames


def _evaluate(capsys, argv):
    code = main(["--json", "-q", "evaluate", *argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def test_a_clip_against_itself_is_exact_and_a_shuffled_one_is_not(tmp_path, capsys, source):
    path, frames = source
    same = write_video(tmp_path / "same", frames, 8.0)
    shuffled = write_video(tmp_path / "shuffled", frames[np.random.default_rng(0).permutation(len(frames))], 8.0)
    result = _evaluate(capsys, ["--metric", "fidelity", "--videos", str(same), "--videos", str(shuffled),
                                "--source", str(path)])
    exact, moved = result["videos"]
    assert exact["psnr"] == float("inf") and exact["ssim"] == pytest.approx(1.0) and exact["warp_error"] < 1e-3
    assert moved["psnr"] < 30 and moved["warp_error"] > 10 * max(exact["warp_error"], 1e-4)
    only = _evaluate(capsys, ["--metric", "warp-error", "--videos", str(shuffled), "--source", str(path)])
    assert set(only["videos"][0]) == {"video", "source", "frames", "warp_error"}
    assert only["mean_warp_error"] == pytest.approx(moved["warp_error"])


def test_the_source_and_its_frames_come_from_the_edit_sidecar(tmp_path, capsys, source):
    """An edit of frames 2, 4, 6 (as `edit --start 2 --stride 2 --frames 3` records it) is compared with
    those frames of the source."""
    path, frames = source
    edited = write_video(tmp_path / "edited", frames[2:8:2], 8.0,
                         {"source": str(path), "clip": {"frames": 3, "stride": 2, "start": 2, "crop": False}})
    result = _evaluate(capsys, ["--metric", "psnr", "--videos", str(edited)])
    assert result["videos"][0]["psnr"] == float("inf") and result["videos"][0]["frames"] == 3


@pytest.mark.parametrize("case, message", [
    ("no source", "pass --source PATH"),
    ("other size", "differ"),
    ("two sources for three", "--source for 3 --videos"),
])
def test_bad_pairs_are_one_line(tmp_path, capsys, source, case, message):
    path, frames = source
    lone = write_video(tmp_path / "lone", frames, 8.0)
    argv = {"no source": ["--videos", str(lone)],
            "other size": ["--videos", str(write_video(tmp_path / "small", frames[:, :32, :32], 8.0)),
                           "--source", str(path)],
            "two sources for three": ["--videos", str(lone)] * 3 + ["--source", str(path)] * 2}[case]
    code = main(["-q", "evaluate", "--metric", "fidelity", *argv])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and message in err, err
