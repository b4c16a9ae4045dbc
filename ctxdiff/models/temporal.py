"""Attention over frames at each token position (Tune-A-Video's temporal attention, ContextDiff's
temporal causal attention in the video adapter, paper Sec. 4.2 and Appendix C).

Videos are folded into the batch: a tensor of tokens [B*F, N, C] holds F frames of B videos,
frame-major within each video. The layer regroups it to [B*N, F, C], lets every token attend to
the same position in other frames and adds the result back (pre-norm residual). The output
projection is zero-initialised, so a new layer leaves a pretrained image model unchanged.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ctxdiff.models.layers import attention, zero_init


@contextmanager
def fixed_init(seed: int = 0) -> Iterator[None]:
    """Initialise the layers built inside the block from `seed`, leaving the global RNG as it was:
    inflating the same model twice gives the same new layers (reproducible tuning runs)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def causal_window_mask(frames: int, window: int, device: torch.device | None = None) -> torch.Tensor:
    """[F, F] boolean mask, True where frame i may attend frame j: i - window < j <= i."""
    i = torch.arange(frames, device=device)[:, None]
    j = torch.arange(frames, device=device)[None, :]
    return (j <= i) & (j > i - window)


class TemporalAttention(nn.Module):
    """x + Attn(LN(x)) over the frame axis at every token; `window` > 0 makes it causal over the
    last `window` frames (the adapter, Tab. 8: 3), None attends all frames (Tune-A-Video)."""

    def __init__(self, dim: int, heads: int, head_dim: int, window: int | None = None):
        super().__init__()
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 frames or None, got {window}")
        self.heads, self.window = heads, window
        inner = heads * head_dim
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = zero_init(nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        """x: [B*F, N, C] tokens of F-frame videos -> the same shape."""
        bf, n, c = x.shape
        if bf % frames:
            raise ValueError(f"a batch of {bf} frame rows does not hold whole {frames}-frame videos")
        b = bf // frames
        seq = x.view(b, frames, n, c).transpose(1, 2).reshape(b * n, frames, c)
        h = self.norm(seq)
        q, k, v = (t.view(b * n, frames, self.heads, -1).transpose(1, 2)
                   for t in (self.to_q(h), *self.to_kv(h).chunk(2, dim=-1)))
        mask = None if self.window is None else causal_window_mask(frames, self.window, x.device)
        out = attention(q, k, v, attn_mask=mask)
        seq = seq + self.to_out(out.transpose(1, 2).flatten(2))
        return seq.view(b, n, frames, c).transpose(1, 2).reshape(bf, n, c)
