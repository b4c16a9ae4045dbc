"""LoRA files for Stable Diffusion 1.x/2.x, merged into our U-Net and text encoder.

Layouts read (a file holds U-Net parts, text-encoder parts or both):

- kohya / AUTOMATIC1111 (sd-scripts and most community files): `lora_unet_<module>` and `lora_te_<module>`,
  the module's dotted path written with `_`. U-Net paths in diffusers names (`lora_unet_down_blocks_0_attentions_0_
  transformer_blocks_0_attn1_to_q`: kohya trains SD 1.x/2.x on the diffusers U-Net) or in CompVis names
  (`lora_unet_input_blocks_1_1_...`, LyCORIS and older tools); text paths in transformers' CLIPTextModel names
  (`lora_te_text_model_encoder_layers_0_self_attn_q_proj`). Per module `.lora_down.weight` [r, in] or
  [r, in, kh, kw], `.lora_up.weight` [out, r] or [out, r, 1, 1], optionally `.alpha`.
- diffusers / PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight` and `text_encoder.<module>...`
  (`text_model.` optional); alpha from the file's `lora_adapter_metadata` (`unet.lora_alpha`, `unet.alpha_pattern`,
  `unet.use_rslora`; what `save_lora_weights` writes) or `.alpha` keys, else alpha = rank, as diffusers reads
  them. Older diffusers spellings (`.lora.down.weight`, `processor.to_q_lora`, `lora_linear_layer`) too.

Merge (what diffusers' `fuse_lora` computes; tests/test_lora.py checks it against diffusers to 1e-5):

    W <- W + weight * (alpha / rank) * up @ down

over the rank; for convolutions up [out, r, 1, 1] times down [r, in, kh, kw] gives the kh x kw kernel (kohya's
LoCon: 1x1 and 3x3). rsLoRA files scale by alpha / sqrt(rank). The product is formed in float32 and stored in the
weight's dtype. Several files add up, each with its own weight. A merged model has other weights than the file it
was loaded from, so a latent adapter's backbone check must run before merging.

Refused in one line (CtxdiffError): keys of no known layout, modules the model does not have (the first few listed),
shapes that do not fit (a LoRA for SD 1.x on an SD 2.x model and back, named so), LoRAs for SDXL, SD 3, Flux or
another architecture, the LyCORIS variants this merge does not implement (LoHa, LoKr, Tucker `lora_mid`, DoRA), and
tensors holding NaN or inf.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import safetensors
import torch
from torch import nn

from ctxdiff.checkpoints import read_state_dict
from ctxdiff.errors import CtxdiffError
from ctxdiff.models.latent.convert import compvis_names, unet_module_map
from ctxdiff.models.latent.loader import LatentModels

_ONLY_SD = "ctxdiff applies LoRAs made for Stable Diffusion 1.x and 2.x"
_CONTEXT_FAMILY = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL", 1280: "SDXL (its refiner)", 4096: "a T5-conditioned model"}
_UNET_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "time_embedding.")
_VARIANTS = (("hada_w", "a LyCORIS LoHa"), ("lokr_w", "a LyCORIS LoKr"), ("lora_mid", "a LyCORIS LoCon with Tucker "
             "decomposition (lora_mid)"), ("dora_scale", "a DoRA"), ("lora_magnitude_vector", "a DoRA"),
             (".diff", "a full weight difference (.diff keys)"), ("lora_embedding_", "a LoRA of the token embedding"))
_DOWN = re.compile(r"^(?P<module>.+?)[._](?:lora_A|lora\.down|lora_linear_layer\.down|lora_down)(?:\.default)?\.weight$")
_UP = re.compile(r"^(?P<module>.+?)[._](?:lora_B|lora\.up|lora_linear_layer\.up|lora_up)(?:\.default)?\.weight$")
_ALPHA = re.compile(r"^(?P<module>.+?)\.alpha$")
_OLD_ATTENTION = {"unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
                  "text": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}}


@dataclass(frozen=True)
class LoraModule:
    """One low-rank update as the file names it: `part` "unet" or "text", `module` our module path."""

    part: str
    module: str
    key: str               # the file's name for it (messages)
    down: torch.Tensor     # [r, in] or [r, in, kh, kw]
    up: torch.Tensor       # [out, r] or [out, r, 1, 1]
    alpha: float | None    # None: alpha = rank (scale 1)
    rslora: bool = False

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        alpha = float(self.rank) if self.alpha is None else self.alpha
        return alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def delta(self, shape: torch.Size) -> torch.Tensor:
        """(alpha / rank) up @ down, float32, shaped like the weight (`shape`)."""
        if self.up.shape[1] != self.rank or (self.up.ndim == 4 and tuple(self.up.shape[2:]) != (1, 1)):
            raise CtxdiffError(f"{self.key}: up {tuple(self.up.shape)} does not fit down {tuple(self.down.shape)} "
                               "(rank first, a 1x1 kernel for convolutions)")
        product = self.up.float().flatten(1) @ self.down.float().flatten(1)
        out = product.reshape(self.up.shape[0], *self.down.shape[1:])
        if tuple(out.shape) != tuple(shape):
            if out.numel() != math.prod(shape) or out.shape[0] != shape[0]:
                raise _ShapeMismatch(self, shape)
            out = out.reshape(shape)  # a linear LoRA on a 1x1 convolution, or back (SD 1.x / 2.x proj_in)
        return self.scale * out


class _ShapeMismatch(Exception):
    def __init__(self, module: LoraModule, shape):
        super().__init__(module.key)
        self.module, self.shape = module, tuple(shape)


@dataclass(frozen=True)
class LoraFile:
    """The low-rank updates of one file, in our module names (not yet checked against a model)."""

    path: Path
    layout: str                 # "kohya" or "diffusers"
    modules: list[LoraModule]

    @property
    def parts(self) -> set[str]:
        return {m.part for m in self.modules}


@dataclass(frozen=True)
class MergedLora:
    """What `merge_lora` changed: the file, its weight, and how many U-Net / text-encoder weights."""

    path: Path
    weight: float
    unet: int
    text: int

    def describe(self) -> str:
        return f"{self.path.name} x{self.weight:g} ({self.unet} U-Net and {self.text} text-encoder weights)"


def parse_lora_spec(spec: str) -> tuple[Path, float]:
    """`FILE[:WEIGHT]` -> (path, weight); the weight defaults to 1 (a colon in the path stays there unless a
    number follows the last one)."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
        except ValueError:
            return Path(spec), 1.0
        if not math.isfinite(weight):
            raise CtxdiffError(f"--lora {spec}: the weight must be a finite number, got {tail!r}")
        return Path(head), weight
    return Path(spec), 1.0


# --------------------------------------------------------------------------- reading


def read_lora(path: str | Path) -> LoraFile:
    """The updates of a LoRA file (.safetensors, or a weights-only pickle) in either layout; see the module doc."""
    path = Path(path)
    state = read_state_dict(path)
    try:
        _refuse_other_files(state)
        if any(k.startswith(("lora_unet_", "lora_te_")) for k in state):
            modules, layout = _read_kohya(state), "kohya"
        else:
            modules, layout = _read_diffusers(state, _peft_metadata(path)), "diffusers"
    except CtxdiffError as e:
        raise CtxdiffError(f"{path}: {e}") from e
    bad = [m.key for m in modules if not (torch.isfinite(m.down).all() and torch.isfinite(m.up).all())]
    if bad:
        raise CtxdiffError(f"{path}: NaN or inf in {len(bad)} LoRA weights ({_listing(bad)}); the file is broken")
    return LoraFile(path, layout, modules)


def _refuse_other_files(state: dict[str, torch.Tensor]) -> None:
    keys = list(state)
    family = _other_family(keys)
    if family:
        raise CtxdiffError(f"a LoRA for {family}; {_ONLY_SD}")
    for mark, what in _VARIANTS:
        hits = [k for k in keys if mark in k]
        if hits:
            raise CtxdiffError(f"{what} file ({hits[0]}); only plain LoRA (lora_down/lora_up, lora_A/lora_B) is merged")


def _other_family(keys: list[str]) -> str | None:
    """The architecture a LoRA is for when it is not SD 1.x/2.x, from its keys alone, or None."""
    def has(*marks):
        return any(m in k for k in keys for m in marks)

    def starts(*prefixes):
        return any(k.startswith(prefixes) for k in keys)

    if starts("lora_te1_", "lora_te2_", "text_encoder_2.") or has("add_embedding.", "label_emb", "add_embedding_"):
        return "SDXL (lora_te1_/lora_te2_, text_encoder_2 or added-condition keys)"
    if has("double_blocks", "single_blocks", "single_transformer_blocks"):
        return "Flux (double/single transformer blocks)"
    if has("joint_blocks", "context_embedder"):
        return "Stable Diffusion 3 (an MMDiT: joint blocks)"
    if starts("transformer.", "lora_transformer_", "diffusion_model.blocks.", "blocks."):
        return "a transformer-based model (transformer.* keys: SD 3, Flux, PixArt, a video model, ...)"
    if starts("base_model.model.", "model.layers.", "lora_unet_blocks_"):
        return "another kind of model (base_model.model.* / model.layers.* keys, e.g. a language model)"
    return None


def _read_kohya(state: dict[str, torch.Tensor]) -> list[LoraModule]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state.items():
        name, _, suffix = key.partition(".")
        if not name.startswith(("lora_unet_", "lora_te_")) or suffix not in ("lora_down.weight", "lora_up.weight",
                                                                              "alpha"):
            unknown.append(key)
            continue
        groups.setdefault(name, {})[suffix] = value
    if unknown:
        raise CtxdiffError(f"{len(unknown)} keys of no known LoRA layout ({_listing(unknown)}); a kohya/A1111 LoRA has "
                           "lora_unet_*/lora_te_* keys ending in .lora_down.weight, .lora_up.weight or .alpha")
    modules = []
    for name, parts in groups.items():
        _check_pair(name, parts, "lora_down.weight", "lora_up.weight")
        part = "unet" if name.startswith("lora_unet_") else "text"
        alpha = parts.get("alpha")
        modules.append(LoraModule(part, name, name, parts["lora_down.weight"], parts["lora_up.weight"],
                                  None if alpha is None else float(alpha)))
    return modules


def _read_diffusers(state: dict[str, torch.Tensor], metadata: dict) -> list[LoraModule]:
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state.items():
        for kind, pattern in (("down", _DOWN), ("up", _UP), ("alpha", _ALPHA)):
            match = pattern.match(key)
            if match:
                break
        else:
            unknown.append(key)
            continue
        target = _diffusers_module(match["module"])
        if target is None:
            unknown.append(key)
            continue
        groups.setdefault(target, {})[kind] = value
    if unknown:
        raise CtxdiffError(f"{len(unknown)} keys of no known LoRA layout ({_listing(unknown)}); a LoRA has lora_unet_*/"
                           "lora_te_* keys (kohya/A1111) or unet.*/text_encoder.* keys ending in .lora_A.weight / "
                           ".lora_B.weight (diffusers/PEFT)")
    if not groups:
        raise CtxdiffError("no LoRA weights in it (no lora_down/lora_up or lora_A/lora_B keys); pass a LoRA file")
    modules = []
    for (part, module), parts in groups.items():
        prefix = "unet" if part == "unet" else "text_encoder"
        _check_pair(f"{prefix}.{module}", parts, "down", "up")
        config = _peft_config(metadata, prefix, module)
        alpha = parts.get("alpha")
        alpha = float(alpha) if alpha is not None else config.get("alpha")
        modules.append(LoraModule(part, module, f"{prefix}.{module}", parts["down"], parts["up"], alpha,
                                  bool(config.get("rslora"))))
    return modules


def _diffusers_module(name: str) -> tuple[str, str] | None:
    """(part, our module path) of a diffusers/PEFT module name, or None if it names no part of SD."""
    if name.startswith("unet."):
        part, module = "unet", name[len("unet."):]
    elif name.startswith("text_encoder."):
        part, module = "text", name[len("text_encoder."):].removeprefix("text_model.")
    elif name.startswith(_UNET_ROOTS):
        part, module = "unet", name          # unet.save_attn_procs files carry no prefix
    else:
        return None
    old = re.match(r"^(?P<head>.+?)\.(?P<proj>to_q|to_k|to_v|to_out)$", module)
    if old and (".processor" in old["head"] or part == "text"):  # diffusers' attention-processor LoRA names
        module = f"{old['head'].removesuffix('.processor')}.{_OLD_ATTENTION[part][old['proj']]}"
    return part, module


def _check_pair(name: str, parts: dict, down: str, up: str) -> None:
    missing = [k for k in (down, up) if k not in parts]
    if missing:
        raise CtxdiffError(f"{name}: no {' / '.join(missing)} weight beside its other half; the file is incomplete")
    if parts[down].ndim not in (2, 4) or parts[up].ndim != parts[down].ndim:
        raise CtxdiffError(f"{name}: down {tuple(parts[down].shape)} and up {tuple(parts[up].shape)} are not the "
                           "weights of a LoRA of a linear or convolution layer")


def _peft_metadata(path: Path) -> dict:
    """diffusers' `lora_adapter_metadata` (PEFT configs keyed "unet.lora_alpha", ...), {} if none."""
    if path.suffix.lower() != ".safetensors":
        return {}
    with safetensors.safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        metadata = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CtxdiffError(f"{path}: unreadable lora_adapter_metadata ({e}); write the file again") from e
    if any(metadata.get(f"{p}.use_dora") for p in ("unet", "text_encoder")):
        raise CtxdiffError(f"{path}: a DoRA file (use_dora in its metadata); only plain LoRA is merged")
    return metadata


def _peft_config(metadata: dict, prefix: str, module: str) -> dict:
    """alpha (None: rank) and rsLoRA for one module from PEFT's config: alpha_pattern beats lora_alpha."""
    alpha = metadata.get(f"{prefix}.lora_alpha")
    for pattern, value in (metadata.get(f"{prefix}.alpha_pattern") or {}).items():
        candidates = (module, f"text_model.{module}") if prefix == "text_encoder" else (module,)
        if any(re.fullmatch(rf"(.*\.)?{pattern}", c) for c in candidates):
            alpha = value
            break
    return {"alpha": None if alpha is None else float(alpha), "rslora": metadata.get(f"{prefix}.use_rslora", False)}


# --------------------------------------------------------------------------- merging


def _module_table(models: LatentModels, layout: str) -> dict[tuple[str, str], nn.Module]:
    """{(part, name as the layout spells it): module} for every linear and convolution layer."""
    layers = {part: {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
              for part, model in (("unet", models.unet), ("text", models.text))}
    if layout == "diffusers":
        return {(part, name): m for part, named in layers.items() for name, m in named.items()}
    table = {("unet", "lora_unet_" + n.replace(".", "_")): m for n, m in layers["unet"].items()}
    compvis = compvis_names([n + ".weight" for n in layers["unet"]], unet_module_map(models.config.unet))
    for ours, theirs in compvis.items():
        table.setdefault(("unet", "lora_unet_" + theirs.removesuffix(".weight").replace(".", "_")),
                         layers["unet"][ours.removesuffix(".weight")])
    table.update({("text", "lora_te_text_model_" + n.replace(".", "_")): m for n, m in layers["text"].items()})
    return table


def merge_lora(models: LatentModels, lora: LoraFile | str | Path, weight: float = 1.0) -> MergedLora:
    """Add `weight` times the file's updates to the weights of `models` (in place); see the module doc.
    Every update is checked before the first weight changes."""
    return merge_loras(models, [(lora, weight)])[0]


def merge_loras(models: LatentModels, specs: list[tuple[LoraFile | str | Path, float]]) -> list[MergedLora]:
    """Merge several files, each with its own weight (`parse_lora_spec` reads `FILE[:WEIGHT]`). All files are read
    and checked before the first is merged, so a bad one leaves the model unchanged."""
    files = [(lora if isinstance(lora, LoraFile) else read_lora(lora), float(weight)) for lora, weight in specs]
    planned = [_planned_deltas(models, lora, weight) for lora, weight in files]
    with torch.no_grad():
        for deltas in planned:
            for target, delta in deltas:
                target.copy_((target.float() + delta.to(target.device)).to(target.dtype))
    return [MergedLora(lora.path, weight, *(sum(m.part == part for m in lora.modules) for part in ("unet", "text")))
            for lora, weight in files]


def _planned_deltas(models: LatentModels, lora: LoraFile, weight: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weight tensor, weight * its update) for every module of `lora`, or a CtxdiffError naming what does not fit."""
    if not math.isfinite(weight):
        raise CtxdiffError(f"{lora.path}: the LoRA weight must be a finite number, got {weight}")
    table = _module_table(models, lora.layout)
    unmatched = [m.key for m in lora.modules if (m.part, m.module) not in table]
    if unmatched:
        raise CtxdiffError(f"{lora.path}: {_family_hint(lora, models)}{len(unmatched)} of its {len(lora.modules)} "
                           f"modules are not in this model ({_listing(unmatched)}); pass a LoRA for this Stable "
                           "Diffusion 1.x/2.x model")
    deltas = []
    for m in lora.modules:
        target = table[(m.part, m.module)].weight
        try:
            deltas.append((target, weight * m.delta(target.shape)))
        except _ShapeMismatch as e:
            raise CtxdiffError(f"{lora.path}: {_family_hint(lora, models)}{m.key} has shape "
                               f"{tuple(m.up.shape[:1]) + tuple(m.down.shape[1:])} but the model's weight "
                               f"{e.shape}; pass a LoRA for this model") from None
    return deltas


def _family_hint(lora: LoraFile, models: LatentModels) -> str:
    """'a LoRA for SD 1.x (...) but this model is SD 2.x (...): ' when the cross-attention widths say so, else ''."""
    widths = {m.down.shape[1] for m in lora.modules
              if m.part == "unet" and re.search(r"attn2[._]to_[kv]$", m.module) and m.down.ndim == 2}
    ours = models.config.unet.cross_attention_dim
    theirs = next(iter(sorted(widths - {ours})), None)
    if theirs is None:
        return ""
    return (f"a LoRA for {_family(theirs)} (its cross-attention reads {theirs}-wide text) but this model is "
            f"{_family(ours)} ({ours}-wide): ")


def _family(width: int) -> str:
    return _CONTEXT_FAMILY.get(width, f"a model of {width}-wide text context")


def _listing(keys: list[str], limit: int = 5) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
