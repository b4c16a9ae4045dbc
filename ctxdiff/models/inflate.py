"""Inflate a U-Net into a video U-Net (Tune-A-Video, Wu et al. 2022; ContextDiff Sec. 4.2): the
pixel `UNet` and the Stable Diffusion `LatentUNet` alike.

Frames are folded into the batch: the video U-Net takes x_t as [B*F, C, H, W] (F frames of B
videos, frame-major within each video) with a per-frame text condition, so the U-Net's convs,
ResBlocks and cross-attention run per frame unchanged. Each transformer block (a pixel
`SpatialTransformer`, an SD `BasicTransformerBlock`) is inflated:

- spatial self-attention becomes sparse-causal: the queries of frame f attend to the keys and
  values of frame 0 and frame f-1 (frame 0 attends to itself twice);
- a temporal attention layer (every pixel attends to the same pixel in all frames) follows the
  transformer block, with its output projection zero-initialised.

The 2D modules keep their parameter names, so a pretrained 2D state dict is a subset of the video
state dict with equal tensors; the only new parameters live under `.temporal.`. What holds with
the new layers at their zero initialisation: frame 0 of any video, and every frame of a static
video, equals the 2D U-Net's output on that frame (keys [frame 0, frame 0] give the same
softmax average as keys [frame 0]).

Attention sites are named by their module path in the U-Net (e.g. `down.1.units.0.attn`,
`down_blocks.1.attentions.0.transformer_blocks.0`); an
optional controller (`AttentionControl`) sees and may replace the attention probabilities of every
site, which is how FateZero-style attention storing and fusion plug in.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Iterator, Protocol

import torch
from torch import nn

from torch.utils.checkpoint import checkpoint

from ctxdiff.models.conditioning import TextCondition
from ctxdiff.models.latent.unet import Attention as LatentAttention
from ctxdiff.models.latent.unet import BasicTransformerBlock, LatentUNet, chunked_attention
from ctxdiff.models.layers import Attention, SpatialTransformer, TransformerBlock, attention
from ctxdiff.models.temporal import TemporalAttention, fixed_init
from ctxdiff.models.unet import UNet

# Parameters one-shot tuning trains (Tune-A-Video): the query projections of spatial self- and
# cross-attention (pixel and SD names), and the temporal layers.
TUNABLE_MARKERS = (".self_attn.to_q.", ".cross_attn.to_q.", ".attn1.to_q.", ".attn2.to_q.", ".temporal.")


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
        self.checkpoint = False   # recompute each SD transformer block in the backward pass


def sparse_causal_keys(x: torch.Tensor, frames: int) -> torch.Tensor:
    """The tokens frame f's queries attend to: those of frame 0 and frame f-1, [B*F, 2N, C]."""
    video = x.view(x.shape[0] // frames, frames, *x.shape[1:])
    previous = video[:, [0, *range(frames - 1)]]
    return torch.cat([video[:, :1].expand_as(video), previous], dim=2).flatten(0, 1)


def attend(state: VideoState, site: str, kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           attn_mask: torch.Tensor | None = None, chunk: int | None = None) -> torch.Tensor:
    """Attention over [B, heads, N, d] through the state's controller when it wants this site (explicit
    probabilities it may replace), else fused SDPA (`chunk` queries at a time)."""
    control = state.control
    if control is None or not control.wants(site, kind, q.shape[2]):
        if attn_mask is None:
            return chunked_attention(q, k, v, chunk)
        return attention(q, k, v, attn_mask=attn_mask)
    scores = (q.float() * q.shape[-1] ** -0.5) @ k.float().transpose(-2, -1)   # float32: fp16 scores overflow
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return control(site, kind, scores.softmax(dim=-1)).to(v.dtype) @ v


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
        out = attend(self.state, self.site, self.kind, q, k, v, attn_mask)
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
        keys_from = sparse_causal_keys(x, self.state.frames) if self.sparse_causal else x
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


class LatentVideoAttention(LatentAttention):
    """An SD attention (`attn1` self, `attn2` cross) under a `VideoState`: `attn1` sparse-causal (or
    per frame), both controllable; parameter names and values those of the 2D module."""

    def __init__(self, attn: LatentAttention, state: VideoState, site: str, kind: str, sparse_causal: bool):
        inner, context_dim = attn.to_q.out_features, attn.to_k.in_features
        super().__init__(attn.to_q.in_features, attn.heads, inner // attn.heads,
                         context_dim if kind == "cross" else None, bias=attn.to_q.bias is not None,
                         dropout=attn.to_out[1].p)
        self.load_state_dict(attn.state_dict())
        self.to(attn.to_q.weight)
        self.state, self.site, self.kind, self.sparse_causal, self.chunk = state, site, kind, sparse_causal, attn.chunk

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "cross":
            keys_from = context
        else:
            keys_from = sparse_causal_keys(x, self.state.frames) if self.sparse_causal else x
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2)
                   for t in (self.to_q(x), self.to_k(keys_from), self.to_v(keys_from)))
        out = attend(self.state, self.site, self.kind, q, k, v, chunk=self.chunk)
        return self.to_out(out.transpose(1, 2).flatten(2))


class LatentVideoTransformerBlock(BasicTransformerBlock):
    """An inflated SD `BasicTransformerBlock`: the 2D block (attn1 sparse-causal) on every frame's
    tokens, then temporal attention across frames at every token; checkpointed when the state says."""

    def __init__(self, block: BasicTransformerBlock, state: VideoState, site: str, config: InflateConfig):
        dim = block.norm1.normalized_shape[0]
        super().__init__(dim, block.attn1.heads, block.attn2.to_k.in_features, block.attn1.to_out[1].p)
        self.load_state_dict(block.state_dict())
        self.to(block.norm1.weight)
        self.attn1 = LatentVideoAttention(self.attn1, state, site, "self", config.sparse_causal)
        self.attn2 = LatentVideoAttention(self.attn2, state, site, "cross", sparse_causal=False)
        self.temporal = None
        if config.temporal_attention:
            heads = block.attn1.heads
            self.temporal = TemporalAttention(dim, heads, dim // heads).to(block.norm1.weight)
        self.state = state

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if self.state.checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, context, use_reentrant=False)
        return self._forward(x, context)

    def _forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = super().forward(x, context)
        return x if self.temporal is None else self.temporal(x, self.state.frames)


class VideoUNet(nn.Module):
    """A U-Net (pixel `UNet` or SD `LatentUNet`) inflated in place (see the module docstring).
    The new temporal layers are initialised from a fixed seed: the same U-Net inflates the same way."""

    def __init__(self, unet: UNet | LatentUNet, config: InflateConfig = InflateConfig()):
        super().__init__()
        self.config, self.state = config, VideoState()
        self.sites: list[str] = []
        with fixed_init():
            for name, module in list(unet.named_modules()):
                if isinstance(module, SpatialTransformer):
                    inflated = VideoSpatialTransformer.inflate(module, self.state, name, config)
                elif isinstance(module, BasicTransformerBlock):
                    inflated = LatentVideoTransformerBlock(module, self.state, name, config)
                else:
                    continue
                parent, _, attr = name.rpartition(".")
                setattr(unet.get_submodule(parent), attr, inflated)
                self.sites.append(name)
        self.unet = unet

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | int, cond: TextCondition | torch.Tensor,
                frames: int) -> torch.Tensor:
        """The U-Net's output for x_t [B*F, C, H, W] (F frames per video) at steps t ([B*F] or scalar)
        under a per-frame condition: x0_hat at paper steps for a pixel U-Net; SD's eps or v at
        diffusers timesteps, for the text context [B*F, L, D], for a latent one."""
        self.set_frames(frames, x_t.shape[0])
        return self.unet(x_t, t, cond)

    def set_frames(self, frames: int, batch: int) -> None:
        """Make the next calls treat a batch of `batch` rows as videos of `frames` frames."""
        if frames < 1 or batch % frames:
            raise ValueError(f"a batch of {batch} frames does not hold whole videos of {frames} frames")
        self.state.frames = frames

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
        """Recompute each U-Net unit (SD: each transformer block) in the backward pass (Tab. 8: "use
        checkpoint")."""
        if isinstance(self.unet, UNet):
            self.unet.config = replace(self.unet.config, gradient_checkpointing=enabled)
        self.state.checkpoint = enabled
