"""Conditions other than text: class labels and layouts (paper Sec. 4.3), as `TextCondition`s.

Each encoder turns its condition into the shape every network already reads (tokens [B, L, D],
mask [B, L], pooled [B, D_pool]), so the U-Net, the adapter and the diffusion core stay
condition-agnostic:

- `class` (one of K labels): one token, the label's embedding; `pooled` is its projection, added
  to the U-Net's timestep embedding (as the pooled text embedding is). Classifier-free guidance
  drops the label to a learned null label (index K).
- `layout` (a set of objects, each a label and a box [x0, y0, x1, y1] in [0, 1]): one token per
  object, its label embedding plus an MLP of the box's Fourier features (LayoutDiffusion's
  object tokens), after a learned global token that is always present (so attention always has a
  key); objects are padded to `max_objects` and masked. Dropping gives the empty layout.

The adapter, as the paper says ("we replace the text encoder in original adapter with ResNet
blocks for embedding classes or layouts, and keep the original image encoder and cross-attention
module"), reads the same tokens through ResNet blocks of its own (`ConditionedAdapter`); its
image branch and cross-attention are the text adapter's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, Sequence

import torch
from torch import nn

from ctxdiff.data.layouts import (Condition, Layout, LayoutObject, check_box, describe, make_layout,  # noqa: F401
                                  parse_layout, read_layout, resolve_label)
from ctxdiff.errors import UsageError
from ctxdiff.models.adapter import ContextAdapter
from ctxdiff.models.conditioning import TextCondition
from ctxdiff.models.layers import zero_init

CONDITION_KINDS = ("text", "class", "layout")


@dataclass(frozen=True)
class ConditionConfig:
    """`model.condition`: what a model is conditioned on. `text` (the default) is the CLIP's text;
    `class` and `layout` are encoded by a `ConditionEncoder` trained with the model, whose label
    vocabulary `labels` the model file keeps (empty in a recipe: taken from the data)."""

    kind: Literal["text", "class", "layout"] = "text"  # text (CLIP), class (one label) or layout (labels + boxes)
    labels: tuple[str, ...] = ()  # the label vocabulary; empty: the data's labels (the shapes world's, the
                                  # folder names, the COCO categories), saved in the model file
    dim: int = 0  # token width; 0: model.unet.text_dim
    pooled_dim: int = 0  # pooled width; 0: model.unet.pooled_dim
    max_objects: int = 8  # layout: the most objects a layout may hold (tokens are padded to it)
    box_frequencies: int = 8  # layout: Fourier frequencies per box coordinate (2^0 .. 2^(n-1) pi)
    adapter_blocks: int = 2  # ResNet blocks over the condition tokens in the adapter (paper Sec. 4.3)

    def __post_init__(self):
        object.__setattr__(self, "labels", tuple(str(label) for label in self.labels))
        if self.kind not in CONDITION_KINDS:
            raise ValueError(f"kind must be one of {', '.join(CONDITION_KINDS)}, got {self.kind!r}")
        if min(self.dim, self.pooled_dim, self.box_frequencies, self.adapter_blocks) < 0 or self.max_objects < 1:
            raise ValueError(f"dims, box_frequencies and adapter_blocks must be >= 0, max_objects >= 1: {self}")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be distinct")
        bad = [label for label in self.labels if not label.strip() or any(ch in label for ch in "@;")]
        if bad:
            raise ValueError(f"labels must be non-empty and hold no '@' or ';' (the inline layout's separators): "
                             f"{bad[:3]}")


def fourier_features(boxes: torch.Tensor, frequencies: int) -> torch.Tensor:
    """[..., 4] box coordinates -> [..., 4 + 8 * frequencies]: the coordinates, and sin/cos of
    2^k pi times each (k < frequencies)."""
    scales = math.pi * 2.0 ** torch.arange(frequencies, device=boxes.device, dtype=boxes.dtype)
    angles = (boxes[..., None] * scales).flatten(-2)
    return torch.cat([boxes, angles.sin(), angles.cos()], dim=-1)


def _mlp(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))


class ConditionEncoder(nn.Module):
    """Class labels or layouts -> `TextCondition` for the U-Net (see the module docstring).
    `config.labels`, `dim` and `pooled_dim` must be set (`ctxdiff train` fills them in)."""

    def __init__(self, config: ConditionConfig):
        super().__init__()
        c = self.config = config
        if c.kind == "text" or not c.labels or min(c.dim, c.pooled_dim) < 1:
            raise ValueError(f"a ConditionEncoder needs kind class or layout, labels, dim and pooled_dim: {c}")
        self.label_embed = nn.Embedding(len(c.labels) + 1, c.dim)   # the last: the null label
        nn.init.normal_(self.label_embed.weight, std=0.5)
        if c.kind == "layout":
            self.box_embed = _mlp(4 + 8 * c.box_frequencies, c.dim)
            self.global_token = nn.Parameter(0.5 * torch.randn(1, 1, c.dim))
        self.pool = nn.Sequential(nn.LayerNorm(c.dim), nn.Linear(c.dim, c.pooled_dim))

    @property
    def null_index(self) -> int:
        return len(self.config.labels)

    def forward(self, labels: torch.Tensor, boxes: torch.Tensor | None = None,
                present: torch.Tensor | None = None) -> TextCondition:
        """class: labels [B] (null_index: dropped). layout: labels [B, N], boxes [B, N, 4], present
        [B, N] (False: padding)."""
        if self.config.kind == "class":
            tokens = self.label_embed(labels)[:, None]
            mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
            return TextCondition(tokens, mask, self.pool(tokens[:, 0]))
        objects = self.label_embed(labels) + self.box_embed(fourier_features(boxes, self.config.box_frequencies))
        objects = objects * present[..., None]
        tokens = torch.cat([self.global_token.expand(len(labels), -1, -1), objects], dim=1)
        mask = torch.cat([torch.ones_like(present[:, :1]), present], dim=1)
        pooled = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return TextCondition(tokens, mask, self.pool(pooled))

    def encode(self, conditions: Sequence[Condition], device: torch.device | str | None = None) -> TextCondition:
        """Encode a batch of labels (class) or layouts (layout); None, "" or () is the dropped condition."""
        device = device if device is not None else self.label_embed.weight.device
        c = self.config
        if c.kind == "class":
            indices = [self.null_index if not cond else self._label(cond) for cond in conditions]
            return self(torch.tensor(indices, dtype=torch.long, device=device))
        n = c.max_objects
        labels = torch.full((len(conditions), n), self.null_index, dtype=torch.long)
        boxes = torch.zeros(len(conditions), n, 4)
        present = torch.zeros(len(conditions), n, dtype=torch.bool)
        for i, layout in enumerate(conditions):
            layout = layout or ()
            if isinstance(layout, str):
                raise UsageError(f"this model is conditioned on layouts, not labels; got {layout!r}")
            if len(layout) > n:
                raise UsageError(f"a layout of {len(layout)} objects; this model takes at most {n}")
            for j, obj in enumerate(layout):
                labels[i, j], boxes[i, j], present[i, j] = self._label(obj.label), torch.tensor(obj.box), True
        dtype = self.label_embed.weight.dtype
        return self(labels.to(device), boxes.to(device=device, dtype=dtype), present.to(device))

    def _label(self, label) -> int:
        if not isinstance(label, str):
            raise UsageError(f"this model is conditioned on {self.config.kind} labels; got {type(label).__name__}")
        return resolve_label(label, self.config.labels)


class ResNetTokens(nn.Module):
    """The adapter's condition encoder (paper Sec. 4.3): residual MLP blocks over each token,
    then a projection to the adapter's text width."""

    def __init__(self, in_dim: int, out_dim: int, blocks: int):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, 2 * in_dim), nn.SiLU(),
                                                  zero_init(nn.Linear(2 * in_dim, in_dim))) for _ in range(blocks))
        self.out = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, out_dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            tokens = tokens + block(tokens)
        return self.out(tokens)


class ConditionedAdapter(nn.Module):
    """r_phi(x_0, c, t) over class or layout tokens: the text adapter (its image branch and
    cross-attention unchanged) reading the condition through `ResNetTokens`."""

    def __init__(self, adapter: ContextAdapter, condition: ConditionConfig):
        super().__init__()
        self.adapter = adapter
        self.context = ResNetTokens(condition.dim, adapter.config.text_dim, condition.adapter_blocks)

    @property
    def config(self):
        return self.adapter.config

    def forward(self, x0: torch.Tensor, cond: TextCondition, t: torch.Tensor | int) -> torch.Tensor:
        return self.adapter(x0, TextCondition(self.context(cond.tokens), cond.mask, cond.pooled), t)


def complete_config(config: ConditionConfig, labels: Sequence[str], dim: int, pooled_dim: int) -> ConditionConfig:
    """`config` with the vocabulary (if unset: `labels`) and the widths (if 0: the U-Net's) filled in."""
    return replace(config, labels=tuple(config.labels or labels), dim=config.dim or dim,
                   pooled_dim=config.pooled_dim or pooled_dim)
