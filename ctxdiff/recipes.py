"""YAML recipes: typed config dataclasses, `--set a.b=c` overrides, `base:` inheritance.

The machinery here knows no schema: `from_dict` builds any (nested, frozen or not) dataclass
from a mapping, checking every key and type, and reports mistakes as one-line `UsageError`s
that name the dotted key (`train.lerning_rate: unknown recipe key; did you mean
train.learning_rate?`). A `ValueError` raised by a dataclass's `__post_init__` becomes a
`UsageError` too; when its message starts with a field name it is reported at that field's
dotted path (`"steps must be > 0"` in section `train` reads `train.steps must be > 0`).

The sections shared by every recipe (diffusion, training, data, sampling) are defined at the
bottom; their defaults follow the paper's Appendix C (Tab. 7: text-to-image; Tab. 8: video
editing) where it gives a value.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import reprlib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml

from ctxdiff.errors import UsageError

T = TypeVar("T")

BASE_KEY = "base"


MAX_RECIPE_NODES = 100_000   # values a recipe may hold once its YAML aliases are expanded


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-4` as a float (YAML 1.1 wants `1.0e-4`), refuses a key given
    twice in one mapping (the second would silently win), and refuses a document whose aliases
    expand to more than MAX_RECIPE_NODES values (a "billion laughs" file)."""

    def construct_document(self, node):
        size = _expanded_size(node, {})
        if size > MAX_RECIPE_NODES:
            raise yaml.constructor.ConstructorError(
                None, None, f"the recipe expands to more than {MAX_RECIPE_NODES} values through its aliases "
                "(&name / *name); write the values out", node.start_mark)
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {_short(key)} (first on line {seen[key].line + 1}); keep one",
                    key_node.start_mark)
            if isinstance(key, typing.Hashable):
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many values `node` holds with every alias expanded (aliases share node objects: memoised)."""
    if id(node) not in sizes:
        sizes[id(node)] = 1   # a node being sized (a recursive alias) counts once
        if isinstance(node, yaml.SequenceNode):
            sizes[id(node)] = 1 + sum(_expanded_size(child, sizes) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            sizes[id(node)] = 1 + sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
    return sizes[id(node)]


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 (a SafeLoader subclass)


# --------------------------------------------------------------------------- from_dict


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxstring, _REPR.maxother = 2, 4, 4, 4, 50, 50


def _short(value: Any, limit: int = 60) -> str:
    """A value for an error message, at most `limit` characters, never built whole (`reprlib`)."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(tp: Any) -> str:
    """The expected type, as a user reads it in an error message."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if _is_union(tp):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plural(args[0])}"
        return f"a list of {len(args)} items ({', '.join(_describe(a) for a in args)})"
    if origin is list:
        return f"a list of {_plural(args[0])}" if args else "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _plural(tp: Any) -> str:
    return {int: "integers", float: "numbers", str: "strings", bool: "booleans"}.get(tp, _describe(tp))


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) is typing.Union or isinstance(tp, types.UnionType)


def _type_error(path: str, value: Any, tp: Any) -> UsageError:
    return UsageError(
        f"{path}: expected {_describe(tp)}, got {_short(value)}; fix the recipe or pass --set {path}=..."
    )


def _coerce(tp: Any, value: Any, path: str) -> Any:
    """Check `value` against the annotation `tp` and convert it (list -> tuple, int -> float)."""
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if _is_union(tp):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise _type_error(path, value, tp)
        options = [a for a in args if a is not type(None)]
        for arg in options:
            try:
                return _coerce(arg, value, path)
            except UsageError:
                if len(options) == 1 and isinstance(value, (Mapping, list, tuple)):
                    raise  # keep the inner key's message (e.g. an unknown key in an optional section)
        raise _type_error(path, value, tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise _type_error(path, value, tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(path, value, tp)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(path, value, tp)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _type_error(path, value, tp)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(path, value, tp)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _type_error(path, value, tp)
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise _type_error(path, value, tp)
            item_types = list(args)
        else:
            item_types = [args[0] if args else Any] * len(value)
        items = [_coerce(t, v, f"{path}[{i}]") for i, (t, v) in enumerate(zip(item_types, value))]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise _type_error(path, value, tp)
        key_type, value_type = args if args else (Any, Any)
        return {
            _coerce(key_type, k, path): _coerce(value_type, v, _join(path, str(k))) for k, v in value.items()
        }
    raise TypeError(f"recipes: unsupported annotation {tp!r} at {path}")


def _unknown_key(path: str, key: str, known: list[str]) -> UsageError:
    dotted = _join(path, str(key))
    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
    if close:
        hint = f"did you mean {_join(path, close[0])}?"
    else:
        hint = f"valid keys{' under ' + path if path else ''}: {', '.join(known)}"
    return UsageError(f"{dotted}: unknown recipe key; {hint}")


def _post_init_error(path: str, cls: type, message: str, names: list[str]) -> UsageError:
    first = message.split(" ", 1)[0]
    if path and first in names:
        return UsageError(f"{path}.{message}")
    return UsageError(f"{path or cls.__name__}: {message}")


def from_dict(cls: type[T], data: Mapping[str, Any], path: str = "") -> T:
    """Build dataclass `cls` from `data`, checking keys and types; `path` prefixes error keys.

    None (an empty YAML section) gives the defaults; keys left out take their defaults. A key that
    was removed (`cls.RETIRED`: name -> the value whose behaviour remains) is read, and skipped,
    when it holds that value: files written before its removal keep loading.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise _type_error(path or cls.__name__, data, cls)
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = [f.name for f in fields]
    retired = getattr(cls, "RETIRED", {})
    for key in data:
        if key in retired:
            if data[key] != retired[key]:
                raise UsageError(f"{_join(path, key)}: this key was removed; only {retired[key]!r} (its "
                                 f"behaviour today) is read, not {_short(data[key])}")
        elif key not in names:
            raise _unknown_key(path, key, names)
    data = {key: value for key, value in data.items() if key not in retired}
    for f in fields:
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in data:
            dotted = _join(path, f.name)
            raise UsageError(f"{dotted}: required recipe key is missing; add it or pass --set {dotted}=...")
    kwargs = {key: _coerce(hints[key], value, _join(path, key)) for key, value in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise _post_init_error(path, cls, str(e), names) from e


# --------------------------------------------------------------------------- to_dict / dump


def to_dict(obj: Any) -> Any:
    """Plain YAML-ready data from a dataclass tree (tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def dump_recipe(obj: Any) -> str:
    """The resolved recipe as YAML, in field order; `load_recipe` reads it back unchanged."""
    return yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=None, allow_unicode=True)


# --------------------------------------------------------------------------- overrides


def _parse_override(override: str) -> tuple[list[str], Any]:
    key, sep, raw = override.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not key or any(not p.strip() for p in parts):
        raise UsageError(
            f"malformed override {override!r}; write KEY=VALUE with a dotted key, e.g. train.lr=1e-4"
        )
    try:
        value = _yaml_load(raw)
    except yaml.YAMLError:
        value = raw  # not YAML (e.g. 'a: b: c'): take the text as it is
    return [p.strip() for p in parts], value


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of `data` with each `a.b.c=value` set (value read as YAML; `null` is None)."""
    result = copy.deepcopy(dict(data))
    for override in overrides:
        parts, value = _parse_override(override)
        node = result
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                section = ".".join(parts[: depth + 1])
                raise UsageError(
                    f"cannot set {'.'.join(parts)}: {section} is a value ({_short(child)}), not a section"
                )
            node = child
        node[parts[-1]] = value
    return result


# --------------------------------------------------------------------------- files


def _deep_merge(base: dict[str, Any], child: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in child.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _read_mapping(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"recipe not found: {path}; pass the path of an existing YAML recipe") from None
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise UsageError(f"cannot read recipe {path}: {reason}; pass a readable UTF-8 YAML file") from None
    try:
        data = _yaml_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UsageError(f"{where}: YAML syntax error: {problem}; fix the recipe file") from None
    if not isinstance(data, dict):
        got = "an empty file" if data is None else type(data).__name__
        raise UsageError(f"{path}: a recipe must be a mapping of sections at the top level, got {got}")
    return data


def read_recipe_data(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The raw mapping of a recipe file, with its `base:` chain merged in (the child wins)."""
    path = Path(path)
    resolved = path.resolve()
    if resolved in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, resolved))
        raise UsageError(f"recipe base chain loops: {chain}; remove one of the `base:` keys")
    data = _read_mapping(path)
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise UsageError(f"{path}: base: expected a file name (string), got {_short(base)}")
    parent = read_recipe_data(path.parent / base, (*_seen, resolved))
    return _deep_merge(parent, data)


def load_recipe(path: str | Path, overrides: Iterable[str] = (), *, schema: type[T]) -> T:
    """Read a YAML recipe (following `base:`), apply `--set` overrides, build `schema`."""
    return from_dict(schema, apply_overrides(read_recipe_data(path), overrides))


# --------------------------------------------------------------------------- shared sections


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def check_finite_fields(obj: Any, *names: str) -> None:
    """Each named float field (or tuple of floats; None skipped) of `obj` is a number: YAML reads
    `.nan` and `.inf`, and a NaN passes every `<`/`>` range check."""
    for name in names:
        value = getattr(obj, name)
        values = value if isinstance(value, tuple) else (value,)
        _check(all(v is None or math.isfinite(v) for v in values), f"{name} must be a finite number, got {value}")


SEED_LIMIT = 2**64   # seeds are 0 .. 2**64 - 1 (what torch.Generator and numpy take)


def check_seed_range(value: int, name: str = "seed") -> None:
    _check(0 <= value < SEED_LIMIT, f"{name} must be in 0 .. 2**64-1, got {value}")


@dataclass(frozen=True)
class DiffusionConfig:
    """The noise process and the training loss (Eq. 1, 6)."""

    schedule: Literal["linear", "scaled_linear", "cosine"] = "cosine"  # Tab. 7; video (Tab. 8): linear
    timesteps: int = 1000  # T; Tab. 7
    loss_weighting: Literal["constant", "min_snr", "snr", "snr_plus_one"] = "constant"  # paper: lambda_t = 1
    min_snr_gamma: float = 5.0  # for loss_weighting: min_snr
    cond_drop_prob: float = 0.1  # empty-text rate for classifier-free guidance
    high_noise_share: float = 0.0  # share of training steps t drawn from above high_noise_from * T
    high_noise_from: float = 0.9   # (sample_timesteps: where the layout is learned from the text)

    def __post_init__(self) -> None:
        check_finite_fields(self, "min_snr_gamma", "cond_drop_prob", "high_noise_share", "high_noise_from")
        _check(self.timesteps >= 1, f"timesteps must be >= 1, got {self.timesteps}")
        _check(0 <= self.high_noise_share <= 1, f"high_noise_share must be in [0, 1], got {self.high_noise_share}")
        _check(0 <= self.high_noise_from < 1, f"high_noise_from must be in [0, 1), got {self.high_noise_from}")
        _check(self.min_snr_gamma > 0, f"min_snr_gamma must be > 0, got {self.min_snr_gamma}")
        _check(0 <= self.cond_drop_prob < 1, f"cond_drop_prob must be in [0, 1), got {self.cond_drop_prob}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, precision, checkpointing and logging of `ctxdiff train` / `tune-video`."""

    steps: int = 10_000  # optimizer steps of the run
    batch_size: int = 64  # Tab. 7: 1024 (global); video, Tab. 8: 1
    lr: float = 1e-4  # AdamW; Tab. 7; video, Tab. 8: 1e-5
    weight_decay: float = 0.0  # Tab. 7; video, Tab. 8: 1e-2
    adam_betas: tuple[float, float] = (0.9, 0.999)  # Tab. 7 and 8
    warmup_steps: int = 1_000  # linear warmup; Tab. 7: 10000 (at batch 1024); video, Tab. 8: 0
    lr_schedule: Literal["constant", "cosine"] | None = None  # after warmup; null: cosine for the clip
                                                               # stage (open_clip's), constant otherwise
    grad_clip: float | None = 1.0  # max global grad norm; null: no clipping
    ema_decay: float = 0.9999  # 0: no EMA
    ema_warmup: bool = True  # decay_t = min(ema_decay, (1 + step) / (10 + step))
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast dtype of the forward pass (weights stay fp32)
    grad_accum: int = 1  # micro-batches per optimizer step (batch_size is split over them)
    checkpoint_every: int = 1_000  # steps between training states (checkpoints/step-*.pt) and model exports
    keep_last: int = 3  # training states kept; the newest by step
    sample_every: int = 1_000  # 0: no preview samples while training
    log_every: int = 50  # steps between lines of metrics.jsonl
    num_workers: int = 0  # data-loader worker processes
    gradient_checkpointing: bool = False  # video, Tab. 8 ("use checkpoint"): true
    stage: Literal["base", "sr", "clip"] = "base"  # what is trained: base U-Net, super-resolution U-Net, or the CLIP
    lowres_noise_level: float = 0.2  # SR stage: noise level of the low-res condition (Imagen)
    layout_loss: float = 0.0  # clip stage, shapes: weight of the auxiliary loss that makes the image
                              # embedding say where each object is (ClipTrainer)
    seed: int = 0  # of initialisation, data order, noise and dropout: a run is a function of it

    RETIRED: ClassVar[dict] = {"shape_loss": 0.0}   # keys of files written before they were removed

    def __post_init__(self) -> None:
        check_finite_fields(self, "lr", "weight_decay", "adam_betas", "grad_clip", "ema_decay", "lowres_noise_level",
                            "layout_loss")
        check_seed_range(self.seed)
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "keep_last", "log_every"):
            value = getattr(self, name)
            _check(value >= 1, f"{name} must be >= 1, got {value}")
        for name in ("warmup_steps", "sample_every", "num_workers"):
            value = getattr(self, name)
            _check(value >= 0, f"{name} must be >= 0, got {value}")
        _check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.layout_loss >= 0, f"layout_loss must be >= 0, got {self.layout_loss}")
        _check(all(0 <= b < 1 for b in self.adam_betas), f"adam_betas must be in [0, 1), got {self.adam_betas}")
        _check(self.grad_clip is None or self.grad_clip > 0, f"grad_clip must be > 0 or null, got {self.grad_clip}")
        _check(0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1), got {self.ema_decay}")
        _check(
            0 <= self.lowres_noise_level <= 1,
            f"lowres_noise_level must be in [0, 1], got {self.lowres_noise_level}",
        )


@dataclass(frozen=True)
class DataConfig:
    """Where training pairs come from.

    `source` is a folder of images with same-named .txt captions, a .jsonl/.csv manifest,
    a webdataset shard pattern ('shards/{00000..00009}.tar'), or 'shapes' (the generated world).
    """

    source: str = "shapes"  # a folder, a .jsonl/.csv manifest, webdataset shards, or 'shapes' (see above)
    image_size: int = 64  # base stage; the SR stage trains at its output size (256)
    shapes_count: int = 10_000  # images (or videos) in the generated shapes dataset
    shapes_seed: int = 0  # seed of the generated shapes world
    caption_key: str = "txt"  # caption field of manifests and shards
    num_frames: int = 8  # video clips; Tab. 8: 8-24
    frame_stride: int = 2  # take every n-th source frame; Tab. 8 "sampling rate": 2
    hard_negatives: bool = False  # shapes, train.stage clip: every scene comes with a twin that differs
                                  # in one stated attribute (a batch holds 2 x batch_size pairs)

    def __post_init__(self) -> None:
        _check(bool(self.source.strip()), "source must not be empty")
        _check(bool(self.caption_key), "caption_key must not be empty")
        _check(not self.hard_negatives or self.source == "shapes",
               f"hard_negatives needs source 'shapes' (it draws each scene's twin), not '{self.source}'")
        for name in ("image_size", "shapes_count", "num_frames", "frame_stride"):
            value = getattr(self, name)
            _check(value >= 1, f"{name} must be >= 1, got {value}")
        check_seed_range(self.shapes_seed, "shapes_seed")


@dataclass(frozen=True)
class SampleConfig:
    """Sampling (Eq. 7 for DDPM, Eq. 9/11 for DDIM) and classifier-free guidance: a recipe's
    `sample:` section, a model's defaults, and everything that decides an image besides its prompt
    and seed (recorded in each PNG)."""

    sampler: str = "ddim"  # ddim (Eq. 9/11), ddpm (Eq. 7), or a context-aware solver: dpmpp-2m, dpmpp-2m-sde,
                          # euler, euler-a, heun, unipc; "-karras" appended (dpmpp-2m-karras, ...): Karras
                          # sigmas, rho 7, over the full range (spacing then does not apply)
    steps: int = 50  # video editing, Tab. 8: 20 (inversion and editing)
    eta: float = 0.0  # DDIM stochasticity (Eq. 9); 0: deterministic (Eq. 11)
    guidance: float = 5.0  # classifier-free guidance weight; paper sweeps 1.5..9.0
    spacing: Literal["leading", "trailing", "linspace"] = "trailing"  # which of the T steps are visited
                                                                      # (diffusers' names)
    sr_steps: int = 25  # steps of the super-resolution stage
    lowres_noise_level: float | None = None  # SR stage: noise level of its low-res input while sampling;
                                             # null: the level it was trained with (train.lowres_noise_level)
    adapter: bool = True  # sample with the adapter's bias; false: r = 0 through the same code path

    SOLVERS: ClassVar[tuple[str, ...]] = ("dpmpp-2m", "dpmpp-2m-sde", "euler", "euler-a", "heun", "unipc")
    SAMPLERS: ClassVar[tuple[str, ...]] = ("ddim", "ddpm", *SOLVERS, *(f"{s}-karras" for s in SOLVERS))

    def __post_init__(self) -> None:
        if self.sampler not in self.SAMPLERS:
            spelled = self.sampler.lower().replace("++", "pp").replace(" ", "-").replace("_", "-")  # A1111's names
            close = difflib.get_close_matches(spelled, self.SAMPLERS, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"sampler {self.sampler!r} is unknown; {hint}choose one of {', '.join(self.SAMPLERS)}")
        check_finite_fields(self, "eta", "guidance", "lowres_noise_level")
        _check(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        _check(self.sr_steps >= 1, f"sr_steps must be >= 1, got {self.sr_steps}")
        _check(self.eta >= 0, f"eta must be >= 0, got {self.eta}")
        _check(self.guidance >= 0, f"guidance must be >= 0, got {self.guidance}")
        _check(self.lowres_noise_level is None or 0 <= self.lowres_noise_level <= 1,
               f"lowres_noise_level must be in [0, 1] or null, got {self.lowres_noise_level}")
