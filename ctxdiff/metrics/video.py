"""Video editing metrics on CLIP frame embeddings (Tune-A-Video / FateZero / ContextDiff).

- text alignment: mean cosine between every frame and the edit prompt;
- temporal consistency: mean cosine between frame embeddings, over all pairs i < j (the
  ContextDiff paper) and over consecutive pairs (FateZero's script); both are reported, named.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ctxdiff.errors import CtxdiffError


def text_alignment(frame_embs: torch.Tensor, text_emb: torch.Tensor) -> float:
    """Mean cosine similarity between each frame embedding [F, D] and the prompt embedding [D] or [1, D]."""
    frames = F.normalize(torch.as_tensor(frame_embs, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.as_tensor(text_emb, dtype=torch.float64).reshape(1, -1), dim=-1)
    return (frames @ text.T).mean().item()


def temporal_consistency(frame_embs: torch.Tensor) -> dict[str, float]:
    """Mean cosine similarity of frame embeddings [F, D]: "all_pairs" (i < j) and "consecutive" (i, i+1)."""
    frames = F.normalize(torch.as_tensor(frame_embs, dtype=torch.float64), dim=-1)
    if len(frames) < 2:
        raise CtxdiffError(f"temporal consistency needs at least 2 frames, got {len(frames)}")
    similarity = frames @ frames.T
    upper = torch.triu_indices(len(frames), len(frames), offset=1)
    return {"all_pairs": similarity[upper[0], upper[1]].mean().item(),
            "consecutive": similarity.diagonal(offset=1).mean().item()}


def video_scores(encoders, frames: np.ndarray, prompt: str | None = None, batch_size: int = 32) -> dict:
    """Temporal consistency (both pairings) of uint8 [F, H, W, 3] frames, and their text alignment
    with `prompt` when one is given."""
    from ctxdiff.metrics.clip_score import embed_images, embed_prompts

    embs = embed_images(encoders, list(frames), batch_size)
    consistency = temporal_consistency(embs)
    record = {"frames": len(embs), "temporal_consistency_all_pairs": consistency["all_pairs"],
              "temporal_consistency_consecutive": consistency["consecutive"]}
    if prompt is not None:
        record["text_alignment"] = text_alignment(embs, embed_prompts(encoders, [prompt])[0])
    return record


def mean_over_videos(records: list[dict]) -> dict[str, float]:
    """The mean of each score that every video's record (from `video_scores`) has."""
    keys = [k for k in ("text_alignment", "temporal_consistency_all_pairs", "temporal_consistency_consecutive")
            if records and all(k in r for r in records)]
    return {key: float(np.mean([r[key] for r in records])) for key in keys}
