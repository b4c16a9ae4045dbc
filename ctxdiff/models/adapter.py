"""The context-aware adapter r_phi(x_0, c, t) (paper Sec. 3.1, Sec. 4.1, Appendix C).

The adapter models the interaction of the text c with the sample x_0 and returns a bias
shaped like x_0 that shifts the diffusion trajectory: the forward marginal becomes
N(sqrt(abar_t) x_0 + k_t r_phi(x_0, c, t), (1 - abar_t) I) (Eq. 1). The paper encodes text
and image with CLIP ViT-B/32 and models their interaction with 8-head cross-attention in 4
transformer blocks.

Trained jointly with the denoiser on Eq. 6 alone, an unbounded adapter can learn r ~ x_0 / k_t:
the bias then writes the data into x_t where the noise should have hidden it (shapes world, t = 0.9 T:
|k_t r| is 8-15x |sqrt(abar_t) x_0|, `benchmarks/word_use.py`'s leak@.9T), the denoiser reads
the layout off x_t instead of learning it from the text, and at sampling time, where r is computed
from the model's own x0_hat, whatever the first noisy prediction shows is amplified and kept.
`bound` keeps r in the data's range (|r| <= bound; 1 for images in [-1, 1]): k_t <= 1/4, so the
bias can at most add k_t x_0 to the signal sqrt(abar_t) x_0, never swamp the noise.

Layout: the patches of x_0 (plus, with `image_branch="clip"`, the tokens of a frozen
external image encoder such as CLIP's patch tokens) form one token sequence; the timestep
embedding is added to every token; 4 pre-norm blocks of (cross-attention to the text tokens
with the key padding mask -> self-attention -> MLP) follow; a zero-initialised head maps
each *patch* token back to its patch of the bias, which is unpatchified to x_0's shape.
External image tokens thus take part in self-attention and cross-attention like the patches
(CLIP's grid need not match x's patch grid), but only the patch grid is read out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ctxdiff.errors import CtxdiffError
from ctxdiff.models.conditioning import TextCondition
from ctxdiff.models.layers import TimestepEmbedding, TransformerBlock, batch_timesteps, zero_init

if TYPE_CHECKING:
    from ctxdiff.models.encoders import ClipEncoders
    from ctxdiff.models.latent.vae import LatentVAE


@dataclass(frozen=True)
class AdapterConfig:
    """Architecture of a `ContextAdapter`; every field is JSON-serialisable (lists become tuples).

    `image_branch="patch"`: x_0 enters through the built-in patch embedding only (fast; also
    the small latent encoder for latent models). `image_branch="clip"`: tokens of an external
    frozen `image_encoder(x) -> [B, N, image_dim]` join the sequence as well.
    """

    x_shape: tuple[int, int, int] = (3, 64, 64)   # (C, H, W) of x and of the bias
    patch_size: int = 4  # x_0 is cut into patch_size x patch_size patches, one token each
    width: int = 512  # token width of the adapter's transformer
    heads: int = 8                                  # paper, Sec. 4.1
    blocks: int = 4                                 # paper, Appendix C
    text_dim: int = 512                             # CLIP ViT-B/32 text width
    image_dim: int = 0                              # external image-token width; 0 with "patch"
    image_branch: Literal["patch", "clip"] = "patch"  # "patch": x_0's own patches only; "clip": also
                                                      # the CLIP image tokens of x_0
    timesteps: int = 1000  # T of the process (as model.unet.timesteps)
    mlp_ratio: int = 4  # hidden width of each block's MLP, in multiples of width
    bound: float | None = None   # r = bound * tanh(head / bound): |r| <= bound; None: unbounded (the paper)

    def __post_init__(self):
        object.__setattr__(self, "x_shape", tuple(int(s) for s in self.x_shape))
        if len(self.x_shape) != 3 or min(self.x_shape) < 1:
            raise ValueError(f"x_shape must be (C, H, W) of positive ints, got {self.x_shape}")
        if min(self.patch_size, self.width, self.heads, self.blocks, self.text_dim, self.timesteps,
               self.mlp_ratio) < 1:
            raise ValueError(f"sizes, dims, heads, blocks and timesteps must be positive: {self}")
        if self.bound is not None and not self.bound > 0:
            raise ValueError(f"bound must be > 0 or null, got {self.bound}")
        if self.x_shape[1] % self.patch_size or self.x_shape[2] % self.patch_size:
            raise ValueError(f"x_shape {self.x_shape} is not divisible into {self.patch_size}-pixel patches")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.image_branch not in ("patch", "clip"):
            raise ValueError(f"image_branch must be 'patch' or 'clip', got {self.image_branch!r}")
        if (self.image_branch == "clip") != (self.image_dim > 0):
            raise ValueError(f"image_dim must be > 0 exactly when image_branch is 'clip' "
                             f"(got image_branch={self.image_branch!r}, image_dim={self.image_dim})")

    @property
    def grid(self) -> tuple[int, int]:
        """The patch grid (rows, columns) of x at the configured size."""
        return self.x_shape[1] // self.patch_size, self.x_shape[2] // self.patch_size


class ContextAdapter(nn.Module):
    """r_phi(x_0, c, t) -> bias shaped like x_0; exactly zero at initialisation.

    `image_encoder` (required for `image_branch="clip"`) is a frozen callable owned by the
    caller: it is called under `torch.no_grad()` on x (data, or x0_hat while sampling), does
    its own resizing/normalisation, and is not part of this module's parameters or state_dict.
    """

    def __init__(self, config: AdapterConfig, image_encoder: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        c = self.config = config
        if (c.image_branch == "clip") != (image_encoder is not None):
            raise ValueError(f"image_branch={c.image_branch!r} needs "
                             f"{'an' if c.image_branch == 'clip' else 'no'} image_encoder")
        self.__dict__["image_encoder"] = image_encoder   # outside the module tree, see the docstring
        channels, p = c.x_shape[0], c.patch_size
        self.patch_embed = nn.Conv2d(channels, c.width, p, stride=p)
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, c.width, *c.grid))
        self.image_proj = (nn.Sequential(nn.LayerNorm(c.image_dim), nn.Linear(c.image_dim, c.width))
                           if c.image_branch == "clip" else None)
        self.time_embed = TimestepEmbedding(c.width, scale=1000.0 / c.timesteps)
        self.blocks = nn.ModuleList(TransformerBlock(c.width, c.heads, c.width // c.heads, c.text_dim, c.mlp_ratio)
                                    for _ in range(c.blocks))
        self.norm_out = nn.LayerNorm(c.width)
        self.head = zero_init(nn.Linear(c.width, p * p * channels))   # r = 0 at init: plain diffusion

    def _patch_tokens(self, x0: torch.Tensor) -> torch.Tensor:
        """Patch embedding plus position embedding (resampled bicubically for another grid)."""
        patches = self.patch_embed(x0)
        pos = self.pos_embed
        if patches.shape[2:] != pos.shape[2:]:
            pos = F.interpolate(pos, size=patches.shape[2:], mode="bicubic", align_corners=False)
        return (patches + pos).flatten(2).transpose(1, 2)

    def forward(self, x0: torch.Tensor, cond: TextCondition, t: torch.Tensor | int) -> torch.Tensor:
        """The bias r_phi(x0, c, t), shaped like `x0`; `t` holds paper steps, [B] or a scalar."""
        c = self.config
        b, channels, h, w = x0.shape
        if channels != c.x_shape[0] or h % c.patch_size or w % c.patch_size:
            raise ValueError(f"x0 must be [B, {c.x_shape[0]}, H, W] with sides divisible by {c.patch_size}, "
                             f"got {tuple(x0.shape)}")
        tokens = self._patch_tokens(x0)
        n_patches = tokens.shape[1]
        if self.image_proj is not None:
            with torch.no_grad():
                image_tokens = self.image_encoder(x0)
            tokens = torch.cat([tokens, self.image_proj(image_tokens.to(tokens.dtype))], dim=1)
        tokens = tokens + self.time_embed(batch_timesteps(t, b, x0.device))[:, None, :]
        for block in self.blocks:
            tokens = block(tokens, cond.tokens, cond.mask)
        patches = self.head(self.norm_out(tokens[:, :n_patches]))
        if c.bound is not None:
            patches = c.bound * torch.tanh(patches / c.bound)
        p = c.patch_size
        patches = patches.view(b, h // p, w // p, channels, p, p)
        return patches.permute(0, 3, 1, 4, 2, 5).reshape(b, channels, h, w)


_SHAPES_TEXT_DIM = 128   # the bundled small CLIP trained on the shapes world
_CLIP_B32 = dict(text_dim=512, image_dim=768, image_branch="clip")   # ViT-B/32: text 512, patch tokens 768

ADAPTER_PRESETS: dict[str, AdapterConfig] = {
    # Test-sized (~56K parameters).
    "tiny": AdapterConfig(x_shape=(3, 32, 32), patch_size=8, width=32, heads=4, blocks=2, text_dim=32),
    # The bundled default model's adapters (~1.1M each), 64 patch tokens for both stages.
    "shapes-base": AdapterConfig(x_shape=(3, 32, 32), patch_size=4, width=128, text_dim=_SHAPES_TEXT_DIM),
    "shapes-sr": AdapterConfig(x_shape=(3, 64, 64), patch_size=8, width=128, text_dim=_SHAPES_TEXT_DIM),
    # Paper scale for the 64x64 base: 37.9M trainable parameters; with the frozen CLIP ViT-B/32
    # text and image towers it uses (~151M) that is ~189M, the paper's "188M" adapter
    # (Appendix B, Tab. 5), which we read as counting its CLIP encoders.
    "paper": AdapterConfig(x_shape=(3, 64, 64), patch_size=4, width=768, **_CLIP_B32),
}


def image_branch(config: AdapterConfig, clip: "ClipEncoders | None" = None,
                 vae: "LatentVAE | None" = None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The adapter's external image encoder: for image_branch "clip", CLIP's patch tokens of x0
    (of its VAE decoding when x0 is a latent: `vae`); for "patch", None (its own patch embedding)."""
    if config.image_branch != "clip":
        return None
    if clip is None:
        raise CtxdiffError("image_branch 'clip' needs a CLIP image tower (model.clip)")
    if vae is not None:
        return DecodedClipTokens(vae, clip)
    return lambda x: clip.encode_image(x)[0]


def build_adapter(config: str | AdapterConfig, clip: "ClipEncoders | None" = None,
                  vae: "LatentVAE | None" = None) -> ContextAdapter:
    """r_phi from a preset name in `ADAPTER_PRESETS` or a config, with its image branch (`image_branch`)."""
    if isinstance(config, str):
        if config not in ADAPTER_PRESETS:
            raise ValueError(f"unknown adapter preset {config!r}; choose one of {sorted(ADAPTER_PRESETS)}")
        config = ADAPTER_PRESETS[config]
    return ContextAdapter(config, image_branch(config, clip, vae))


class DecodedClipTokens:
    """The image branch "clip" on latents: CLIP patch tokens of the VAE decoding of z (faithful to
    the paper's image CLIP, which sees pixels). Eq. 9/11 stack one x0_hat twice (the bias at t and
    at s, `context_biases`), so a batch whose halves are equal is decoded once."""

    def __init__(self, vae: "LatentVAE", clip: "ClipEncoders") -> None:
        self.vae, self.clip = vae, clip

    def __deepcopy__(self, memo) -> "DecodedClipTokens":
        return self   # frozen and shared: an EMA copy of the adapter uses the same VAE and CLIP

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        half = z.shape[0] // 2
        if z.shape[0] % 2 == 0 and half and torch.equal(z[:half], z[half:]):
            tokens = self._encode(z[:half])
            return torch.cat([tokens, tokens])
        return self._encode(z)

    def _encode(self, z: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vae.parameters()).dtype
        return self.clip.encode_image(self.vae.from_latents(z.to(dtype)).float())[0]
