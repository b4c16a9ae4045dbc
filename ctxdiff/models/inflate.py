"""Inflate a pixel U-Net into a video U-Net (Tune-A-Video, Wu et al. 2022; ContextDiff Sec. 4.2).

Frames are folded into the batch: the video U-Net takes x_t as [B*F, C, H, W] (F frames of B
videos, frame-major within each video) with a per-frame text condition, so the U-Net's convs,
ResBlocks and cross-attention run per frame unchanged. Each SpatialTransformer is inflated:

- spatial self-attention becomes sparse-causal: the queries of frame f attend to the keys and
  values of frame 0 and frame f-1 (frame 0 attends to itself twice);
- a temporal attention layer (every pixel attends to the same pixel in all frames) follows the
  transformer block, with its output projection zero-initialised.

The 2D modules keep their parameter names, so a pretrained 2D state dict is a subset of the video
state dict with equal tensors; the only new parameters live under `.temporal.`. What holds with
the new layers at their zero initialisation: frame 0 of any video, and every frame of a static
video, equals the 2D U-Net's output on that frame (keys [frame 0, frame 0] give the same
softmax average as keys [frame 0]).

Attention sites are named by their module path in the U-Net (e.g. `down.1.units.0.attn`); an
optional controller (`AttentionControl`) sees and may replace the attention probabilities of every
site, which is how FateZero-style attention storing and fusion plug in.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Iterator, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ctxdiff.models.conditioning import TextCondition
from ctxdiff.models.layers import Attention, SpatialTransformer, TransformerBlock
from ctxdiff.models.temporal import TemporalAttention, fixed_init
from ctxdiff.models.unet import UNet

# Parameters one-shot tuning trains (Tune-A-Video): the query projections of spatial self- and
# cross-attention, and the temporal layers.
TUNABLE_MARKERS = (".self_attn.to_q.", ".cross_attn.to_q.", ".temporal.")


@dataclass(frozen=True)
class InflateConfig:
    """How a 2D U-Net is inflated. Both switches on: Tune-A-Video's inflation."""

    sparse_causal: bool = True        # False: each frame's self-attention sees only itself
    temporal_attention: bool = True   # False: no temporal layers (frames interact only sparse-causally)


class AttentionControl(Protocol):
    """Sees the attention probabilities [batch, heads, queries, keys] of the sites it wants."""

    def wants(self, site: str, kind: str, queries: int) -> bool: ...

    def __call__(self, site: str, kind: str, probs: torch.Tensor) -> torch.Tensor: ...


class VideoState:
    """What the inflated layers of one video U-Net share: the frame count of the current call and
    the attention controller (None: plain fused attention)."""

    def __init__(self) -> None:
        self.frames = 1
        self.control: AttentionControl | None = None


class _ControlledAttention(Attention):
    """An `Attention` whose probabilities an `AttentionControl` can read and replace."""

    kind = ""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None, state: VideoState, site: str):
        super().__init__(dim, heads, head_dim, context_dim)
        self.state, self.site = state, site

    @classmethod
    def from_2d(cls, attn: Attention, state: VideoState, site: str, **kwargs) -> "_ControlledAttention":
        """The same attention with the 2D module's weights (names and values unchanged)."""
        inner = attn.to_q.out_features
        context_dim = attn.to_kv.in_features if attn.is_cross else None
        new = cls(attn.to_q.in_features, attn.heads, inner // attn.heads, context_dim, state, site, **kwargs)
        new.load_state_dict(attn.state_dict())
        return new.to(attn.to_q.weight)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attn_mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = (self._split_heads(x) for x in (q, k, v))
        control = self.state.control
        if control is None or not control.wants(self.site, self.kind, q.shape[2]):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        else:
            scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
            if attn_mask is not None:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            out = control(self.site, self.kind, scores.softmax(dim=-1)) @ v
        return self.to_out(out.transpose(1, 2).flatten(2))


class VideoSelfAttention(_ControlledAttention):
    """Sparse-causal self-attention: frame f's queries attend to frames 0 and f-1 (keys [2N]);
    with `sparse_causal=False`, to their own frame only (the 2D computation)."""

    kind = "self"

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: None, state: VideoState, site: str,
                 sparse_causal: bool = True):
        super().__init__(dim, heads, head_dim, context_dim, state, site)
        self.sparse_causal = sparse_causal

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        frames = self.state.frames
        if not self.sparse_causal:
            return self._attend(self.to_q(x), *self.to_kv(x).chunk(2, dim=-1), None)
        video = x.view(x.shape[0] // frames, frames, *x.shape[1:])
        previous = video[:, [0, *range(frames - 1)]]
        keys_from = torch.cat([video[:, :1].expand_as(video), previous], dim=2).flatten(0, 1)
        return self._attend(self.to_q(x), *self.to_kv(keys_from).chunk(2, dim=-1), None)


class VideoCrossAttention(_ControlledAttention):
    """Per-frame cross-attention to the text tokens (the 2D computation, with a learned null key)."""

    kind = "cross"

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        k, v = self.to_kv(self.context_norm(context)).chunk(2, dim=-1)
        null_k, null_v = self.null_kv.to(k.dtype)[:, None, None, :].expand(2, x.shape[0], 1, -1)
        k, v = torch.cat([null_k, k], dim=1), torch.cat([null_v, v], dim=1)
        attn_mask = None
        if mask is not None:
            keep = torch.ones(x.shape[0], 1, dtype=torch.bool, device=mask.device)
            attn_mask = torch.cat([keep, mask.bool()], dim=1)[:, None, None, :]
        return self._attend(self.to_q(x), k, v, attn_mask)


class VideoSpatialTransformer(nn.Module):
    """An inflated `SpatialTransformer`: the 2D block (self-attention made sparse-causal) on every
    frame's pixels, then temporal attention across frames at every pixel."""

    def __init__(self, block: TransformerBlock, temporal: TemporalAttention | None, state: VideoState):
        super().__init__()
        self.block, self.temporal, self.state = block, temporal, state

    @classmethod
    def inflate(cls, transformer: SpatialTransformer, state: VideoState, site: str,
                config: InflateConfig) -> "VideoSpatialTransformer":
        block = transformer.block
        block.self_attn = VideoSelfAttention.from_2d(block.self_attn, state, site, sparse_causal=config.sparse_causal)
        block.cross_attn = VideoCrossAttention.from_2d(block.cross_attn, state, site)
        temporal = None
        if config.temporal_attention:
            heads, inner = block.self_attn.heads, block.self_attn.to_q.out_features
            temporal = TemporalAttention(block.self_attn.to_q.in_features, heads, inner // heads)
            temporal = temporal.to(block.self_attn.to_q.weight)
        return cls(block, temporal, state)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.block(x.flatten(2).transpose(1, 2), context, mask)
        if self.temporal is not None:
            tokens = self.temporal(tokens, self.state.frames)
        return tokens.transpose(1, 2).reshape(b, c, h, w)


class VideoUNet(nn.Module):
    """A U-Net inflated in place (see the module docstring); f_theta(x_t, c, t) per video frame.
    The new temporal layers are initialised from a fixed seed: the same U-Net inflates the same way."""

    def __init__(self, unet: UNet, config: InflateConfig = InflateConfig()):
        super().__init__()
        self.config, self.state = config, VideoState()
        self.sites: list[str] = []
        with fixed_init():
            for name, module in list(unet.named_modules()):
                if isinstance(module, SpatialTransformer):
                    parent, _, attr = name.rpartition(".")
                    setattr(unet.get_submodule(parent), attr,
                            VideoSpatialTransformer.inflate(module, self.state, name, config))
                    self.sites.append(name)
        self.unet = unet

    @property
    def image_size(self) -> int:
        return self.unet.config.image_size

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | int, cond: TextCondition, frames: int) -> torch.Tensor:
        """x0_hat for x_t [B*F, C, H, W] at paper steps t ([B*F] or scalar) under a per-frame `cond`."""
        if frames < 1 or x_t.shape[0] % frames:
            raise ValueError(f"a batch of {x_t.shape[0]} frames does not hold whole videos of {frames} frames")
        self.state.frames = frames
        return self.unet(x_t, t, cond)

    @contextmanager
    def controlled(self, control: AttentionControl | None) -> Iterator[None]:
        """Run the attention sites under `control` (None: unchanged) for the duration of the block."""
        previous, self.state.control = self.state.control, control
        try:
            yield
        finally:
            self.state.control = previous

    def tunable_state(self) -> dict[str, torch.Tensor]:
        """The tensors one-shot tuning trains (TUNABLE_MARKERS), by their names in this module."""
        return {name: p for name, p in self.named_parameters() if any(m in name for m in TUNABLE_MARKERS)}

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each U-Net unit in the backward pass (Tab. 8: "use checkpoint")."""
        self.unet.config = replace(self.unet.config, gradient_checkpointing=enabled)
