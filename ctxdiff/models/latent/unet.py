"""The Stable Diffusion 1.x/2.x U-Net, with diffusers' `UNet2DConditionModel` parameter names.

The state dict of `LatentUNet` has exactly the keys of diffusers' model for the same config, so a
diffusers `unet/diffusion_pytorch_model.safetensors` loads with no renaming; CompVis
(`model.diffusion_model.*`) names are mapped in `convert.py`.

Timestep convention: `forward` takes the diffusers integer timestep tau in 0..T-1 (what SD was
trained with); paper step t = tau + 1 (see `as_x0_predictor` in this package).

Memory: `set_attention_chunk(n)` makes every attention layer process its queries n at a time
(exactly the same result, peak attention memory / (tokens / n)); on GPUs SDPA's memory-efficient
kernels usually make this unnecessary, on CPUs it bounds the [tokens x tokens] score matrix.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ctxdiff.errors import CtxdiffError
from ctxdiff.models.layers import attention


@dataclass(frozen=True)
class LatentUNetConfig:
    """Architecture of an SD 1.x/2.x U-Net (field names follow diffusers' config where they agree).

    `num_attention_heads` is per level; diffusers' SD configs store this number under the
    misnomer `attention_head_dim` (SD 1.x: 8 heads everywhere; SD 2.x: 5, 10, 20, 20 heads =
    64 channels per head). `attention_levels[i]` says whether level i has cross-attention
    transformers (CrossAttnDownBlock2D / CrossAttnUpBlock2D); the up path mirrors the down path.
    """

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    num_attention_heads: tuple[int, ...] = (8, 8, 8, 8)
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    dropout: float = 0.0
    sample_size: int = 64  # default latent height/width (512 px / 8)

    def __post_init__(self):
        levels = len(self.block_out_channels)
        heads = self.num_attention_heads
        heads = (heads,) * levels if isinstance(heads, int) else tuple(heads)
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        object.__setattr__(self, "attention_levels", tuple(bool(a) for a in self.attention_levels))
        object.__setattr__(self, "num_attention_heads", heads)
        if len(self.attention_levels) != levels or len(heads) != levels:
            raise ValueError(
                f"attention_levels {self.attention_levels} and num_attention_heads {heads} need one entry "
                f"per level of block_out_channels {self.block_out_channels}"
            )

    @classmethod
    def v1(cls) -> "LatentUNetConfig":
        """Stable Diffusion 1.x (CLIP ViT-L/14 context, 8 heads, 1x1-conv projections)."""
        return cls()

    @classmethod
    def v2(cls, sample_size: int = 96) -> "LatentUNetConfig":
        """Stable Diffusion 2.x (OpenCLIP ViT-H/14 context, 64-channel heads, linear projections)."""
        return cls(num_attention_heads=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
                   sample_size=sample_size)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_diffusers(cls, config: dict) -> "LatentUNetConfig":
        """The config of a diffusers `unet/config.json`; features SD 1.x/2.x never use are refused.

        `upcast_attention` (SD 2.1, fp16) is not needed: the fused SDPA kernels accumulate the softmax in float32.
        """
        unsupported = [f"{key}={config[key]!r}" for key, default in _DIFFUSERS_DEFAULTS.items()
                       if key in config and config[key] != default]
        down = list(config.get("down_block_types", ()))
        up = list(config.get("up_block_types", ()))
        known = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}
        if any(d not in known for d in down) or [known.get(d) for d in reversed(down)] != up:
            unsupported.append(f"down_block_types={down} / up_block_types={up}")
        depth = config.get("transformer_layers_per_block", 1)
        if any(d != 1 for d in ([depth] if isinstance(depth, int) else depth)):
            unsupported.append(f"transformer_layers_per_block={depth!r}")
        if unsupported:
            raise CtxdiffError(f"unet/config.json: not a Stable Diffusion 1.x/2.x U-Net ({'; '.join(unsupported)}); "
                               "pass an SD 1.x or 2.x model")
        heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
        return cls(
            in_channels=config.get("in_channels", 4),
            out_channels=config.get("out_channels", 4),
            block_out_channels=tuple(config["block_out_channels"]),
            layers_per_block=config.get("layers_per_block", 2),
            attention_levels=tuple(d == "CrossAttnDownBlock2D" for d in down),
            num_attention_heads=heads,
            cross_attention_dim=config.get("cross_attention_dim", 1280),
            use_linear_projection=bool(config.get("use_linear_projection", False)),
            norm_num_groups=config.get("norm_num_groups", 32),
            norm_eps=config.get("norm_eps", 1e-5),
            dropout=config.get("dropout", 0.0),
            sample_size=config.get("sample_size") or 64,
        )


# diffusers UNet2DConditionModel options, and the only value an SD 1.x/2.x U-Net uses.
_DIFFUSERS_DEFAULTS = {
    "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "dual_cross_attention": False, "class_embed_type": None, "addition_embed_type": None,
    "num_class_embeds": None, "resnet_time_scale_shift": "default", "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional", "time_embedding_dim": None,
    "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "attention_type": "default",
    "class_embeddings_concat": False, "mid_block_only_cross_attention": None, "cross_attention_norm": None,
}


# --------------------------------------------------------------------------- building blocks


def timestep_features(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """SD's sinusoidal timestep features [B] -> [B, dim], cos first (flip_sin_to_cos, freq_shift 0)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """SDPA over [B, heads, N, d] queries, `chunk` queries at a time (None: all at once)."""
    if chunk is None or q.shape[-2] <= chunk:
        return attention(q, k, v)
    return torch.cat([attention(part, k, v) for part in q.split(chunk, dim=-2)], dim=-2)


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, the time embedding added in between (none in the VAE)."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None, groups: int, eps: float,
                 dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        if temb_channels is not None:
            self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if temb is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        shortcut = self.conv_shortcut(x) if hasattr(self, "conv_shortcut") else x
        return shortcut + h


class Downsample2D(nn.Module):
    """Strided 3x3 conv; `pad_right` pads (0, 1, 0, 1) first instead of padding 1 (the VAE's way)."""

    def __init__(self, channels: int, pad_right: bool = False):
        super().__init__()
        self.pad_right = pad_right
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if pad_right else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.pad_right else x)


class Upsample2D(nn.Module):
    """Nearest-neighbour upsampling (x2, or to `size`) followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        x = F.interpolate(x, size=size, mode="nearest") if size is not None else F.interpolate(
            x, scale_factor=2.0, mode="nearest")
        return self.conv(x)


class Attention(nn.Module):
    """Multi-head (cross-)attention: to_q/to_k/to_v, then to_out = (Linear, Dropout)."""

    def __init__(self, query_dim: int, heads: int, head_dim: int, context_dim: int | None = None,
                 bias: bool = False, dropout: float = 0.0):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.chunk: int | None = None
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=bias)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, _ = x.shape
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        out = chunked_attention(q, k, v, self.chunk)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class GEGLU(nn.Module):
    """proj to 2 x inner features; one half gates the other through GELU."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, dropout: float, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LN self-attention (attn1), cross-attention to the text (attn2), GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, context_dim: int, dropout: float):
        super().__init__()
        head_dim = dim // heads
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim, dropout=dropout)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """GroupNorm, proj_in (1x1 conv, or linear on tokens for SD 2.x), transformer block, proj_out, residual."""

    def __init__(self, channels: int, heads: int, context_dim: int, config: LatentUNetConfig):
        super().__init__()
        self.linear = config.use_linear_projection
        self.norm = nn.GroupNorm(config.norm_num_groups, channels, eps=1e-6)
        proj = (lambda: nn.Linear(channels, channels)) if self.linear else (lambda: nn.Conv2d(channels, channels, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(channels, heads, context_dim, config.dropout)])
        self.proj_out = proj()

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hidden = self.norm(x)
        if self.linear:
            hidden = self.proj_in(hidden.flatten(2).transpose(1, 2))
        else:
            hidden = self.proj_in(hidden).flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            hidden = block(hidden, context)
        if self.linear:
            hidden = self.proj_out(hidden).transpose(1, 2).reshape(b, c, h, w)
        else:
            hidden = self.proj_out(hidden.transpose(1, 2).reshape(b, c, h, w))
        return hidden + x


# --------------------------------------------------------------------------- levels


class DownBlock(nn.Module):
    """One level of the down path: (resnet [+ transformer]) x layers, then a strided conv (not at the last level)."""

    def __init__(self, config: LatentUNetConfig, level: int, temb: int):
        super().__init__()
        chans = config.block_out_channels
        out = chans[level]
        ins = [chans[max(level - 1, 0)]] + [out] * (config.layers_per_block - 1)
        groups, eps = config.norm_num_groups, config.norm_eps
        self.resnets = nn.ModuleList([ResnetBlock2D(i, out, temb, groups, eps, config.dropout) for i in ins])
        self.attentions = nn.ModuleList(
            [Transformer2DModel(out, config.num_attention_heads[level], config.cross_attention_dim, config)
             for _ in ins] if config.attention_levels[level] else [])
        self.downsamplers = nn.ModuleList([Downsample2D(out)] if level < len(chans) - 1 else [])

    def forward(self, x, temb, context) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions:
                x = self.attentions[i](x, context)
            skips.append(x)
        for down in self.downsamplers:
            x = down(x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """resnet, transformer, resnet at the lowest resolution."""

    def __init__(self, config: LatentUNetConfig, temb: int):
        super().__init__()
        c = config.block_out_channels[-1]
        groups, eps = config.norm_num_groups, config.norm_eps
        self.attentions = nn.ModuleList(
            [Transformer2DModel(c, config.num_attention_heads[-1], config.cross_attention_dim, config)])
        self.resnets = nn.ModuleList([ResnetBlock2D(c, c, temb, groups, eps, config.dropout) for _ in range(2)])

    def forward(self, x, temb, context):
        x = self.resnets[0](x, temb)
        return self.resnets[1](self.attentions[0](x, context), temb)


class UpBlock(nn.Module):
    """Up-path level `index` (0 = lowest resolution): layers_per_block + 1 resnets fed with skips, then upsampling."""

    def __init__(self, config: LatentUNetConfig, index: int, temb: int):
        super().__init__()
        rev = config.block_out_channels[::-1]
        level = len(rev) - 1 - index
        out, prev, skip_in = rev[index], rev[max(index - 1, 0)], rev[min(index + 1, len(rev) - 1)]
        n = config.layers_per_block + 1
        groups, eps = config.norm_num_groups, config.norm_eps
        self.resnets = nn.ModuleList([
            ResnetBlock2D((prev if j == 0 else out) + (skip_in if j == n - 1 else out), out, temb, groups, eps,
                          config.dropout)
            for j in range(n)])
        self.attentions = nn.ModuleList(
            [Transformer2DModel(out, config.num_attention_heads[level], config.cross_attention_dim, config)
             for _ in range(n)] if config.attention_levels[level] else [])
        self.upsamplers = nn.ModuleList([Upsample2D(out)] if index < len(rev) - 1 else [])

    def forward(self, x, skips: list[torch.Tensor], temb, context, size=None):
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if self.attentions:
                x = self.attentions[i](x, context)
        for up in self.upsamplers:
            x = up(x, size)
        return x


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class LatentUNet(nn.Module):
    """SD 1.x/2.x denoiser: `unet(latents [B,4,h,w], tau, context [B,L,D]) -> eps or v` (as trained)."""

    def __init__(self, config: LatentUNetConfig):
        super().__init__()
        self.config = config
        chans = config.block_out_channels
        temb = chans[0] * 4
        self.conv_in = nn.Conv2d(config.in_channels, chans[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(chans[0], temb)
        self.down_blocks = nn.ModuleList([DownBlock(config, i, temb) for i in range(len(chans))])
        self.mid_block = MidBlock(config, temb)
        self.up_blocks = nn.ModuleList([UpBlock(config, i, temb) for i in range(len(chans))])
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, chans[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(chans[0], config.out_channels, 3, padding=1)

    def set_attention_chunk(self, chunk: int | None) -> None:
        """Attend `chunk` queries at a time in every attention layer (None: all at once); same output."""
        if chunk is not None and chunk < 1:
            raise ValueError(f"attention chunk must be a positive number of queries, got {chunk}")
        for module in self.modules():
            if isinstance(module, Attention):
                module.chunk = chunk

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor | int,
                encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """latents [B, C, h, w]; timestep: diffusers tau in 0..T-1, a number or [B]; context [B, L, D]."""
        tau = torch.as_tensor(timestep, device=latents.device)
        tau = tau.expand(latents.shape[0]) if tau.ndim == 0 else tau
        temb = self.time_embedding(timestep_features(tau, self.config.block_out_channels[0]).to(latents.dtype))
        x = self.conv_in(latents)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, encoder_hidden_states)
            skips += block_skips
        x = self.mid_block(x, temb, encoder_hidden_states)
        n = self.config.layers_per_block + 1
        for block in self.up_blocks:
            level_skips, skips = skips[-n:], skips[:-n]
            size = tuple(skips[-1].shape[-2:]) if block.upsamplers else None
            x = block(x, level_skips, temb, encoder_hidden_states, size)
        return self.conv_out(F.silu(self.conv_norm_out(x)))
