"""Folders of images, and the prompts that go with them (PNG text chunks, sidecars, a prompts file)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from ctxdiff.errors import CtxdiffError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})


def list_images(folder: str | Path, *, recursive: bool = False) -> list[Path]:
    """The image files of a folder, sorted by their path inside it; an error if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "is a file" if folder.exists() else "does not exist"
        raise CtxdiffError(f"{folder}: {what}; pass a folder of images")
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    files = sorted((p for p in candidates if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                   key=lambda p: p.relative_to(folder).as_posix())
    if not files:
        kinds = ", ".join(sorted(IMAGE_SUFFIXES))
        raise CtxdiffError(f"{folder}: no images in this folder ({kinds}); pass a folder that holds some")
    return files


def read_image(path: str | Path) -> np.ndarray:
    """One image as uint8 [H, W, 3] RGB (greyscale, palette and alpha images are converted)."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise CtxdiffError(f"{path}: no such image file") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise CtxdiffError(f"{path}: cannot read this image ({_first_line(exc)}); "
                           "replace or remove the file") from None


def read_images(paths: list[Path], *, same_size: bool = False) -> list[np.ndarray]:
    """Read images in order; with `same_size`, all must share the first image's size."""
    images = [read_image(p) for p in paths]
    if same_size:
        height, width = images[0].shape[:2]
        for path, image in zip(paths, images):
            if image.shape[:2] != (height, width):
                raise CtxdiffError(f"{path}: size {image.shape[1]}x{image.shape[0]} differs from "
                                   f"{paths[0].name}'s {width}x{height}; resize the images to one size")
    return images


class ImageFiles(Sequence):
    """uint8 [H, W, 3] images read when indexed (a slice reads only its files), so a large
    folder streams through a metric instead of sitting in memory."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [read_image(p) for p in self.paths[index]]
        return read_image(self.paths[index])


def fit_image(image: np.ndarray, size: tuple[int, int], mode: Literal["crop", "pad"] = "crop") -> np.ndarray:
    """Resize one uint8 [H, W, 3] image to (height, width), keeping its aspect ratio by a centre
    crop ("crop": scale to cover) or centred black bars ("pad": scale to fit)."""
    height, width = size
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    scale = max(height / h, width / w) if mode == "crop" else min(height / h, width / w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC))
    if mode == "crop":
        top, left = (new_h - height) // 2, (new_w - width) // 2
        return resized[top:top + height, left:left + width]
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    canvas[top:top + new_h, left:left + new_w] = resized
    return canvas


def check_readable(paths: list[Path]) -> None:
    """Open each file's header (cheap) so a non-image fails here, by name, not deep inside a loader."""
    for path in paths:
        try:
            with Image.open(path):
                pass
        except (UnidentifiedImageError, OSError) as exc:
            raise CtxdiffError(f"{path}: cannot read this image ({_first_line(exc)}); "
                               "replace or remove the file") from None


def embedded_prompt(path: Path) -> str | None:
    """An image's prompt: its PNG text chunk `prompt`, else a sidecar `<name>.txt` or `<name>.json`."""
    try:
        with Image.open(path) as image:
            prompt = getattr(image, "text", {}).get("prompt")
    except (UnidentifiedImageError, OSError):
        prompt = None
    if prompt:
        return prompt
    txt, sidecar = path.with_suffix(".txt"), path.with_suffix(".json")
    if txt.is_file():
        return read_text(txt, "caption file").strip() or None
    if sidecar.is_file():
        try:
            record = json.loads(read_text(sidecar, "sidecar"))
        except json.JSONDecodeError as exc:
            raise CtxdiffError(f"{sidecar}: not valid JSON ({exc}); fix it or pass --prompts FILE") from None
        value = record.get("prompt") if isinstance(record, dict) else None
        return value if isinstance(value, str) and value else None
    return None


def read_text(path: str | Path, what: str = "text file") -> str:
    """A text file's contents, UTF-8 (a byte-order mark is dropped); a file that is not UTF-8 or
    cannot be read is a CtxdiffError naming it and, for bad bytes, the line and column."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CtxdiffError(f"{path}: no such {what}") from None
    except OSError as exc:
        raise CtxdiffError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    return decode_text(data, str(path), what)


def decode_text(data: bytes, name: str, what: str) -> str:
    """UTF-8 text (a byte-order mark dropped), or a CtxdiffError naming `name` (a file, "stdin"),
    the line and the column of the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise CtxdiffError(f"{name}, line {line}, column {column}: the {what} is not UTF-8 text (byte "
                           f"0x{data[exc.start]:02x}); save it as UTF-8") from None


def read_prompt_lines(path: str | Path) -> list[str]:
    """A prompts file: one prompt a line; blank lines are skipped."""
    return [line.strip() for line in read_text(path, "prompts file").splitlines() if line.strip()]


NEGATIVE_MARK = " --negative "


def split_negative(line: str, default: str = "") -> tuple[str, str]:
    """(prompt, negative prompt) of a prompts-file line: `a cat in armor --negative blurry, low quality` gives its
    own negative prompt (the CLI's flag name), a line without one gets `default` (the --negative of the command)."""
    prompt, mark, negative = line.partition(NEGATIVE_MARK)
    if not mark and line.rstrip().endswith(NEGATIVE_MARK.rstrip()):
        prompt, mark = line.rstrip()[: -len(NEGATIVE_MARK.rstrip())], NEGATIVE_MARK
    return prompt.strip(), negative.strip() if mark else default


def prompts_for_images(paths: list[Path], prompts_file: str | Path | None = None) -> list[str]:
    """One prompt per image: line i of `prompts_file` for image i (sorted order), else each
    image's embedded prompt (PNG chunk or sidecar)."""
    if prompts_file is not None:
        prompts = read_prompt_lines(prompts_file)
        if len(prompts) != len(paths):
            raise CtxdiffError(f"{prompts_file}: {len(prompts)} prompts for {len(paths)} images; "
                               "give one prompt a line for each image, in sorted file-name order")
        return prompts
    prompts = []
    for path in paths:
        prompt = embedded_prompt(path)
        if prompt is None:
            raise CtxdiffError(f"{path}: no prompt (no PNG 'prompt' text chunk, no {path.stem}.txt or "
                               f"{path.stem}.json sidecar); pass --prompts FILE with one prompt a line")
        prompts.append(prompt)
    return prompts


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
