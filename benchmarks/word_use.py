"""Which words has a text-to-image model learned to use? For prompts that differ in one word, the
mean absolute difference of the model's x0 prediction at t = T (pure noise in, so the prediction
is the model's E[x0 | prompt], whatever the seed), averaged over noise draws. A word the model
ignores moves nothing; a colour moves the most pixels. Cheap (one U-Net call per prompt), so it
can follow training: pass several bundles (e.g. the exports of a run's checkpoints). The first
row is the shapes world itself (the same difference between the mean images of 400 scenes drawn
for each prompt): what a model that had learned the word would show. The last column, `noise`, is
how far the predictions for single noise draws stray from their mean (averaged over the prompts):
at t = T, x_T says nothing about x_0, so the best prediction ignores it (0); a model that reads
layouts into the noise lets the seed, not the prompt, decide where things go.

    python benchmarks/word_use.py MODEL [MODEL ...] [--samples 16]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from ctxdiff.data.shapes import render_scene, scene_from_caption
from ctxdiff.pipelines.text2image import Text2Image

SWAPS = {   # attribute: (prompt, the same prompt with one word changed)
    "colour": ("a large red circle on the left", "a large blue circle on the left"),
    "background": ("a red circle on a white background", "a red circle on a black background"),
    "size": ("a large red circle on a white background", "a small red circle on a white background"),
    "shape": ("a large red circle on a white background", "a large red cross on a white background"),
    "position": ("a large red circle on the left", "a large red circle on the right"),
    "relation": ("a red circle above a blue square", "a red circle below a blue square"),
}


@torch.no_grad()
def word_use(pipe: Text2Image, samples: int) -> dict[str, float]:
    unet, steps = pipe.base.unet, pipe.sched.T
    c = unet.config
    noise = torch.randn(samples, c.in_channels, c.image_size, c.image_size, generator=torch.Generator().manual_seed(0))
    result, strays = {}, []
    for attribute, prompts in SWAPS.items():
        predictions = [unet(noise, torch.full((samples,), steps), pipe.encode([p] * samples)) for p in prompts]
        means = [p.mean(0) for p in predictions]
        result[attribute] = float((means[0] - means[1]).abs().mean())
        strays += [float((p - m).abs().mean()) for p, m in zip(predictions, means)]
    return result | {"noise": float(np.mean(strays))}


def world_reference(size: int, scenes: int = 400) -> dict[str, float]:
    def mean_image(prompt: str) -> np.ndarray:
        return np.mean([render_scene(scene_from_caption(prompt, seed=s), size) / 127.5 - 1 for s in range(scenes)], 0)

    return {attribute: float(np.abs(mean_image(a) - mean_image(b)).mean()) for attribute, (a, b) in SWAPS.items()} | {
        "noise": 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--samples", type=int, default=16, help="noise draws per prompt")
    args = parser.parse_args()
    print("mean |E[x0 | prompt] - E[x0 | prompt with one word changed]| at t = T (pixels in [-1, 1])")
    columns = [*SWAPS, "noise"]
    print(f"{'model':<48}" + "".join(f"{a:>11}" for a in columns))
    pipes = {model: Text2Image.from_bundle(model) for model in args.models}
    rows = {"the shapes world (target)": world_reference(next(iter(pipes.values())).base.unet.config.image_size)}
    rows |= {model: word_use(pipe, args.samples) for model, pipe in pipes.items()}
    for name, row in rows.items():
        print(f"{name[-48:]:<48}" + "".join(f"{row[a]:>11.4f}" for a in columns))


if __name__ == "__main__":
    main()
