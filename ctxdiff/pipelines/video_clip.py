"""A source clip as the video commands take it: every frame by default (`frames`/`stride`/`start`
take part of it), kept at its own size and rate, letterboxed onto the model's square input and
brought back to its width x height (never a silent centre crop; `crop` asks for one), with the span
of its audio for an mp4 output (data/video.py: `FrameFit`, `read_audio`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ctxdiff.data.images import IMAGE_SUFFIXES, read_image
from ctxdiff.data.video import FRAME_FOLDER_FPS, FrameBudget, FrameFit, Video, available_memory, read_video


@dataclass
class SourceClip:
    """`video`: the chosen frames at the source's size, at the source's fps / stride; `fit`: how they
    meet the model's square side."""

    video: Video
    fit: FrameFit
    _model: Video | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.video)

    @property
    def fps(self) -> float:
        return self.video.fps

    @property
    def model_video(self) -> Video:
        """The frames the model reads: [F, side, side, 3], same rate and source."""
        if self._model is None:
            v = self.video
            self._model = Video(self.fit.to_model(v.frames), v.fps, v.source, v.start_s, v.duration_s)
        return self._model

    def to_source(self, frames: np.ndarray, detail: bool = True) -> np.ndarray:
        """Model frames [F, side, side, 3] back at the output size (the source's, or the crop's);
        `detail`: the model's change added to the source frames, so unchanged pixels keep their resolution."""
        return self.fit.to_source(frames, self.video.frames if detail else None)

    def region_to_source(self, region: np.ndarray | None) -> np.ndarray | None:
        """A bool mask [F, side, side] at the model's size (the blend mask) at the output size."""
        if region is None:
            return None
        grey = np.repeat(np.asarray(region, dtype=np.uint8)[..., None] * np.uint8(255), 3, axis=-1)
        return self.fit.to_source(grey)[..., 0] > 127

    def source_frames(self) -> np.ndarray:
        """The source frames the output is compared with (the crop's square with `crop`)."""
        return self.fit.to_source(self.model_video.frames, self.video.frames) if self.fit.crop else self.video.frames


def read_clip(path: str | Path, side: int, frames: int | None = None, stride: int = 1, start: int = 0,
              crop: bool = False, max_bytes: int | None = None) -> SourceClip:
    """A video file, folder of frames, or one image (a one-frame clip) for a model of side `side`:
    every frame from `start` every `stride` (`frames` of them, or all), at the source's size."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        image = read_image(path)
        FrameBudget(path, max_bytes if max_bytes is not None else available_memory() // 2).add(image)
        video = Video(image[None], FRAME_FOLDER_FPS, path)
    else:
        video = read_video(path, num_frames=frames, start=start, stride=stride, max_bytes=max_bytes)
    height, width = video.frames.shape[1:3]
    return SourceClip(video, FrameFit(height, width, side, crop))


def read_source(path: str | Path, frames: int | None = None, stride: int = 1, start: int = 0,
                size: int | None = None, crop: bool = False) -> Video:
    """The clip's frames as `read_clip` takes them, at the model's side `size` (letterboxed; `crop`:
    the centred square), or at their own size when `size` is None."""
    if size is None:
        return read_clip(path, 1, frames, stride, start).video
    return read_clip(path, size, frames, stride, start, crop).model_video
