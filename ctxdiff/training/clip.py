"""Contrastive training of a small CLIP (open_clip's ClipLoss, learnable logit scale) and
held-out retrieval accuracy, for the shapes world or any (image, caption) data."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import torch
from open_clip.loss import ClipLoss

from ctxdiff.errors import CtxdiffError, UsageError
from ctxdiff.models.encoders import ClipConfig, ClipEncoders, load_clip

PRECISIONS = ("fp32", "bf16")
MAX_LOGIT_SCALE = math.log(100)  # open_clip's clamp on the learned temperature


def train_clip(config: ClipConfig, images_and_captions: Iterable, *, steps: int, batch_size: int = 128,
               lr: float = 5e-4, weight_decay: float = 0.1, warmup: int = 100, seed: int = 0,
               precision: str = "fp32", device: str | torch.device = "cpu",
               callback: Callable | None = None) -> ClipEncoders:
    """Train the CLIP of `config` (from its weights, or from scratch) with AdamW and a cosine
    schedule after linear warm-up; returns it frozen, in eval mode.

    `images_and_captions` yields (image [3, H, W] in [-1, 1], caption); a Dataset with `len` is
    reshuffled every epoch, any other iterable is re-iterated. Images go through
    `ClipEncoders.image_features`, the same resize and normalisation as `encode_image`.
    `callback(step=, loss=, lr=, logit_scale=)` runs after each step.
    """
    if precision not in PRECISIONS:
        raise UsageError(f"precision '{precision}' is not one of {', '.join(PRECISIONS)}")
    torch.manual_seed(seed)
    encoders = load_clip(config, device, trainable=True)
    optimizer = torch.optim.AdamW(_param_groups(encoders, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6,
                                  fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _warmup_cosine(step, warmup, steps))
    loss_fn, logit_scale = ClipLoss(), encoders.clip.logit_scale
    batches = _batches(images_and_captions, batch_size, torch.Generator().manual_seed(seed))
    device_type = torch.device(device).type
    for step in range(steps):
        images, captions = next(batches)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = loss_fn(encoders.image_features(images.to(device)), encoders.text_features(captions),
                           logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        if callback is not None:
            callback(step=step, loss=loss.item(), lr=schedule.get_last_lr()[0], logit_scale=logit_scale.exp().item())
    encoders.requires_grad_(False)
    return encoders.eval()


@torch.no_grad()
def retrieval_top1(encoders: ClipEncoders, images: torch.Tensor, captions: list[str], *,
                   batch_size: int = 256) -> dict[str, float]:
    """Top-1 retrieval over a held-out set of [-1, 1] images and their captions.

    text_to_image: each caption retrieves the most similar image; image_to_text: each image the
    most similar caption. A hit is a retrieved item whose caption equals the query's (captions
    repeat). `chance` is the expected hit rate of a uniformly random retrieval.
    """
    if len(images) != len(captions) or not captions:
        raise CtxdiffError(f"retrieval needs as many captions as images, at least one ({len(images)} images, "
                           f"{len(captions)} captions)")
    device = encoders.mean.device
    image_emb = torch.cat([encoders.image_features(images[i:i + batch_size].to(device))
                           for i in range(0, len(images), batch_size)])
    text_emb = torch.cat([encoders.text_features(captions[i:i + batch_size])
                          for i in range(0, len(captions), batch_size)])
    ids = {caption: i for i, caption in enumerate(dict.fromkeys(captions))}
    label = torch.tensor([ids[c] for c in captions], device=device)
    same = label[:, None] == label[None, :]
    similarity = text_emb @ image_emb.T  # [caption, image]
    return {"text_to_image": (label[similarity.argmax(1)] == label).float().mean().item(),
            "image_to_text": (label[similarity.argmax(0)] == label).float().mean().item(),
            "chance": same.float().mean().item()}


def _param_groups(encoders: ClipEncoders, weight_decay: float) -> list[dict]:
    """open_clip's split: no weight decay on gains, biases, norms and the logit scale."""
    decay, no_decay = [], []
    for name, param in encoders.named_parameters():
        exclude = param.ndim < 2 or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def _warmup_cosine(step: int, warmup: int, steps: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _batches(data: Iterable, batch_size: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Endless (images [B, 3, H, W], captions) batches: a sized Dataset is reshuffled each
    epoch, any other iterable is re-iterated in order. Incomplete batches are dropped."""
    if hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        return _shuffled_batches(data, batch_size, generator)
    return _streamed_batches(data, batch_size)


def _shuffled_batches(data, batch_size: int, generator: torch.Generator):
    if len(data) < batch_size:
        raise UsageError(f"batch size {batch_size} exceeds the {len(data)} training images")
    while True:
        order = torch.randperm(len(data), generator=generator).tolist()
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield _collate([data[i] for i in order[start:start + batch_size]])


def _streamed_batches(data: Iterable, batch_size: int):
    while True:
        pending, produced = [], False
        for item in data:
            pending.append(item)
            if len(pending) == batch_size:
                yield _collate(pending)
                pending, produced = [], True
        if not produced:
            raise CtxdiffError(f"the image-caption data gave no full batch of {batch_size}; pass more pairs, "
                               "or a Dataset / re-iterable instead of a one-shot iterator")


def _collate(pairs: list) -> tuple[torch.Tensor, list[str]]:
    return torch.stack([image for image, _ in pairs]), [caption for _, caption in pairs]
