"""Building blocks shared by the U-Nets and the context-aware adapter.

Timestep convention: networks receive paper steps t in 1..T (t = 0 is clean data;
docs/math.md#notation-and-indexing) and embed t * 1000 / T, so an embedding means the same noise
level whatever T a schedule uses.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

SHORT_SEQUENCE = 128  # tokens: up to here the CPU's fused bf16 attention backward loses to the math kernel


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
              is_causal: bool = False) -> torch.Tensor:
    """`F.scaled_dot_product_attention` over [B, heads, N, d], on the math kernel where PyTorch's
    fused CPU kernel is slow: the backward of bf16 attention over short sequences (measured by
    benchmarks/attention_cpu.py: 7x slower at 16 tokens, 2.7x at 64, faster again from 256). Elsewhere
    (forward passes, fp32, CUDA, long sequences) PyTorch picks its kernel as usual."""
    if (q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.requires_grad and torch.is_grad_enabled()
            and max(q.shape[-2], k.shape[-2]) <= SHORT_SEQUENCE):
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)


def zero_init(module: nn.Module) -> nn.Module:
    """Set every parameter of `module` to zero and return it (residual branches, output heads)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def group_norm(channels: int, max_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= `max_groups` that divides `channels`."""
    groups = max(g for g in range(1, max_groups + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


def batch_timesteps(t: torch.Tensor | int, batch: int, device: torch.device) -> torch.Tensor:
    """Broadcast an int, a 0-d tensor or a [B] tensor of timesteps to a [batch] tensor."""
    t = torch.as_tensor(t, device=device)
    if t.ndim == 0:
        return t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"timesteps must be a scalar or shaped [{batch}], got {tuple(t.shape)}")
    return t


def sinusoidal_embedding(x: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer/DDPM sinusoidal features of the real values `x` [B] -> [B, dim] (float32)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
    args = x.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class TimestepEmbedding(nn.Module):
    """Sinusoid of `scale * t` followed by a two-layer SiLU MLP (DDPM, ADM).

    For paper steps use scale = 1000 / T; for a noise-augmentation level in [0, 1] use 1000.
    """

    def __init__(self, out_dim: int, scale: float, freq_dim: int = 256):
        super().__init__()
        self.scale = scale
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(t * self.scale, self.freq_dim))


class ResBlock(nn.Module):
    """ADM residual block: GN-SiLU-conv, embedding as FiLM scale/shift, GN-SiLU-dropout-conv.

    The embedding (time + pooled text + noise level) modulates the second normalisation as
    h * (1 + scale) + shift (Dhariwal & Nichol 2021, "adaptive group normalisation"). The last
    conv is zero-initialised, so the block starts as its skip path.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_channels))
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour upsampling then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Attention(nn.Module):
    """Multi-head attention through `attention` (fused scaled dot-product attention).

    Self-attention when `context_dim` is None. Otherwise cross-attention over a context
    sequence (text tokens) with a key padding mask [B, L] (True = attend); a learned null
    key/value is always attendable (imagen-pytorch), so an all-padding context is well defined.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.is_cross = context_dim is not None
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(context_dim if self.is_cross else dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim)
        if self.is_cross:
            self.context_norm = nn.LayerNorm(context_dim)
            self.null_kv = nn.Parameter(torch.randn(2, inner) / math.sqrt(head_dim))

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        q = self.to_q(x)
        attn_mask = None
        if self.is_cross:
            k, v = self.to_kv(self.context_norm(context)).chunk(2, dim=-1)
            null_k, null_v = self.null_kv.to(k.dtype)[:, None, None, :].expand(2, x.shape[0], 1, -1)
            k, v = torch.cat([null_k, k], dim=1), torch.cat([null_v, v], dim=1)
            if mask is not None:
                keep = torch.ones(x.shape[0], 1, dtype=torch.bool, device=mask.device)
                attn_mask = torch.cat([keep, mask.bool()], dim=1)[:, None, None, :]
        else:
            k, v = self.to_kv(x).chunk(2, dim=-1)
        out = attention(self._split_heads(q), self._split_heads(k), self._split_heads(v), attn_mask=attn_mask)
        return self.to_out(out.transpose(1, 2).flatten(2))


class TransformerBlock(nn.Module):
    """Pre-norm block: cross-attention over text -> self-attention -> GELU MLP (residual each).

    `zero_init_residual` zero-initialises each branch's output projection, so the block starts
    as the identity (used inside the U-Net, as in ADM and Stable Diffusion).
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, mlp_ratio: int = 4,
                 zero_init_residual: bool = False):
        super().__init__()
        self.norm_cross = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, heads, head_dim, context_dim=context_dim)
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads, head_dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))
        if zero_init_residual:
            for out in (self.cross_attn.to_out, self.self_attn.to_out, self.mlp[-1]):
                zero_init(out)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.cross_attn(self.norm_cross(x), context, mask)
        x = x + self.self_attn(self.norm_self(x))
        return x + self.mlp(self.norm_mlp(x))


class SpatialTransformer(nn.Module):
    """A `TransformerBlock` applied to the pixels of a feature map [B, C, H, W] as tokens."""

    def __init__(self, channels: int, heads: int, head_dim: int, context_dim: int, mlp_ratio: int = 4):
        super().__init__()
        self.block = TransformerBlock(channels, heads, head_dim, context_dim, mlp_ratio, zero_init_residual=True)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.block(x.flatten(2).transpose(1, 2), context, mask)
        return tokens.transpose(1, 2).reshape(b, c, h, w)
