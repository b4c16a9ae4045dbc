"""Read Lightning .ckpt pickles that name data-only classes, without running any code they name.

A Stable Diffusion .ckpt written by PyTorch Lightning (the SD 1.4 release, many fine-tunes) keeps
training bookkeeping beside `state_dict`: its `callbacks` entry keys ModelCheckpoint's state by the
class itself (`pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`), and that state may
hold numpy scalars. `torch.load(weights_only=True)` refuses such a pickle, since those names are
not in its table. `load` reads it with the same weights-only unpickler, with the exact names in
`ALLOWED` bound to inert stand-ins; a pickle naming anything else is refused unread
(`ForbiddenGlobals`). This is the allow-list of AUTOMATIC1111's modules/safe.py, minus its
imports: nothing of Lightning or numpy is imported or called.

Why torch's weights-only unpickler plus stand-ins (`torch.serialization.safe_globals`), and not a
custom `pickle_module` whose Unpickler overrides `find_class` (A1111's route):
  - torch's unpickler re-implements a subset of the pickle opcodes and never imports by name: a
    GLOBAL resolves only through its table; REDUCE and NEWOBJ call, and BUILD sets state on, only
    objects in that table; persistent ids may only name storages; os/sys/posix/nt are blocked
    outright. A custom Unpickler keeps the C unpickler, every opcode included, so the whole defence
    is one `find_class`, and every object it lets through becomes callable with arguments the file
    chooses (A1111 hands out the real ModelCheckpoint class and numpy's `_reconstruct`).
  - the stand-ins are not the classes they are named after. Calling one records its arguments;
    BUILD stores the state in a slot. They have no `__dict__`, so a state cannot plant attributes
    (a `__setstate__` for a later BUILD, say).
  - tensors are rebuilt by torch's own code path, the same as for any weights-only file.
The one cost: `safe_globals` is process-wide while a file is read, so a weights-only load in
another thread during that window also accepts the stand-ins (inert, so harmless).

Names are checked twice: statically before unpickling (`unsafe_globals`, zip-format files: a
forbidden name is refused without reading the file's tensors), then by the unpickler itself (which
is the only check for legacy-format files).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

# Lightning's callback state, as checkpoints name it (pytorch_lightning 1.x; lightning 2.x's namespace).
_LIGHTNING = ("pytorch_lightning", "lightning.pytorch")
_CALLBACKS = ("callbacks.model_checkpoint.ModelCheckpoint", "callbacks.early_stopping.EarlyStopping",
              "callbacks.lr_monitor.LearningRateMonitor",
              "callbacks.model_checkpoint")  # the module itself, as some files name it (A1111 allows it)
_ATTRIBUTE_DICTS = ("pytorch_lightning.utilities.parsing.AttributeDict",  # saved hyper-parameters
                    "lightning_fabric.utilities.data.AttributeDict", "lightning.fabric.utilities.data.AttributeDict")
# numpy scalars and arrays in callback state (numpy 1.x writes numpy.core, 2.x numpy._core).
_NUMPY = ("numpy.core.multiarray.scalar", "numpy.core.multiarray._reconstruct", "numpy._core.multiarray.scalar",
          "numpy._core.multiarray._reconstruct", "numpy.dtype", "numpy.ndarray")


class StandIn:
    """An inert object in place of a class or function a checkpoint names: it keeps what the pickle
    gave it (`args` of the call, `state` of BUILD) and does nothing else."""

    __slots__ = ("args", "state")
    name = "?"  # the full name it stands in for

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<stand-in for {self.name}>"


class DictStandIn:
    """A stand-in for a dict subclass (Lightning's AttributeDict): creating one gives a plain dict."""

    name = "?"

    def __new__(cls, *args, **kwargs):
        return {}


def _stand_in(name: str, base: type) -> type:
    return type(name.rpartition(".")[2], (base,), {"__slots__": (), "name": name, "__module__": __name__})


ALLOWED: dict[str, type] = {
    **{f"{package}.{name}": _stand_in(f"{package}.{name}", StandIn) for package in _LIGHTNING for name in _CALLBACKS},
    **{name: _stand_in(name, DictStandIn) for name in _ATTRIBUTE_DICTS},
    **{name: _stand_in(name, StandIn) for name in _NUMPY},
}


class ForbiddenGlobals(Exception):
    """The pickle names classes or functions that are neither torch's weights nor in ALLOWED."""

    def __init__(self, names: list[str]):
        super().__init__(f"the pickle names {', '.join(names)}")
        self.names = names


def supported() -> bool:
    """Whether this torch can bind a name to a stand-in (`safe_globals` with (object, name) pairs: torch >= 2.6)."""
    version = tuple(int(p) for p in re.findall(r"\d+", torch.__version__)[:2])
    return version >= (2, 6) and hasattr(torch.serialization, "safe_globals")


def unsafe_globals(path: str | Path) -> list[str] | None:
    """The names in a zip-format torch file's pickle that torch's weights-only unpickler does not
    allow by itself, read statically (nothing is unpickled); None when the file cannot be scanned
    so (legacy format, torch < 2.5, not a torch zip)."""
    scan = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if scan is None:
        return None
    try:
        return sorted(scan(str(path)))
    except Exception:  # a legacy-format or corrupt file: torch.load decides what it is
        return None


def forbidden(names: list[str]) -> list[str]:
    """Those of `names` that are not in ALLOWED."""
    return [name for name in names if name not in ALLOWED]


def load(path: str | Path, map_location: Any = "cpu") -> Any:
    """torch.load(weights_only=True) with the names in ALLOWED bound to stand-ins.

    ForbiddenGlobals (before anything is unpickled) when a zip-format file names anything else;
    pickle.UnpicklingError from torch's unpickler for any other refusal. Needs torch >= 2.6
    (`supported()`).
    """
    names = unsafe_globals(path)
    if names and forbidden(names):
        raise ForbiddenGlobals(forbidden(names))
    with torch.serialization.safe_globals([(cls, name) for name, cls in ALLOWED.items()]):
        return torch.load(path, map_location=map_location, weights_only=True)
