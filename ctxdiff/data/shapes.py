"""The shapes world: a deterministic, captioned world of coloured shapes (images and videos).

Every scene holds one or two objects (a circle, square, triangle or cross; small or large; one of
nine colours) on a white, black or gray background. Its caption states the colours and shapes,
and some of: sizes, the position of a single object, the relation between two objects, the
background. Videos hold one object moving across the frame. `parse_caption` reads back every
caption the templates write (and prompts a person writes in the same words); the judge in
`ctxdiff.metrics.shapes_judge` uses it to check images against their captions.

Coordinates are normalised: x to the right, y downwards, both in [0, 1]; an object's (cx, cy)
is the centre of its bounding box and its extent is the side of that (square) box.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ctxdiff.data.video import FRAME_FOLDER_FPS, write_video
from ctxdiff.errors import CtxdiffError

OBJECT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 25, 35),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 225, 30),
    "purple": (140, 50, 190),
    "orange": (255, 125, 0),
    "cyan": (30, 200, 210),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
PALETTE: dict[str, tuple[int, int, int]] = {**OBJECT_COLOURS, **BACKGROUND_COLOURS}
SHAPES = ("circle", "square", "triangle", "cross")
SHAPE_FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "cross": 5 / 9}    # area / extent^2
SHAPE_CENTROID_DROP = {"circle": 0.0, "square": 0.0, "triangle": 1 / 6, "cross": 0.0}  # (centroid - cy) / extent
SIZES: dict[str, float] = {"small": 0.24, "large": 0.42}   # extent, as a fraction of the image side
POSITIONS = ("left", "right", "top", "bottom", "centre")
RELATIONS = ("above", "below", "left of", "right of")
MOTIONS = ("right", "left", "up", "down")

MARGIN = 0.03          # empty border around every object
GAP = 0.06             # at least this much space between two objects along their relation's axis
SIDE_BAND = 0.29       # a positioned object's centre lies within this of its edge ...
CROSS_BAND = (0.4, 0.6)  # ... and inside this band across it
CENTRE_BAND = (0.45, 0.55)
MAX_OFFSET = 0.15      # how far two related objects may sit apart across their relation's axis
SUPERSAMPLE = 4        # coverage samples per pixel side

# Probabilities with which a sampled caption states an attribute.
P_SIZE, P_POSITION, P_BACKGROUND, P_RELATION = 0.5, 0.6, 0.4, 0.85

# Salts keep the random streams of scenes, held-out prompts and videos apart.
_SCENE, _PROMPTS, _VIDEO, _FROM_CAPTION, _TWIN = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class ObjectSpec:
    """One object as a caption states it; size None: not stated."""

    colour: str
    shape: str
    size: str | None = None


@dataclass(frozen=True)
class SceneSpec:
    """What a caption states. relation relates objects[0] to objects[1]; position and motion are
    for a single object; None: not stated."""

    objects: tuple[ObjectSpec, ...]
    position: str | None = None
    relation: str | None = None
    background: str | None = None
    motion: str | None = None

    def caption(self, rng: np.random.Generator | None = None) -> str:
        """The caption in words; `rng` picks among equivalent phrasings (None: the first)."""
        def pick(options: tuple[str, ...]) -> str:
            return options[0] if rng is None else options[int(rng.integers(len(options)))]

        words = [_object_phrase(self.objects[0])]
        if self.motion is not None:
            words.append(pick(_MOTION_WORDS[self.motion]))
        if self.position is not None:
            words.append(pick(_POSITION_WORDS[self.position]))
        if len(self.objects) == 2:
            words.append(pick(_RELATION_WORDS[self.relation]) if self.relation else "and")
            words.append(_object_phrase(self.objects[1]))
        if self.background is not None:
            words.append(pick(_BACKGROUND_WORDS).format(self.background))
        return " ".join(words)


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object: its centre (cx, cy) in normalised coordinates."""

    shape: str
    colour: str
    size: str
    cx: float
    cy: float

    @property
    def extent(self) -> float:
        return SIZES[self.size]


@dataclass(frozen=True)
class Scene:
    """A drawn scene, its caption and what the caption states (`spec`)."""

    objects: tuple[ShapeObject, ...]
    background: str
    caption: str
    spec: SceneSpec


class ShapeVideo(NamedTuple):
    """frames: uint8 [F, H, W, 3]; centres: [F, 2] the object's (cx, cy) in every frame."""

    frames: np.ndarray
    caption: str
    centres: np.ndarray


# -- captions ----------------------------------------------------------------------------------

_POSITION_WORDS = {
    "left": ("on the left", "on the left side"),
    "right": ("on the right", "on the right side"),
    "top": ("at the top",),
    "bottom": ("at the bottom",),
    "centre": ("in the centre", "in the middle"),
}
_RELATION_WORDS = {
    "above": ("above",),
    "below": ("below", "under"),
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
}
_MOTION_WORDS = {
    "right": ("moving to the right", "moving right"),
    "left": ("moving to the left", "moving left"),
    "up": ("moving up", "moving upwards"),
    "down": ("moving down", "moving downwards"),
}
_BACKGROUND_WORDS = ("on a {} background", "with a {} background")

# Words a person may write for the same thing, beyond those the templates write.
_SYNONYMS = {"center": "centre", "grey": "gray", "big": "large", "tiny": "small", "little": "small",
             "disc": "circle", "disk": "circle", "plus": "cross", "beneath": "below",
             "upward": "upwards", "downward": "downwards"}
_ARTICLES = ("a", "an", "the", "one")
_EXTRA_PHRASES = {("in", "the", "center"): ("position", "centre"),
                  ("on", "the", "left", "of"): ("relation", "left of"),
                  ("on", "the", "right", "of"): ("relation", "right of")}


def _phrase_table() -> list[tuple[tuple[str, ...], tuple[str, str]]]:
    table = dict(_EXTRA_PHRASES)
    for kind, words in (("position", _POSITION_WORDS), ("relation", _RELATION_WORDS), ("motion", _MOTION_WORDS)):
        for value, phrases in words.items():
            table.update({tuple(p.split()): (kind, value) for p in phrases})
    return sorted(table.items(), key=lambda item: -len(item[0]))   # longest match first


_PHRASES = _phrase_table()


def _object_phrase(obj: ObjectSpec) -> str:
    words = ([obj.size] if obj.size else []) + [obj.colour, obj.shape]
    return ("an" if words[0][0] in "aeiou" else "a") + " " + " ".join(words)


def parse_caption(text: str) -> SceneSpec:
    """The attributes a caption states, e.g. 'a small red circle on the left on a black background',
    'a red circle above a blue square', 'a cyan cross moving to the right'.

    Raises ValueError, naming the first word it cannot read and what it expected there.
    """
    return _CaptionParser(text).parse()


class _CaptionParser:
    def __init__(self, text: str) -> None:
        self.text = text
        words = re.sub(r"[^a-z ]", " ", text.lower().replace("-", " ")).split()
        self.words = [_SYNONYMS.get(w, w) for w in words]
        self.i = 0

    def parse(self) -> SceneSpec:
        objects = [self.object()]
        stated: dict[str, str] = {}
        while self.i < len(self.words):
            background = self.background()
            kind, value = ("background", background) if background else self.phrase()
            if kind in ("relation", "and") and len(objects) == 2:
                self.reject("a caption names at most two objects")
            if kind in stated:
                self.reject(f"it states the {kind} twice")
            stated[kind] = value
            if kind in ("relation", "and"):
                objects.append(self.object())
        if len(objects) == 2 and ("position" in stated or "motion" in stated):
            self.reject("a position or motion is for a caption with one object; "
                        "relate two objects with above, below, left of or right of")
        if "position" in stated and "motion" in stated:
            self.reject("a moving object takes no position; drop one of the two")
        return SceneSpec(tuple(objects), stated.get("position"), stated.get("relation"),
                         stated.get("background"), stated.get("motion"))

    def object(self) -> ObjectSpec:
        if self.peek() in _ARTICLES:
            self.i += 1
        size = self.take(SIZES, "a size", optional=True)
        colour = self.take(OBJECT_COLOURS, "a colour")
        shape = self.take(SHAPES, "a shape")
        return ObjectSpec(colour, shape, size)

    def background(self) -> str | None:
        """'on a black background', 'with a gray background', 'against white background'."""
        w = self.words[self.i:]
        if not w or w[0] not in ("on", "with", "against"):
            return None
        j = 2 if len(w) > 1 and w[1] in _ARTICLES else 1
        if len(w) <= j + 1 or w[j + 1] != "background":
            return None
        if w[j] not in BACKGROUND_COLOURS:
            self.i += j
            self.fail(f"expected a background colour ({', '.join(BACKGROUND_COLOURS)})")
        self.i += j + 2
        return w[j]

    def phrase(self) -> tuple[str, str]:
        if self.peek() == "and":
            self.i += 1
            return "and", "and"
        for words, meaning in _PHRASES:
            if tuple(self.words[self.i:self.i + len(words)]) == words:
                self.i += len(words)
                return meaning
        self.fail("expected a position (on the left, at the top, in the centre ...), a relation "
                  "(above, below, left of, right of) and a second object, a motion (moving to the right ...) "
                  "or a background (on a black background)")

    def take(self, vocabulary, what: str, optional: bool = False) -> str | None:
        word = self.peek()
        if word in vocabulary:
            self.i += 1
            return word
        if optional:
            return None
        self.fail(f"expected {what} ({', '.join(vocabulary)})")

    def peek(self) -> str | None:
        return self.words[self.i] if self.i < len(self.words) else None

    def fail(self, expected: str):
        where = f"at {self.peek()!r}" if self.peek() else "at the end"
        raise ValueError(f"cannot read caption {self.text!r} {where}: {expected}")

    def reject(self, reason: str):
        raise ValueError(f"cannot read caption {self.text!r}: {reason}")


# -- sampling and layout -----------------------------------------------------------------------

def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


def _choice(rng: np.random.Generator, options) -> str:
    options = list(options)
    return options[int(rng.integers(len(options)))]


def sample_spec(rng: np.random.Generator, two_objects: bool, moving: bool = False) -> SceneSpec:
    """A random caption's content: colours and shapes always, other attributes sometimes."""
    background = _choice(rng, BACKGROUND_COLOURS)
    colours = [c for c in OBJECT_COLOURS if c != background]
    picked = rng.choice(len(colours), size=2 if two_objects else 1, replace=False)
    objects = tuple(ObjectSpec(colours[k], _choice(rng, SHAPES),
                               _choice(rng, SIZES) if rng.random() < P_SIZE else None) for k in picked)
    position = relation = motion = None
    if moving:
        motion = _choice(rng, MOTIONS)
    elif two_objects:
        relation = _choice(rng, RELATIONS) if rng.random() < P_RELATION else None
    elif rng.random() < P_POSITION:
        position = _choice(rng, POSITIONS)
    return SceneSpec(objects, position, relation, background if rng.random() < P_BACKGROUND else None, motion)


_OPPOSITE_RELATION = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}


def counterfactual(spec: SceneSpec, rng: np.random.Generator) -> tuple[SceneSpec, str]:
    """`spec` with one stated attribute changed, and that attribute's name: an object's colour,
    shape or stated size, the position, the relation (to its opposite: "above" and "left of" can
    both hold), the stated background, or (two objects of different shapes) which shape goes with
    which colour ("binding"); the attribute is picked uniformly among those `spec` can change, then
    the object. Its scene is a hard negative for contrastive training: a caption the text encoder
    can tell from the original by that one attribute only."""
    objects, taken = list(spec.objects), {o.colour for o in spec.objects} | {spec.background}
    alternatives = {"colour": [c for c in OBJECT_COLOURS if c not in taken], "shape": SHAPES, "size": SIZES,
                    "position": POSITIONS, "relation": [_OPPOSITE_RELATION.get(spec.relation)],
                    "background": [c for c in BACKGROUND_COLOURS if c not in taken]}
    options = [(name, i) for name in ("colour", "shape") for i in range(len(objects))]
    options += [("size", i) for i, o in enumerate(objects) if o.size is not None]
    options += [(name, None) for name in ("position", "relation", "background")
                if getattr(spec, name) is not None and alternatives[name]]
    if len(objects) == 2 and objects[0].shape != objects[1].shape:
        options.append(("binding", None))
    attribute = _choice(rng, dict.fromkeys(name for name, _ in options))
    i = _choice(rng, [i for name, i in options if name == attribute])
    if attribute == "binding":
        a, b = objects
        objects = [dataclasses.replace(a, shape=b.shape), dataclasses.replace(b, shape=a.shape)]
        return dataclasses.replace(spec, objects=tuple(objects)), attribute
    alternatives = alternatives[attribute]
    if i is None:
        value = _choice(rng, [v for v in alternatives if v != getattr(spec, attribute)])
        return dataclasses.replace(spec, **{attribute: value}), attribute
    value = _choice(rng, [v for v in alternatives if v != getattr(objects[i], attribute)])
    objects[i] = dataclasses.replace(objects[i], **{attribute: value})
    return dataclasses.replace(spec, objects=tuple(objects)), attribute


def realise(spec: SceneSpec, rng: np.random.Generator, caption: str | None = None) -> Scene:
    """A scene that satisfies `spec`; what it leaves unstated is drawn from `rng`."""
    colours = {o.colour for o in spec.objects}
    if spec.background in colours:
        raise ValueError(f"a {spec.background} object on a {spec.background} background cannot be seen; "
                         "pick another colour or background")
    background = spec.background or _choice(rng, [b for b in BACKGROUND_COLOURS if b not in colours])
    sizes = [o.size or _choice(rng, SIZES) for o in spec.objects]
    if len(spec.objects) == 1:
        centres = [_place_single(SIZES[sizes[0]], spec.position, rng)]
    else:
        centres = _place_pair(SIZES[sizes[0]], SIZES[sizes[1]], spec.relation, rng)
    objects = tuple(ShapeObject(o.shape, o.colour, s, float(cx), float(cy))
                    for o, s, (cx, cy) in zip(spec.objects, sizes, centres))
    return Scene(objects, background, caption if caption is not None else spec.caption(rng), spec)


def _bounds(extent: float) -> tuple[float, float]:
    return extent / 2 + MARGIN, 1 - extent / 2 - MARGIN


def _place_single(extent: float, position: str | None, rng: np.random.Generator) -> tuple[float, float]:
    lo, hi = _bounds(extent)
    if position is None:
        return rng.uniform(lo, hi), rng.uniform(lo, hi)
    if position == "centre":
        return rng.uniform(*CENTRE_BAND), rng.uniform(*CENTRE_BAND)
    along = rng.uniform(lo, SIDE_BAND)
    across = rng.uniform(*CROSS_BAND)
    along = 1 - along if position in ("right", "bottom") else along
    return (along, across) if position in ("left", "right") else (across, along)


def _place_pair(extent_a: float, extent_b: float, relation: str | None,
                rng: np.random.Generator) -> list[tuple[float, float]]:
    """Centres of two objects that do not touch and stand in `relation` (None: any of the four)."""
    relation = relation or _choice(rng, RELATIONS)
    first, second = (extent_a, extent_b) if relation in ("above", "left of") else (extent_b, extent_a)
    lo_first, _ = _bounds(first)
    lo_second, hi_second = _bounds(second)
    distance = (first + second) / 2 + GAP
    a = rng.uniform(lo_first, hi_second - distance)            # along the relation's axis
    b = rng.uniform(max(lo_second, a + distance), hi_second)
    pa = rng.uniform(*_bounds(first))                            # across it
    pb = rng.uniform(max(lo_second, pa - MAX_OFFSET), min(hi_second, pa + MAX_OFFSET))
    centres = [(pa, a), (pb, b)] if relation in ("above", "below") else [(a, pa), (b, pb)]
    return centres if relation in ("above", "left of") else centres[::-1]


# -- rendering ---------------------------------------------------------------------------------

def shape_coverage(shape: str, cx: float, cy: float, extent: float, size: int,
                   supersample: int = SUPERSAMPLE) -> np.ndarray:
    """The fraction of every pixel a shape covers, float32 [size, size], from supersample x
    supersample exact point tests per pixel. (cx, cy): the centre of its bounding box."""
    points = (np.arange(size * supersample, dtype=np.float32) + 0.5) / (size * supersample)
    x, y = points[None, :] - cx, points[:, None] - cy
    half = extent / 2
    if shape == "circle":
        inside = x * x + y * y <= half * half
    elif shape == "square":
        inside = (np.abs(x) <= half) & (np.abs(y) <= half)
    elif shape == "triangle":          # apex up, base at the bottom, as wide as it is high
        inside = (y <= half) & (np.abs(x) <= (y + half) / 2)
    elif shape == "cross":             # arms a third of the extent wide
        inside = ((np.abs(x) <= half / 3) & (np.abs(y) <= half)) | ((np.abs(x) <= half) & (np.abs(y) <= half / 3))
    else:
        raise ValueError(f"unknown shape {shape!r}; shapes are {', '.join(SHAPES)}")
    return inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3), dtype=np.float32)


def render_scene(scene: Scene, size: int = 64) -> np.ndarray:
    """uint8 [size, size, 3]: the background, then every object, anti-aliased by exact coverage."""
    image = np.empty((size, size, 3), np.float32)
    image[:] = BACKGROUND_COLOURS[scene.background]
    for obj in scene.objects:
        alpha = shape_coverage(obj.shape, obj.cx, obj.cy, obj.extent, size)[..., None]
        image = image * (1 - alpha) + np.asarray(OBJECT_COLOURS[obj.colour], np.float32) * alpha
    return np.rint(image).astype(np.uint8)


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


def colour_shapes(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Which shape each object colour has in captioned scenes, read from the captions alone.

    Returns labels [B, K] (indices into SHAPES; 0 where absent) and present [B, K] (bool) for the K
    object colours in OBJECT_COLOURS order: within a scene the object colours differ, so a colour
    names its object (the caption-side companion of `colour_layout`, for `train.shape_loss`).
    """
    colours = list(OBJECT_COLOURS)
    labels = torch.zeros(len(captions), len(colours), dtype=torch.long)
    present = torch.zeros(len(captions), len(colours), dtype=torch.bool)
    for i, caption in enumerate(captions):
        for obj in parse_caption(caption).objects:
            k = colours.index(obj.colour)
            labels[i, k], present[i, k] = SHAPES.index(obj.shape), True
    return labels, present


# -- the world ---------------------------------------------------------------------------------

class ShapesWorld:
    """Captioned scenes, random-access: scene(index) depends only on (seed, index)."""

    def __init__(self, seed: int = 0, image_size: int = 64, two_object_prob: float = 0.5) -> None:
        if not 0 <= two_object_prob <= 1:
            raise ValueError(f"two_object_prob must lie in [0, 1], not {two_object_prob}")
        self.seed, self.image_size, self.two_object_prob = seed, image_size, two_object_prob

    def scene(self, index: int) -> Scene:
        rng = _rng(self.seed, index, _SCENE)
        return realise(self._spec(rng), rng)

    def scene_and_twin(self, index: int) -> tuple[Scene, Scene, str]:
        """scene(index), its twin (the `counterfactual` scene: one stated attribute changed, the
        rest drawn from the same random stream) and the name of the changed attribute."""
        rng = _rng(self.seed, index, _SCENE)
        spec = self._spec(rng)
        twin_spec, attribute = counterfactual(spec, _rng(self.seed, index, _TWIN))
        state = rng.bit_generator.state
        scene = realise(spec, rng)
        rng.bit_generator.state = state
        return scene, realise(twin_spec, rng), attribute

    def _spec(self, rng: np.random.Generator) -> SceneSpec:
        return sample_spec(rng, two_objects=rng.random() < self.two_object_prob)

    def render(self, scene: Scene, size: int | None = None) -> np.ndarray:
        return render_scene(scene, size or self.image_size)

    def sample(self, index: int) -> tuple[np.ndarray, str]:
        scene = self.scene(index)
        return self.render(scene), scene.caption

    def video(self, index: int, frames: int = 8) -> ShapeVideo:
        rng = _rng(self.seed, index, _VIDEO)
        return _realise_video(sample_spec(rng, two_objects=False, moving=True), rng, frames, self.image_size)


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


def scene_from_caption(text: str, seed: int = 0) -> Scene:
    """A scene drawn to satisfy `text` (ValueError if it cannot be read); same text and seed, same scene."""
    return realise(parse_caption(text), _rng(seed, _text_key(text), _FROM_CAPTION), caption=text)


def _text_key(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def held_out_prompts(n: int, seed: int = 0, kind: Literal["single", "two", "mixed"] = "mixed") -> list[str]:
    """n captions from a stream the training world never draws from (their scenes are new; the
    world is small, so a caption's words may repeat a training caption's)."""
    if kind not in ("single", "two", "mixed"):
        raise ValueError(f"kind must be 'single', 'two' or 'mixed', not {kind!r}")
    prompts = []
    for index in range(n):
        rng = _rng(seed, index, _PROMPTS)
        two = rng.random() < 0.5 if kind == "mixed" else kind == "two"
        prompts.append(sample_spec(rng, two_objects=two).caption(rng))
    return prompts


# -- videos ------------------------------------------------------------------------------------

def moving_shape_video(caption_or_spec: str | SceneSpec, frames: int = 8, size: int = 64,
                       seed: int = 0) -> ShapeVideo:
    """One object moving in a straight line across the frame, e.g. 'a red circle moving to the right'."""
    if isinstance(caption_or_spec, str):
        spec, key = parse_caption(caption_or_spec), _text_key(caption_or_spec)
    else:
        spec, key = caption_or_spec, _text_key(caption_or_spec.caption())
    if len(spec.objects) != 1 or spec.motion is None:
        raise ValueError(f"a video caption names one object and its motion, e.g. 'a red circle moving "
                         f"to the right'; not {spec.caption()!r}")
    caption = caption_or_spec if isinstance(caption_or_spec, str) else None
    return _realise_video(spec, _rng(seed, key, _VIDEO), frames, size, caption)


def _realise_video(spec: SceneSpec, rng: np.random.Generator, frames: int, size: int,
                   caption: str | None = None) -> ShapeVideo:
    if frames < 2:
        raise ValueError(f"a video needs at least 2 frames, not {frames}")
    scene = realise(spec, rng, caption)
    obj = scene.objects[0]
    lo, hi = _bounds(obj.extent)
    start, end = rng.uniform(lo, lo + 0.05), rng.uniform(hi - 0.05, hi)
    if spec.motion in ("left", "up"):
        start, end = 1 - start, 1 - end
    along = np.linspace(start, end, frames)
    across = obj.cy if spec.motion in ("right", "left") else obj.cx
    centres = np.stack([along, np.full(frames, across)], axis=1)
    if spec.motion in ("up", "down"):
        centres = centres[:, ::-1].copy()
    video = np.stack([render_scene(dataclasses.replace(scene, objects=(dataclasses.replace(obj, cx=cx, cy=cy),)), size)
                      for cx, cy in centres])
    return ShapeVideo(video, scene.caption, centres)


# -- writing samples ---------------------------------------------------------------------------

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
