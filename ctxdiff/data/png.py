"""Writing images: PNGs that carry their parameters in text chunks, and sample grids."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ctxdiff.checkpoints import atomic_write


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] in [-1, 1] -> uint8 [N, H, W, 3]."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
    """Tile uint8 [N, H, W, 3] images into one image, row by row (2 px white gaps)."""
    n, h, w, _ = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    gap = 2
    canvas = np.full((rows * (h + gap) - gap, columns * (w + gap) - gap, 3), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        canvas[r * (h + gap): r * (h + gap) + h, c * (w + gap): c * (w + gap) + w] = image
    return canvas


def save_png(path: str | Path, image: np.ndarray, metadata: dict | None = None) -> Path:
    """Write a PNG atomically; `metadata` goes into text chunks: `parameters` (A1111-style, one
    line per key) and `ctxdiff` (JSON), plus `prompt` when present."""
    path = Path(path)
    info = PngInfo()
    if metadata:
        if "prompt" in metadata:
            info.add_itxt("prompt", str(metadata["prompt"]))
        info.add_itxt("parameters", "\n".join(f"{k}: {v}" for k, v in metadata.items()))
        info.add_itxt("ctxdiff", json.dumps(metadata, default=str))
    atomic_write(path, lambda temp: Image.fromarray(image).save(temp, format="PNG", pnginfo=info))
    return path


def read_png_metadata(path: str | Path) -> dict:
    """The `ctxdiff` JSON text chunk of a PNG written by `save_png` ({} when absent)."""
    with Image.open(path) as image:
        text = getattr(image, "text", {}) or {}
    return json.loads(text["ctxdiff"]) if "ctxdiff" in text else {}
