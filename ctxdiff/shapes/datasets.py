"""The shapes world as training data: datasets of (image, caption), scene twins for contrastive
training, the colour layout read back from pixels (the CLIP's layout head), sample folders on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ctxdiff.data.video import FRAME_FOLDER_FPS, write_video
from ctxdiff.errors import CtxdiffError
from ctxdiff.shapes.captions import OBJECT_COLOURS
from ctxdiff.shapes.world import ShapesWorld

LAYOUT_TOLERANCE = 24.0  # a pixel within this distance (0-255 RGB) of an object colour counts as that colour


def colour_layout(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each object colour lies in rendered scenes, read from the pixels alone.

    images: [B, 3, H, W] in [-1, 1]. Returns centroids [B, K, 2] ((x, y) in [0, 1], x to the right,
    y downwards) and present [B, K] (bool) for the K object colours in OBJECT_COLOURS order. The
    background is the top-left pixel's colour (objects keep a margin from the border); anti-aliased
    edge pixels further than LAYOUT_TOLERANCE from every colour are left out. Within a scene the
    object colours differ, so colour centroids are object positions, and their differences relations.
    A batched, hard-assignment cousin of the judge's `segment` for the training loop (128 scenes:
    23 ms here, against 186 ms for `segment` image by image).
    """
    rgb = (images.float() + 1) * 127.5
    palette = torch.tensor(list(OBJECT_COLOURS.values()), dtype=rgb.dtype, device=rgb.device)
    palette = palette.expand(len(rgb), -1, -1)                                        # [B, K, 3]
    nearest = torch.cdist(rgb.flatten(2).transpose(1, 2), palette).min(-1)           # per pixel [B, H*W]
    background = torch.cdist(rgb[:, :, :1, 0].transpose(1, 2), palette)[:, 0].min(-1)
    is_background = (background.values < LAYOUT_TOLERANCE)[:, None] & (background.indices[:, None] == nearest.indices)
    keep = (nearest.values < LAYOUT_TOLERANCE) & ~is_background                      # [B, H*W]
    weights = torch.nn.functional.one_hot(nearest.indices, len(OBJECT_COLOURS)).to(rgb.dtype) * keep[..., None]
    h, w = images.shape[-2:]
    y, x = torch.meshgrid((torch.arange(h, device=rgb.device, dtype=rgb.dtype) + 0.5) / h,
                          (torch.arange(w, device=rgb.device, dtype=rgb.dtype) + 0.5) / w, indexing="ij")
    coords = torch.stack([x.flatten(), y.flatten()], -1)                             # [HW, 2]
    mass = weights.sum(1)                                                            # [B, K]
    centroids = torch.einsum("bpk,pc->bkc", weights, coords) / mass.clamp_min(1)[..., None]
    return centroids, mass >= 2



class ShapesDataset(Dataset):
    """The first `count` samples of a world: (float [3, H, W] in [-1, 1], caption)."""

    def __init__(self, world: ShapesWorld, count: int) -> None:
        self.world, self.count = world, count

    def __len__(self) -> int:
        return self.count

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.count:
            raise IndexError(f"index {index} outside a dataset of {self.count}")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        self._check_index(index)
        image, caption = self.world.sample(index)
        return torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1, caption


class ShapeTwinsDataset(ShapesDataset):
    """The first `count` scenes of a world, each with its twin (`ShapesWorld.scene_and_twin`):
    (float [2, 3, H, W] in [-1, 1], [caption, twin caption]), a group contrastive training keeps
    in one batch so that the two captions must be told apart by the attribute they differ in."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, list[str]]:
        self._check_index(index)
        scenes = self.world.scene_and_twin(index)[:2]
        images = np.stack([self.world.render(scene) for scene in scenes])
        return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1, [s.caption for s in scenes]



def prepare_folder(folder: str | Path, force: bool = False) -> Path:
    """Create `folder`; refuse (CtxdiffError) one that holds anything, unless `force`."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CtxdiffError(f"{folder}: exists and is not a folder; pass a folder to write samples into")
    if folder.is_dir() and any(folder.iterdir()) and not force:
        raise CtxdiffError(f"{folder}: the folder is not empty; pass an empty or new folder, or --force to write into it")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_samples(folder: str | Path, n: int, *, seed: int = 0, size: int = 64,
                  kind: Literal["images", "videos"] = "images", frames: int = 8, force: bool = False,
                  callback: Callable[..., None] | None = None) -> list[Path]:
    """Write n samples of the world: `00000.png` + `00000.txt` (caption) pairs, or videos as a folder
    of frames `00000/` + `00000.txt` + `00000.json` (fps, caption, per-frame centres).

    Refuses a folder that holds anything unless `force`. callback(index=, path=, caption=) runs
    after every sample. Returns the image files or frame folders.
    """
    if kind not in ("images", "videos"):
        raise ValueError(f"kind must be 'images' or 'videos', not {kind!r}")
    folder = prepare_folder(folder, force)
    world = ShapesWorld(seed=seed, image_size=size)
    written = []
    for index in range(n):
        stem = folder / f"{index:05d}"
        if kind == "images":
            image, caption = world.sample(index)
            path = stem.with_suffix(".png")
            Image.fromarray(image).save(path)
        else:
            video = world.video(index, frames)
            caption, path = video.caption, stem
            write_video(path, video.frames, FRAME_FOLDER_FPS,
                        metadata={"caption": caption, "centres": video.centres.round(4).tolist()})
        stem.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
        written.append(path)
        if callback is not None:
            callback(index=index, path=path, caption=caption)
    return written
