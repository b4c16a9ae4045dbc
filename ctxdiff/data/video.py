"""Video I/O with PyAV: read mp4/webm/gif/mov files or folders of frames, write mp4/webm/gif/folders.

Frames are uint8 [F, H, W, 3] RGB throughout. Every written video gets a sidecar `<path>.json`
holding its fps, size and the caller's metadata (prompts, seed, parameters).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator, Literal

import numpy as np
from PIL import Image

from ctxdiff.checkpoints import atomic_write
from ctxdiff.data.images import fit_image, list_images, read_images
from ctxdiff.errors import CtxdiffError, UsageError

FRAME_FOLDER_FPS = 8.0  # a folder of frames carries no rate; Tune-A-Video writes its GIFs at 8 fps
WRITABLE = (".mp4", ".webm", ".gif", "a folder (a path without suffix)")


@dataclass
class Video:
    """frames: uint8 [F, H, W, 3] RGB; fps: the rate of these frames (source fps / stride); `start_s`,
    `duration_s`: the span of the source they cover, in seconds (for its audio)."""

    frames: np.ndarray
    fps: float
    source: Path
    start_s: float = 0.0
    duration_s: float | None = None

    def __len__(self) -> int:
        return self.frames.shape[0]


@dataclass(frozen=True)
class FrameFit:
    """How frames of `height` x `width` become the model's `side` x `side` input and come back.

    Letterbox (the default): scaled to fit, the bars filled by repeating the edge pixels (no hard
    border for the model to draw), and cut away again on the way back, so nothing of the frame is lost.
    `crop`: the centred square of side min(height, width) only, and the output is that square.
    On the way back frames are resized to the output size; with `detail` the model's *change* is
    resized and added to the source frames instead (`to_source`), so what an edit leaves alone keeps
    the source's full resolution and a reconstruction is the source itself."""

    height: int
    width: int
    side: int
    crop: bool = False

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of the frames `to_source` returns."""
        s = min(self.height, self.width)
        return (s, s) if self.crop else (self.height, self.width)

    def _box(self) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the picture inside the model's square (letterbox)."""
        scale = self.side / max(self.height, self.width)
        h, w = max(1, round(self.height * scale)), max(1, round(self.width * scale))
        return (self.side - h) // 2, (self.side - w) // 2, h, w

    def _region(self, frames: np.ndarray) -> np.ndarray:
        """The part of source frames the output shows (all of it, or the centred square)."""
        if not self.crop:
            return frames
        s = min(self.height, self.width)
        top, left = (self.height - s) // 2, (self.width - s) // 2
        return frames[:, top:top + s, left:left + s]

    def to_model(self, frames: np.ndarray) -> np.ndarray:
        """Source frames [F, height, width, 3] -> the model's [F, side, side, 3]."""
        region = self._region(frames)
        if self.crop:
            return np.stack([_resize(f, self.side, self.side) for f in region])
        top, left, h, w = self._box()
        pad = ((top, self.side - h - top), (left, self.side - w - left), (0, 0))
        return np.stack([np.pad(_resize(f, h, w), pad, mode="edge") for f in region])

    def to_source(self, frames: np.ndarray, source: np.ndarray | None = None) -> np.ndarray:
        """The model's frames [F, side, side, 3] -> [F, *output_size, 3]; with the `source` frames
        (detail): source + resize(frames - to_model(source)), clipped to 0..255."""
        out_h, out_w = self.output_size
        if self.crop:
            inner = frames
        else:
            top, left, h, w = self._box()
            inner = frames[:, top:top + h, left:left + w]
        if source is None:
            return np.stack([_resize(f, out_h, out_w) for f in inner])
        seen = self.to_model(source)
        if not self.crop:
            seen = seen[:, top:top + h, left:left + w]
        change = inner.astype(np.float32) - seen.astype(np.float32)
        grown = np.stack([np.stack([_resize_float(c[..., k], out_h, out_w) for k in range(3)], -1) for c in change])
        return np.clip(np.rint(self._region(source).astype(np.float32) + grown), 0, 255).astype(np.uint8)


def _resize(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    if frame.shape[:2] == (height, width):
        return frame
    return np.asarray(Image.fromarray(frame).resize((width, height), Image.Resampling.BICUBIC))


def _resize_float(channel: np.ndarray, height: int, width: int) -> np.ndarray:
    if channel.shape == (height, width):
        return channel
    return np.asarray(Image.fromarray(channel.astype(np.float32), mode="F").resize((width, height),
                                                                                   Image.Resampling.BICUBIC))


def read_video(path: str | Path, num_frames: int | None = None, start: int = 0, stride: int = 1,
               size: int | tuple[int, int] | None = None,
               resize_mode: Literal["crop", "pad"] = "crop", max_bytes: int | None = None) -> Video:
    """Read frames start, start + stride, ... (`num_frames` of them, or all to the end).

    `size`: an int (a square) or (height, width); the aspect ratio is kept by a centre crop
    ("crop") or by black bars ("pad"). A folder of frames reads its images in sorted order, at
    the fps of its sidecar `<folder>.json` when there is one, else FRAME_FOLDER_FPS. The decoded
    frames may take at most `max_bytes` (default: half the memory available now); a longer clip is
    an error that says how to take part of it.
    """
    if start < 0 or stride < 1 or (num_frames is not None and num_frames < 1):
        raise UsageError(f"cannot take {num_frames} frames from frame {start} every {stride}; "
                         "use start >= 0, stride >= 1 and num_frames >= 1")
    if resize_mode not in ("crop", "pad"):
        raise UsageError(f"resize mode {resize_mode!r} is not one of: crop, pad")
    path = Path(path)
    target = (size, size) if isinstance(size, int) else size
    budget = FrameBudget(path, max_bytes if max_bytes is not None else available_memory() // 2)
    if path.is_dir():
        frames, total, source_fps = _read_frame_folder(path, start, stride, num_frames)
        budget.add(*frames)
    elif path.is_file():
        frames, total, source_fps = _decode_file(path, start, stride, num_frames, budget)
    else:
        raise CtxdiffError(f"{path}: no such video file or folder of frames")
    if not frames:
        if total == 0:
            raise CtxdiffError(f"{path}: the video has no frames; pass another video")
        raise CtxdiffError(f"{path}: the video has {total} frames; start {start} is past the end")
    if num_frames is not None and len(frames) < num_frames:
        needed = start + (num_frames - 1) * stride + 1
        raise CtxdiffError(f"{path}: the video has {total} frames; {num_frames} frames from frame {start} "
                           f"every {stride} need {needed}; ask for fewer frames or a smaller stride")
    if target is not None:
        frames = [fit_image(f, target, resize_mode) for f in frames]
    return Video(np.stack(frames), source_fps / stride, path, start / source_fps, len(frames) * stride / source_fps)


def available_memory() -> int:
    """Bytes of memory available now (MemAvailable; 8 GiB where /proc/meminfo cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


class FrameBudget:
    """Counts decoded bytes and refuses past `limit` with a message naming --frames and --stride."""

    def __init__(self, path: Path, limit: int):
        self.path, self.limit, self.used, self.count = path, limit, 0, 0

    def add(self, *frames: np.ndarray) -> None:
        for frame in frames:
            self.used += frame.nbytes
            self.count += 1
            if self.used > self.limit:
                h, w = frame.shape[:2]
                raise CtxdiffError(f"{self.path}: more than {self.count - 1} frames of {w}x{h} do not fit the "
                                   f"{self.limit / 2**30:.1f} GiB this clip may use; take part of it with --frames "
                                   "(and --start/--stride)")


def write_video(path: str | Path, frames: np.ndarray, fps: float, metadata: dict | None = None,
                audio_of: Video | None = None) -> Path:
    """Write uint8 [F, H, W, 3] frames; the format comes from the suffix (.mp4: H.264 yuv420p,
    .webm: VP9, .gif, no suffix: a folder of PNG frames). The video is written to a temporary
    name and moved into place; the sidecar `<path>.json` holds fps, size and `metadata`, and
    "audio": whether the sound of `audio_of` (a video read from a file: its span of the source's
    audio track, re-encoded as AAC) went into an mp4."""
    path = Path(path)
    frames = _check_frames(frames)
    if fps <= 0:
        raise UsageError(f"{path}: fps must be positive, not {fps}")
    suffix = "" if path.is_dir() else path.suffix.lower()
    writers = {".mp4": _write_mp4, ".webm": _write_webm, ".gif": _write_gif, "": _write_folder}
    if suffix not in writers:
        raise CtxdiffError(f"{path}: cannot write '{suffix}' videos; write one of: {', '.join(WRITABLE)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    sound = read_audio(audio_of) if audio_of is not None and suffix == ".mp4" else None
    if suffix == ".mp4":
        _write_mp4(path, frames, fps, sound)
    else:
        writers[suffix](path, frames, fps)
    count, height, width = frames.shape[:3]
    record = {"fps": fps, "frames": count, "width": width, "height": height, "audio": sound is not None,
              **(metadata or {})}
    write_json_atomic(sidecar_path(path), record)
    return path


@dataclass
class Audio:
    """Planar float samples [channels, n] at `rate` Hz in channel `layout` (e.g. "stereo")."""

    samples: np.ndarray
    rate: int
    layout: str


def read_audio(video: Video) -> Audio | None:
    """The audio of `video`'s span of its source file (None: no file, no audio track, or no sound in the span)."""
    import av

    path = Path(video.source)
    if not path.is_file() or video.duration_s is None:
        return None
    chunks = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                return None
            stream = container.streams.audio[0]
            rate, layout = stream.rate, stream.layout.name
            resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
            first = None
            for frame in container.decode(stream):
                if first is None:
                    first = float(frame.pts * frame.time_base) if frame.pts is not None else 0.0
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray())
    except av.FFmpegError:
        return None
    if not chunks:
        return None
    samples = np.concatenate(chunks, axis=1)
    begin = max(0, round((video.start_s - (first or 0.0)) * rate))
    samples = samples[:, begin:begin + round(video.duration_s * rate)]
    return Audio(np.ascontiguousarray(samples, dtype=np.float32), rate, layout) if samples.shape[1] else None


def _audio_frames(audio: Audio, frame_size: int = 1024) -> Iterator:
    import av

    for pts in range(0, audio.samples.shape[1], frame_size):
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio.samples[:, pts:pts + frame_size]),
                                           format="fltp", layout=audio.layout)
        frame.sample_rate, frame.pts = audio.rate, pts
        yield frame


def sidecar_path(path: str | Path) -> Path:
    """`video.mp4` -> `video.mp4.json`; a folder `frames/` -> `frames.json`."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def read_sidecar(path: str | Path) -> dict:
    """The record of a video's sidecar `<path>.json` (see `write_video`); {} when there is none."""
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        return {}
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CtxdiffError(f"{sidecar}: not valid JSON ({exc}); fix or remove it") from None
    return record if isinstance(record, dict) else {}


def video_prompt(path: str | Path) -> str | None:
    """The "prompt" recorded in a video's sidecar `<path>.json` (see `write_video`), if any."""
    prompt = read_sidecar(path).get("prompt")
    return prompt if isinstance(prompt, str) and prompt else None


def side_by_side(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Frames of `a` and `b` next to each other ([F, H, Wa + Wb', 3]); `b` is scaled to a's height."""
    a, b = _check_frames(a), _check_frames(b)
    if len(a) != len(b):
        raise CtxdiffError(f"cannot put {len(a)} frames next to {len(b)}; pass videos of equal length")
    height = a.shape[1]
    if b.shape[1] != height:
        width = max(1, round(b.shape[2] * height / b.shape[1]))
        b = np.stack([fit_image(f, (height, width)) for f in b])
    return np.concatenate([a, b], axis=2)


def write_json_atomic(path: str | Path, record: dict) -> Path:
    """Write `record` as indented JSON through a temporary file renamed onto `path`."""
    path = Path(path)
    text = json.dumps(record, indent=2, default=str) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


# -- reading -----------------------------------------------------------------------------------

def _wanted(index: int, start: int, stride: int) -> bool:
    return index >= start and (index - start) % stride == 0


def _read_frame_folder(folder: Path, start: int, stride: int, num_frames: int | None):
    files = list_images(folder)
    chosen = files[start::stride][:num_frames]
    frames = read_images(chosen, same_size=True) if chosen else []
    fps = FRAME_FOLDER_FPS
    sidecar = sidecar_path(folder)
    if sidecar.is_file():
        try:
            fps = float(json.loads(sidecar.read_text(encoding="utf-8")).get("fps", fps))
        except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
            raise CtxdiffError(f"{sidecar}: not a video sidecar with a numeric 'fps'; fix or remove it") from None
    return frames, len(files), fps


def _decode_file(path: Path, start: int, stride: int, num_frames: int | None, budget: "FrameBudget"):
    import av

    frames: list[np.ndarray] = []
    total = 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise CtxdiffError(f"{path}: no video stream in this file; pass a video")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = stream.average_rate or stream.guessed_rate
            for frame in container.decode(stream):
                if _wanted(total, start, stride):
                    frames.append(frame.to_ndarray(format="rgb24"))
                    budget.add(frames[-1])
                total += 1
                if num_frames is not None and len(frames) == num_frames:
                    break
    except av.FFmpegError as exc:
        raise CtxdiffError(f"{path}: cannot decode this video ({exc.strerror or type(exc).__name__}); "
                           "check that it is a complete mp4/webm/gif/mov file") from None
    if rate is None:
        raise CtxdiffError(f"{path}: the video stream has no frame rate; re-encode it with one")
    return frames, total, float(rate)


# -- writing -----------------------------------------------------------------------------------

def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise UsageError(f"frames must be a non-empty uint8 array [F, H, W, 3], "
                         f"not {frames.dtype} {list(frames.shape)}")
    return frames


def _even(frames: np.ndarray) -> np.ndarray:
    """yuv420p needs even sizes: repeat the last row/column where a size is odd."""
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    return np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge") if pad_h or pad_w else frames


def _encode(path: Path, container_format: str, codec: str, pix_fmt: str, fps: float,
            frames: Iterable, options: dict[str, str], size: tuple[int, int], audio: Audio | None = None) -> None:
    import av

    def write(tmp: Path) -> None:
        with av.open(str(tmp), mode="w", format=container_format) as container:
            stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
            stream.height, stream.width = size
            stream.pix_fmt = pix_fmt
            stream.options = options
            if audio is not None:
                sound = container.add_stream("aac", rate=audio.rate)
                sound.layout = audio.layout
                for frame in _audio_frames(audio):
                    container.mux(sound.encode(frame))
                container.mux(sound.encode())
            for frame in frames:
                container.mux(stream.encode(frame))
            container.mux(stream.encode())

    atomic_write(path, write)


def _rgb_frames(frames: np.ndarray) -> Iterator:
    import av

    return (av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24") for f in frames)


def _write_mp4(path: Path, frames: np.ndarray, fps: float, audio: Audio | None = None) -> None:
    frames = _even(frames)
    _encode(path, "mp4", "libx264", "yuv420p", fps, _rgb_frames(frames), {"crf": "18"}, frames.shape[1:3], audio)


def _write_webm(path: Path, frames: np.ndarray, fps: float) -> None:
    import av

    try:
        av.Codec("libvpx-vp9", "w")
    except av.FFmpegError:
        raise CtxdiffError(f"{path}: this PyAV build has no VP9 encoder (libvpx-vp9); "
                           "write .mp4 or .gif instead") from None
    frames = _even(frames)
    _encode(path, "webm", "libvpx-vp9", "yuv420p", fps, _rgb_frames(frames),
            {"crf": "30", "b": "0", "row-mt": "1"}, frames.shape[1:3])


def _palette_frames(frames: np.ndarray) -> Iterator:
    """GIF frames: each quantised to its own 256-colour palette (PIL), handed to FFmpeg as pal8.
    (PIL's own GIF writer merges identical frames, which would change the frame count.)"""
    import av

    for frame in frames:
        indexed = Image.fromarray(frame).quantize(256)
        rgb = np.zeros((256, 3), dtype=np.uint8)
        palette = np.asarray(indexed.getpalette(), dtype=np.uint8).reshape(-1, 3)[:256]
        rgb[:len(palette)] = palette
        argb = np.concatenate([np.full((256, 1), 255, np.uint8), rgb], axis=1)
        yield av.VideoFrame.from_ndarray((np.asarray(indexed), argb), format="pal8")


def _write_gif(path: Path, frames: np.ndarray, fps: float) -> None:
    _encode(path, "gif", "gif", "pal8", fps, _palette_frames(frames), {}, frames.shape[1:3])


def _write_folder(path: Path, frames: np.ndarray, fps: float) -> None:
    """PNG frames 00000.png, ... written into a temporary folder that then replaces `path`."""
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        for i, frame in enumerate(frames):
            Image.fromarray(frame).save(staging / f"{i:05d}.png")
        if path.exists():
            old = path.with_name(f".{path.name}.{os.getpid()}.old")
            path.rename(old)
            staging.rename(path)
            shutil.rmtree(old)
        else:
            staging.rename(path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
