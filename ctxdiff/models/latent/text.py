"""The CLIP text transformers of Stable Diffusion, with transformers' `CLIPTextModel` names.

SD 1.x: OpenAI CLIP ViT-L/14 text, the last layer's output after the final LayerNorm.
SD 2.x: OpenCLIP ViT-H/14 text, the penultimate (23rd of 24) layer's output, then the final
LayerNorm: `layer="penultimate"` for the whole tower (SD's own files), `layer="last"` for one that
stops at the 23rd (diffusers' text_encoder/, and single files converted from it).

Why our own module rather than open_clip's text tower: the same network, but this one has the
parameter names of transformers' CLIPTextModel (what diffusers folders store in
`text_encoder/`, and SD 1.x single files under `cond_stage_model.transformer.text_model.`), so
those load with no renaming, the SD 2.x open_clip names (fused `in_proj`) are mapped once in
`convert.py`, and the output matches CLIPTextModel exactly (tested). Tokens come from open_clip's
SimpleTokenizer, the same BPE vocabulary as the CLIP tokenizers of SD.

Padding: the U-Net cross-attends to all 77 positions, so the padding id matters. SD 1.x pads with
the end-of-text id 49407 (the CLIPTokenizer of openai/clip-vit-large-patch14); SD 2.x pads with
0 (open_clip's tokenizer, and "!" = 0 in the SD 2 diffusers tokenizer).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from ctxdiff.errors import CtxdiffError
from ctxdiff.models.conditioning import TextCondition
from ctxdiff.models.layers import attention

EOT_ID = 49407
_ACTIVATIONS = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "gelu": F.gelu}


@dataclass(frozen=True)
class LatentTextConfig:
    """A CLIP text transformer and which layer's output conditions the U-Net."""

    width: int = 768
    layers: int = 12
    heads: int = 12
    intermediate_size: int = 3072
    vocab_size: int = 49408
    max_positions: int = 77
    act: str = "quick_gelu"  # "quick_gelu" (OpenAI CLIP) or "gelu" (OpenCLIP)
    layer: str = "last"  # "last" or "penultimate": whose output goes through the final LayerNorm
    pad_token_id: int = EOT_ID
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.act not in _ACTIVATIONS:
            raise CtxdiffError(f"text encoder activation {self.act!r} is not supported; use one of "
                               f"{', '.join(_ACTIVATIONS)}")
        if self.layer not in ("last", "penultimate"):
            raise ValueError(f"layer must be 'last' or 'penultimate', got {self.layer!r}")

    @classmethod
    def v1(cls) -> "LatentTextConfig":
        """OpenAI CLIP ViT-L/14 text, last layer, padded with end-of-text (SD 1.x)."""
        return cls()

    @classmethod
    def v2(cls) -> "LatentTextConfig":
        """OpenCLIP ViT-H/14 text, all 24 blocks, penultimate layer, padded with 0 (SD 2.x's own single files)."""
        return cls(width=1024, layers=24, heads=16, intermediate_size=4096, act="gelu", layer="penultimate",
                   pad_token_id=0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_hf(cls, config: dict, pad_token_id: int | None = None) -> "LatentTextConfig":
        """The config of a transformers `text_encoder/config.json` (CLIPTextModel), used as is: last layer.

        diffusers' SD 2.x folders already drop the last OpenCLIP layer (23 layers), so their last
        layer is SD's penultimate. `pad_token_id` None: 0 for gelu (OpenCLIP) models, else 49407.
        """
        act = config.get("hidden_act", "quick_gelu")
        return cls(
            width=config.get("hidden_size", 512),
            layers=config.get("num_hidden_layers", 12),
            heads=config.get("num_attention_heads", 8),
            intermediate_size=config.get("intermediate_size", 2048),
            vocab_size=config.get("vocab_size", 49408),
            max_positions=config.get("max_position_embeddings", 77),
            act=act,
            layer="last",
            pad_token_id=pad_token_id if pad_token_id is not None else (0 if act == "gelu" else EOT_ID),
            layer_norm_eps=config.get("layer_norm_eps", 1e-5),
        )


class CLIPAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (proj(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))


class CLIPMLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.act = _ACTIVATIONS[act]
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: LatentTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(config.width, config.heads)
        self.layer_norm1 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config.width, config.intermediate_size, config.act)
        self.layer_norm2 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: LatentTextConfig):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(config) for _ in range(config.layers)])


class CLIPEmbeddings(nn.Module):
    def __init__(self, config: LatentTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.position_embedding = nn.Embedding(config.max_positions, config.width)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(input_ids) + self.position_embedding.weight[: input_ids.shape[-1]]


class LatentTextEncoder(nn.Module):
    """Token ids [B, L] (or prompts, via `encode`) -> TextCondition for the SD U-Net.

    tokens: the chosen layer's output after the final LayerNorm [B, L, width] (all L positions,
    padding included: SD attends to them); mask: True up to and including end-of-text;
    pooled: the end-of-text token's feature (no CLIP projection).
    """

    def __init__(self, config: LatentTextConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> TextCondition:
        x = self.embeddings(input_ids)
        layers = self.encoder.layers
        for layer in layers[:-1] if self.config.layer == "penultimate" else layers:
            x = layer(x)
        x = self.final_layer_norm(x)
        is_eot = input_ids == EOT_ID
        if not bool(is_eot.any(dim=-1).all()):
            raise ValueError("every token sequence needs an end-of-text token (49407); use tokenize()")
        eot = is_eot.int().argmax(dim=-1)
        mask = torch.arange(input_ids.shape[-1], device=input_ids.device)[None] <= eot[:, None]
        return TextCondition(x, mask, x[torch.arange(x.shape[0], device=x.device), eot])

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> [B, max_positions] ids: start, BPE tokens (truncated), end-of-text, then padding."""
        return tokenize(prompts, self.config.pad_token_id, self.config.max_positions)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> TextCondition:
        return self(self.tokenize(prompts).to(self.embeddings.token_embedding.weight.device))


@functools.lru_cache(maxsize=1)
def _tokenizer() -> open_clip.SimpleTokenizer:
    return open_clip.SimpleTokenizer()


def vocab_id(token: str | None) -> int | None:
    """The id of a token string (transformers' special-token spellings included), None if unknown."""
    special = {"<|endoftext|>": EOT_ID, "<|startoftext|>": EOT_ID - 1}
    return special.get(token, _tokenizer().encoder.get(token))


def tokenize(prompts: list[str], pad_token_id: int, context_length: int = 77) -> torch.Tensor:
    """open_clip's CLIP BPE; positions after the (first) end-of-text get `pad_token_id`."""
    ids = _tokenizer()(list(prompts), context_length=context_length)
    after_eot = (ids == EOT_ID).int().cumsum(dim=-1) - (ids == EOT_ID).int() > 0
    return ids.masked_fill(after_eot, pad_token_id)
