"""Metrics: FID/KID (against clean-fid), CLIP score, video alignment/consistency, `ctxdiff evaluate`."""

import json
import types
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import cleanfid.fid
import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image, PngImagePlugin

from ctxdiff.cli import main
import ctxdiff.cli.evaluate  # noqa: F401  (registers the command)
from ctxdiff.data.images import prompts_for_images
from ctxdiff.errors import CtxdiffError
from ctxdiff.metrics import fid
from ctxdiff.metrics.clip_score import scores_from_embeddings
from ctxdiff.metrics.video import temporal_consistency, text_alignment


# -- helpers -------------------------------------------------------------------------------------

@contextmanager
def clean_fid_sqrtm_guard():
    """clean-fid calls `sqrtm(..., disp=False)`; SciPy 1.18 removes `disp`: answer it without."""
    import cleanfid.fid

    def sqrtm(matrix, disp=True):
        root = scipy.linalg.sqrtm(matrix)
        return root if disp else (root, 0.0)

    original = cleanfid.fid.linalg
    cleanfid.fid.linalg = types.SimpleNamespace(sqrtm=sqrtm)
    try:
        yield
    finally:
        cleanfid.fid.linalg = original


def pooled_colours(images: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for Inception: mean colour of each image quadrant (12 dims)."""
    return torch.nn.functional.adaptive_avg_pool2d(images, 2).flatten(1)


def image_folder(folder: Path, count: int, seed: int, size=(24, 24), prompts=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        info = PngImagePlugin.PngInfo()
        if prompts is not None:
            info.add_text("prompt", prompts[i])
        Image.fromarray(pixels).save(folder / f"{i:03d}.png", pnginfo=info)
    return folder


def gaussian_features(n=3000, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, dim)) @ rng.standard_normal((dim, dim))


# -- FID / KID -----------------------------------------------------------------------------------

def test_fid_of_a_feature_set_against_itself_is_zero():
    mu, sigma = fid.feature_stats(gaussian_features())
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_fid_against_a_shifted_copy_is_the_squared_shift_and_grows_with_it():
    features = gaussian_features()
    mu, sigma = fid.feature_stats(features)
    values = []
    for shift in (0.5, 1.0, 2.0):
        mu_s, sigma_s = fid.feature_stats(features + shift)
        values.append(fid.frechet_distance(mu, sigma, mu_s, sigma_s))
        assert values[-1] == pytest.approx(features.shape[1] * shift**2, rel=1e-6)
    assert values == sorted(values)


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    a, b = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_equals_clean_fids_on_the_same_statistics():
    s1 = fid.feature_stats(gaussian_features(seed=0))
    s2 = fid.feature_stats(gaussian_features(seed=1) * 1.3 + 0.2)
    ours = fid.frechet_distance(s1[0], s1[1], s2[0], s2[1])
    with clean_fid_sqrtm_guard():
        theirs = cleanfid.fid.frechet_distance(s1[0], s1[1], s2[0], s2[1])
    assert ours == pytest.approx(theirs, rel=1e-8)


def test_fid_of_folders_equals_clean_fids_compute_fid_with_the_same_extractor(tmp_path):
    real, fake = image_folder(tmp_path / "real", 16, seed=0), image_folder(tmp_path / "fake", 16, seed=1)
    extractor = fid.FeatureExtractor("quadrant-colours", pooled_colours)
    ours = fid.compute_fid(real, fake, extractor, batch_size=8)
    with clean_fid_sqrtm_guard():
        theirs = cleanfid.fid.compute_fid(str(real), str(fake), mode="clean", custom_feat_extractor=pooled_colours,
                                          num_workers=0, batch_size=8, device=torch.device("cpu"), verbose=False)
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_kid_equals_clean_fids_when_each_subset_is_the_whole_set():
    x, y = gaussian_features(200, 16, 0), gaussian_features(200, 16, 1) + 0.3
    assert fid.kernel_distance(x, y, num_subsets=3) == pytest.approx(cleanfid.fid.kernel_distance(x, y, num_subsets=3), rel=1e-10)


def test_missing_inception_weights_fail_at_once_naming_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(fid, "INCEPTION_DIR", tmp_path)

    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    real = image_folder(tmp_path / "real", 2, seed=0)
    with pytest.raises(CtxdiffError, match=f"{fid.INCEPTION_FILE} not found in {tmp_path}"):
        fid.compute_fid(real, real)


def test_fid_needs_at_least_two_images(tmp_path):
    one = image_folder(tmp_path / "one", 1, seed=0)
    with pytest.raises(CtxdiffError, match="at least 2 images"):
        fid.compute_fid(one, one, fid.FeatureExtractor("quadrant-colours", pooled_colours))


def test_saved_statistics_give_the_same_fid_and_refuse_other_features(tmp_path):
    extractor = fid.FeatureExtractor("quadrant-colours", pooled_colours)
    real, fake = image_folder(tmp_path / "real", 8, seed=0), image_folder(tmp_path / "fake", 8, seed=1)
    stats = fid.dataset_stats(real, extractor)
    path = fid.save_stats(tmp_path / "real.npz", stats)
    assert fid.compute_fid(path, fake, extractor) == pytest.approx(fid.compute_fid(real, fake, extractor))
    assert fid.compute_kid(path, fake, extractor) == pytest.approx(fid.compute_kid(real, fake, extractor))
    with pytest.raises(CtxdiffError, match="not 'other'"):
        fid.dataset_stats(path, fid.FeatureExtractor("other", pooled_colours))


def test_clean_fid_reference_statistics_give_fid_but_kid_asks_for_features(tmp_path):
    extractor = fid.FeatureExtractor("quadrant-colours", pooled_colours)
    real, fake = image_folder(tmp_path / "real", 8, seed=0), image_folder(tmp_path / "fake", 8, seed=1)
    stats = fid.dataset_stats(real, extractor)
    np.savez(tmp_path / "clean_fid_stats.npz", mu=stats.mu, sigma=stats.sigma)   # clean-fid's FID file layout
    assert fid.compute_fid(tmp_path / "clean_fid_stats.npz", fake, extractor) == pytest.approx(
        fid.compute_fid(real, fake, extractor))
    with pytest.raises(CtxdiffError, match="KID needs the features"):
        fid.compute_kid(tmp_path / "clean_fid_stats.npz", fake, extractor)


# -- CLIP score and video metrics ----------------------------------------------------------------

def test_clip_score_matches_a_hand_computation():
    images = torch.tensor([[3.0, 4.0, 0.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    texts = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    scores = scores_from_embeddings(images, texts)
    assert scores["per_image_cosine"] == pytest.approx([0.6, -1.0, 1.0])
    assert scores["mean_cosine"] == pytest.approx(0.6 / 3)
    assert scores["per_image_clipscore"] == pytest.approx([1.5, 0.0, 2.5])    # 2.5 * max(cos, 0)
    assert scores["clipscore"] == pytest.approx(4.0 / 3)


def test_text_alignment_and_temporal_consistency_match_a_hand_computation():
    frames = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    s = 1 / np.sqrt(2)
    assert text_alignment(frames, torch.tensor([1.0, 0.0])) == pytest.approx((1 + 0 + s) / 3)
    scores = temporal_consistency(frames)
    assert scores["all_pairs"] == pytest.approx((0 + s + s) / 3)          # (0,1) (0,2) (1,2)
    assert scores["consecutive"] == pytest.approx((0 + s) / 2)            # (0,1) (1,2)


def test_a_static_video_is_perfectly_consistent():
    scores = temporal_consistency(torch.tensor([[0.3, -1.2, 0.5]]).repeat(5, 1))
    assert scores["all_pairs"] == pytest.approx(1.0) and scores["consecutive"] == pytest.approx(1.0)


def test_frame_order_does_not_change_the_all_pairs_consistency():
    frames = torch.randn(7, 16, generator=torch.Generator().manual_seed(0))
    shuffled = frames[torch.randperm(7, generator=torch.Generator().manual_seed(1))]
    assert temporal_consistency(frames)["all_pairs"] == pytest.approx(temporal_consistency(shuffled)["all_pairs"])


def test_one_frame_has_no_temporal_consistency():
    with pytest.raises(CtxdiffError, match="at least 2 frames"):
        temporal_consistency(torch.ones(1, 4))


# -- prompts for images ------------------------------------------------------------------------

def test_prompts_come_from_png_chunks_then_sidecars(tmp_path):
    folder = image_folder(tmp_path / "imgs", 3, seed=0, prompts=["a red circle", "", ""])
    (folder / "001.txt").write_text("a blue square\n")
    (folder / "002.json").write_text(json.dumps({"prompt": "a green cross", "seed": 1}))
    paths = sorted(folder.glob("*.png"))
    assert prompts_for_images(paths) == ["a red circle", "a blue square", "a green cross"]


def test_an_image_without_a_prompt_is_named(tmp_path):
    folder = image_folder(tmp_path / "imgs", 2, seed=0)
    with pytest.raises(CtxdiffError, match="000.png: no prompt"):
        prompts_for_images(sorted(folder.glob("*.png")))


# -- the CLI ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A randomly initialised tiny CLIP saved as a ctxdiff clip bundle (its arch travels with it)."""
    from ctxdiff.models.encoders import ClipConfig, load_clip, save_clip

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip") / "tiny-clip.safetensors"
    return save_clip(path, load_clip(ClipConfig(arch="tiny-clip")))


def run_cli(capsys, *args):
    """(exit code, stdout, stderr) of `ctxdiff --json --quiet evaluate ...`."""
    code = main(["--json", "--quiet", "evaluate", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_clip_score_command_prints_one_json_record_and_writes_out(tmp_path, capsys, tiny_clip):
    captions = ["a red circle", "a blue square", "a green cross"]
    folder = image_folder(tmp_path / "imgs", 3, seed=0, prompts=captions)
    code, out, err = run_cli(capsys, "--metric", "clip-score", "--images", folder, "--clip-weights", tiny_clip,
                             "--out", tmp_path / "r.json")
    assert code == 0, err
    record = json.loads(out)
    assert record == json.loads((tmp_path / "r.json").read_text())
    assert record["count"] == 3 and record["prompts"] == captions
    assert -1 <= record["mean_cosine"] <= 1
    assert record["clipscore"] == pytest.approx(np.mean([2.5 * max(c, 0) for c in record["per_image_cosine"]]))


def test_temporal_consistency_command_reports_both_pairings(tmp_path, capsys, tiny_clip):
    from ctxdiff.data.video import write_video

    frames = np.repeat(np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8), 4, axis=0)
    video = write_video(tmp_path / "still", frames, fps=4, metadata={"prompt": "a red circle"})
    code, out, err = run_cli(capsys, "--metric", "text-alignment", "--videos", video, "--clip-weights", tiny_clip)
    assert code == 0, err
    record = json.loads(out)
    assert record["mean_temporal_consistency_all_pairs"] == pytest.approx(1.0)
    assert record["mean_temporal_consistency_consecutive"] == pytest.approx(1.0)
    assert record["videos"][0]["prompt"] == "a red circle" and "text_alignment" in record["videos"][0]


def test_fid_command_with_clip_features_saves_statistics(tmp_path, capsys, tiny_clip):
    real, fake = image_folder(tmp_path / "real", 4, seed=0), image_folder(tmp_path / "fake", 4, seed=1)
    code, out, err = run_cli(capsys, "--metric", "fid", "--real", real, "--fake", fake,
                             "--features", f"clip:tiny-clip:{tiny_clip}", "--save-stats", tmp_path / "real.npz")
    assert code == 0, err
    record = json.loads(out)
    assert record["fid"] >= 0 and record["real_images"] == 4 and record["fake_images"] == 4
    assert fid.load_stats(tmp_path / "real.npz").extractor == record["features"]


@pytest.mark.parametrize("case, expected_code, message", [
    ("empty folder", 1, "no images in this folder"),
    ("one image for FID", 1, "at least 2 images"),
    ("short prompts file", 1, "1 prompts for 3 images"),
    ("corrupt video", 1, "cannot decode"),
    ("mismatched frame sizes", 1, "differs"),
    ("unknown metric", 2, "unknown metric 'fidd'"),
    ("missing flag", 2, "needs --images DIR"),
])
def test_bad_input_is_a_one_line_error(tmp_path, capsys, tiny_clip, case, expected_code, message):
    weights = ["--clip-weights", tiny_clip]
    empty = tmp_path / "empty"
    empty.mkdir()
    if case == "empty folder":
        args = ["--metric", "clip-score", "--images", empty, *weights]
    elif case == "one image for FID":
        one = image_folder(tmp_path / "one", 1, seed=0)
        args = ["--metric", "fid", "--real", one, "--fake", one, "--features", f"clip:tiny-clip:{tiny_clip}"]
    elif case == "short prompts file":
        (tmp_path / "prompts.txt").write_text("a red circle\n")
        folder = image_folder(tmp_path / "imgs", 3, seed=0)
        args = ["--metric", "clip-score", "--images", folder, "--prompts", tmp_path / "prompts.txt", *weights]
    elif case == "corrupt video":
        (tmp_path / "bad.mp4").write_bytes(b"\x00\x01not a video" * 100)
        args = ["--metric", "temporal-consistency", "--videos", tmp_path / "bad.mp4", *weights]
    elif case == "mismatched frame sizes":
        Image.new("RGB", (16, 16)).save(empty / "00000.png")
        Image.new("RGB", (20, 16)).save(empty / "00001.png")
        args = ["--metric", "temporal-consistency", "--videos", empty, *weights]
    elif case == "unknown metric":
        args = ["--metric", "fidd"]
    else:
        args = ["--metric", "clip-score", *weights]
    code, out, err = run_cli(capsys, *args)
    assert code == expected_code
    assert message in err and out == ""
    assert len(err.strip().splitlines()) == 1
