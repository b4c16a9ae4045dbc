"""Wall-clock timing shared by the benchmark scripts (CUDA work is synchronised around the call)."""

from __future__ import annotations

import time

import torch


def timed(fn, device: torch.device) -> float:
    """Seconds one call of fn() takes on `device`."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
