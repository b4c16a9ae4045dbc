"""A deterministic judge for the shapes world: does an image show what its caption states?

No network. The caption is parsed (`ctxdiff.shapes.captions.parse_caption`); the background is the
palette colour nearest the median border pixel; every pixel confidently nearest one object colour
belongs to that colour, and connected pixels of one colour (a pixel's gap allowed) are a region.
A region's soft coverage (each pixel's position between the background and the region's colour,
over the region grown by two pixels) is compared with every drawn shape, scaled to the region's
area and placed at its centroid, sharp and slightly blurred: the nearest is its shape, that
shape's extent its size (against the midpoint of small and large). Its centre comes from its
soft silhouettes.

The caption's objects take the regions that match them best (colour first, then the most
attributes right). Each stated attribute is checked: colour, shape, size, position (centre in
the outer or middle third), relation (centres compared), background, count (as many regions as
named objects) and, for videos, motion.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from itertools import permutations
from typing import Iterable

import numpy as np
from PIL import Image
from scipy import ndimage

from ctxdiff.shapes.captions import OBJECT_COLOURS, PALETTE, SHAPES, SIZES, SceneSpec, parse_caption
from ctxdiff.shapes.render import SHAPE_CENTROID_DROP, SHAPE_FILL, shape_coverage

ATTRIBUTES = ("colour", "shape", "size", "position", "relation", "background", "count", "motion")
REPORT_COLUMNS = ("group", "attribute", "correct", "stated", "accuracy")

CONFIDENCE = 0.6         # a pixel takes its nearest palette colour when nearer than this x the second
MIN_AREA = 0.005         # regions with fewer confident pixels than this fraction of the image are noise
MAX_CANDIDATES = 6       # the largest regions considered as the caption's objects
SIZE_THRESHOLD = (SIZES["small"] + SIZES["large"]) / 2
TEMPLATE_SUPERSAMPLE = 2
TEMPLATE_BLURS = (0.0, 0.7)  # pixels: a generated image's edges may be softer than drawn ones
GROW = 2                 # pixels a region grows by to take in its soft edge
MAX_SIDE = 64            # larger images are judged area-averaged to this side: same verdicts, fixed cost
MIN_TRAVEL = 0.15        # a moving object's centre travels at least this far along its direction

_NAMES = list(PALETTE)
_COLOURS = np.asarray([PALETTE[name] for name in _NAMES], np.float32)


@dataclass(frozen=True)
class Detection:
    """One region: its colour name, measurements and the shape and size they read as."""

    colour: str
    shape: str
    size: str
    cx: float
    cy: float
    extent: float      # of the drawn shape that fits best, as a fraction of the image side
    area: float        # soft coverage, as a fraction of the image
    mismatch: float    # L1 distance to that shape, relative to the area (0: exactly it)


@dataclass(frozen=True)
class Verdict:
    """Per attribute: True (correct), False (wrong) or None (the caption does not state it)."""

    caption: str
    colour: bool | None = None
    shape: bool | None = None
    size: bool | None = None
    position: bool | None = None
    relation: bool | None = None
    background: bool | None = None
    count: bool | None = None
    motion: bool | None = None
    detections: tuple[Detection | None, ...] = ()   # the region taken for each named object

    def attributes(self) -> dict[str, bool | None]:
        return {name: getattr(self, name) for name in ATTRIBUTES}

    @property
    def all_correct(self) -> bool:
        return all(value is not False for value in self.attributes().values())


# -- one image ---------------------------------------------------------------------------------

def judge(image, caption: str) -> Verdict:
    """Check an image (uint8, or float in [0, 1]; [H, W, 3] or [3, H, W]; numpy or torch) against
    a caption. Raises ValueError when the caption cannot be read."""
    return judge_spec(image, parse_caption(caption), caption)


def judge_spec(image, spec: SceneSpec, caption: str = "") -> Verdict:
    """`judge` for a caption already parsed."""
    image = as_uint8_image(image)
    if image.shape[0] > MAX_SIDE:
        image = np.asarray(Image.fromarray(image).resize((MAX_SIDE, MAX_SIDE), Image.Resampling.BOX))
    background, regions = segment(image)
    found = _match(spec, regions)
    checks = _checks(spec, found)
    count = len(regions) == len(spec.objects)
    return Verdict(caption=caption or spec.caption(), background=None if spec.background is None
                   else background == spec.background, count=count, detections=found, **checks)


def judge_video(frames, caption: str) -> Verdict:
    """Check a video ([F, H, W, 3]) against a caption: every stated attribute by majority over the
    frames, and the motion by the object's travel from the first frame to the last."""
    spec = parse_caption(caption)
    verdicts = [judge_spec(frame, spec, caption) for frame in frames]
    votes = {}
    for name in (a for a in ATTRIBUTES if a != "motion"):
        values = [getattr(v, name) for v in verdicts if getattr(v, name) is not None]
        votes[name] = sum(values) * 2 > len(values) if values else None
    motion = None
    if spec.motion is not None:
        first, last = verdicts[0].detections[0], verdicts[-1].detections[0]
        motion = first is not None and last is not None and _moved(first, last, spec.motion)
    return Verdict(caption=caption, motion=motion, detections=verdicts[0].detections, **votes)


def _moved(first: Detection, last: Detection, direction: str) -> bool:
    dx, dy = last.cx - first.cx, last.cy - first.cy
    along, across = {"right": (dx, dy), "left": (-dx, dy), "down": (dy, dx), "up": (-dy, dx)}[direction]
    return along >= MIN_TRAVEL and along > abs(across)


def as_uint8_image(image) -> np.ndarray:
    """uint8 [N, N, 3] from uint8 or float-in-[0, 1] pixels, channels last or first."""
    if hasattr(image, "detach"):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] == 3 and image.shape[-1] != 3:
        image = image.transpose(1, 2, 0)
    if image.ndim != 3 or image.shape[-1] != 3 or image.shape[0] != image.shape[1]:
        raise ValueError(f"the judge reads square RGB images, [N, N, 3] or [3, N, N], not {list(image.shape)}")
    if image.dtype != np.uint8:
        image = np.rint(np.clip(image.astype(np.float32), 0, 1) * 255).astype(np.uint8)
    return image


def segment(image: np.ndarray) -> tuple[str, list[Detection]]:
    """The background's palette name and the image's regions of one object colour, largest first."""
    height, width = image.shape[:2]
    pixels = image.astype(np.float32)
    ring = max(1, min(height, width) // 32)
    border = np.concatenate([pixels[:ring].reshape(-1, 3), pixels[-ring:].reshape(-1, 3),
                             pixels[:, :ring].reshape(-1, 3), pixels[:, -ring:].reshape(-1, 3)])
    measured_bg = np.median(border, axis=0)
    background = _NAMES[int(np.argmin(np.linalg.norm(_COLOURS - measured_bg, axis=1)))]

    colours = np.concatenate([_COLOURS, measured_bg[None]])       # the measured background is a class too
    distances = np.linalg.norm(pixels[:, :, None, :] - colours, axis=-1)
    nearest = np.argmin(distances, axis=-1)
    two = np.partition(distances, 1, axis=-1)
    label = np.where(two[..., 0] < CONFIDENCE * two[..., 1], nearest, -1)

    object_classes = [k for k, name in enumerate(_NAMES) if name in OBJECT_COLOURS and name != background]
    objects = np.isin(label, object_classes)
    regions = []
    for k in object_classes:
        pixels_k = label == k         # pieces a pixel apart (an uncertain pixel between) are one region
        components, count = ndimage.label(ndimage.binary_dilation(pixels_k, structure=np.ones((3, 3))))
        for index in range(1, count + 1):
            mask = (components == index) & pixels_k
            if mask.sum() >= MIN_AREA * height * width:
                alpha = _coverage(pixels, mask, objects & (label != k), measured_bg)
                regions.append(_measure(_NAMES[k], alpha))
    return background, sorted(regions, key=lambda r: -r.area)


def _coverage(pixels: np.ndarray, mask: np.ndarray, other_objects: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """Soft coverage of one region: each pixel's position on the line from the background colour
    to the region's colour, over the region grown by GROW pixels (its soft edge) but not into other
    objects' pixels, 0 elsewhere."""
    colour = np.median(pixels[mask], axis=0)
    grown = ndimage.binary_dilation(mask, structure=np.ones((3, 3)), iterations=GROW) & ~other_objects
    direction = colour - bg
    alpha = ((pixels - bg) @ direction) / max(float(direction @ direction), 1.0)
    return np.where(grown, np.clip(alpha, 0, 1), 0).astype(np.float32)


def _measure(colour: str, alpha: np.ndarray) -> Detection:
    """Centre from the soft silhouettes; shape: the drawn shape (scaled to the region's area,
    placed at its centroid) that differs least from the coverage; size from that shape's extent."""
    n = alpha.shape[0]
    positions = (np.arange(n) + 0.5) / n
    columns, rows = alpha.max(axis=0), alpha.max(axis=1)          # soft silhouettes along x and y
    cx, cy = float(columns @ positions / columns.sum()), float(rows @ positions / rows.sum())
    total = float(alpha.sum())
    mass_x, mass_y = float(alpha.sum(axis=0) @ positions) / total, float(alpha.sum(axis=1) @ positions) / total
    area = total / (n * n)
    fits = {}
    for shape in SHAPES:
        extent = float(np.sqrt(area / SHAPE_FILL[shape]))
        template = shape_coverage(shape, mass_x, mass_y - SHAPE_CENTROID_DROP[shape] * extent, extent, n,
                                  TEMPLATE_SUPERSAMPLE)
        mismatch = min(float(np.abs(alpha - (ndimage.gaussian_filter(template, blur) if blur else template)).sum())
                       for blur in TEMPLATE_BLURS)
        fits[shape] = (mismatch / total, extent)
    shape = min(fits, key=lambda s: fits[s][0])
    mismatch, extent = fits[shape]
    return Detection(colour, shape, "large" if extent >= SIZE_THRESHOLD else "small", cx, cy, extent, area, mismatch)


# -- matching the caption's objects to regions -------------------------------------------------

def _match(spec: SceneSpec, regions: list[Detection]) -> tuple[Detection | None, ...]:
    """The regions to take for the caption's objects: the assignment with the most colours right,
    then the most attributes right, then the largest regions (None where regions run out)."""
    candidates = regions[:MAX_CANDIDATES]
    n = len(spec.objects)
    if len(candidates) < n:
        candidates = candidates + [None] * (n - len(candidates))

    def score(found):
        checks = _checks(spec, found)
        colours = sum(f is not None and f.colour == o.colour for f, o in zip(found, spec.objects))
        return colours, sum(v is True for v in checks.values()), sum(f.area for f in found if f is not None)

    return max(permutations(candidates, n), key=score)


def _checks(spec: SceneSpec, found: tuple[Detection | None, ...]) -> dict[str, bool | None]:
    def every(test, stated=lambda o: True):
        pairs = [(f, o) for f, o in zip(found, spec.objects) if stated(o)]
        return all(f is not None and test(f, o) for f, o in pairs) if pairs else None

    checks = {
        "colour": every(lambda f, o: f.colour == o.colour),
        "shape": every(lambda f, o: f.shape == o.shape),
        "size": every(lambda f, o: f.size == o.size, stated=lambda o: o.size is not None),
        "position": None,
        "relation": None,
    }
    if spec.position is not None:
        checks["position"] = found[0] is not None and _in_position(found[0], spec.position)
    if spec.relation is not None:
        checks["relation"] = None not in found and _related(found[0], found[1], spec.relation)
    return checks


def _in_position(d: Detection, position: str) -> bool:
    third = 1 / 3
    return {"left": d.cx < third, "right": d.cx > 1 - third, "top": d.cy < third, "bottom": d.cy > 1 - third,
            "centre": third <= d.cx <= 1 - third and third <= d.cy <= 1 - third}[position]


def _related(a: Detection, b: Detection, relation: str) -> bool:
    return {"above": a.cy < b.cy, "below": a.cy > b.cy, "left of": a.cx < b.cx, "right of": a.cx > b.cx}[relation]


# -- many images -------------------------------------------------------------------------------

@dataclass
class Tally:
    correct: int = 0
    stated: int = 0

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.stated if self.stated else None


@dataclass
class GroupTally:
    """Judged prompts of one kind: how many, how many wholly right, and per attribute."""

    prompts: int = 0
    all_correct: int = 0
    attributes: dict[str, Tally] = field(default_factory=lambda: {name: Tally() for name in ATTRIBUTES})

    def add(self, verdict: Verdict) -> None:
        self.prompts += 1
        self.all_correct += verdict.all_correct
        for name, value in verdict.attributes().items():
            if value is not None:
                self.attributes[name].stated += 1
                self.attributes[name].correct += bool(value)


@dataclass
class JudgeReport:
    """Accuracy per attribute over the prompts that state it, for single-object prompts, two-object
    prompts and all; plus the prompts the judge could not read (caption, reason)."""

    groups: dict[str, GroupTally] = field(default_factory=lambda: {g: GroupTally() for g in ("single", "two", "all")})
    unparseable: list[tuple[str, str]] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)

    def add(self, verdict: Verdict, objects: int) -> None:
        self.verdicts.append(verdict)
        self.groups["single" if objects == 1 else "two"].add(verdict)
        self.groups["all"].add(verdict)

    def accuracy(self, attribute: str, group: str = "all") -> float | None:
        return self.groups[group].attributes[attribute].accuracy

    def all_correct_rate(self, group: str = "all") -> float | None:
        tally = self.groups[group]
        return tally.all_correct / tally.prompts if tally.prompts else None

    def rows(self) -> list[tuple]:
        """Table rows (REPORT_COLUMNS): every stated attribute, then 'all correct', per group."""
        rows = []
        for group, tally in self.groups.items():
            if not tally.prompts:
                continue
            for name, t in tally.attributes.items():
                if t.stated:
                    rows.append((group, name, t.correct, t.stated, t.accuracy))
            rows.append((group, "all correct", tally.all_correct, tally.prompts, self.all_correct_rate(group)))
        return rows

    def to_dict(self) -> dict:
        return {
            "groups": {group: {"prompts": t.prompts, "all_correct": self.all_correct_rate(group),
                               "attributes": {name: {**asdict(a), "accuracy": a.accuracy}
                                              for name, a in t.attributes.items() if a.stated}}
                       for group, t in self.groups.items()},
            "unparseable": [{"caption": c, "reason": r} for c, r in self.unparseable],
        }


def judge_many(images: Iterable, captions: Iterable[str]) -> JudgeReport:
    """Judge every (image, caption) pair; unreadable captions are listed in the report, not judged."""
    images, captions = list(images), list(captions)
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions; pass one caption per image")
    report = JudgeReport()
    for image, caption in zip(images, captions):
        try:
            spec = parse_caption(caption)
        except ValueError as exc:
            report.unparseable.append((caption, str(exc)))
            continue
        report.add(judge_spec(image, spec, caption), len(spec.objects))
    return report


# -- class and layout conditions (paper Sec. 4.3) ------------------------------------------------

LAYOUT_IOU = 0.5   # a drawn object is where its layout box asks when their IoU is at least this


@dataclass(frozen=True)
class ObjectVerdict:
    """One asked object ("colour shape" in a box): the region of its colour that overlaps the box
    most (None: no region of that colour), whether its colour and shape are right, the IoU of its
    box (centre +- half its fitted extent) with the asked box."""

    label: str
    box: tuple[float, float, float, float]
    colour: bool
    shape: bool
    iou: float
    detection: Detection | None = None

    @property
    def placed(self) -> bool:
        return self.iou >= LAYOUT_IOU

    @property
    def correct(self) -> bool:
        return self.colour and self.shape and self.placed


def split_label(label: str) -> tuple[str, str]:
    """A shapes-world label "colour shape" -> (colour, shape); ValueError for anything else."""
    colour, _, shape = " ".join(label.lower().split()).rpartition(" ")
    if colour not in OBJECT_COLOURS or shape not in SHAPES:
        raise ValueError(f"{label!r} is not a shapes-world label 'colour shape' "
                         f"(colours {', '.join(OBJECT_COLOURS)}; shapes {', '.join(SHAPES)})")
    return colour, shape


def detection_box(d: Detection) -> tuple[float, float, float, float]:
    return (d.cx - d.extent / 2, d.cy - d.extent / 2, d.cx + d.extent / 2, d.cy + d.extent / 2)


def box_iou(a, b) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


def _regions(image) -> list[Detection]:
    image = as_uint8_image(image)
    if image.shape[0] > MAX_SIDE:
        image = np.asarray(Image.fromarray(image).resize((MAX_SIDE, MAX_SIDE), Image.Resampling.BOX))
    return segment(image)[1]


def judge_class(image, label: str) -> dict[str, bool]:
    """A class-conditional image against its label: the largest region's colour and shape."""
    colour, shape = split_label(label)
    regions = _regions(image)
    top = regions[0] if regions else None
    return {"colour": top is not None and top.colour == colour, "shape": top is not None and top.shape == shape}


def judge_layout(image, layout) -> list[ObjectVerdict]:
    """A layout-conditional image against its layout ((label, box) objects), object by object."""
    regions = _regions(image)
    verdicts = []
    for label, box in layout:
        colour, shape = split_label(label)
        same = [r for r in regions if r.colour == colour]
        best = max(same, key=lambda r: box_iou(detection_box(r), box), default=None)
        verdicts.append(ObjectVerdict(label, tuple(box), best is not None, best is not None and best.shape == shape,
                                      0.0 if best is None else box_iou(detection_box(best), box), best))
    return verdicts


def condition_accuracy(images: Iterable, conditions: Iterable) -> dict[str, float]:
    """Accuracy over many images: labels (str) give colour/shape/all rates per image; layouts give
    per-object colour, shape, placed (IoU >= LAYOUT_IOU), all, and the mean IoU."""
    rows = []
    for image, condition in zip(images, conditions):
        if isinstance(condition, str):
            v = judge_class(image, condition)
            rows.append({**v, "all": v["colour"] and v["shape"]})
        else:
            rows += [{"colour": o.colour, "shape": o.shape, "placed": o.placed, "all": o.correct, "iou": o.iou}
                     for o in judge_layout(image, condition)]
    if not rows:
        return {}
    return {key: float(np.mean([row[key] for row in rows])) for key in rows[0]} | {"n": len(rows)}
