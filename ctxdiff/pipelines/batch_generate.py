"""Generation for evaluation: many prompts into one folder, resumable (the zero-shot protocol), or
into memory in batches (benchmarks). Under torchrun the folder's images are split over the ranks
(ctxdiff/distributed.py): each image keeps the seed and file name it has in one process."""

from __future__ import annotations

import random
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ctxdiff import distributed
from ctxdiff.data.images import IMAGE_SUFFIXES
from ctxdiff.data.png import read_png_metadata, save_png, to_uint8
from ctxdiff.errors import CtxdiffError
from ctxdiff.pipelines.text2image import Text2Image
from ctxdiff.recipes import SampleConfig


def progress_steps(pipe, params: SampleConfig, strength: float | None = None) -> int:
    """Steps one batch of `pipe.sample(..., params)` reports to its progress bar (one per sampler step of each
    stage); with an init image of `strength` (img2img / inpainting), only the steps below round(S T) run."""
    from ctxdiff.diffusion.samplers import timesteps_for
    from ctxdiff.pipelines.init_image import start_step, start_timesteps

    stages = [params.steps] + ([params.sr_steps] if getattr(pipe, "sr", None) is not None else [])
    if strength is None:
        return sum(stages)
    start = start_step(pipe.sched.T, strength)
    return sum(len(start_timesteps(timesteps_for(pipe.sched.T, n, params.spacing), start)) - 1 for n in stages)


def sample_captions(captions: list[str], n: int, seed: int) -> list[str]:
    """n captions drawn without replacement (seeded), as the paper samples 30K MS-COCO captions."""
    if len(captions) < n:
        raise CtxdiffError(f"the prompts file has {len(captions)} prompts, fewer than -n {n}; "
                           "pass a smaller -n or more prompts")
    return random.Random(seed).sample(captions, n)


def generate_to_folder(pipe: Text2Image, prompts: list[str], folder: Path, seed: int, params: SampleConfig,
                       batch_size: int = 32, progress=None) -> list[Path]:
    """Image i is prompts[i] with seed + i, written as folder/{i:05d}.png (PNG metadata: prompt,
    seed, parameters). Images already in the folder are kept, so an interrupted run resumes, but
    only those this protocol made with these prompts, seeds and parameters: any other image there
    would be counted by the metric, so it is an error.

    Under torchrun (ctxdiff.distributed) the batches of one process are dealt out (batch b to rank b % world), so
    every image is made in the batch it has in one process: the floats of a batch's images depend on its other
    members in the last bits, enough to flip a uint8 level now and then. With a
    process group every rank checks the folder before any writes and returns when all images are written (without
    one, wait for the other ranks before reading the folder). `progress.advance(n)` counts this rank's images."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:05d}.png" for i in range(len(prompts))]
    records = {path: {"prompt": prompts[i], "seed": seed + i, **asdict(params), "model": pipe.source}
               for i, path in enumerate(paths)}
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        made = read_png_metadata(path) if path in records else None
        if made != records.get(path, {}):
            raise CtxdiffError(f"{folder}: holds {path.name}, which this run did not make (another prompt, seed, "
                               "model or setting, or another file): the metric would count it; pass an empty "
                               "or new --fake folder")
    todo = [i for i, p in enumerate(paths) if not p.exists()]
    batches = distributed.share([todo[start:start + batch_size] for start in range(0, len(todo), batch_size)])
    distributed.barrier()      # every rank has checked the folder before any rank writes into it
    for batch in batches:
        images = to_uint8(pipe.sample([prompts[i] for i in batch], [seed + i for i in batch], params))
        for i, image in zip(batch, images):
            save_png(paths[i], image, records[paths[i]])
        if progress is not None:
            progress.advance(len(batch))
    distributed.barrier()      # the folder is complete on every rank
    return paths


def sample_uint8(pipe: Text2Image, prompts: list[str], seeds: list[int], params: SampleConfig,
                 batch_size: int = 50) -> np.ndarray:
    """uint8 [N, H, W, 3]: image i is prompts[i] with seeds[i], made `batch_size` at a time."""
    return np.concatenate([to_uint8(pipe.sample(prompts[i:i + batch_size], seeds[i:i + batch_size], params))
                           for i in range(0, len(prompts), batch_size)])
