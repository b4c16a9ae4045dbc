"""The shapes world: a deterministic world of captioned scenes and moving-shape videos.

`ShapesWorld.scene(index)` depends only on (seed, index); scenes are drawn to satisfy what their
caption states (`realise`), the rest at random; `counterfactual` changes one stated attribute (the
hard negatives of contrastive CLIP training); `held_out_prompts` draws captions from a stream the
training world never uses. Coordinates as in `ctxdiff.shapes.render`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np

from ctxdiff.shapes.captions import (BACKGROUND_COLOURS, MOTIONS, OBJECT_COLOURS, POSITIONS, RELATIONS, SHAPES,
                                     SIZES, ObjectSpec, SceneSpec, parse_caption)
from ctxdiff.shapes.render import render_scene

MARGIN = 0.03          # empty border around every object
GAP = 0.06             # at least this much space between two objects along their relation's axis
SIDE_BAND = 0.29       # a positioned object's centre lies within this of its edge ...
CROSS_BAND = (0.4, 0.6)  # ... and inside this band across it
CENTRE_BAND = (0.45, 0.55)
MAX_OFFSET = 0.15      # how far two related objects may sit apart across their relation's axis


# Probabilities with which a sampled caption states an attribute.
P_SIZE, P_POSITION, P_BACKGROUND, P_RELATION = 0.5, 0.6, 0.4, 0.85

# Salts keep the random streams of scenes, held-out prompts and videos apart.
_SCENE, _PROMPTS, _VIDEO, _FROM_CAPTION, _TWIN = 0, 1, 2, 3, 4


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
