"""Class labels and layouts as values: a layout's objects (label + box in [0, 1]), the inline
and JSON forms users write, their checks, and label look-up with close matches (the data layer,
so data loaders, models and pipelines all share them)."""

from __future__ import annotations

import difflib
import json
import math
from pathlib import Path
from typing import NamedTuple, Sequence, Union

from ctxdiff.errors import UsageError


class LayoutObject(NamedTuple):
    """One object of a layout: its label and its box (x0, y0, x1, y1), normalised to [0, 1]
    (x to the right, y downwards, as `ctxdiff.shapes.render`)."""

    label: str
    box: tuple[float, float, float, float]


Layout = tuple[LayoutObject, ...]
Condition = Union[str, Layout, None]   # a class label, a layout, or None (dropped: the null condition)


def resolve_label(label: str, labels: Sequence[str]) -> int:
    """The index of `label` in the vocabulary (case and spacing forgiven); a UsageError naming the
    closest known labels otherwise."""
    wanted = " ".join(str(label).lower().split())
    folded = [" ".join(known.lower().split()) for known in labels]
    if wanted in folded:
        return folded.index(wanted)
    close = difflib.get_close_matches(wanted, folded, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(repr(labels[folded.index(c)]) for c in close)}? " if close else ""
    shown = ", ".join(repr(known) for known in labels[:12]) + (f" and {len(labels) - 12} more" if len(labels) > 12
                                                                 else "")
    raise UsageError(f"unknown label {label!r}; {hint}this model knows {shown}")


def check_box(box: Sequence[float], where: str = "box") -> tuple[float, float, float, float]:
    """A box (x0, y0, x1, y1) with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, else a UsageError."""
    try:
        values = tuple(float(v) for v in box)
    except (TypeError, ValueError):
        raise UsageError(f"{where}: a box is four numbers x0,y0,x1,y1 in [0, 1], got {box!r}") from None
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise UsageError(f"{where}: a box is four numbers x0,y0,x1,y1 in [0, 1], got {box!r}")
    x0, y0, x1, y1 = values
    if min(values) < 0 or max(values) > 1:
        raise UsageError(f"{where}: box {list(values)} lies outside [0, 1]; boxes are fractions of the image side")
    if not (x0 < x1 and y0 < y1):
        raise UsageError(f"{where}: box {list(values)} is empty; it needs x0 < x1 and y0 < y1")
    return values


def make_layout(objects: Sequence) -> Layout:
    """A layout from (label, box) pairs or {"label": ..., "box": [...]} mappings, boxes checked."""
    layout = []
    for i, item in enumerate(objects):
        if isinstance(item, dict):
            if set(item) - {"label", "box"} or "label" not in item or "box" not in item:
                raise UsageError(f"layout object {i + 1}: needs exactly 'label' and 'box' keys, got {sorted(item)}")
            label, box = item["label"], item["box"]
        else:
            label, box = item
        if not isinstance(label, str) or not label.strip():
            raise UsageError(f"layout object {i + 1}: the label must be a non-empty string, got {label!r}")
        layout.append(LayoutObject(" ".join(label.split()), check_box(box, f"layout object {i + 1} ({label})")))
    return tuple(layout)


def parse_layout(text: str) -> Layout:
    """The inline layout 'red circle@0.1,0.1,0.4,0.4;blue square@0.5,0.5,0.9,0.9'."""
    objects = []
    for i, part in enumerate(p for p in text.split(";") if p.strip()):
        label, at, box = part.rpartition("@")
        if not at:
            raise UsageError(f"layout object {i + 1} {part.strip()!r}: write it as label@x0,y0,x1,y1, "
                             "e.g. 'red circle@0.1,0.1,0.4,0.4'")
        objects.append((label, box.split(",")))
    if not objects:
        raise UsageError("the layout is empty; give objects as 'label@x0,y0,x1,y1;label@...'")
    return make_layout(objects)


def read_layout(path: str | Path) -> Layout:
    """A layout file: a JSON list of {"label": ..., "box": [x0, y0, x1, y1]}."""
    layouts = read_layouts(path)
    if len(layouts) != 1:
        raise UsageError(f"{path}: holds {len(layouts)} layouts; one is wanted here")
    return layouts[0]


def read_layouts(path: str | Path) -> list[Layout]:
    """A file of one layout (a JSON list of {"label": ..., "box": [...]}) or of many (a JSON list
    of such lists, one per image)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UsageError(f"{path}: cannot read the layout file ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: not a JSON layout ({e}); write a list of "
                         '{"label": "red circle", "box": [0.1, 0.1, 0.4, 0.4]}') from None
    if not isinstance(data, list) or not data:
        raise UsageError(f"{path}: a layout file is a non-empty JSON list of {{\"label\": ..., \"box\": [...]}} "
                         "(or a list of such lists)")
    many = all(isinstance(item, list) for item in data)
    try:
        return [make_layout(item) for item in data] if many else [make_layout(data)]
    except UsageError as e:
        raise UsageError(f"{path}: {e}") from None


def layout_argument(value: str) -> Layout:
    """--layout's value: a layout file (it exists, or ends in .json) or the inline form."""
    if value.strip().lower().endswith(".json") or Path(value).is_file():
        return read_layout(value)
    return parse_layout(value)


def format_layout(layout: Layout) -> str:
    """The inline form of a layout ('red circle@0.1,0.1,0.4,0.4;...'), which `parse_layout` reads back."""
    return ";".join(f"{o.label}@{','.join(f'{v:g}' for v in o.box)}" for o in layout)


def describe(condition: Condition) -> str | list | None:
    """A JSON-ready form of a condition (PNG metadata, previews): the label, or a list of
    {"label", "box"} objects."""
    if condition is None or isinstance(condition, str):
        return condition
    return [{"label": o.label, "box": [round(v, 4) for v in o.box]} for o in condition]


def from_description(value) -> Condition:
    """The condition `describe` wrote (a PNG's metadata): a label string or a layout."""
    return value if value is None or isinstance(value, str) else make_layout(value)


def conditions_for_images(paths: Sequence[Path], layouts_file: str | Path | None = None) -> list[Condition] | None:
    """One class label or layout per image: entry i of `layouts_file` (`read_layouts`) for image i
    (sorted order), else the condition each PNG's metadata records (`ctxdiff generate --class/--layout`);
    None when the images carry prompts instead."""
    from ctxdiff.data.png import read_png_metadata
    from ctxdiff.errors import CtxdiffError

    if layouts_file is not None:
        layouts = read_layouts(layouts_file)
        if len(layouts) != len(paths):
            raise CtxdiffError(f"{layouts_file}: {len(layouts)} layouts for {len(paths)} images; give one layout "
                               "per image, in sorted file-name order (a JSON list of layouts)")
        return list(layouts)
    recorded = [(read_png_metadata(p) if Path(p).suffix.lower() == ".png" else {}).get("condition") for p in paths]
    if all(r is None for r in recorded):
        return None
    missing = [p for p, r in zip(paths, recorded) if r is None]
    if missing:
        raise CtxdiffError(f"{missing[0]}: no class or layout in its metadata, unlike the other images; "
                           "pass --layouts FILE (one layout per image) or judge the folders apart")
    return [from_description(r["value"]) for r in recorded]
