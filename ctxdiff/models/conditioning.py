"""The text condition every network in ctxdiff consumes."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TextCondition:
    """Encoded prompts: token embeddings for cross-attention plus a pooled embedding.

    tokens: [B, L, D_tok] per-token features, mask: [B, L] True for real tokens,
    pooled: [B, D_pool] the sentence embedding (CLIP's projected text feature).
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, device=None, dtype=None) -> "TextCondition":
        """Move to a device; `dtype` casts the float features only (the mask stays bool)."""
        return TextCondition(self.tokens.to(device=device, dtype=dtype), self.mask.to(device=device),
                             self.pooled.to(device=device, dtype=dtype))

    def __getitem__(self, index) -> "TextCondition":
        return TextCondition(self.tokens[index], self.mask[index], self.pooled[index])

    def repeat_interleave(self, n: int) -> "TextCondition":
        return TextCondition(self.tokens.repeat_interleave(n, 0), self.mask.repeat_interleave(n, 0),
                             self.pooled.repeat_interleave(n, 0))

    @staticmethod
    def cat(conds: list["TextCondition"]) -> "TextCondition":
        return TextCondition(torch.cat([c.tokens for c in conds]), torch.cat([c.mask for c in conds]),
                             torch.cat([c.pooled for c in conds]))
