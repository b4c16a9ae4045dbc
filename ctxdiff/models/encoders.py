"""open_clip text and image towers as ctxdiff's context encoders (frozen by default).

Text: per-token features after `ln_final` (cross-attention keys) plus the projected sentence
embedding. Image: patch tokens after `ln_post` (adapter queries) plus the projected image
embedding. Weights come from a local file (state dict or ctxdiff "clip" bundle) or from an
open_clip pretrained tag that is already in the local cache: ctxdiff never downloads.
"""

from __future__ import annotations

import difflib
import os
import warnings
from copy import deepcopy
from dataclasses import dataclass, replace
from typing import ClassVar
from functools import lru_cache
from pathlib import Path

import open_clip
import safetensors
import torch
import torch.nn.functional as F
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import CLIP, resize_pos_embed, resize_text_pos_embed
from open_clip.transformer import text_global_pool
from torch import nn

from ctxdiff.checkpoints import TORCH_SUFFIXES, load_bundle, load_module_state, read_state_dict, save_bundle
from ctxdiff.errors import CtxdiffError, UsageError
from ctxdiff.models.conditioning import TextCondition
from ctxdiff.recipes import from_dict

# ctxdiff's own small CLIPs, in open_clip's model-config format (embed_dim, vision_cfg, text_cfg).
# Both use open_clip's bundled BPE vocabulary (49408 tokens), so the token embedding dominates
# their size: shapes-clip ~2.9M parameters (2.37M of them token embedding, hence the narrow
# 48-wide text tower: the default model must ship in <= 25 MB), tiny-clip 1.64M (1.58M).
CUSTOM_ARCHS: dict[str, dict] = {
    # 64x64 input with 8x8 patches: 64 patch tokens; 32x32 images are upsampled (bicubic) to it.
    "shapes-clip": {
        "embed_dim": 96,
        "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 96, "layers": 4, "head_width": 32},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 48, "heads": 4, "layers": 4},
    },
    # For tests: 16 patch tokens of width 32, 2 layers per tower.
    "tiny-clip": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    },
}


@dataclass(frozen=True)
class ClipConfig:
    """The CLIP that encodes text (for the U-Net and the adapter) and images (the adapter's image branch)."""

    arch: str = "ViT-B-32"                 # open_clip architecture name (OpenAI weights from a file:
                                           # "ViT-B-32-quickgelu"), or a CUSTOM_ARCHS key
    weights: str | None = None             # local file, or open_clip pretrained tag ("openai"); None: random
    context_length: int | None = None      # None: the architecture's own (77 for OpenAI CLIPs)

    RETIRED: ClassVar[dict] = {"word_tokens": False}   # keys of files written before they were removed


class PromptTruncatedWarning(UserWarning):
    """A prompt had more tokens than the text encoder's context length and was cut."""


@lru_cache(maxsize=None)
def _tokenizer() -> open_clip.SimpleTokenizer:
    return open_clip.SimpleTokenizer()


class ClipEncoders(nn.Module):
    """An open_clip `CLIP` with the encoders ctxdiff needs; built by `load_clip`.

    `encode_text(...).pooled` and `encode_image(...)[1]` are the *un-normalised* projected
    embeddings (for conditioning); `text_features` / `image_features` are their L2-normalised
    versions (for CLIP score and retrieval).
    """

    def __init__(self, clip: CLIP, config: ClipConfig, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD):
        super().__init__()
        self.clip = clip
        self.config = config
        clip.visual.output_tokens = True
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def text_dim(self) -> int:
        """Width of `encode_text(...).tokens`."""
        return self.clip.transformer.width

    @property
    def image_dim(self) -> int:
        return self.clip.visual.conv1.out_channels

    @property
    def embed_dim(self) -> int:
        return self.clip.visual.output_dim

    @property
    def image_size(self) -> int:
        return self.clip.visual.image_size[0]

    @property
    def context_length(self) -> int:
        return self.clip.context_length

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids [B, context_length]; over-long prompts are cut (EOT kept) with a warning."""
        tok, length = _tokenizer(), self.context_length
        ids = torch.zeros(len(prompts), length, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            tokens = [tok.sot_token_id, *tok.encode(prompt), tok.eot_token_id]
            if len(tokens) > length:
                warnings.warn(PromptTruncatedWarning(
                    f"prompt truncated to the text encoder's {length} tokens ({len(tokens)} with start/end): "
                    f"{prompt!r}"), stacklevel=3)
                tokens = tokens[:length - 1] + [tok.eot_token_id]
            ids[i, :len(tokens)] = torch.tensor(tokens)
        return ids.to(self.mean.device)

    def encode_text(self, prompts: list[str]) -> TextCondition:
        """tokens [B, L, text_dim] after ln_final, mask True up to and including EOT,
        pooled [B, embed_dim] the un-normalised projected text embedding."""
        ids = self.tokenize(prompts)
        tokens, pooled = self._text_tower(ids)
        eot = (ids == _tokenizer().eot_token_id).int().argmax(dim=1, keepdim=True)
        mask = torch.arange(ids.shape[1], device=ids.device)[None] <= eot
        return TextCondition(tokens=tokens, mask=mask, pooled=pooled)

    def _text_input(self, ids: torch.Tensor) -> torch.Tensor:
        """The text transformer's input: token plus position embeddings of ids [B, n <= L]."""
        clip = self.clip
        cast_dtype = clip.transformer.get_cast_dtype()
        return clip.token_embedding(ids).to(cast_dtype) + clip.positional_embedding[:ids.shape[1]].to(cast_dtype)

    def _text_tower(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-token features after ln_final, projected EOT feature) of token ids [B, n <= L]."""
        clip, n = self.clip, ids.shape[1]
        tokens = clip.ln_final(clip.transformer(self._text_input(ids), attn_mask=clip.attn_mask[:n, :n]))
        pooled = text_global_pool(tokens, ids, clip.text_pool_type, eos_token_id=clip.text_eos_id)
        projection = clip.text_projection
        return tokens, projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images in [-1, 1], [B, 3, H, W] of any size -> (patch tokens [B, N, image_dim] after
        ln_post, pooled [B, embed_dim] un-normalised projected embedding).

        Images are resized (bicubic, antialiased; non-square ones squashed, not cropped) to the
        tower's size and normalised with CLIP's mean/std here, so callers pass [-1, 1] pixels.
        """
        x = (images.to(self.mean.dtype) + 1) / 2
        if tuple(x.shape[-2:]) != tuple(self.clip.visual.image_size):
            x = F.interpolate(x, size=self.clip.visual.image_size, mode="bicubic", antialias=True,
                              align_corners=False).clamp(0, 1)
        pooled, tokens = self.clip.visual((x - self.mean) / self.std)
        return tokens, pooled

    def text_features(self, prompts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings [B, embed_dim] (CLIP score, retrieval, training).

        The text transformer is causal, so it runs only up to the batch's last EOT: the same
        embedding as `encode_text(...).pooled`, without the cost of the padding."""
        ids = self.tokenize(prompts)
        last = int((ids == _tokenizer().eot_token_id).int().argmax(dim=1).max()) + 1
        return F.normalize(self._text_tower(ids[:, :last])[1], dim=-1)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings [B, embed_dim] of [-1, 1] images (CLIP score, retrieval)."""
        return F.normalize(self.encode_image(images)[1], dim=-1)


def load_clip(config: ClipConfig, device: str | torch.device = "cpu", *, trainable: bool = False) -> ClipEncoders:
    """Build the CLIP named by `config` and load its weights (none: random init); frozen and in
    eval mode unless `trainable`. A ctxdiff "clip" bundle in `config.weights` brings its own
    arch and context length, which replace those in `config`."""
    state, tag_cfg = None, {}
    if config.weights is not None:
        path = _weights_file(config)
        bundle = _read_clip_bundle(path)
        if bundle is not None:
            bundle_config, state = bundle
            config = replace(config, arch=bundle_config.arch, context_length=bundle_config.context_length)
        else:
            state, tag_cfg = read_state_dict(path), _tag_cfg(config)
    model_cfg = _model_cfg(config.arch)
    if config.context_length is not None:
        model_cfg["text_cfg"]["context_length"] = config.context_length
    model_cfg["quick_gelu"] = model_cfg.get("quick_gelu", False) or tag_cfg.get("quick_gelu", False)
    clip = CLIP(**model_cfg)
    if state is not None:
        _load_state(clip, state, f"{config.weights} (CLIP '{config.arch}')")
    mean, std = tag_cfg.get("mean", OPENAI_DATASET_MEAN), tag_cfg.get("std", OPENAI_DATASET_STD)
    encoders = ClipEncoders(clip, config, mean, std)
    encoders.requires_grad_(trainable)
    return encoders.to(device).train(trainable)


def _open_clip_name(arch: str) -> str:
    return arch.replace("/", "-")


def _model_cfg(arch: str) -> dict:
    """The open_clip model config for `arch` (a deep copy); UsageError if unknown or unsupported."""
    if arch in CUSTOM_ARCHS:
        return deepcopy(CUSTOM_ARCHS[arch])
    cfg = open_clip.get_model_config(_open_clip_name(arch))
    if cfg is None:
        known = [*CUSTOM_ARCHS, *open_clip.list_models()]
        lowered = {name.lower(): name for name in known}
        matches = difflib.get_close_matches(_open_clip_name(arch).lower(), lowered, n=5, cutoff=0.5)
        close = [lowered[m] for m in matches]
        hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(known)}"
        raise UsageError(f"unknown CLIP architecture '{arch}'; {hint}")
    unsupported = _unsupported_parts(cfg)
    if unsupported:
        usable = [*CUSTOM_ARCHS, *(name for name in open_clip.list_models()
                                   if not _unsupported_parts(open_clip.get_model_config(name)))]
        raise UsageError(f"CLIP architecture '{arch}' has {' and '.join(unsupported)}, which ctxdiff's "
                         f"encoders do not support; use one of: {', '.join(usable)}")
    return cfg


def _unsupported_parts(cfg: dict) -> list[str]:
    """What in an open_clip model config ctxdiff's encoders cannot run (they need open_clip's
    `CLIP` class with a VisionTransformer and the bundled BPE tokenizer)."""
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    return [why for why, bad in (
        ("a timm image tower", vision.get("timm_model_name")),
        ("a ResNet image tower", not isinstance(vision.get("layers", 12), int)),
        ("a Hugging Face text tower", text.get("hf_model_name")),
        ("a Hugging Face tokenizer", text.get("hf_tokenizer_name")),
        ("a custom text tower", cfg.get("custom_text")),
    ) if bad]


def _tag_cfg(config: ClipConfig) -> dict:
    """open_clip's pretrained entry (url, hf_hub, mean/std, quick_gelu) if `weights` is a tag, else {}."""
    if config.arch in CUSTOM_ARCHS:
        return {}
    return open_clip.get_pretrained_cfg(_open_clip_name(config.arch), config.weights)


def _weights_file(config: ClipConfig) -> str:
    """The local file holding `config.weights`: the path itself, or the cached file of a tag."""
    weights = config.weights
    if os.path.isfile(weights):
        return weights
    _model_cfg(config.arch)  # an unknown arch is a usage error before any tag lookup
    name, tag_cfg = _open_clip_name(config.arch), _tag_cfg(config)
    if tag_cfg:
        return _cached_pretrained(name, weights, tag_cfg)
    looks_like_path = os.sep in weights or "/" in weights or weights.endswith((".safetensors", *TORCH_SUFFIXES))
    if looks_like_path or os.path.exists(weights):
        what = "is not a file" if os.path.exists(weights) else "not found"
        raise CtxdiffError(f"{weights}: CLIP weights file {what}; pass a .safetensors/.pt/.bin state dict "
                           "or a ctxdiff clip bundle")
    tags = open_clip.list_pretrained_tags_by_model(name)
    raise CtxdiffError(f"CLIP weights '{weights}' are neither a file nor a pretrained tag of '{config.arch}'"
                       f" (tags: {', '.join(tags) if tags else 'none'})")


def _cached_pretrained(arch: str, tag: str, tag_cfg: dict) -> str:
    """The already-downloaded Hugging Face file of an open_clip pretrained tag, looked up in the
    local cache without network access (every tag of a supported arch has an `hf_hub` entry);
    CtxdiffError naming the file to fetch if it is absent."""
    repo, filename = os.path.split(tag_cfg["hf_hub"])  # "org/name/" -> open_clip's default file name
    names = [Path(filename).stem + ".safetensors", filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
    for name in names:
        hit = try_to_load_from_cache(repo, name)
        if isinstance(hit, str):
            return hit
    raise CtxdiffError(
        f"open_clip weights '{arch}/{tag}' are not on this machine and ctxdiff does not download them: "
        f"download https://huggingface.co/{repo}/resolve/main/{names[-1]} elsewhere and pass "
        f"--clip-weights /path/to/file (or put it in the Hugging Face cache {hf_constants.HF_HUB_CACHE}, "
        f"e.g. with `huggingface-cli download {repo} {names[-1]}`)")


def _read_clip_bundle(path: str) -> tuple[ClipConfig, dict[str, torch.Tensor]] | None:
    """(config, CLIP state dict) of a ctxdiff "clip" bundle, or of the CLIP inside a "t2i" bundle
    (a text-to-image model carries its encoders); None if `path` is not a ctxdiff bundle."""
    if not path.endswith(".safetensors"):
        return None
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            if "ctxdiff_version" not in (f.metadata() or {}):
                return None
    except safetensors.SafetensorError:
        return None  # read_state_dict reports the corrupt file
    bundle = load_bundle(path)
    if bundle.kind not in ("clip", "t2i"):
        raise CtxdiffError(f"{path}: a '{bundle.kind}' bundle holds no CLIP; pass a clip or t2i bundle")
    try:
        config = from_dict(ClipConfig, bundle.configs["clip"], "clip")
        state = bundle.tensors["clip"]
    except (KeyError, TypeError, CtxdiffError) as exc:
        raise CtxdiffError(f"{path}: clip bundle without a valid 'clip' module and config ({exc}); "
                           "write it again with `save_clip`") from exc
    return config, state


def save_clip(path: str | Path, encoders: ClipEncoders) -> Path:
    """Write the CLIP and its config as a ctxdiff "clip" bundle; `load_clip(ClipConfig(weights=path))`
    reads it back whatever `arch` that config names."""
    config = replace(encoders.config, weights=None, context_length=encoders.context_length)
    return save_bundle(path, {"clip": encoders.clip}, {"clip": config}, kind="clip")


def _load_state(clip: CLIP, state: dict[str, torch.Tensor], source: str) -> None:
    """Load an open_clip CLIP state dict (or a ClipEncoders one, keys "clip.*"; DataParallel
    "module.*" too), resizing position embeddings to this model; CtxdiffError naming bad keys."""
    state = {k.removeprefix("module.").removeprefix("clip."): v for k, v in state.items()}
    # open_clip interpolates position embeddings to this model's grid / context length; a width
    # mismatch (another architecture) is left for load_module_state to report.
    if _same_width(state, "visual.positional_embedding", clip.visual.positional_embedding):
        resize_pos_embed(state, clip)
    if _same_width(state, "positional_embedding", clip.positional_embedding):
        resize_text_pos_embed(state, clip)
    if "logit_scale" in state and state["logit_scale"].numel() == 1:  # scalar in some files, [1] in others
        state["logit_scale"] = state["logit_scale"].reshape(clip.logit_scale.shape)
    load_module_state(clip, state, source)


def _same_width(state: dict[str, torch.Tensor], key: str, own: torch.Tensor) -> bool:
    return key in state and state[key].ndim == 2 and state[key].shape[1] == own.shape[1]
