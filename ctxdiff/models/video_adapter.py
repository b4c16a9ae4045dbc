"""The spatio-temporal context-aware adapter r_phi(x_0, c, t) for videos (paper Sec. 4.2, Appendix C).

The paper adds "spatio-temporal attention, which includes spatial self-attention and temporal
causal attention" to the image adapter. Here the image adapter (`ContextAdapter`) runs on every
frame: its blocks already hold the spatial self-attention over a frame's tokens and the
cross-attention to the text. After each of its blocks a temporal causal attention lets every
token attend to the same token in the current and the previous `window - 1` frames (Tab. 8:
3 frames). The temporal layers run as forward hooks on the image adapter's blocks, so the image
adapter's code and parameter names (under `image.`) stay those of a t2i bundle's adapter. Their
output projections are zero-initialised (the rest from a fixed seed): a new video adapter equals
the image adapter frame by frame. The bias is per frame, shaped like the video [B*F, C, H, W]
(Eq. 1: the mean shift k_t r_phi(x_0, c, t)).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ctxdiff.models.adapter import AdapterConfig, ContextAdapter
from ctxdiff.models.conditioning import TextCondition
from ctxdiff.models.temporal import TemporalAttention, fixed_init


@dataclass(frozen=True)
class VideoAdapterConfig:
    """The image adapter's config plus the temporal causal window (Tab. 8: 3 frames)."""

    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    window: int = 3

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"window must be >= 1 frames, got {self.window}")


class VideoAdapter(nn.Module):
    """r_phi(x_0, c, t) on F-frame videos folded into the batch: x0 [B*F, C, H, W] -> bias, same shape."""

    def __init__(self, config: VideoAdapterConfig, image_encoder: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.config = config
        self.image = ContextAdapter(config.adapter, image_encoder)
        width, heads = config.adapter.width, config.adapter.heads
        with fixed_init():
            self.temporal = nn.ModuleList(TemporalAttention(width, heads, width // heads, window=config.window)
                                          for _ in self.image.blocks)
        self._frames = 1
        for block, layer in zip(self.image.blocks, self.temporal):
            block.register_forward_hook(self._temporal_hook(layer))

    def _temporal_hook(self, layer: TemporalAttention):
        def after_block(module: nn.Module, args, tokens: torch.Tensor) -> torch.Tensor:
            return layer(tokens, self._frames)

        return after_block

    @classmethod
    def from_image_adapter(cls, adapter: ContextAdapter, window: int = 3) -> "VideoAdapter":
        """A video adapter whose image part holds `adapter`'s weights (and its image encoder)."""
        video = cls(VideoAdapterConfig(adapter.config, window), adapter.image_encoder)
        video.image.load_state_dict(adapter.state_dict())
        return video.to(next(adapter.parameters()))

    def forward(self, x0: torch.Tensor, cond: TextCondition, t: torch.Tensor | int, frames: int) -> torch.Tensor:
        """The per-frame bias for x0 [B*F, C, H, W] under a per-frame condition and steps t."""
        if frames < 1 or x0.shape[0] % frames:
            raise ValueError(f"a batch of {x0.shape[0]} frames does not hold whole videos of {frames} frames")
        self._frames = frames
        return self.image(x0, cond, t)
