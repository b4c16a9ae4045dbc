"""CLIP score of images against their prompts.

Two numbers, named apart because papers mix them up:
- `mean_cosine`: the mean raw cosine similarity of image and prompt embeddings (the scale of
  the ContextDiff paper's text alignment, e.g. 0.274);
- `clipscore`: Hessel et al. (2021) CLIPScore, the mean of 2.5 * max(cosine, 0).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ctxdiff.data.images import fit_image
from ctxdiff.errors import CtxdiffError

CLIPSCORE_WEIGHT = 2.5  # Hessel et al. 2021, w in CLIP-S = w * max(cos, 0)


def clip_input(encoders, image: np.ndarray) -> np.ndarray:
    """One uint8 [H, W, 3] image, scaled (shorter side) and centre-cropped to the CLIP's input size,
    like CLIP's own preprocessing."""
    return fit_image(image, (encoders.image_size, encoders.image_size), "crop")


@torch.no_grad()
def embed_images(encoders, images: Sequence[np.ndarray], batch_size: int = 32) -> torch.Tensor:
    """Unit-normalised CLIP embeddings [N, D] of uint8 [H, W, 3] images (any sizes)."""
    device = encoders.mean.device
    chunks = []
    for i in range(0, len(images), batch_size):
        batch = np.stack([clip_input(encoders, image) for image in images[i:i + batch_size]])
        pixels = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
        chunks.append(encoders.image_features(pixels).float().cpu())
    return torch.cat(chunks)


@torch.no_grad()
def embed_prompts(encoders, prompts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """Unit-normalised CLIP text embeddings [N, D]; each distinct prompt is encoded once."""
    unique = list(dict.fromkeys(prompts))
    chunks = [encoders.text_features(unique[i:i + batch_size]).float().cpu()
              for i in range(0, len(unique), batch_size)]
    table = torch.cat(chunks)
    index = {prompt: i for i, prompt in enumerate(unique)}
    return table[[index[p] for p in prompts]]


def scores_from_embeddings(image_embs: torch.Tensor, text_embs: torch.Tensor) -> dict:
    """Row-wise cosine of image i and prompt i, its mean, and CLIPScore (see the module docstring)."""
    cosine = F.cosine_similarity(torch.as_tensor(image_embs, dtype=torch.float64),
                                 torch.as_tensor(text_embs, dtype=torch.float64), dim=-1)
    clipscore = CLIPSCORE_WEIGHT * cosine.clamp(min=0)
    return {"count": len(cosine), "mean_cosine": cosine.mean().item(), "clipscore": clipscore.mean().item(),
            "per_image_cosine": cosine.tolist(), "per_image_clipscore": clipscore.tolist()}


def clip_scores(encoders, images: Sequence[np.ndarray], prompts: Sequence[str], batch_size: int = 32) -> dict:
    """CLIP scores of uint8 images against their prompts (one prompt per image)."""
    if len(images) != len(prompts):
        raise CtxdiffError(f"{len(images)} images but {len(prompts)} prompts; give one prompt per image")
    return scores_from_embeddings(embed_images(encoders, images, batch_size), embed_prompts(encoders, prompts))
