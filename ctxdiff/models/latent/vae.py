"""The Stable Diffusion autoencoder (AutoencoderKL), with diffusers' parameter names.

`vae.encode(x)` takes images in [-1, 1] and returns the latent Gaussian (mean, std, sample);
`vae.decode(z)` maps latents back to images. Diffusion runs on `scaling_factor * z`
(`to_latents` / `from_latents` do the scaling).

Large images: `vae.enable_tiling(tile=512)` encodes and decodes in overlapping tiles of `tile`
pixels (latent tiles of tile / 8) blended linearly over a quarter of a tile, diffusers'
algorithm, so memory stays flat with image size. The result differs slightly from untiled
coding (each tile normalises and attends on its own); images no larger than a tile are coded
whole, exactly as without tiling.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ctxdiff.errors import CtxdiffError
from ctxdiff.models.latent.unet import Attention, Downsample2D, ResnetBlock2D, Upsample2D

_EPS = 1e-6


@dataclass(frozen=True)
class LatentVAEConfig:
    """Architecture of the KL autoencoder (SD 1.x and 2.x share it)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side (8 for SD)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_diffusers(cls, config: dict) -> "LatentVAEConfig":
        """The config of a diffusers `vae/config.json` (AutoencoderKL)."""
        unsupported = [f"{key}={config[key]!r}" for key, default in _DIFFUSERS_DEFAULTS.items()
                       if key in config and config[key] != default]
        if any(t != "DownEncoderBlock2D" for t in config.get("down_block_types", ())) or any(
                t != "UpDecoderBlock2D" for t in config.get("up_block_types", ())):
            unsupported.append("block types other than DownEncoderBlock2D / UpDecoderBlock2D")
        if unsupported:
            raise CtxdiffError(f"vae/config.json: not a Stable Diffusion KL autoencoder ({'; '.join(unsupported)}); "
                               "pass an SD 1.x or 2.x model")
        return cls(
            in_channels=config.get("in_channels", 3),
            out_channels=config.get("out_channels", 3),
            block_out_channels=tuple(config.get("block_out_channels", (64,))),
            layers_per_block=config.get("layers_per_block", 1),
            latent_channels=config.get("latent_channels", 4),
            norm_num_groups=config.get("norm_num_groups", 32),
            scaling_factor=config.get("scaling_factor", 0.18215),
        )


_DIFFUSERS_DEFAULTS = {"act_fn": "silu", "shift_factor": None, "latents_mean": None, "latents_std": None,
                       "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True}


class SpatialSelfAttention(Attention):
    """Single-head self-attention over all pixels with its own GroupNorm and a residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__(channels, heads=1, head_dim=channels, bias=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)
        return super().forward(tokens).transpose(1, 2).reshape(b, c, h, w) + x


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups)])
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, None, groups, _EPS) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class EncoderBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None,
                                                    groups, _EPS) for i in range(layers)])
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, pad_right=True)] if downsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in [*self.resnets, *self.downsamplers]:
            x = module(x)
        return x


class DecoderBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None,
                                                    groups, _EPS) for i in range(layers)])
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)] if upsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in [*self.resnets, *self.upsamplers]:
            x = module(x)
        return x


class Encoder(nn.Module):
    def __init__(self, config: LatentVAEConfig):
        super().__init__()
        chans, groups, n = config.block_out_channels, config.norm_num_groups, len(config.block_out_channels)
        self.conv_in = nn.Conv2d(config.in_channels, chans[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            EncoderBlock(chans[max(i - 1, 0)], chans[i], config.layers_per_block, groups, i < n - 1)
            for i in range(n)])
        self.mid_block = MidBlock(chans[-1], groups)
        self.conv_norm_out = nn.GroupNorm(groups, chans[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(chans[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, config: LatentVAEConfig):
        super().__init__()
        rev, groups, n = config.block_out_channels[::-1], config.norm_num_groups, len(config.block_out_channels)
        self.conv_in = nn.Conv2d(config.latent_channels, rev[0], 3, padding=1)
        self.mid_block = MidBlock(rev[0], groups)
        self.up_blocks = nn.ModuleList([
            DecoderBlock(rev[max(i - 1, 0)], rev[i], config.layers_per_block + 1, groups, i < n - 1)
            for i in range(n)])
        self.conv_norm_out = nn.GroupNorm(groups, rev[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(rev[-1], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


@dataclass
class LatentDistribution:
    """The encoder's diagonal Gaussian over latents (log-variance clamped to [-30, 20] as in SD)."""

    mean: torch.Tensor
    std: torch.Tensor

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise


class LatentVAE(nn.Module):
    """AutoencoderKL: encoder -> quant_conv -> Gaussian; post_quant_conv -> decoder."""

    def __init__(self, config: LatentVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)
        self.tile: int | None = None

    def enable_tiling(self, tile: int = 512) -> None:
        """Code images larger than `tile` pixels (a multiple of the downscale factor) in blended tiles."""
        if tile < self.config.downscale or tile % self.config.downscale:
            raise ValueError(f"tile must be a positive multiple of {self.config.downscale} pixels, got {tile}")
        self.tile = tile

    def disable_tiling(self) -> None:
        self.tile = None

    def encode(self, x: torch.Tensor) -> LatentDistribution:
        """Images [B, 3, H, W] in [-1, 1] -> the latent distribution (unscaled latents)."""
        if self.tile is not None and max(x.shape[-2:]) > self.tile:
            moments = _tiled(lambda t: self.quant_conv(self.encoder(t)), x, self.tile,
                             self.tile // self.config.downscale)
        else:
            moments = self.quant_conv(self.encoder(x))
        mean, logvar = moments.chunk(2, dim=1)
        return LatentDistribution(mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents [B, 4, h, w] -> images [B, 3, 8h, 8w] (roughly in [-1, 1])."""
        latent_tile = None if self.tile is None else self.tile // self.config.downscale
        if latent_tile is not None and max(z.shape[-2:]) > latent_tile:
            return _tiled(lambda t: self.decoder(self.post_quant_conv(t)), z, latent_tile, self.tile)
        return self.decoder(self.post_quant_conv(z))

    def to_latents(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> diffusion latents: a sample of the encoding times scaling_factor."""
        return self.encode(x).sample(generator) * self.config.scaling_factor

    def from_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Diffusion latents -> images: decode(latents / scaling_factor)."""
        return self.decode(latents / self.config.scaling_factor)


def _blend(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """b with its first `extent` rows (dim -2) or columns (dim -1) faded in from a's last ones."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    if extent == 0:
        return b
    shape = [1] * b.ndim
    shape[dim] = extent
    w = (torch.arange(extent, device=b.device, dtype=b.dtype) / extent).view(shape)
    head = a.narrow(dim, a.shape[dim] - extent, extent) * (1 - w) + b.narrow(dim, 0, extent) * w
    return torch.cat([head, b.narrow(dim, extent, b.shape[dim] - extent)], dim=dim)


def _tiled(code, x: torch.Tensor, tile_in: int, tile_out: int, overlap: float = 0.25) -> torch.Tensor:
    """Apply `code` to overlapping tile_in tiles of x (stride 3/4 tile), blend the tile_out outputs, stitch."""
    stride = int(tile_in * (1 - overlap))
    extent = int(tile_out * overlap)
    keep = tile_out - extent
    rows = [[code(x[..., i:i + tile_in, j:j + tile_in]) for j in range(0, x.shape[-1], stride)]
            for i in range(0, x.shape[-2], stride)]
    out_rows = []
    for i, row in enumerate(rows):
        parts = []
        for j, t in enumerate(row):
            if i > 0:
                t = _blend(rows[i - 1][j], t, extent, -2)
            if j > 0:
                t = _blend(row[j - 1], t, extent, -1)
            row[j] = t  # later neighbours blend with the blended tile (as diffusers, which blends in place)
            parts.append(t[..., :keep, :keep])
        out_rows.append(torch.cat(parts, dim=-1))
    return torch.cat(out_rows, dim=-2)
