"""Training data for class- and layout-conditional models (paper Sec. 4.3).

Map-style datasets of (float [3, S, S] in [-1, 1], condition) with `labels`, the vocabulary:

- the shapes world: class = "colour shape" of a single-object scene; layout = each object's
  "colour shape" and its box (its centre +- half its extent, `ctxdiff.shapes.world`);
- an ImageNet-style folder tree: `root/<class name>/*.jpg`, the class the folder's name;
- COCO instances JSON (`annotations/instances_*.json`: images, annotations with pixel boxes
  [x, y, w, h], categories): a layout per image, boxes normalised to the centre-cropped square
  the model sees (`ctxdiff.data.datasets.to_tensor`), objects cut off by the crop clipped, those
  left with (almost) nothing dropped, the largest `max_objects` kept.
"""

from __future__ import annotations

import json
from itertools import product
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ctxdiff.data.datasets import _readable, to_tensor
from ctxdiff.data.images import IMAGE_SUFFIXES, read_image
from ctxdiff.errors import CtxdiffError
from ctxdiff.data.layouts import Layout, LayoutObject

MIN_BOX_SIDE = 0.01   # a box narrower than this (of the cropped square) after cropping is dropped


def shapes_labels() -> tuple[str, ...]:
    """The shapes world's labels: every "colour shape"."""
    from ctxdiff.shapes.captions import OBJECT_COLOURS, SHAPES

    return tuple(f"{colour} {shape}" for colour, shape in product(OBJECT_COLOURS, SHAPES))


def scene_layout(scene) -> Layout:
    """The layout of a shapes-world scene: each object's "colour shape" and its bounding box."""
    return tuple(LayoutObject(f"{o.colour} {o.shape}", tuple(round(v, 6) for v in (
        o.cx - o.extent / 2, o.cy - o.extent / 2, o.cx + o.extent / 2, o.cy + o.extent / 2)))
        for o in scene.objects)


class ShapesConditions(Dataset):
    """The first `count` scenes of a shapes world with their class (single-object scenes) or layout."""

    def __init__(self, kind: str, size: int, count: int, seed: int = 0) -> None:
        from ctxdiff.shapes.world import ShapesWorld

        if kind not in ("class", "layout"):
            raise ValueError(f"kind must be 'class' or 'layout', got {kind!r}")
        self.kind, self.count, self.labels = kind, count, shapes_labels()
        self.world = ShapesWorld(seed=seed, image_size=size, two_object_prob=0.0 if kind == "class" else 0.5)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        if not 0 <= index < self.count:
            raise IndexError(f"index {index} outside a dataset of {self.count}")
        scene = self.world.scene(index)
        image = torch.from_numpy(self.world.render(scene)).permute(2, 0, 1).float() / 127.5 - 1
        if self.kind == "class":
            return image, scene_layout(scene)[0].label
        return image, scene_layout(scene)


class ClassFolders(Dataset):
    """An ImageNet-style tree: every image under `root/<class>/` (recursively) is of that class."""

    def __init__(self, root: str | Path, size: int) -> None:
        root = Path(root)
        classes = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        items = [(path, name) for name in classes for path in sorted((root / name).rglob("*"))
                 if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()]
        self.skipped = sum(not _readable(path) for path, _ in items)
        self.items = [(path, name) for path, name in items if _readable(path)]
        if not self.items:
            raise CtxdiffError(f"{root}: no images in class folders; a class dataset is a folder of one folder per "
                               "class (root/<class name>/*.jpg), as ImageNet's")
        self.labels = tuple(name for name in classes if any(n == name for _, n in self.items))
        self.size = size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        path, label = self.items[index]
        return to_tensor(read_image(path), self.size), label


def crop_box(box: list[float], width: int, height: int) -> tuple[float, float, float, float] | None:
    """A COCO pixel box [x, y, w, h] in the centre square crop of a width x height image, as
    (x0, y0, x1, y1) in [0, 1]; None when the crop leaves (almost) nothing of it."""
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    x, y, w, h = (float(v) for v in box)
    x0, y0 = max(0.0, (x - left) / side), max(0.0, (y - top) / side)
    x1, y1 = min(1.0, (x + w - left) / side), min(1.0, (y + h - top) / side)
    if x1 - x0 < MIN_BOX_SIDE or y1 - y0 < MIN_BOX_SIDE:
        return None
    return (x0, y0, x1, y1)


class CocoLayouts(Dataset):
    """COCO instances JSON: (image, layout) per image; `labels` the category names (by id).
    Image files are found next to the JSON, or in `../<split>/` for annotations/instances_<split>.json."""

    def __init__(self, path: str | Path, size: int, max_objects: int = 8) -> None:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            categories = {int(c["id"]): str(c["name"]) for c in data["categories"]}
            images = {int(im["id"]): im for im in data["images"]}
            annotations = data.get("annotations", [])
        except OSError as e:
            raise CtxdiffError(f"{path}: cannot read ({e.strerror or e})") from None
        except (ValueError, KeyError, TypeError) as e:
            raise CtxdiffError(f"{path}: not a COCO instances file (needs 'images', 'annotations' and 'categories';"
                               f" {type(e).__name__}: {e})") from None
        self.labels = tuple(categories[k] for k in sorted(categories))
        objects: dict[int, list[tuple[float, LayoutObject]]] = {k: [] for k in images}
        for ann in annotations:
            image = images.get(int(ann.get("image_id", -1)))
            if image is None or ann.get("iscrowd") or int(ann.get("category_id", -1)) not in categories:
                continue
            box = crop_box(ann["bbox"], int(image["width"]), int(image["height"]))
            if box is not None:
                area = (box[2] - box[0]) * (box[3] - box[1])
                objects[int(image["id"])].append((area, LayoutObject(categories[int(ann["category_id"])], box)))
        split = path.stem.removeprefix("instances_")
        roots = [path.parent, path.parent.parent / split, path.parent.parent / "images" / split]
        self.items, self.missing = [], 0
        for key in sorted(images):
            name = images[key]["file_name"]
            file = next((root / name for root in roots if (root / name).is_file()), None)
            if file is None:
                self.missing += 1
                continue
            largest = sorted(objects[key], key=lambda item: -item[0])[:max_objects]
            self.items.append((file, tuple(obj for _, obj in largest)))
        if not self.items:
            raise CtxdiffError(f"{path}: none of its {len(images)} images was found (looked in "
                               f"{', '.join(str(r) for r in roots)})")
        self.size = size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        path, layout = self.items[index]
        return to_tensor(read_image(path), self.size), layout


def open_condition_dataset(kind: str, source: str, size: int, *, shapes_count: int = 10_000, shapes_seed: int = 0,
                           max_objects: int = 8):
    """The dataset of a class or layout recipe's `data.source`: 'shapes', a class-folder tree
    (class), or a COCO instances .json (layout)."""
    if source == "shapes":
        return ShapesConditions(kind, size, shapes_count, shapes_seed)
    path = Path(source)
    if kind == "class":
        if not path.is_dir():
            raise CtxdiffError(f"{source}: a class model trains on 'shapes' or a folder of class folders "
                               "(root/<class name>/*.jpg)")
        return ClassFolders(path, size)
    if kind == "layout":
        if path.suffix != ".json" or not path.is_file():
            raise CtxdiffError(f"{source}: a layout model trains on 'shapes' or a COCO instances .json file")
        return CocoLayouts(path, size, max_objects)
    raise ValueError(f"kind must be 'class' or 'layout', got {kind!r}")
