"""`ctxdiff train` with `train.stage: clip`: contrastive training of a small CLIP (open_clip's
ClipLoss, learnable logit scale), and held-out retrieval and twin accuracy, for the shapes world
or any (image, caption) data.

Exact resume: the model's initialisation comes from the seed, the batch order is replayed from
the seed (epochs are permutations drawn from one generator; a stream is re-read from its start),
and a checkpoint holds the model, optimizer, LR schedule and step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from open_clip.loss import ClipLoss
from torch import nn

from ctxdiff.checkpoints import rotate_checkpoints, save_training_state, training_state_path
from ctxdiff.data.datasets import collate, open_dataset
from ctxdiff.errors import CtxdiffError, UsageError
from ctxdiff.models.encoders import ClipEncoders, load_clip, save_clip
from ctxdiff.shapes.captions import OBJECT_COLOURS
from ctxdiff.shapes.datasets import colour_layout
from ctxdiff.shapes.world import ShapesWorld
from ctxdiff.training.recipe import Recipe
from ctxdiff.training.trainer import TrainLoop, check_run_folder, lr_scheduler

PRECISIONS = ("fp32", "bf16")
MAX_LOGIT_SCALE = math.log(100)  # open_clip's clamp on the learned temperature


class ClipTrainer(TrainLoop):
    """One CLIP training run: AdamW (betas 0.9/0.98, eps 1e-6, open_clip's weight-decay split; no
    gradient clipping, as open_clip) with a cosine schedule after linear warm-up. The model is
    `recipe.model.clip` (from its weights, or from scratch); `data` replaces the recipe's dataset
    ((image [3, H, W] in [-1, 1], caption) pairs, or groups (images [G, 3, H, W], G captions) kept
    in one batch: hard negatives, a batch then holds G x batch_size pairs). Writes
    <output>/clip.safetensors (a ctxdiff "clip" bundle) at every checkpoint and at the end.

    `train.layout_loss` > 0 (shapes world) adds w * the squared error of a linear head that reads
    every object colour's centroid (`colour_layout`) off the image embedding: contrastive batches
    are met by colours and shapes alone, and the vision tower learns to ignore where things are
    (left and right placements had embedding cosine 0.998). The head is not part of the CLIP.
    """

    ema = None

    def __init__(self, recipe: Recipe, device: torch.device | str = "cpu", resume: bool = False,
                 on_step: Callable[[dict], None] | None = None, log: Callable[[str], None] = lambda _: None,
                 data: Iterable | None = None) -> None:
        cfg = recipe.train
        if cfg.precision not in PRECISIONS:
            raise UsageError(f"train.precision '{cfg.precision}' is not one of {', '.join(PRECISIONS)} for CLIP training")
        self.recipe, self.device, self.on_step, self.log = recipe, torch.device(device), on_step, log
        self.out = Path(recipe.output)
        self.ckpt_dir = self.out / "checkpoints"
        self.model_path = self.out / "clip.safetensors"
        check_run_folder(self.out, self.ckpt_dir, resume)
        torch.manual_seed(cfg.seed)
        self.encoders = load_clip(recipe.model.clip, self.device, trainable=True)
        groups = _param_groups(self.encoders, cfg.weight_decay)
        self.layout_head = nn.Linear(self.encoders.embed_dim, 2 * len(OBJECT_COLOURS)).to(self.device) \
            if cfg.layout_loss else None
        if self.layout_head is not None:
            groups.append({"params": list(self.layout_head.parameters()), "weight_decay": 0.0})
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6, fused=True)
        self.scheduler = lr_scheduler(self.optimizer, cfg)
        self.scaler = torch.amp.GradScaler("cuda", enabled=False)
        self.loss_fn = ClipLoss()
        d = recipe.data
        self.dataset = data if data is not None else open_dataset(
            d.source, d.image_size, caption_key=d.caption_key, shapes_count=d.shapes_count, shapes_seed=d.shapes_seed,
            hard_negatives=d.hard_negatives)
        self.step = 0
        if resume:
            self._load_latest()
        self._batches: Iterator | None = None

    def train_step(self) -> float:
        cfg = self.recipe.train
        if self._batches is None:
            self._batches = _batches(self.dataset, cfg.batch_size, cfg.seed, self.step)
        images, captions = next(self._batches)
        logit_scale = self.encoders.clip.logit_scale
        images = images.to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            image_features = self.encoders.image_features(images)
            text_features = self.encoders.text_features(captions)
            loss = self.loss_fn(image_features, text_features, logit_scale.exp())
        if self.layout_head is not None:
            loss = loss + cfg.layout_loss * self.layout_error(images, image_features.float())
        self.check_finite(loss)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():
            logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        self.step += 1
        return loss.item()

    def layout_error(self, images: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """Mean squared distance between the head's and the pixels' centroid of every object colour."""
        centroids, present = colour_layout(images)
        predicted = self.layout_head(image_features).view(centroids.shape)
        return (predicted - centroids).square().sum(-1)[present].mean()

    def preview(self) -> None:
        """A CLIP has no samples to show while it trains (its held-out scores come at the end)."""

    def save_checkpoint(self) -> Path:
        state = {"clip": self.encoders.clip.state_dict(), **self.loop_state()}
        if self.layout_head is not None:
            state["layout_head"] = self.layout_head.state_dict()
        path = save_training_state(training_state_path(self.ckpt_dir, self.step), state)
        rotate_checkpoints(self.ckpt_dir, keep_last=self.recipe.train.keep_last)
        save_clip(self.model_path, self.encoders)
        return path

    def trained(self) -> ClipEncoders:
        """The CLIP, frozen and in eval mode."""
        return self.encoders.requires_grad_(False).eval()

    def _load_latest(self) -> None:
        state, path = self.resume_state()
        self.encoders.clip.load_state_dict(state["clip"])
        if self.layout_head is not None:
            self.layout_head.load_state_dict(state["layout_head"])
        self.restore_loop_state(state, path)


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


@torch.no_grad()
def twin_accuracy(encoders: ClipEncoders, images: torch.Tensor, twin_images: torch.Tensor, captions: list[str],
                  twin_captions: list[str]) -> dict[str, float]:
    """How often a CLIP tells a scene from its twin (one attribute changed), Winoground-style:
    text: each caption is closer to its own image than to the twin's; image: each image is closer
    to its own caption than to the twin's (both directions of a pair must be right)."""
    device = encoders.mean.device
    image_emb = torch.stack([encoders.image_features(x.to(device)) for x in (images, twin_images)])
    text_emb = torch.stack([encoders.text_features(c) for c in (captions, twin_captions)])
    similarity = torch.einsum("tnd,ind->tin", text_emb, image_emb)   # [caption of, image of, pair]
    text = (similarity[0, 0] > similarity[0, 1]) & (similarity[1, 1] > similarity[1, 0])
    image = (similarity[0, 0] > similarity[1, 0]) & (similarity[1, 1] > similarity[0, 1])
    return {"text": text.float().mean().item(), "image": image.float().mean().item()}


def shapes_scores(encoders: ClipEncoders, world: ShapesWorld, n: int = 500) -> dict[str, float]:
    """Top-1 retrieval over the first n scenes of a (held-out) shapes world, and how often the CLIP
    tells each scene from its twin, per changed attribute (`twin_text/<attribute>`, `twin_image/...`)."""
    def pixels(scenes) -> torch.Tensor:
        images = torch.stack([torch.from_numpy(world.render(scene)) for scene in scenes])
        return (images.permute(0, 3, 1, 2).float() / 127.5 - 1).to(encoders.mean.device)

    scenes, twins, attributes = zip(*(world.scene_and_twin(i) for i in range(n)))
    images, twin_images = pixels(scenes), pixels(twins)
    result = retrieval_top1(encoders, images, [scene.caption for scene in scenes])
    for attribute in sorted(set(attributes)):
        pick = [i for i, a in enumerate(attributes) if a == attribute]
        scores = twin_accuracy(encoders, images[pick], twin_images[pick], [scenes[i].caption for i in pick],
                               [twins[i].caption for i in pick])
        result |= {f"twin_{direction}/{attribute}": value for direction, value in scores.items()}
    return result


def _param_groups(encoders: ClipEncoders, weight_decay: float) -> list[dict]:
    """open_clip's split: no weight decay on gains, biases, norms and the logit scale."""
    decay, no_decay = [], []
    for name, param in encoders.named_parameters():
        exclude = param.ndim < 2 or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def _batches(data: Iterable, batch_size: int, seed: int, start: int) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Endless (images [B, 3, H, W], captions) batches from step `start` on: a sized Dataset is
    reshuffled each epoch (permutations from one generator seeded by `seed`), any other iterable
    is re-iterated in order. Incomplete batches are dropped."""
    if hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        return _shuffled_batches(data, batch_size, torch.Generator().manual_seed(seed), start)
    return _streamed_batches(data, batch_size, start)


def _shuffled_batches(data, batch_size: int, generator: torch.Generator, start: int):
    if len(data) < batch_size:
        raise UsageError(f"batch size {batch_size} exceeds the {len(data)} training images")
    per_epoch = len(data) // batch_size
    epoch = 0
    while True:
        order = torch.randperm(len(data), generator=generator).tolist()
        first = max(0, start - epoch * per_epoch)   # resume: skip the batches already trained on
        for batch in range(first, per_epoch):
            yield collate([data[i] for i in order[batch * batch_size:(batch + 1) * batch_size]])
        epoch += 1


def _streamed_batches(data: Iterable, batch_size: int, start: int):
    step = 0
    while True:
        pending, produced = [], False
        for item in data:
            pending.append(item)
            if len(pending) == batch_size:
                if step >= start:
                    yield collate(pending)
                pending, produced, step = [], True, step + 1
        if not produced:
            raise CtxdiffError(f"the image-caption data gave no full batch of {batch_size}; pass more pairs, "
                               "or a Dataset / re-iterable instead of a one-shot iterator")
