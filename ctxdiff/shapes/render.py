"""Drawing scenes of the shapes world: exact, anti-aliased coverage of each shape.

Coordinates are normalised: x to the right, y downwards, both in [0, 1]; an object's (cx, cy)
is the centre of its bounding box and its extent is the side of that (square) box.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ctxdiff.shapes.captions import BACKGROUND_COLOURS, OBJECT_COLOURS, SHAPES

if TYPE_CHECKING:
    from ctxdiff.shapes.world import Scene

SHAPE_FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "cross": 5 / 9}    # area / extent^2
SHAPE_CENTROID_DROP = {"circle": 0.0, "square": 0.0, "triangle": 1 / 6, "cross": 0.0}  # (centroid - cy) / extent
SUPERSAMPLE = 4        # coverage samples per pixel side


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
