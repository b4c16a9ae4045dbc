"""Evaluating models as a library (ctxdiff.evaluation), without the CLI: bits/dim and the guidance sweep."""

import pytest
import torch

from ctxdiff.data.datasets import open_dataset
from ctxdiff.evaluation import bits_per_dim, guidance_sweep, plot_sweep, sweep_folder
from ctxdiff.metrics.fid import dataset_stats, feature_extractor, fid_between
from ctxdiff.models.encoders import ClipConfig, load_clip
from ctxdiff.pipelines.text2image import Text2Image
from ctxdiff.recipes import SampleConfig
from ctxdiff.shapes.datasets import write_samples
from test_evaluate_models import tiny_model  # noqa: F401  (the same tiny bundle, trained once a module)


def test_bits_per_dim_parts_sum_to_the_bound_and_r_zero_changes_it(tiny_model):
    pipe = Text2Image.from_bundle(tiny_model, torch.device("cpu"))
    data = open_dataset("shapes", pipe.base.unet.config.image_size, shapes_count=8, shapes_seed=4242)
    with_adapter = bits_per_dim(pipe, data, count=3, batch_size=2, num_timesteps=4)
    without = bits_per_dim(pipe, data, count=3, batch_size=2, num_timesteps=4, adapter=False)
    for bound in (with_adapter, without):
        parts = bound.prior_bpd + bound.diffusion_bpd + bound.decoder_bpd
        assert bound.images == 3 and bound.bits_per_dim == pytest.approx(parts, rel=1e-9)
    assert with_adapter.bits_per_dim != without.bits_per_dim
    assert bits_per_dim(pipe, data, count=3, batch_size=2, num_timesteps=4) == with_adapter   # seeded


def test_guidance_sweep_scores_each_weight_from_its_own_resumable_folder(tiny_model, tmp_path):
    pipe = Text2Image.from_bundle(tiny_model, torch.device("cpu"))
    write_samples(tmp_path / "real", 4, size=16)
    extractor = feature_extractor(f"clip:tiny-clip:{tiny_model}")
    real = dataset_stats(tmp_path / "real", extractor)
    clip = load_clip(ClipConfig(arch="tiny-clip", weights=str(tiny_model)))
    captions = ["a red circle", "a blue square", "a green triangle"]
    params = SampleConfig(steps=2, sr_steps=2)
    sweep = dict(real=real, extractor=extractor, clip=clip, params=params, seed=1)
    points = guidance_sweep(pipe, captions, [1.0, 3.0], tmp_path / "sweep", **sweep)
    assert [p.guidance for p in points] == [1.0, 3.0]
    folder = sweep_folder(tmp_path / "sweep", 3.0)
    assert len(list(folder.glob("*.png"))) == 3
    assert points[1].fid == pytest.approx(fid_between(real, dataset_stats(folder, extractor)))
    kept = (folder / "00000.png").stat().st_mtime_ns
    assert guidance_sweep(pipe, captions, [3.0], tmp_path / "sweep", **sweep) == points[1:]
    assert (folder / "00000.png").stat().st_mtime_ns == kept                       # made once, then reused
    assert plot_sweep(points, tmp_path / "sweep.png", extractor.name).stat().st_size > 0
