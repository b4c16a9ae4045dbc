"""A base model named by path and content: what tuned files and inversions record of the model they
were made with, so that using them with another model is refused."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ctxdiff.errors import CtxdiffError


@dataclass(frozen=True)
class ModelRef:
    """A model file (or diffusers folder) by path and content (SHA-256 of its bytes)."""

    path: str
    sha256: str

    @classmethod
    def of(cls, path: str | Path) -> "ModelRef":
        """A file, or a diffusers folder by the files of its model parts (hidden entries skipped;
        symlinked files, as in the Hugging Face cache, are read through their links)."""
        path = Path(path)
        if not path.exists():
            raise CtxdiffError(f"{path}: no such model file or folder")
        if path.is_dir():
            files = sorted(f for f in path.rglob("*") if f.is_file() and f.relative_to(path).parts[0] in
                           DIFFUSERS_PARTS and not any(part.startswith(".") for part in f.relative_to(path).parts))
            names = tuple(str(f.relative_to(path)) for f in files)
        else:
            files, names = [path], (path.name,)
        stamps = tuple((name, str(f.resolve()), f.stat().st_mtime_ns, f.stat().st_size) for name, f in zip(names, files))
        return cls(str(path.absolute()), _sha256(stamps))

    def locate(self, beside: str | Path | None = None) -> Path | None:
        """Where the model is now: its recorded (absolute) path, else a file or folder of the same
        name next to `beside` (a tuned file or inversion moved together with it) with the same
        content; None when neither is there."""
        recorded = Path(self.path)
        if recorded.exists():
            return recorded
        if beside is not None:
            near = Path(beside).absolute().parent / recorded.name
            if near.exists() and ModelRef.of(near).sha256 == self.sha256:
                return near
        return None


DIFFUSERS_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "model_index.json")


@lru_cache(maxsize=16)
def _sha256(stamps: tuple[tuple[str, str, int, int], ...]) -> str:
    """SHA-256 of the files' bytes (and, for a folder, their names in it); cached per mtime and size."""
    digest = hashlib.sha256()
    for name, resolved, _, _ in stamps:
        if len(stamps) > 1:
            digest.update(name.encode() + b"\0")
        with open(resolved, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
