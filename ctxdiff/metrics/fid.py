"""FID and KID between image sets, with clean-fid's image pipeline ("clean" mode resizing).

clean-fid reads and resizes the images and runs the feature network; the statistics and the
distances are ours: the Frechet distance uses two symmetric eigen-decompositions instead of
`scipy.linalg.sqrtm` (faster at 2048 dims, and independent of sqrtm's `disp` argument, removed
in SciPy 1.18, which clean-fid's own `frechet_distance` still passes).

Features: "inception" (clean-fid's Inception-V3 torchscript, pool3, 2048 dims; its weights must
already be on disk, nothing is downloaded) or "clip:<arch>:<weights file>" (an open_clip image
tower from a local file, unit-normalised embeddings).
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import scipy.linalg
import torch

from ctxdiff.checkpoints import atomic_write
from ctxdiff.errors import CtxdiffError, UsageError

INCEPTION_FILE = "inception-2015-12-05.pt"
# clean-fid keeps (and would download) its Inception weights here: cleanfid/features.py.
INCEPTION_DIR = Path("./" if platform.system() == "Windows" else "/tmp")
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + INCEPTION_FILE


@dataclass(frozen=True)
class FeatureExtractor:
    """A clean-fid feature network. `model_fn` takes float [B, 3, H, W] images in [0, 255] and
    returns [B, D]; `fn_resize` maps one uint8 [H, W, 3] image to the network's input size
    (None: clean-fid's "clean" resize, PIL bicubic to 299x299)."""

    name: str
    model_fn: Callable[[torch.Tensor], torch.Tensor]
    fn_resize: Callable[[np.ndarray], np.ndarray] | None = None


@dataclass
class FeatureStats:
    """Mean and covariance of a feature set; the features themselves when kept (KID needs them)."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int
    extractor: str | None = None
    features: np.ndarray | None = None

    @classmethod
    def of(cls, features: np.ndarray, extractor: str | None = None) -> "FeatureStats":
        mu, sigma = feature_stats(features)
        return cls(mu, sigma, len(features), extractor, np.asarray(features, dtype=np.float32))


# -- the math ------------------------------------------------------------------------------------

def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of [N, D] features in float64; N >= 2."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise CtxdiffError(f"feature statistics need at least 2 images, got {len(features)}; pass more images")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), the Frechet distance of two Gaussians.

    With S1 = V D V^T: S1 S2 is similar to the symmetric PSD matrix D^(1/2) V^T S2 V D^(1/2), so
    tr((S1 S2)^(1/2)) is the sum of the square roots of its eigenvalues; two symmetric eigen-
    decompositions replace a general matrix square root. Round-off negatives are clipped to 0.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise CtxdiffError(f"cannot compare statistics of {mu1.shape[0]}-dim and {mu2.shape[0]}-dim features; "
                           "compute both with the same --features")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise CtxdiffError("feature statistics contain NaN or infinity; recompute them")
    eigvals, eigvecs = scipy.linalg.eigh(sigma1, check_finite=False)
    root = np.sqrt(np.clip(eigvals, 0, None))
    middle = root[:, None] * (eigvecs.T @ sigma2 @ eigvecs) * root[None, :]
    trace_sqrt = np.sqrt(np.clip(scipy.linalg.eigvalsh(middle, check_finite=False), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def kernel_distance(features1: np.ndarray, features2: np.ndarray, num_subsets: int = 100,
                    max_subset_size: int = 1000, seed: int = 0) -> float:
    """KID: unbiased MMD^2 with the cubic polynomial kernel (x.y / d + 1)^3, averaged over random
    subsets; clean-fid's `kernel_distance` with a seeded generator, so results repeat."""
    features1, features2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    dim = features1.shape[1]
    m = min(len(features1), len(features2), max_subset_size)
    if m < 2:
        raise CtxdiffError(f"KID needs at least 2 images in each set, got {len(features1)} and {len(features2)}")
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(num_subsets):
        x = features2[rng.choice(len(features2), m, replace=False)]
        y = features1[rng.choice(len(features1), m, replace=False)]
        a = (x @ x.T / dim + 1) ** 3 + (y @ y.T / dim + 1) ** 3
        b = (x @ y.T / dim + 1) ** 3
        total += (a.sum() - np.diag(a).sum()) / (m - 1) - b.sum() * 2 / m
    return float(total / num_subsets / m)


# -- statistics files ----------------------------------------------------------------------------

def save_stats(path: str | Path, stats: FeatureStats) -> Path:
    """Write mu, sigma, the count, the extractor name and the features (for KID) to one .npz,
    atomically. clean-fid reference files (mu, sigma; or feats) load too."""
    path = Path(path)
    if path.suffix != ".npz":
        raise UsageError(f"{path}: statistics files end in .npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"mu": stats.mu, "sigma": stats.sigma, "count": np.int64(stats.count),
              "extractor": np.str_(stats.extractor or "")}
    if stats.features is not None:
        arrays["features"] = stats.features

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)

    atomic_write(path, write)
    return path


def load_stats(path: str | Path) -> FeatureStats:
    """Read a file written by `save_stats`, or a clean-fid statistics file (mu, sigma / feats)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = set(data.files)
            features = data["features"] if "features" in keys else data["feats"] if "feats" in keys else None
            if {"mu", "sigma"} <= keys:
                mu, sigma = data["mu"], data["sigma"]
            elif features is not None:
                mu, sigma = feature_stats(features)
            else:
                raise CtxdiffError(f"{path}: no 'mu'/'sigma' or features in this .npz; pass a file "
                                   "written by `ctxdiff evaluate --save-stats` or by clean-fid")
            extractor = str(data["extractor"]) if "extractor" in keys else None
            count = int(data["count"]) if "count" in keys else len(features) if features is not None else 0
    except FileNotFoundError:
        raise CtxdiffError(f"{path}: no such statistics file") from None
    except (OSError, ValueError) as exc:
        raise CtxdiffError(f"{path}: not a readable .npz statistics file ({exc})") from None
    return FeatureStats(mu, sigma, count, extractor or None, features)


# -- feature extraction (clean-fid) --------------------------------------------------------------

def inception_extractor(device: torch.device | str = "cpu") -> FeatureExtractor:
    """clean-fid's Inception-V3 ("clean" mode, resize outside the network), loaded from the file
    clean-fid keeps in INCEPTION_DIR; fails at once, naming the file, when it is not there."""
    weights = INCEPTION_DIR / INCEPTION_FILE
    if not weights.is_file():
        raise CtxdiffError(f"Inception weights {INCEPTION_FILE} not found in {INCEPTION_DIR}; nothing is "
                           f"downloaded: copy the file there (from {INCEPTION_URL}), or use "
                           "--features clip:<arch>:<weights file>")
    from cleanfid.inception_torchscript import InceptionV3W

    try:
        model = InceptionV3W(str(INCEPTION_DIR), download=False, resize_inside=False).to(device).eval()
    except RuntimeError as exc:
        raise CtxdiffError(f"{weights}: not a readable TorchScript model ({str(exc).splitlines()[0]}); "
                           f"replace it with a fresh copy from {INCEPTION_URL}") from None
    return FeatureExtractor("inception", model)


def clip_extractor(arch: str, weights: str | Path, device: torch.device | str = "cpu") -> FeatureExtractor:
    """An open_clip image tower from a local weights file (or an already-cached open_clip tag);
    unit-normalised image embeddings of centre-cropped images."""
    from ctxdiff.metrics.clip_score import clip_input
    from ctxdiff.models.encoders import ClipConfig, load_clip

    encoders = load_clip(ClipConfig(arch=arch, weights=str(weights)), device)

    @torch.no_grad()
    def model_fn(images: torch.Tensor) -> torch.Tensor:
        return encoders.image_features(images / 127.5 - 1)

    def fn_resize(image: np.ndarray) -> np.ndarray:
        return clip_input(encoders, image)

    return FeatureExtractor(f"clip:{encoders.config.arch}:{Path(weights).name}", model_fn, fn_resize)


def feature_extractor(spec: str, device: torch.device | str = "cpu") -> FeatureExtractor:
    """"inception" or "clip:<arch>:<weights file>" (see the module docstring)."""
    if spec == "inception":
        return inception_extractor(device)
    kind, _, rest = spec.partition(":")
    arch, _, weights = rest.partition(":")
    if kind == "clip" and arch and weights:
        return clip_extractor(arch, weights, device)
    raise UsageError(f"unknown features {spec!r}; use 'inception' or 'clip:<arch>:<weights file>'")


def folder_features(folder: str | Path, extractor: FeatureExtractor, batch_size: int = 32,
                    device: torch.device | str = "cpu") -> np.ndarray:
    """[N, D] features of the images under `folder` (recursive, sorted), via clean-fid."""
    from cleanfid.fid import get_files_features

    from ctxdiff.data.images import check_readable, list_images

    files = list_images(folder, recursive=True)
    check_readable(files)
    workers = min(4, os.cpu_count() or 1) if sys.platform == "linux" and len(files) > 4 * batch_size else 0
    try:
        return get_files_features([str(f) for f in files], extractor.model_fn, num_workers=workers,
                                  batch_size=batch_size, device=torch.device(device), mode="clean",
                                  custom_fn_resize=extractor.fn_resize, verbose=False)
    except OSError as exc:
        raise CtxdiffError(f"{folder}: an image could not be decoded ({str(exc).splitlines()[0]}); "
                           "replace or remove it") from None


def dataset_stats(source: str | Path, extractor: FeatureExtractor, batch_size: int = 32,
                  device: torch.device | str = "cpu") -> FeatureStats:
    """Statistics of a folder of images, or loaded from a .npz made with the same extractor."""
    source = Path(source)
    if source.suffix == ".npz" and not source.is_dir():
        stats = load_stats(source)
        if stats.extractor is not None and stats.extractor != extractor.name:
            raise CtxdiffError(f"{source}: statistics of '{stats.extractor}' features, not "
                               f"'{extractor.name}'; pass --features {stats.extractor} or a folder")
        return stats
    features = folder_features(source, extractor, batch_size, device)
    if len(features) < 2:
        raise CtxdiffError(f"{source}: {len(features)} image; FID and KID need at least 2 images per set")
    return FeatureStats.of(features, extractor.name)


def fid_between(real: FeatureStats, fake: FeatureStats) -> float:
    """FID of two sets' statistics."""
    return frechet_distance(real.mu, real.sigma, fake.mu, fake.sigma)


def kid_between(real: FeatureStats, fake: FeatureStats) -> float:
    """KID of two sets' features (statistics files saved without features cannot give it)."""
    for label, stats in (("real", real), ("fake", fake)):
        if stats.features is None:
            raise CtxdiffError(f"the {label} statistics hold mean and covariance only, KID needs the features; "
                               "pass the image folder, or statistics saved by `ctxdiff evaluate --save-stats`")
    return kernel_distance(real.features, fake.features)


def compute_fid(real: str | Path, fake: str | Path, features: str | FeatureExtractor = "inception",
                batch_size: int = 32, device: torch.device | str = "cpu") -> float:
    """FID between two folders of images (either may be a .npz of statistics instead)."""
    extractor = features if isinstance(features, FeatureExtractor) else feature_extractor(features, device)
    return fid_between(dataset_stats(real, extractor, batch_size, device),
                       dataset_stats(fake, extractor, batch_size, device))


def compute_kid(real: str | Path, fake: str | Path, features: str | FeatureExtractor = "inception",
                batch_size: int = 32, device: torch.device | str = "cpu") -> float:
    """KID between two folders of images (either may be a .npz of statistics with features)."""
    extractor = features if isinstance(features, FeatureExtractor) else feature_extractor(features, device)
    return kid_between(dataset_stats(real, extractor, batch_size, device),
                       dataset_stats(fake, extractor, batch_size, device))
