"""Frechet distance at Inception width: ctxdiff's eigen route against the `scipy.linalg.sqrtm` route.

Both covariances come from random features (default 4000 x 2048), like real FID statistics.
The sqrtm route is clean-fid's formula, tr((S1 S2)^(1/2)) from `sqrtm(S1 @ S2)`, called without
the `disp` argument that SciPy 1.18 removes.

    python benchmarks/sqrtm.py [--dim 2048] [--samples 4000] [--repeats 3]

Timings depend on the BLAS threads and the machine's load: on a shared machine,
OPENBLAS_NUM_THREADS=1 gives steadier numbers.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy
import scipy.linalg
from rich.console import Console
from rich.table import Table

from ctxdiff.metrics.fid import feature_stats, frechet_distance


def sqrtm_frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean).real)


def best_time(fn, args, repeats: int) -> tuple[float, float]:
    """(fastest wall time of `repeats` calls, the value)."""
    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn(*args)
        times.append(time.perf_counter() - start)
    return min(times), value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    mixing = rng.standard_normal((args.dim, args.dim)) / np.sqrt(args.dim)  # correlated features
    real = rng.standard_normal((args.samples, args.dim)) @ mixing
    fake = (rng.standard_normal((args.samples, args.dim)) + 0.1) @ (mixing + 0.05 * np.eye(args.dim))
    stats = (*feature_stats(real), *feature_stats(fake))  # mu1, sigma1, mu2, sigma2

    eigen_s, eigen_fid = best_time(frechet_distance, stats, args.repeats)
    sqrtm_s, sqrtm_fid = best_time(sqrtm_frechet_distance, stats, args.repeats)

    table = Table(title=f"Frechet distance, {args.dim} dims, {args.samples} samples per set "
                        f"(best of {args.repeats}; scipy {scipy.__version__}, numpy {np.__version__})")
    for column in ("route", "seconds", "FID"):
        table.add_column(column)
    table.add_row("eigh (ctxdiff)", f"{eigen_s:.3f}", f"{eigen_fid:.6f}")
    table.add_row("scipy.linalg.sqrtm", f"{sqrtm_s:.3f}", f"{sqrtm_fid:.6f}")
    table.add_row("sqrtm / eigh", f"{sqrtm_s / eigen_s:.1f}x", f"|diff| = {abs(sqrtm_fid - eigen_fid):.3e}")
    Console().print(table)


if __name__ == "__main__":
    main()
