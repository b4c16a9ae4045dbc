"""Image-text training data: a folder of images with same-named .txt captions, a JSONL/CSV
manifest, webdataset tar shards (img2dataset's layout for LAION), or the shapes world.

Map-style datasets return (float [3, S, S] in [-1, 1], caption); `batch_indices` gives the
order, a deterministic function of (seed, global step), so a resumed run reads exactly the
samples the interrupted one would have read.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ctxdiff.data.images import IMAGE_SUFFIXES, fit_image, read_image, read_text
from ctxdiff.errors import CtxdiffError


def to_tensor(image: np.ndarray, size: int) -> torch.Tensor:
    """uint8 [H, W, 3] -> float [3, size, size] in [-1, 1] (centre crop, bicubic, anti-aliased)."""
    fitted = fit_image(image, (size, size), "crop")
    return torch.from_numpy(np.array(fitted)).permute(2, 0, 1).float() / 127.5 - 1  # a writable copy


class CaptionedImages(Dataset):
    """(image path, caption) pairs, checked once when built: a pair whose image cannot be read or
    has no caption is skipped and counted in `skipped`; none usable is an error."""

    def __init__(self, pairs: list[tuple[Path, str]], size: int, source: str, skipped: dict[str, int]) -> None:
        if not pairs:
            detail = ", ".join(f"{n} {why}" for why, n in skipped.items() if n) or "no images"
            raise CtxdiffError(f"{source}: no usable image-caption pairs ({detail}); "
                               "each image needs a same-named .txt caption")
        self.pairs, self.size, self.skipped = pairs, size, skipped

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        path, caption = self.pairs[index]
        return to_tensor(read_image(path), self.size), caption


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except Exception:  # noqa: BLE001 - any decoder failure means "unreadable"
        return False


def _checked(candidates: list[tuple[Path, str | None]], size: int, source: str) -> CaptionedImages:
    skipped = {"without caption": 0, "unreadable": 0}
    pairs = []
    for path, caption in candidates:
        if not caption or not caption.strip():
            skipped["without caption"] += 1
        elif not _readable(path):
            skipped["unreadable"] += 1
        else:
            pairs.append((path, caption.strip()))
    return CaptionedImages(pairs, size, source, skipped)


def folder_dataset(folder: Path, size: int) -> CaptionedImages:
    """Images in `folder` (recursively), each captioned by the .txt file of the same name."""
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise CtxdiffError(f"{folder}: no images in this folder; add images with same-named .txt captions")
    candidates = []
    for path in images:
        caption_file = path.with_suffix(".txt")
        candidates.append((path, read_text(caption_file, "caption file") if caption_file.exists() else None))
    return _checked(candidates, size, str(folder))


def manifest_dataset(manifest: Path, size: int, caption_key: str) -> CaptionedImages:
    """A .jsonl (one object per line) or .csv manifest with an image path column (`image`,
    `path` or `file`, relative to the manifest) and a caption column (`caption_key`, `caption`
    or `text`)."""
    text = read_text(manifest, "manifest")
    if manifest.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise CtxdiffError(f"{manifest}:{number}: not valid JSON ({exc.msg})") from None
    else:
        rows = list(csv.DictReader(io.StringIO(text)))
    candidates = []
    for number, row in enumerate(rows, 1):
        image = next((row[k] for k in ("image", "path", "file") if row.get(k)), None)
        if image is None:
            raise CtxdiffError(f"{manifest}: row {number} has no 'image', 'path' or 'file' column")
        caption = next((row[k] for k in (caption_key, "caption", "text") if row.get(k)), None)
        candidates.append(((manifest.parent / image), caption))
    return _checked(candidates, size, str(manifest))


class ShardStream:
    """Webdataset tar shards read in order (no shuffling, so a position is a sample count).
    Unreadable samples are skipped and counted; `skip` samples are passed over first (resume)."""

    def __init__(self, urls: str, size: int, caption_key: str) -> None:
        self.urls, self.size, self.caption_key = urls, size, caption_key
        self.skipped = 0

    def __iter__(self):
        import webdataset as wds

        dataset = wds.WebDataset(self.urls, shardshuffle=False, empty_check=False)
        while True:
            yielded = 0
            for sample in dataset:
                item = self._decode(sample)
                if item is None:
                    self.skipped += 1
                    continue
                yielded += 1
                yield item
            if yielded == 0:
                raise CtxdiffError(f"{self.urls}: no usable samples in these shards "
                                   f"(image + '{self.caption_key}' entries, {self.skipped} skipped)")

    def _decode(self, sample: dict) -> tuple[torch.Tensor, str] | None:
        image_key = next((k for k in ("jpg", "jpeg", "png", "webp") if k in sample), None)
        caption = sample.get(self.caption_key)
        if image_key is None or caption is None:
            return None
        try:
            with Image.open(io.BytesIO(sample[image_key])) as image:
                array = np.asarray(image.convert("RGB"))
        except Exception:  # noqa: BLE001 - a broken sample is skipped, not fatal
            return None
        try:
            text = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
        except UnicodeDecodeError:   # a caption that is not UTF-8: skipped like a broken image
            return None
        return to_tensor(array, self.size), text.strip()


def open_dataset(source: str, size: int, *, caption_key: str = "txt", shapes_count: int = 10_000,
                 shapes_seed: int = 0, hard_negatives: bool = False):
    """The dataset a recipe's `data.source` names: 'shapes' (`hard_negatives`: scenes with their
    twins), a folder, a manifest, or shards."""
    if source == "shapes":
        from ctxdiff.shapes.datasets import ShapesDataset, ShapeTwinsDataset
        from ctxdiff.shapes.world import ShapesWorld

        dataset = ShapeTwinsDataset if hard_negatives else ShapesDataset
        return dataset(ShapesWorld(seed=shapes_seed, image_size=size), shapes_count)
    if source.endswith(".tar") or "{" in source:
        return ShardStream(source, size, caption_key)
    path = Path(source)
    if path.is_dir():
        return folder_dataset(path, size)
    if path.suffix in (".jsonl", ".csv") and path.is_file():
        return manifest_dataset(path, size, caption_key)
    if not path.exists():
        raise CtxdiffError(f"{source}: no such dataset; data.source takes 'shapes', a folder of images "
                           "with .txt captions, a .jsonl/.csv manifest, or webdataset shards ('x/{0000..0009}.tar')")
    raise CtxdiffError(f"{source}: not a dataset ctxdiff reads (a folder, .jsonl, .csv or .tar shards)")


def collate(items: list) -> tuple[torch.Tensor, list[str]]:
    """(images [N, 3, H, W], N captions) of (image, caption) pairs, or of groups (images
    [G, 3, H, W], G captions: a scene and its hard negatives), which stay together."""
    groups = [(images, captions) if isinstance(captions, list) else (images[None], [captions])
              for images, captions in items]
    return torch.cat([images for images, _ in groups]), [c for _, captions in groups for c in captions]


def batch_indices(length: int, seed: int, step: int, batch_size: int) -> list[int]:
    """Indices of the global batch at `step`: epochs are seeded permutations of the dataset, so
    the order is a pure function of (seed, step) and resuming needs only the step."""
    start = step * batch_size
    indices = []
    epoch_cache: dict[int, torch.Tensor] = {}
    for position in range(start, start + batch_size):
        epoch, offset = divmod(position, length)
        if epoch not in epoch_cache:
            generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**64)   # seeds go up to 2**64 - 1
            epoch_cache[epoch] = torch.randperm(length, generator=generator)
        indices.append(int(epoch_cache[epoch][offset]))
    return indices
