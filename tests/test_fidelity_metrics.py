"""PSNR, SSIM and warp error (ctxdiff/metrics/fidelity.py): the values their definitions give."""

import numpy as np
import pytest

from ctxdiff.errors import CtxdiffError
from ctxdiff.metrics.fidelity import fidelity_scores, psnr, ssim, warp_error
from ctxdiff.shapes.world import moving_shape_video


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    return moving_shape_video("a large red circle moving to the right on a gray background", frames=8, size=48,
                              seed=9100).frames


def test_psnr_and_ssim_of_identical_frames_are_inf_and_one(clip):
    assert psnr(clip, clip) == float("inf") and ssim(clip, clip) == 1.0
    assert psnr(clip[0], clip[0].copy()) == float("inf")


def test_psnr_is_the_mse_formula_and_a_mask_sees_only_its_pixels(clip):
    brighter = np.clip(clip.astype(int) + 5, 0, 255).astype(np.uint8)
    changed = brighter != clip
    expected = 10 * np.log10(255 ** 2 / np.mean((brighter.astype(float) - clip) ** 2))
    assert psnr(brighter, clip) == pytest.approx(expected)
    untouched = ~changed.any(-1)
    if untouched.any():
        assert psnr(brighter, clip, untouched) == float("inf")
    half = np.zeros(clip.shape[1:3], bool)
    half[:, :24] = True
    edited = clip.copy()
    edited[:, :, 24:] = 255 - edited[:, :, 24:]      # damage only the right half
    assert psnr(edited, clip, half) == float("inf") and ssim(edited, clip, half) > ssim(edited, clip, ~half)
    with pytest.raises(CtxdiffError):
        psnr(edited, clip, np.zeros_like(half))


def test_ssim_of_flat_frames_is_the_luminance_term():
    a, b = np.full((2, 16, 16, 3), 100, np.uint8), np.full((2, 16, 16, 3), 140, np.uint8)
    c1 = (0.01 * 255) ** 2
    assert ssim(a, b) == pytest.approx((2 * 100 * 140 + c1) / (100 ** 2 + 140 ** 2 + c1), rel=1e-9)


def test_warp_error_of_a_clip_with_itself_is_near_zero_and_of_a_shuffled_clip_large(clip):
    shuffled = clip[np.random.default_rng(0).permutation(len(clip))]
    for flow in ("dis", "farneback"):
        itself, scrambled = warp_error(clip, clip, flow), warp_error(shuffled, clip, flow)
        assert itself < 1e-3 and scrambled > 30 * itself, (flow, itself, scrambled)
    still = np.repeat(clip[:1], len(clip), axis=0)      # a frozen clip does not move like its source
    assert warp_error(still, clip) > 10 * warp_error(clip, clip)


def test_fidelity_scores_name_each_metric(clip):
    keep = np.ones(clip.shape[:3], bool)
    record = fidelity_scores(clip, clip, keep)
    assert record["psnr"] == record["psnr_kept"] == float("inf") and record["ssim"] == record["ssim_kept"] == 1.0
    assert record["warp_error"] < 1e-3
    assert "warp_error" not in fidelity_scores(clip[:1], clip[:1])
    with pytest.raises(CtxdiffError):
        psnr(clip[:4], clip)


def test_an_edit_is_scored_against_its_source_inside_and_outside_the_blend_mask(tmp_path):
    from ctxdiff.data.video import Video
    from ctxdiff.formats.inversion import InversionParams
    from ctxdiff.pipelines.video_edit import EditParams, edit_scores, edit_video, invert_video
    from tiny_video import tiny_video_model

    model = tiny_video_model(tmp_path)
    clip = moving_shape_video("a red circle moving to the right", frames=4, size=16, seed=9101)
    inversion = invert_video(model, Video(clip.frames, 8.0, tmp_path / "clip"), "a red circle moving to the right",
                             InversionParams(steps=3, attention=True))
    result = edit_video(model, inversion, "a blue circle moving to the right", EditParams(blend_threshold=0.5))
    assert result.edited_region is not None and result.edited_region.shape == (4, 16, 16)
    assert np.mean(result.edited_region) == pytest.approx(result.blend_fraction)
    record = edit_scores(model, result.frames, "a blue circle moving to the right", inversion.frames,
                         result.edited_region)
    assert {"text_alignment", "psnr", "ssim", "warp_error"} <= set(record)
    assert ("psnr_kept" in record) == bool((~result.edited_region).any())
