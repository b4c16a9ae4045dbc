"""Evaluating text-to-image models: the variational bound in bits/dim on held-out images (Eq. 4,
Appendix A.2) and the guidance sweep (FID against CLIP score per guidance weight, paper Fig. 11).

The loops live here, reachable without the CLI; `ctxdiff evaluate` parses the flags, loads the
model, data and feature networks, and prints what these return.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, ContextManager, Sequence

import torch

from ctxdiff.data.images import ImageFiles, list_images, prompts_for_images
from ctxdiff.diffusion import variational_bound
from ctxdiff.metrics.clip_score import clip_scores
from ctxdiff.metrics.fid import FeatureExtractor, FeatureStats, dataset_stats, fid_between
from ctxdiff.pipelines.batch_generate import generate_to_folder
from ctxdiff.pipelines.text2image import Text2Image
from ctxdiff.recipes import SampleConfig

# progress(description, total) -> a context manager whose value has .advance(n) (None: no progress)
ProgressFactory = Callable[[str, int], ContextManager]


@dataclass(frozen=True)
class DatasetBound:
    """The bound of the base stage averaged over `images` held-out images, in bits/dim; the three
    parts (prior, diffusion, decoder) sum to `bits_per_dim`."""

    images: int
    bits_per_dim: float
    prior_bpd: float
    diffusion_bpd: float
    decoder_bpd: float


def bits_per_dim(pipe: Text2Image, data: Sequence, *, count: int | None = None, batch_size: int = 32,
                 seed: int = 0, adapter: bool = True, num_timesteps: int | None = None,
                 progress=None) -> DatasetBound:
    """The variational bound (Eq. 4) of `pipe`'s base stage on the first `count` (default: all)
    (image, caption) items of `data`, images in [-1, 1] at the base stage's size.

    `adapter` = False scores with r = 0 (plain diffusion); `num_timesteps` estimates the sum over t
    from that many random steps (None: all T). `seed` fixes the draws of x_t; `progress.advance(n)`
    is called per batch of n images.
    """
    count = len(data) if count is None else min(len(data), count)
    generator = torch.Generator().manual_seed(seed)
    stage_adapter = pipe.base.adapter if adapter else None
    x0_fn = pipe.base.x0_fn(clip_x0=False)
    totals, parts = [], {"prior": 0.0, "diffusion": 0.0, "decoder": 0.0}
    for start in range(0, count, batch_size):
        items = [data[i] for i in range(start, min(count, start + batch_size))]
        x0 = torch.stack([x for x, _ in items]).to(pipe.device)
        cond = pipe.encode([c for _, c in items])
        bound = variational_bound(pipe.sched, x0_fn, x0, cond, stage_adapter, num_timesteps=num_timesteps,
                                  generator=generator)
        totals.append(bound.total.cpu())
        for name in parts:
            parts[name] += getattr(bound, name).sum().item()
        if progress is not None:
            progress.advance(len(items))
    return DatasetBound(count, torch.cat(totals).mean().item(),
                        **{f"{name}_bpd": value / count for name, value in parts.items()})


@dataclass(frozen=True)
class SweepPoint:
    """One guidance weight of a sweep: FID of its images against the reference, and their CLIP score
    (mean cosine of image and prompt embeddings)."""

    guidance: float
    fid: float
    clip_mean_cosine: float


def sweep_folder(root: Path, guidance: float) -> Path:
    """Where a sweep writes the images of one guidance weight: root/guidance-<w>/."""
    return root / f"guidance-{guidance:g}"


def guidance_sweep(pipe: Text2Image, captions: list[str], weights: Sequence[float], root: Path, *,
                   real: FeatureStats, extractor: FeatureExtractor, clip, params: SampleConfig, seed: int = 0,
                   batch_size: int = 32, device: torch.device | str = "cpu", progress: ProgressFactory | None = None,
                   log: Callable[[str], None] | None = None) -> list[SweepPoint]:
    """Per guidance weight w: generate `captions` (image i with seed + i, `params` but guidance w)
    into `sweep_folder(root, w)` (resumable: images already there are kept), then measure the FID
    of that folder against `real` (statistics of `extractor`'s features) and the CLIP score of its
    images with the prompts their PNGs carry, with the encoders `clip`."""
    progress = progress or (lambda description, total: nullcontext(None))
    points = []
    for weight in weights:
        folder = sweep_folder(root, weight)
        with progress(f"generate {len(captions)} for guidance {weight:g}", len(captions)) as bar:
            generate_to_folder(pipe, captions, folder, seed, replace(params, guidance=weight), batch_size, bar)
        fid = fid_between(real, dataset_stats(folder, extractor, batch_size, device))
        paths = list_images(folder)
        clip_score = clip_scores(clip, ImageFiles(paths), prompts_for_images(paths), batch_size)["mean_cosine"]
        if log is not None:
            log(f"guidance {weight:g}: FID {fid:.4g}, CLIP score {clip_score:.4g} ({len(paths)} images in {folder})")
        points.append(SweepPoint(weight, fid, clip_score))
    return points


def plot_sweep(points: Sequence[SweepPoint], path: Path, features: str) -> Path:
    """CLIP score against FID, one marker per guidance weight, labelled with it (paper Fig. 11)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot([p.fid for p in points], [p.clip_mean_cosine for p in points], marker="o")
    for p in points:
        ax.annotate(f"{p.guidance:g}", (p.fid, p.clip_mean_cosine))
    ax.set(xlabel=f"FID ({features} features)", ylabel="CLIP score (mean cosine)", title="guidance sweep")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
