"""Load Stable Diffusion 1.x/2.x weights (CompVis single files, diffusers folders); write single files.

`load_sd(path)` accepts
  - a single file in the original CompVis layout: `.safetensors`, or `.ckpt`/`.pt` read with
    torch.load(weights_only=True) (Lightning's callback state mapped to inert stand-ins, see
    ctxdiff/safe_pickle.py; pickles that need code are refused). The architecture is read from
    tensor shapes (text keys without `text_model.` included; SD 2.x towers of 24 or 23 OpenCLIP
    blocks both run 23, see convert.openclip_layer); EMA weights (`model_ema.*`) replace the
    U-Net's when present;
  - a diffusers folder: model_index.json, unet/, vae/, text_encoder/ (config.json plus
    .safetensors or .bin weights), scheduler/scheduler_config.json if present. tokenizer/ is not
    needed: prompts are tokenised with open_clip's BPE, the same vocabulary.

Prediction type, the rule (`prediction_type=` always wins, since keys cannot always tell):
  - a file written by `save_compvis`: the type it was saved with;
  - a diffusers folder: scheduler_config.json's `prediction_type` ("epsilon" if absent);
  - a CompVis file: SD 1.x (768-wide context) predicts epsilon; SD 2.x (1024-wide OpenCLIP
    context) is taken to be a 768-v model, v_prediction. SD 2.x *base* (512 px) checkpoints
    predict epsilon and need prediction_type="epsilon".
Noise schedule: the file's own where it has one (CompVis `alphas_cumprod` / `betas` buffers; a
diffusers scheduler_config.json's beta_schedule, beta_start, beta_end, num_train_timesteps,
trained_betas, rescale_betas_zero_snr), else SD's standard scaled_linear 0.00085..0.012, T = 1000;
a schedule other than the standard one is used with a NonStandardScheduleWarning.

Other files are named in one line (CtxdiffError): other families (SDXL, SD 3, Flux, ControlNet)
and parts of a model (a LoRA, a VAE, text encoder or U-Net alone, a textual-inversion embedding).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import safetensors
import torch

from ctxdiff.checkpoints import load_module_state, read_state_dict, save_bundle
from ctxdiff.errors import CtxdiffError
from ctxdiff.models.latent.convert import (
    TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, compvis_text_config, detect_text_config, detect_unet_config,
    detect_vae_config, ema_key, normalize_text_keys, text_from_compvis, to_compvis, unet_from_compvis,
    vae_from_compvis,
)
from ctxdiff.models.latent.text import LatentTextConfig, LatentTextEncoder, vocab_id
from ctxdiff.models.latent.unet import LatentUNet, LatentUNetConfig
from ctxdiff.models.latent.vae import LatentVAE, LatentVAEConfig

PREDICTION_TYPES = ("epsilon", "v_prediction")
_SAVED_KIND = "sd-compvis"
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                      "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin")
_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.fp16.safetensors", "pytorch_model.fp16.bin")


_FAMILIES = ("scaled_linear", "linear")


class NonStandardScheduleWarning(UserWarning):
    """A checkpoint's own noise schedule is not Stable Diffusion's standard one; it is the one used."""


@dataclass(frozen=True)
class SchedulerInfo:
    """The noise schedule the model was trained with (SD 1.x/2.x: scaled_linear 0.00085..0.012, T = 1000).

    Parametric (beta_schedule "scaled_linear" or "linear" from beta_start to beta_end), or, with
    `trained_betas`, exactly those T betas: a file's own schedule, beta_schedule then naming the
    family they follow ("custom": none). `from_betas` / `from_alphas_cumprod` build it from a file's
    values, giving the standard schedule itself where they are it to their precision.
    """

    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    trained_betas: tuple[float, ...] | None = None  # beta_1..beta_T; when set, they are the schedule

    def __post_init__(self):
        if self.trained_betas is None:
            if self.beta_schedule not in _FAMILIES:
                raise CtxdiffError(f"beta_schedule {self.beta_schedule!r} is not supported; SD uses 'scaled_linear' "
                                   "(or 'linear', or its own trained_betas)")
            return
        betas = tuple(float(b) for b in self.trained_betas)
        object.__setattr__(self, "trained_betas", betas)  # a JSON list read back becomes the tuple again
        if len(betas) != self.num_train_timesteps:
            raise CtxdiffError(f"the schedule has {len(betas)} betas but num_train_timesteps "
                               f"{self.num_train_timesteps}; they must agree")
        if not (all(0 < b < 1 for b in betas[:-1]) and 0 < betas[-1] <= 1):
            raise CtxdiffError("the schedule's betas must lie in (0, 1), the last in (0, 1] (abar decreasing from "
                               "1, reaching 0 at T at most); this one is not a diffusion schedule")

    def betas(self) -> torch.Tensor:
        """beta_1..beta_T, float64 [T]."""
        if self.trained_betas is not None:
            return torch.tensor(self.trained_betas, dtype=torch.float64)
        return _family_betas(self.beta_schedule, self.beta_start, self.beta_end, self.num_train_timesteps)

    def alphas_cumprod(self) -> torch.Tensor:
        """abar in paper indexing, float64 [T + 1]: abar[0] = 1, abar[t] for diffusers timestep tau = t - 1."""
        return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - self.betas(), dim=0)])

    @property
    def is_standard(self) -> bool:
        return self == SchedulerInfo()

    def describe(self) -> str:
        if self.trained_betas is None:
            return f"{self.beta_schedule} {self.beta_start:g}..{self.beta_end:g}, T = {self.num_train_timesteps}"
        family = "betas of no standard family" if self.beta_schedule == "custom" else (
            f"{self.beta_schedule} {self.beta_start:.6g}..{self.beta_end:.6g}")
        return f"its own {family}, T = {self.num_train_timesteps}, abar_T = {self.alphas_cumprod()[-1].item():.3g}"

    @classmethod
    def from_betas(cls, betas: torch.Tensor, precision: torch.dtype | None = None) -> "SchedulerInfo":
        """The schedule of betas [T] stored at `precision` (default: their dtype): the standard one where
        they are it to that precision, else exactly these, named after the family they follow."""
        b = torch.as_tensor(betas).double().flatten()
        rtol = 4 * torch.finfo(precision or torch.as_tensor(betas).dtype).eps
        standard = cls()
        if len(b) == standard.num_train_timesteps and _close(b, standard.betas(), rtol):
            return standard
        if len(b) == 0:
            raise CtxdiffError("the schedule has no betas; this is not a diffusion schedule")
        start, end = b[0].item(), b[-1].item()
        family = next((f for f in _FAMILIES if min(start, end) > 0 and _close(b, _family_betas(f, start, end, len(b)),
                                                                              rtol)), "custom")
        return cls(len(b), family, start, end, tuple(b.tolist()))

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: torch.Tensor) -> "SchedulerInfo":
        """The schedule of abar_1..abar_T [T] (a CompVis `alphas_cumprod` buffer): the standard one where
        they are it to their dtype's precision, else the betas that give exactly these."""
        a = torch.as_tensor(alphas_cumprod).double().flatten()
        standard = cls()
        if len(a) == standard.num_train_timesteps and _close(
                a, standard.alphas_cumprod()[1:], 4 * torch.finfo(alphas_cumprod.dtype).eps):
            return standard
        return cls.from_betas(1 - a / torch.cat([torch.ones(1, dtype=torch.float64), a[:-1]]), torch.float64)


def _family_betas(family: str, start: float, end: float, steps: int) -> torch.Tensor:
    if family == "scaled_linear":
        return torch.linspace(start ** 0.5, end ** 0.5, steps, dtype=torch.float64) ** 2
    return torch.linspace(start, end, steps, dtype=torch.float64)


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    return a.shape == b.shape and bool(((a - b).abs() <= rtol * b.abs()).all())


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas whose abar ends at exactly 0, sqrt(abar) shifted and scaled (Lin et al. 2024, Algorithm 1;
    diffusers' rescale_betas_zero_snr), float64."""
    root = torch.cumprod(1 - betas.double(), dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    abar = ((root - last) * first / (first - last)) ** 2
    return 1 - torch.cat([abar[:1], abar[1:] / abar[:-1]])


@dataclass(frozen=True)
class LatentSDConfig:
    """The three architectures of a Stable Diffusion model."""

    unet: LatentUNetConfig
    vae: LatentVAEConfig
    text: LatentTextConfig

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LatentSDConfig":
        return cls(LatentUNetConfig(**d["unet"]), LatentVAEConfig(**d["vae"]), LatentTextConfig(**d["text"]))


@dataclass
class LatentModels:
    """A loaded Stable Diffusion model: U-Net, VAE, text encoder, and how to drive them."""

    unet: LatentUNet
    vae: LatentVAE
    text: LatentTextEncoder
    config: LatentSDConfig
    prediction_type: str  # "epsilon" or "v_prediction": what the U-Net outputs
    scheduler: SchedulerInfo
    used_ema: bool = False


def load_sd(path: str | Path, *, prediction_type: str | None = None, use_ema: bool = True,
            device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> LatentModels:
    """Load an SD 1.x/2.x checkpoint (CompVis single file or diffusers folder); see the module doc."""
    path = Path(path)
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise CtxdiffError(f"prediction type {prediction_type!r} is not known; "
                           f"use one of {', '.join(PREDICTION_TYPES)}")
    if path.is_dir():
        models = _load_diffusers(path, prediction_type, device, dtype)
    else:
        models = _load_single_file(path, prediction_type, use_ema, device, dtype)
    _check_schedule(path, models)
    return models


def _check_schedule(path: Path, models: LatentModels) -> None:
    """Warn of a schedule other than SD's standard one; refuse one an epsilon U-Net cannot sample."""
    scheduler = models.scheduler
    if scheduler.is_standard:
        return
    if models.prediction_type == "epsilon" and scheduler.alphas_cumprod()[-1] == 0:
        raise CtxdiffError(f"{path}: its schedule ends at zero SNR (abar_T = 0), where an epsilon-predicting U-Net "
                           "cannot give x0; zero-SNR models predict v: pass prediction_type='v_prediction'")
    warnings.warn(NonStandardScheduleWarning(
        f"{path}: its noise schedule is not Stable Diffusion's standard one ({SchedulerInfo().describe()}) but "
        f"{scheduler.describe()}; sampling with the file's own"), stacklevel=3)


def save_compvis(path: str | Path, models: LatentModels) -> Path:
    """Write the models as one CompVis-layout .safetensors file (atomically), configs in its metadata.

    Other tools read it as an SD 1.x/2.x checkpoint; `load_sd` reads the exact configs back.
    """
    state = to_compvis(models.unet, models.vae, models.text)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        groups.setdefault(head, {})[rest] = value
    config = replace(models.config, text=compvis_text_config(models.text.config))
    saved = {**config.to_dict(), "prediction_type": models.prediction_type, "scheduler": asdict(models.scheduler)}
    return save_bundle(path, groups, saved, kind=_SAVED_KIND)


# --------------------------------------------------------------------------- single files


def _load_single_file(path: Path, prediction_type, use_ema, device, dtype) -> LatentModels:
    state = read_state_dict(path)
    _refuse_other_files(path, state)
    state = normalize_text_keys(state)
    saved = _saved_configs(path)
    try:
        if saved is not None:
            config = LatentSDConfig.from_dict(saved)
            prediction_type = prediction_type or saved["prediction_type"]
            scheduler = SchedulerInfo(**saved["scheduler"])
        else:
            text_config = detect_text_config(state)
            vae_config = detect_vae_config(state)
            unet_config = detect_unet_config(state)
            v2 = unet_config.cross_attention_dim == 1024
            prediction_type = prediction_type or ("v_prediction" if v2 else "epsilon")
            unet_config = replace(unet_config, sample_size=96 if prediction_type == "v_prediction" else 64)
            config = LatentSDConfig(unet_config, vae_config, text_config)
            scheduler = compvis_schedule(state)
        used_ema = False
        if use_ema:
            state, used_ema = _prefer_ema(state)
        unet_state = unet_from_compvis(state, config.unet)
        vae_state = vae_from_compvis(state, config.vae)
        text_state = text_from_compvis(state, config.text)
    except CtxdiffError as e:
        raise CtxdiffError(f"{path}: {e}") from e
    return LatentModels(
        _build(LatentUNet, config.unet, unet_state, device, dtype, f"{path}: unet"),
        _build(LatentVAE, config.vae, vae_state, device, dtype, f"{path}: vae"),
        _build(LatentTextEncoder, config.text, text_state, device, dtype, f"{path}: text encoder"),
        config, prediction_type, scheduler, used_ema)


def compvis_schedule(state: dict[str, torch.Tensor]) -> SchedulerInfo:
    """A CompVis file's own schedule, from its `betas` or `alphas_cumprod` buffer (the one stored more
    precisely; betas on a tie where the two agree, else alphas_cumprod, what CompVis' samplers read);
    the standard one without either."""
    buffers = {name: state[name] for name in ("betas", "alphas_cumprod")
               if name in state and state[name].is_floating_point() and state[name].ndim == 1}
    if not buffers:
        return SchedulerInfo()
    bits = {name: torch.finfo(value.dtype).bits for name, value in buffers.items()}
    best = [name for name in buffers if bits[name] == max(bits.values())]
    if len(best) == 2:
        betas, abar = buffers["betas"], buffers["alphas_cumprod"]
        agree = _close(torch.cumprod(1 - betas.double(), 0), abar.double(), 64 * torch.finfo(abar.dtype).eps)
        best = ["betas"] if agree else ["alphas_cumprod"]
    name = best[0]
    try:
        if name == "alphas_cumprod":
            return SchedulerInfo.from_alphas_cumprod(buffers[name])
        return SchedulerInfo.from_betas(buffers[name])
    except CtxdiffError as e:
        raise CtxdiffError(f"its `{name}` buffer: {e}") from e


_LORA_MARKS = ("lora_down.", "lora_up.", ".lora_A.", ".lora_B.", "lora.down.", "lora.up.", "hada_w1_", "lokr_w1")
_WHOLE = "pass a full Stable Diffusion 1.x/2.x checkpoint or a diffusers folder"
_ONLY_SD = "ctxdiff loads Stable Diffusion 1.x and 2.x checkpoints"


def _contains(keys: list[str], *marks: str) -> bool:
    return any(mark in key for key in keys for mark in marks)


def _starts(keys: list[str], *prefixes: str) -> bool:
    return any(key.startswith(prefixes) for key in keys)


def _other_family(state: dict[str, torch.Tensor]) -> str | None:
    """The model family of a file that is not SD 1.x/2.x (a LoRA included), from its keys, or None."""
    keys = list(state)
    if _contains(keys, *_LORA_MARKS) or _starts(keys, "lora_unet_", "lora_te"):
        return (f"this is a LoRA (low-rank adapter weights), not a model: {_WHOLE} as the model and give the LoRA "
                "with --lora FILE[:WEIGHT] (ctxdiff.models.latent.lora.merge_lora)")
    contexts = {v.shape[1] for k, v in state.items() if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")}
    if _starts(keys, "conditioner.embedders.") or (
            UNET_PREFIX + "label_emb.0.0.weight" in state and contexts & {1280, 2048}):
        return f"not supported: detected SDXL (conditioner.embedders.* / label_emb keys); {_ONLY_SD}"
    if _contains(keys, "joint_blocks."):
        return f"not supported: detected Stable Diffusion 3 (an MMDiT: joint_blocks.* keys); {_ONLY_SD}"
    if _contains(keys, "double_blocks."):
        return f"not supported: detected Flux (double_blocks.* keys); {_ONLY_SD}"
    if _starts(keys, "control_model.", "controlnet_") or _contains(keys, "controlnet_cond_embedding."):
        return f"not supported: detected a ControlNet (control_model.* keys); {_ONLY_SD}"
    return None


def _model_part(keys: list[str]) -> str | None:
    """What part of a model a file holds when it is not a whole SD checkpoint, from its keys, or None."""
    if _starts(keys, UNET_PREFIX):
        missing = [(what, prefix) for what, prefix in (("VAE", VAE_PREFIX), ("text encoder", TEXT_PREFIX))
                   if not _starts(keys, prefix)]
        if not missing:
            return None
        return (f"this is a U-Net without its {' and '.join(what for what, _ in missing)} "
                f"(no {' / '.join(prefix + '*' for _, prefix in missing)} keys); {_WHOLE}")
    vae = any(k.removeprefix(VAE_PREFIX) in ("encoder.conv_in.weight", "decoder.conv_in.weight") for k in keys)
    text = _starts(keys, TEXT_PREFIX, "text_model.", "transformer.resblocks.", "encoder.layers.", "token_embedding.")
    if vae and not text:
        return "this is a VAE-only checkpoint; pass a full Stable Diffusion checkpoint"
    if text and not vae:
        return f"this is a text encoder alone (CLIP text weights, no U-Net); {_WHOLE}"
    if _starts(keys, "conv_in.", "time_embedding.", "down_blocks.", "input_blocks.", "diffusion_model."):
        return (f"this is a U-Net alone (no {UNET_PREFIX}* keys: a diffusers unet/ weights file or a bare "
                f"CompVis U-Net); {_WHOLE}")
    if _starts(keys, "emb_params", "string_to_param", "clip_l", "clip_g"):
        return f"this is a textual-inversion embedding, not a model; {_WHOLE}"
    return f"no Stable Diffusion U-Net in it (no {UNET_PREFIX}* keys); {_WHOLE}"


def _refuse_other_files(path: Path, state: dict[str, torch.Tensor]) -> None:
    what = _other_family(state) or _model_part(list(state))
    if what is not None:
        raise CtxdiffError(f"{path}: {what}")


def _saved_configs(path: Path) -> dict | None:
    """The configs `save_compvis` stored in a .safetensors file's metadata, or None."""
    if path.suffix.lower() != ".safetensors":
        return None
    with safetensors.safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("kind") != _SAVED_KIND:
        return None
    try:
        return json.loads(metadata["configs"])
    except (KeyError, json.JSONDecodeError) as e:
        raise CtxdiffError(f"{path}: corrupt ctxdiff metadata ({e}); write the file again") from e


def _prefer_ema(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """The U-Net's weights replaced by their `model_ema.*` copies, if the file has them."""
    unet_keys = [k for k in state if k.startswith(UNET_PREFIX)]
    missing = [ema_key(k) for k in unet_keys if ema_key(k) not in state]
    if len(missing) == len(unet_keys):
        return state, False
    if missing:
        raise CtxdiffError(f"the EMA weights are incomplete ({len(missing)} missing, e.g. {missing[0]}); "
                           "load with use_ema=False to use the training weights")
    return {**state, **{k: state[ema_key(k)] for k in unet_keys}}, True


def _build(cls, config, state: dict[str, torch.Tensor], device, dtype, what: str):
    """`cls(config)` built without initialisation, then filled with `state` (names checked)."""
    with torch.device("meta"):
        model = cls(config).to(dtype)
    model = model.to_empty(device=device)
    load_module_state(model, state, what)
    return model.eval()


# --------------------------------------------------------------------------- diffusers folders


def _load_diffusers(folder: Path, prediction_type, device, dtype) -> LatentModels:
    index = _read_json(folder / "model_index.json", "a diffusers folder (with model_index.json)")
    if "unet" not in index and "transformer" in index:
        raise CtxdiffError(f"{folder}: not supported: detected a transformer-based model "
                           f"({index.get('_class_name', 'a transformer/ folder')}, no unet/); "
                           "ctxdiff loads Stable Diffusion 1.x and 2.x models")
    unet_json = _read_json(folder / "unet" / "config.json", "the unet/ config")
    if "text_encoder_2" in index or unet_json.get("addition_embed_type") == "text_time":
        raise CtxdiffError(f"{folder}: not supported: detected SDXL (text_encoder_2 / text_time embeddings); "
                           "ctxdiff loads Stable Diffusion 1.x and 2.x models")
    try:
        config = LatentSDConfig(
            LatentUNetConfig.from_diffusers(unet_json),
            LatentVAEConfig.from_diffusers(_read_json(folder / "vae" / "config.json", "the vae/ config")),
            LatentTextConfig.from_hf(_read_json(folder / "text_encoder" / "config.json", "the text_encoder/ config"),
                                     _pad_token_id(folder)))
    except CtxdiffError as e:
        raise CtxdiffError(f"{folder}/{e}") from e
    sched_path = folder / "scheduler" / "scheduler_config.json"
    sched = _read_json(sched_path, "the scheduler config") if sched_path.is_file() else {}
    try:
        scheduler = diffusers_schedule(sched)
    except CtxdiffError as e:
        raise CtxdiffError(f"{sched_path}: {e}") from e
    text_weights = _read_weights(folder / "text_encoder", _HF_WEIGHTS)
    text_state = {k.removeprefix("text_model."): v for k, v in text_weights.items()}
    text_state.pop("embeddings.position_ids", None)
    return LatentModels(
        _build(LatentUNet, config.unet, _read_weights(folder / "unet", _DIFFUSERS_WEIGHTS), device, dtype,
               f"{folder}/unet"),
        _build(LatentVAE, config.vae, _read_weights(folder / "vae", _DIFFUSERS_WEIGHTS), device, dtype,
               f"{folder}/vae"),
        _build(LatentTextEncoder, config.text, text_state, device, dtype, f"{folder}/text_encoder"),
        config, prediction_type or sched.get("prediction_type", "epsilon"), scheduler)


def diffusers_schedule(config: dict) -> SchedulerInfo:
    """The schedule of a diffusers scheduler_config.json: trained_betas (stored as float32 by diffusers)
    or the parametric beta_schedule, then rescaled to zero terminal SNR if rescale_betas_zero_snr."""
    if config.get("trained_betas") is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float64)
        if "num_train_timesteps" in config and config["num_train_timesteps"] != len(betas):
            raise CtxdiffError(f"{len(betas)} trained_betas but num_train_timesteps {config['num_train_timesteps']}; "
                               "they must agree")
        scheduler = SchedulerInfo.from_betas(betas, torch.float32)
    else:
        scheduler = SchedulerInfo(**{k: config[k] for k in ("num_train_timesteps", "beta_schedule", "beta_start",
                                                             "beta_end") if k in config})
    if config.get("rescale_betas_zero_snr"):
        scheduler = SchedulerInfo.from_betas(rescale_zero_terminal_snr(scheduler.betas()))
    return scheduler


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise CtxdiffError(f"{path}: no such file; pass {what}")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CtxdiffError(f"{path}: unreadable JSON ({e}); restore the file") from e


def _read_weights(folder: Path, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    for name in names:
        if (folder / name).is_file():
            return read_state_dict(folder / name)
    raise CtxdiffError(f"{folder}: no weights file (looked for {', '.join(names)}); restore the folder")


def _pad_token_id(folder: Path) -> int | None:
    """The padding id of tokenizer/special_tokens_map.json, if the folder has one."""
    path = folder / "tokenizer" / "special_tokens_map.json"
    if not path.is_file():
        return None
    pad = _read_json(path, "the tokenizer's special tokens").get("pad_token")
    return vocab_id(pad.get("content") if isinstance(pad, dict) else pad)
