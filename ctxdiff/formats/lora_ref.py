"""The LoRAs merged into a Stable Diffusion base, as tuned files and inversions record them (file by
path and content, and the weight it was merged with), so that using them over other LoRAs is refused:
a tuned file's tensors and an inversion's trajectory belong to the merged weights."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from ctxdiff.errors import CtxdiffError
from ctxdiff.formats.model_ref import ModelRef


@dataclass(frozen=True)
class LoraRef:
    """One merged LoRA: its file (path and SHA-256 of its bytes, as `ModelRef`) and its weight."""

    path: str
    sha256: str
    weight: float

    @classmethod
    def of(cls, path: str | Path, weight: float) -> "LoraRef":
        ref = ModelRef.of(path)
        return cls(ref.path, ref.sha256, float(weight))

    @property
    def spec(self) -> str:
        """The `--lora FILE:WEIGHT` that merges it again."""
        return f"{self.path}:{self.weight:g}"


def lora_records(loras: tuple[LoraRef, ...]) -> list[dict]:
    """What a file's metadata holds of its LoRAs (`read_lora_records` reads it back)."""
    return [asdict(lora) for lora in loras]


def read_lora_records(records: list[dict] | None) -> tuple[LoraRef, ...]:
    """The LoRAs of a file's metadata (none in files written before LoRAs were recorded)."""
    return tuple(LoraRef(**record) for record in records or [])


def check_loras(name: str, recorded: tuple[LoraRef, ...], now: tuple[LoraRef, ...], made: str, redo: str) -> None:
    """Refuse the file `name`, `made` ("tuned") with the LoRAs `recorded`, over other LoRAs than `now`: the
    same files by content, each with the same weight, are the same in any order (merging adds them up).
    `redo` ("tune") is what makes a new file."""
    if sorted((r.sha256, r.weight) for r in recorded) == sorted((r.sha256, r.weight) for r in now):
        return
    then = " ".join(f"--lora {r.spec}" for r in recorded)
    raise CtxdiffError(f"{name}: {made} with {_listing(recorded)}, not with {_listing(now)}; "
                       f"{'pass ' + then if then else 'drop --lora'}, or {redo} again")


def _listing(loras: tuple[LoraRef, ...]) -> str:
    if not loras:
        return "no LoRA"
    return "the LoRA" + ("s " if len(loras) > 1 else " ") + ", ".join(
        f"{Path(r.path).name} x{r.weight:g}" for r in loras)
