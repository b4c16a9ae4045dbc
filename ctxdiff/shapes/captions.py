"""The words of the shapes world: its vocabulary, what a caption states (`SceneSpec`), how a caption
is written from it and read back (`parse_caption`: every caption the templates write, and prompts a
person writes in the same words).

Every scene holds one or two objects (a circle, square, triangle or cross; small or large; one of
nine colours) on a white, black or gray background. Its caption states the colours and shapes,
and some of: sizes, the position of a single object, the relation between two objects, the
background; a video's caption, its object's motion.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

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
SIZES: dict[str, float] = {"small": 0.24, "large": 0.42}   # extent, as a fraction of the image side
POSITIONS = ("left", "right", "top", "bottom", "centre")
RELATIONS = ("above", "below", "left of", "right of")
MOTIONS = ("right", "left", "up", "down")


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


def vocabulary() -> frozenset[str]:
    """Every word the world's captions use or `parse_caption` reads (colours, shapes, sizes, the
    words of positions, relations, motions and backgrounds, articles, synonyms)."""
    words = set(OBJECT_COLOURS) | set(BACKGROUND_COLOURS) | set(SHAPES) | set(SIZES) | set(_ARTICLES) | {"and"}
    words |= set(_SYNONYMS) | {w for phrase, _ in _PHRASES for w in phrase}
    words |= {w for template in _BACKGROUND_WORDS for w in template.replace("{}", "").split()} | {"against"}
    return frozenset(words)


def unknown_words(text: str) -> list[str]:
    """The words of `text` the shapes world has no meaning for, in order, each once."""
    known = vocabulary()
    words = re.sub(r"[^a-z ]", " ", text.lower().replace("-", " ")).split()
    return list(dict.fromkeys(w for w in words if w not in known))
