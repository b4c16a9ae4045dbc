"""Model bundles (one safetensors file: tensors + configs as JSON metadata) and training states.

A bundle names its tensors `"{module}.{param}"` and carries string metadata: `ctxdiff_version`,
`kind` ("t2i", "clip", "video-tuned", ...), `configs` (JSON) and `extra` (JSON), so a file is
all a user passes. Training states (model, EMA, optimizer, scheduler, RNG, data position) are
`torch.save` files named `step-00001000.pt`, read back with `torch.load(weights_only=True)`.
Every file is written atomically: a temp file in the same folder, fsync, `os.replace`.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import pickle
import random
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch

from ctxdiff import __version__, safe_pickle
from ctxdiff.errors import CtxdiffError

TORCH_SUFFIXES = (".pt", ".ckpt", ".pth", ".bin")
TRAINING_STATE_GLOB = "step-*.pt"
_LIST_LIMIT = 8


# --------------------------------------------------------------------------- atomic writes


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # folders cannot be opened on some platforms; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Run write(temp) on a temp file beside `path`, fsync it, then rename it onto `path`. Temp
    files of earlier writes to `path` that a kill -9 left behind are removed first."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            stale.unlink(missing_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _write_error(path, e) from e
    os.close(fd)
    temp = Path(name)
    try:
        write(temp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)  # mkstemp makes 0600; give the file ordinary permissions
        with open(temp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException as e:
        temp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _write_error(path, e) from e
        raise
    _fsync_dir(path.parent)


def _write_error(path: Path, e: OSError) -> CtxdiffError:
    return CtxdiffError(f"cannot write {path}: {e.strerror or e}; check the folder's permissions and free space")


# --------------------------------------------------------------------------- bundles


@dataclass
class Bundle:
    """A loaded model bundle: tensors grouped by module name, plus what the file says of itself."""

    tensors: dict[str, dict[str, torch.Tensor]]
    configs: dict[str, Any]
    kind: str
    version: str
    extra: dict[str, Any] = field(default_factory=dict)


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    return obj


def _bundle_tensors(
    modules: Mapping[str, torch.nn.Module | Mapping[str, torch.Tensor]], dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for module_name, module in modules.items():
        if not module_name or "." in module_name:
            raise ValueError(f"bundle module names must be non-empty and dot-free, got {module_name!r}")
        state = module.state_dict() if isinstance(module, torch.nn.Module) else module
        for param_name, tensor in state.items():
            if not isinstance(tensor, torch.Tensor):
                continue  # e.g. a module's extra state; bundles hold tensors only
            t = tensor.detach().cpu()
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            # A fresh contiguous copy: safetensors refuses shared or strided storage.
            tensors[f"{module_name}.{param_name}"] = t.clone(memory_format=torch.contiguous_format)
    return tensors


def save_bundle(
    path: str | Path,
    modules: Mapping[str, torch.nn.Module | Mapping[str, torch.Tensor]],
    configs: Mapping[str, Any],
    kind: str,
    dtype: torch.dtype | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write `modules` (modules or state dicts) and their `configs` to one safetensors file.

    `dtype` casts floating tensors (e.g. torch.float16 for shipping); integer buffers keep theirs.
    Atomic: on failure any existing file at `path` is untouched and no temp file is left.
    """
    path = Path(path)
    tensors = _bundle_tensors(modules, dtype)
    metadata = {
        "ctxdiff_version": __version__,
        "kind": kind,
        "configs": json.dumps(_jsonable(configs)),
        "extra": json.dumps(_jsonable(extra or {})),
    }
    atomic_write(path, lambda temp: safetensors.torch.save_file(tensors, str(temp), metadata=metadata))
    return path


def _missing_file(path: Path, what: str) -> CtxdiffError:
    return CtxdiffError(f"{path}: no such file; pass the path of {what}")


def load_bundle(path: str | Path, kind: str | None = None, device: str | torch.device = "cpu") -> Bundle:
    """Read a bundle written by `save_bundle`; `kind` (if given) must match the file's."""
    path = Path(path)
    if not path.is_file():
        raise _missing_file(path, "a .safetensors model bundle written by `ctxdiff train`")
    try:
        with safetensors.safe_open(str(path), framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            if "ctxdiff_version" not in metadata:
                raise CtxdiffError(
                    f"{path}: not a ctxdiff model bundle (no 'ctxdiff_version' metadata); "
                    "pass a file written by `ctxdiff train`"
                )
            tensors: dict[str, dict[str, torch.Tensor]] = {}
            for key in f.keys():
                module_name, _, param_name = key.partition(".")
                tensors.setdefault(module_name, {})[param_name] = f.get_tensor(key)
    except safetensors.SafetensorError as e:
        raise CtxdiffError(f"{path}: truncated or corrupt safetensors file ({e}); write or copy it again") from e
    if kind is not None and metadata.get("kind") != kind:
        raise CtxdiffError(
            f"{path}: is a {metadata.get('kind')!r} bundle, expected {kind!r}; pass a {kind} model bundle"
        )
    try:
        configs = json.loads(metadata.get("configs", "{}"))
        extra = json.loads(metadata.get("extra", "{}"))
    except json.JSONDecodeError as e:
        raise CtxdiffError(f"{path}: corrupt bundle metadata ({e}); write the bundle again") from e
    return Bundle(tensors, configs, metadata.get("kind", ""), metadata["ctxdiff_version"], extra)


def _name_list(names: list[str]) -> str:
    shown = ", ".join(names[:_LIST_LIMIT])
    more = len(names) - _LIST_LIMIT
    return f"{shown}, ... and {more} more" if more > 0 else shown


def load_module_state(
    module: torch.nn.Module, state: Mapping[str, torch.Tensor], name: str, strict: bool = True
) -> tuple[list[str], list[str]]:
    """Load `state` into `module`, casting to the module's dtypes; returns (missing, unexpected).

    Shape mismatches always fail; missing and unexpected names fail when `strict`; so does a
    weight that is not finite (NaN or inf: every sample would be too). The error names the first
    few of each, with counts. `name` says what is loaded (e.g. "bundle.safetensors: unet").
    """
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{key} (file {tuple(state[key].shape)}, model {tuple(own[key].shape)})"
        for key in sorted(set(own) & set(state))
        if state[key].shape != own[key].shape
    ]
    problems = []
    if strict and missing:
        problems.append(f"{len(missing)} missing: {_name_list(missing)}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_name_list(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} with other shapes: {_name_list(mismatched)}")
    if problems:
        raise CtxdiffError(
            f"{name}: weights do not fit the model ({'; '.join(problems)}); "
            "the file was written for another architecture or config"
        )
    broken = sorted(key for key, value in state.items()
                    if key in own and value.is_floating_point() and not torch.isfinite(value).all())
    if broken:
        raise CtxdiffError(f"{name}: {len(broken)} weight tensors hold NaN or inf ({_name_list(broken)}); the file "
                           "is damaged or came from a run that diverged: use an earlier checkpoint or train again")
    cast = {
        key: value.to(own[key].dtype) if value.is_floating_point() and own[key].is_floating_point() else value
        for key, value in state.items()
        if key in own
    }
    module.load_state_dict(cast, strict=False)
    return missing, unexpected


# --------------------------------------------------------------------------- plain weight files


def load_torch_file(path: str | Path) -> Any:
    """torch.load(weights_only=True) onto the CPU; pickles that need code are refused.

    A pickle naming classes beyond torch's weights is read only when every one is known data
    (Lightning callback state, numpy scalars: `ctxdiff.safe_pickle`, which binds them to inert
    stand-ins); anything else is refused before it is unpickled (zip-format files) or as it is met.
    """
    path = Path(path)
    if not path.is_file():
        raise _missing_file(path, "an existing checkpoint file")
    names = safe_pickle.unsafe_globals(path)  # None: not scanned (legacy format); torch.load still checks
    try:
        if names:
            return _load_naming_globals(path, names)
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if names is None and _names_a_global(e):  # a legacy-format file: the names one at a time
                return _load_naming_globals(path, _global_names(e))
            raise
    except CtxdiffError:
        raise
    except safe_pickle.ForbiddenGlobals as e:
        raise _refused_pickle(path, e.names) from e
    except pickle.UnpicklingError as e:
        if _names_a_global(e):  # the pickle names a class or function to call
            raise _refused_pickle(path, _global_names(e)) from e
        raise _corrupt_torch_file(path) from e
    except Exception as e:  # torch.load raises many types (RuntimeError, KeyError, EOFError...) on bad bytes
        raise _corrupt_torch_file(path) from e


def _load_naming_globals(path: Path, names: list[str]) -> Any:
    """A pickle that names more than torch's weights: read with safe_pickle's stand-ins where this torch can."""
    if safe_pickle.forbidden(names):
        raise safe_pickle.ForbiddenGlobals(safe_pickle.forbidden(names))
    if not safe_pickle.supported():
        raise CtxdiffError(f"{path}: names classes ({', '.join(names)}) that torch "
                           f"{torch.__version__} cannot map to stand-ins; install torch >= 2.6, or convert the "
                           "file to .safetensors with a tool you trust")
    return safe_pickle.load(path)


def _names_a_global(e: pickle.UnpicklingError) -> bool:
    return "safe_globals" in str(e) or "GLOBAL" in str(e)


def _global_names(e: pickle.UnpicklingError) -> list[str]:
    """The names torch's weights-only unpickler stopped at, from its message."""
    return re.findall(r"GLOBAL (\S+)", str(e))


def _refused_pickle(path: Path, names: list[str]) -> CtxdiffError:
    listing = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    named = f" (it names {listing}, not known to be data)" if names else ""
    return CtxdiffError(f"{path}: refused: needs arbitrary code execution (pickle){named}; "
                        "convert it to .safetensors with a tool you trust")


def _corrupt_torch_file(path: Path) -> CtxdiffError:
    return CtxdiffError(
        f"{path}: truncated or corrupt, or not a torch checkpoint; write or copy it again, or pass a .safetensors file"
    )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: .safetensors, or a .pt/.ckpt/.pth/.bin pickle (weights only).

    A pickle holding {"state_dict": ...} (Lightning / CompVis checkpoints) gives its state_dict.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        if not path.is_file():
            raise _missing_file(path, "an existing .safetensors file")
        try:
            return safetensors.torch.load_file(str(path), device="cpu")
        except safetensors.SafetensorError as e:
            raise CtxdiffError(f"{path}: truncated or corrupt safetensors file ({e}); write or copy it again") from e
    if suffix not in TORCH_SUFFIXES:
        raise CtxdiffError(
            f"{path}: unsupported weights file type {suffix or '(none)'!r}; "
            f"pass .safetensors or one of {', '.join(TORCH_SUFFIXES)}"
        )
    obj = load_torch_file(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
    if not tensors:
        raise CtxdiffError(f"{path}: holds no tensors by name (not a state dict); pass a model weights file")
    return tensors


# --------------------------------------------------------------------------- training states


def capture_rng_state() -> dict[str, Any]:
    """Torch (CPU and CUDA), numpy and python-random states, loadable with weights_only=True."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Undo `capture_rng_state`: the same random numbers follow in torch, numpy and random."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"][: torch.cuda.device_count()]
        for device, cuda_state in enumerate(cuda_states):
            torch.cuda.set_rng_state(cuda_state, device)


def training_state_path(folder: str | Path, step: int) -> Path:
    """Where the training state of `step` lives: folder/step-00001000.pt."""
    return Path(folder) / f"step-{step:08d}.pt"


def save_training_state(path: str | Path, state: Mapping[str, Any]) -> Path:
    """torch.save `state` atomically (model/EMA/optimizer/scheduler state dicts, step, RNG, data position)."""
    path = Path(path)
    atomic_write(path, lambda temp: torch.save(dict(state), temp))
    return path


def load_training_state(path: str | Path) -> dict[str, Any]:
    """Read a training state with torch.load(weights_only=True)."""
    state = load_torch_file(path)
    if not isinstance(state, dict):
        raise CtxdiffError(f"{path}: not a ctxdiff training state; pass a step-*.pt file written by `ctxdiff train`")
    return state


def numbered_checkpoints(folder: str | Path, pattern: str = TRAINING_STATE_GLOB) -> list[tuple[int, Path]]:
    """(step, path) of the files in `folder` matching `pattern` (its '*' is the step), by step."""
    folder = Path(folder)
    if pattern.count("*") != 1:
        raise ValueError(f"checkpoint pattern needs exactly one '*' for the step number, got {pattern!r}")
    head, tail = pattern.split("*")
    number = re.compile(re.escape(head) + r"(\d+)" + re.escape(tail) + "$")
    found = []
    for path in folder.glob(pattern) if folder.is_dir() else ():
        match = number.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def rotate_checkpoints(folder: str | Path, pattern: str = TRAINING_STATE_GLOB, keep_last: int = 3) -> list[Path]:
    """Delete all but the newest `keep_last` files matching `pattern` (its '*' is the step); returns the deleted."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    old = [path for _, path in numbered_checkpoints(folder, pattern)[:-keep_last]]
    for path in old:
        path.unlink(missing_ok=True)
    return old


def latest_checkpoint(folder: str | Path, pattern: str = TRAINING_STATE_GLOB) -> Path | None:
    """The training state with the highest step number in `folder`, or None."""
    found = numbered_checkpoints(folder, pattern)
    return found[-1][1] if found else None


def load_latest_good_state(folder: str | Path, note: Callable[[str], None] = lambda _: None) -> tuple[dict, Path]:
    """The newest training state in `folder` that reads; a damaged newer one (truncated by a kill
    mid-write on a file system without atomic rename, a bad disk) is skipped with a `note`."""
    damaged = []
    for _, path in reversed(numbered_checkpoints(folder)):
        try:
            state = load_training_state(path)
        except CtxdiffError:
            damaged.append(path)
            continue
        if damaged:
            note(f"skipped the damaged {', '.join(p.name for p in damaged)}; resuming from {path.name} "
                 "(delete the damaged files to silence this)")
        return state, path
    if damaged:
        raise CtxdiffError(f"{folder}: every checkpoint is damaged ({', '.join(p.name for p in damaged)}); delete "
                           "them and start again without --resume")
    raise CtxdiffError(f"{folder}: no checkpoint to resume from; run without --resume to start")
