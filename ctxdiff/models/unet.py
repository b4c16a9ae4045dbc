"""Pixel U-Nets predicting x_0: the base text-to-image model and the super-resolution model.

The paper's backbone follows Imagen (Sec. 4.1): a base diffusion model (ADM, Nichol &
Dhariwal 2021) at 64x64 and an "Efficient U-Net" super-resolution model 64 -> 256, both
conditioned on the full sequence of text embeddings through cross-attention at several
resolutions. The network is the denoiser f_theta(x_t, c, t) = x0_hat of Eq. 6.

Initialisation: each residual branch (second conv of a ResBlock, the output projections of
attention and MLP) is zero-initialised (ADM), so every block starts as its skip path. The
final conv is NOT zero-initialised: under x0-prediction a zero output would make x0_hat
independent of x_t, c and t at the start, whereas the skip paths already carry x_t to the
output; training then learns the corrections.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ctxdiff.diffusion.process import PREDICTION_TYPES, x0_from_output
from ctxdiff.diffusion.schedule import make_schedule
from ctxdiff.models.conditioning import TextCondition
from ctxdiff.models.layers import (Downsample, ResBlock, SpatialTransformer, TimestepEmbedding, Upsample,
                                   batch_timesteps, group_norm)


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of a `UNet`; every field is JSON-serialisable (lists become tuples).

    `efficient` selects Imagen's Efficient U-Net layout: each level but the last downsamples
    *before* its residual blocks (so no block runs at full resolution; a final block joins the
    full-resolution stem), used with `scale_skip` (skips scaled by 2**-0.5), more blocks at low
    resolution and attention only at the lowest level. `lowres_cond` makes a super-resolution
    net: it concatenates the upsampled low-resolution image to x_t and embeds its
    noise-augmentation level. `heads` is the head count at every attention site unless
    `head_dim` > 0, which fixes the head width instead (heads = channels // head_dim).
    `prediction_type` is what the last conv outputs (`x0_from_output`); the net always returns
    x0_hat. Every type but `sample` reads its output under the noise schedule `schedule` (with
    `timesteps` steps), which `ctxdiff train` sets from the recipe's `diffusion.schedule`.
    """

    image_size: int = 64  # side of the (square) images it denoises, in pixels
    in_channels: int = 3  # channels of x_t (3 for RGB)
    out_channels: int = 3  # channels of its output
    base_channels: int = 128  # channels of the first level; level i has base_channels * channel_mults[i]
    channel_mults: tuple[int, ...] = (1, 2, 3, 4)  # one per resolution level, each halving the resolution
    num_res_blocks: int | tuple[int, ...] = 2  # residual blocks per level (one number, or one per level)
    attention_levels: tuple[int, ...] = (1, 2, 3)  # levels (0: full resolution) with self- and
                                                   # cross-attention to the text
    heads: int = 4  # attention heads at every site (unless head_dim > 0)
    head_dim: int = 0  # > 0: fixed head width instead, heads = channels // head_dim
    text_dim: int = 512  # width of the text tokens (the CLIP's text width)
    pooled_dim: int = 512  # width of the pooled text embedding (the CLIP's embedding width)
    coord_channels: bool = False  # CoordConv: x and y coordinate maps join the input (absolute position)
    layout_maps: int = 0  # this many maps drawn from the pooled text embedding join the input (a layout prior)
    dropout: float = 0.0  # in the residual blocks
    timesteps: int = 1000  # T of the process it is trained on (the timestep embedding reads t * 1000 / T)
    lowres_cond: bool = False  # super-resolution: the upsampled low-res image joins x_t, its noise
                               # level the timestep embedding
    efficient: bool = False  # Imagen's Efficient U-Net layout (see above)
    scale_skip: bool = False  # skip connections scaled by 2**-0.5 (Imagen)
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, slower
    prediction_type: Literal["sample", "epsilon", "v_prediction"] = "sample"  # what the last conv outputs;
                                                                             # the net always returns x0_hat
    schedule: Literal["linear", "scaled_linear", "cosine"] | None = None  # the schedule its output is read
                                                                         # under; null: set by `ctxdiff train`

    RETIRED: ClassVar[dict] = {"token_pool": False}   # keys of files written before they were removed

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "channel_mults", tuple(int(m) for m in self.channel_mults))
        set_(self, "attention_levels", tuple(int(a) for a in self.attention_levels))
        levels = len(self.channel_mults)
        if levels == 0 or min(self.channel_mults) < 1:
            raise ValueError(f"channel_mults must be non-empty positive ints, got {self.channel_mults}")
        blocks = self.num_res_blocks
        blocks = (int(blocks),) * levels if isinstance(blocks, int) else tuple(int(n) for n in blocks)
        set_(self, "num_res_blocks", blocks)
        if len(blocks) != levels or min(blocks) < 1:
            raise ValueError(f"num_res_blocks must be >= 1, one per level ({levels}), got {self.num_res_blocks}")
        if min(self.image_size, self.in_channels, self.out_channels, self.base_channels, self.text_dim,
               self.pooled_dim, self.timesteps, self.heads) < 1 or min(self.head_dim, self.layout_maps) < 0:
            raise ValueError(f"sizes, dims, heads and timesteps must be positive: {self}")
        if self.image_size % self.downsample_factor:
            raise ValueError(f"image_size {self.image_size} is not divisible by 2**(levels-1) = "
                             f"{self.downsample_factor}")
        if any(not 0 <= a < levels for a in self.attention_levels):
            raise ValueError(f"attention_levels {self.attention_levels} must lie in 0..{levels - 1}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for level in sorted(set(self.attention_levels) | {levels - 1}):
            self.attention_heads(self.base_channels * self.channel_mults[level])
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, "
                             f"got {self.prediction_type!r}")

    @property
    def downsample_factor(self) -> int:
        """Total spatial reduction; input sides must be multiples of it."""
        return 2 ** (len(self.channel_mults) - 1)

    def attention_heads(self, channels: int) -> tuple[int, int]:
        """(heads, head_dim) for an attention site with `channels` channels."""
        head_dim = self.head_dim or channels // self.heads
        if head_dim == 0 or channels % head_dim or (not self.head_dim and channels % self.heads):
            raise ValueError(f"{channels} channels cannot be split into heads (heads={self.heads}, "
                             f"head_dim={self.head_dim})")
        return channels // head_dim, head_dim


class _Unit(nn.Module):
    """One ResBlock, followed by a self+cross-attention SpatialTransformer at attention levels."""

    def __init__(self, config: UNetConfig, in_channels: int, out_channels: int, emb_dim: int, attention: bool):
        super().__init__()
        self.res = ResBlock(in_channels, out_channels, emb_dim, config.dropout)
        self.attn = (SpatialTransformer(out_channels, *config.attention_heads(out_channels), config.text_dim)
                     if attention else None)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.res(h, emb)
        return h if self.attn is None else self.attn(h, context, mask)


class _Level(nn.Module):
    """The units of one resolution level, with the resampling before and after them."""

    def __init__(self, pre: nn.Module, units: list[_Unit], post: nn.Module):
        super().__init__()
        self.pre, self.units, self.post = pre, nn.ModuleList(units), post


class UNet(nn.Module):
    """ADM/Imagen U-Net f_theta(x_t, c, t) -> x0_hat with text cross-attention (paper Sec. 4.1).

    The pooled text embedding (for super-resolution, also the augmentation level) is added to the timestep embedding
    that drives every ResBlock's scale/shift: what a prompt says reaches every resolution, not only
    the attention levels. With `coord_channels`, x and y coordinate maps join the input
    (CoordConv, Liu et al. 2018): a convolutional net otherwise sees absolute position only through
    its zero padding, and learns "on the left" slowly. With `layout_maps` = k, an MLP turns the
    pooled embedding into k maps at the lowest resolution, upsampled to the input's and joined to
    it: a prompt's layout ("on the left", "above") becomes a linear read-out of its embedding, where
    FiLM and coordinates need the product of the two. The token sequence enters
    through cross-attention with `cond.mask` as key padding mask at `attention_levels` and in
    the middle block.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        c = self.config = config
        levels = len(c.channel_mults)
        emb_dim = 4 * c.base_channels
        self.time_embed = TimestepEmbedding(emb_dim, scale=1000.0 / c.timesteps)
        self.pooled_embed = _embedding_mlp(c.pooled_dim, emb_dim)
        self.lowres_embed = TimestepEmbedding(emb_dim, scale=1000.0) if c.lowres_cond else None
        self.skip_scale = 2 ** -0.5 if c.scale_skip else 1.0
        if c.prediction_type != "sample" and c.schedule is None:
            raise ValueError(f"prediction_type {c.prediction_type!r} needs the noise schedule (schedule) to read "
                             "the output")
        # float64 on the CPU on purpose: not a buffer, so .half() cannot round it
        self.alpha_bar = None if c.prediction_type == "sample" else make_schedule(c.schedule, c.timesteps).alpha_bar

        self.layout_embed = (_embedding_mlp(c.pooled_dim, emb_dim, c.layout_maps * self.layout_grid ** 2)
                             if c.layout_maps else None)
        stem_in = ((2 * c.in_channels if c.lowres_cond else c.in_channels) + (2 if c.coord_channels else 0)
                   + c.layout_maps)
        self.conv_in = nn.Conv2d(stem_in, c.base_channels, 3, padding=1)
        ch, skip_channels = c.base_channels, []
        self.down = nn.ModuleList()
        for i, mult in enumerate(c.channel_mults):
            out, last = c.base_channels * mult, i == levels - 1
            pre = Downsample(ch) if c.efficient and not last else nn.Identity()
            skip_channels.append(ch)
            units = []
            for _ in range(c.num_res_blocks[i]):
                units.append(_Unit(c, ch, out, emb_dim, i in c.attention_levels))
                ch = out
                skip_channels.append(ch)
            post = Downsample(ch) if not c.efficient and not last else nn.Identity()
            self.down.append(_Level(pre, units, post))

        self.mid = nn.ModuleList([_Unit(c, ch, ch, emb_dim, attention=True), _Unit(c, ch, ch, emb_dim, False)])

        self.up = nn.ModuleList()
        for i in reversed(range(levels)):
            out = c.base_channels * c.channel_mults[i]
            units = []
            for _ in range(c.num_res_blocks[i] + 1):
                units.append(_Unit(c, ch + skip_channels.pop(), out, emb_dim, i in c.attention_levels))
                ch = out
            upsample = i < levels - 1 if c.efficient else i > 0
            self.up.append(_Level(nn.Identity(), units, Upsample(ch) if upsample else nn.Identity()))

        self.final = _Unit(c, ch + c.base_channels, ch, emb_dim, False) if c.efficient else None
        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, c.out_channels, 3, padding=1)

    @property
    def layout_grid(self) -> int:
        """Side of the layout maps: the lowest resolution of a net at its image_size."""
        return self.config.image_size // self.config.downsample_factor

    def layout(self, pooled: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """[B, layout_maps, *size]: the layout maps of the pooled text embeddings, upsampled bilinearly."""
        grid = self.layout_grid
        maps = self.layout_embed(pooled).view(-1, self.config.layout_maps, grid, grid)
        return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)

    def _run(self, unit: _Unit, *args: torch.Tensor) -> torch.Tensor:
        if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(unit, *args, use_reentrant=False)
        return unit(*args)

    def _check_inputs(self, x_t: torch.Tensor, lowres: torch.Tensor | None) -> None:
        c = self.config
        if x_t.ndim != 4 or x_t.shape[1] != c.in_channels:
            raise ValueError(f"x_t must be [B, {c.in_channels}, H, W], got {tuple(x_t.shape)}")
        if x_t.shape[2] % c.downsample_factor or x_t.shape[3] % c.downsample_factor:
            raise ValueError(f"x_t sides {tuple(x_t.shape[2:])} must be multiples of {c.downsample_factor}")
        if c.lowres_cond and (lowres is None or lowres.shape != x_t.shape):
            got = None if lowres is None else tuple(lowres.shape)
            raise ValueError(f"this super-resolution U-Net needs `lowres` upsampled to {tuple(x_t.shape)}, got {got}")
        if not c.lowres_cond and lowres is not None:
            raise ValueError("`lowres` given to a U-Net built without lowres_cond")

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | int, cond: TextCondition,
                lowres: torch.Tensor | None = None, lowres_t: torch.Tensor | None = None) -> torch.Tensor:
        """Predict x_0 from x_t at paper steps `t` (1..T) under the text condition `cond`.

        Super-resolution nets take `lowres`, the low-resolution image already upsampled to
        x_t's size (and noise-augmented by the pipeline), and `lowres_t`, the augmentation
        level in [0, 1] per sample (None: 0, no augmentation).
        """
        self._check_inputs(x_t, lowres)
        batch = x_t.shape[0]
        t = batch_timesteps(t, batch, x_t.device)
        emb = self.time_embed(t) + self.pooled_embed(cond.pooled)
        h = x_t
        if self.lowres_embed is not None:
            level = 0.0 if lowres_t is None else lowres_t
            emb = emb + self.lowres_embed(batch_timesteps(level, batch, x_t.device))
            h = torch.cat([x_t, lowres], dim=1)
        if self.config.coord_channels:
            h = torch.cat([h, coordinate_maps(h)], dim=1)
        if self.layout_embed is not None:
            h = torch.cat([h, self.layout(cond.pooled, h.shape[-2:]).to(h.dtype)], dim=1)
        context, mask = cond.tokens, cond.mask

        h = stem = self.conv_in(h)
        skips = []
        for level in self.down:
            h = level.pre(h)
            skips.append(h)
            for unit in level.units:
                h = self._run(unit, h, emb, context, mask)
                skips.append(h)
            h = level.post(h)
        for unit in self.mid:
            h = self._run(unit, h, emb, context, mask)
        for level in self.up:
            for unit in level.units:
                h = self._run(unit, torch.cat([h, skips.pop() * self.skip_scale], dim=1), emb, context, mask)
            h = level.post(h)
        if self.final is not None:
            h = self._run(self.final, torch.cat([h, stem * self.skip_scale], dim=1), emb, context, mask)
        out = self.conv_out(F.silu(self.norm_out(h)))
        if self.alpha_bar is None:
            return out
        alpha_bar_t = self.alpha_bar[t.cpu().long()].view(-1, 1, 1, 1)
        return x0_from_output(self.config.prediction_type, out, x_t, alpha_bar_t)


def _embedding_mlp(in_dim: int, emb_dim: int, out_dim: int | None = None) -> nn.Sequential:
    """A text feature -> timestep-embedding space (or `out_dim` features): LayerNorm, Linear, SiLU, Linear."""
    return nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, emb_dim), nn.SiLU(),
                         nn.Linear(emb_dim, out_dim or emb_dim))


def coordinate_maps(h: torch.Tensor) -> torch.Tensor:
    """[B, 2, H, W]: x (left -1 to right +1) and y (top -1 to bottom +1) at pixel centres."""
    b, _, height, width = h.shape
    ys = (torch.arange(height, device=h.device, dtype=h.dtype) + 0.5) / height * 2 - 1
    xs = (torch.arange(width, device=h.device, dtype=h.dtype) + 0.5) / width * 2 - 1
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"))
    return grid[None].expand(b, -1, -1, -1)


_SHAPES_TEXT = dict(text_dim=128, pooled_dim=128)   # the bundled small CLIP trained on the shapes world
_CLIP_B32_TEXT = dict(text_dim=512, pooled_dim=512)  # CLIP ViT-B/32: text width 512, projection 512
_EFFICIENT_SR = dict(lowres_cond=True, efficient=True, scale_skip=True)

UNET_PRESETS: dict[str, UNetConfig] = {
    # Test-sized nets (~0.26M, ~0.38M parameters).
    "tiny": UNetConfig(image_size=32, base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
                       attention_levels=(1,), heads=2, text_dim=32, pooled_dim=32),
    "tiny-sr": UNetConfig(image_size=64, base_channels=16, channel_mults=(1, 2), num_res_blocks=(1, 2),
                          attention_levels=(1,), heads=2, text_dim=32, pooled_dim=32, **_EFFICIENT_SR),
    # The bundled default model, sized to train on 2 CPU cores: 32x32 base (~5.4M) and
    # 32 -> 64 super-resolution (~2.5M); attention at the 8x8 (base) and 16x16 (SR) levels.
    "shapes-base": UNetConfig(image_size=32, base_channels=32, channel_mults=(1, 2, 4), num_res_blocks=2,
                              attention_levels=(2,), head_dim=32, **_SHAPES_TEXT),
    "shapes-sr": UNetConfig(image_size=64, base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=(1, 2, 3),
                            attention_levels=(2,), head_dim=32, **_SHAPES_TEXT, **_EFFICIENT_SR),
    # Paper scale (Sec. 4.1, Imagen): ADM-style 64x64 base with attention at 32, 16 and 8
    # (~654M), and Imagen's Efficient U-Net 64 -> 256 (dims 128 x (1, 2, 4, 8), blocks
    # (2, 4, 8, 8), attention at the lowest level; ~897M).
    "base64": UNetConfig(image_size=64, base_channels=256, channel_mults=(1, 2, 3, 4), num_res_blocks=3,
                         attention_levels=(1, 2, 3), head_dim=64, dropout=0.1, **_CLIP_B32_TEXT),
    "sr256": UNetConfig(image_size=256, base_channels=128, channel_mults=(1, 2, 4, 8), num_res_blocks=(2, 4, 8, 8),
                        attention_levels=(3,), head_dim=64, **_CLIP_B32_TEXT, **_EFFICIENT_SR),
}


def build_unet(name_or_config: str | UNetConfig) -> UNet:
    """Build a U-Net from a preset name in `UNET_PRESETS` or from a config."""
    if isinstance(name_or_config, UNetConfig):
        return UNet(name_or_config)
    if name_or_config not in UNET_PRESETS:
        raise ValueError(f"unknown U-Net preset {name_or_config!r}; choose one of {sorted(UNET_PRESETS)}")
    return UNet(UNET_PRESETS[name_or_config])
