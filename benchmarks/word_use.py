"""Which words has a text-to-image model learned to use? For prompts that differ in one word, the
mean absolute difference of the model's x0 prediction at t = T (pure noise in, so the prediction
is the model's E[x0 | prompt], whatever the seed), averaged over noise draws. A word the model
ignores moves nothing; a colour moves the most pixels. Cheap (one U-Net call per prompt), so it
can follow training: pass several bundles (e.g. the exports of a run's checkpoints). The first
row is the shapes world itself (the same difference between the mean images of 400 scenes drawn
for each prompt): what a model that had learned the word would show. The last column, `noise`, is
how far the predictions for single noise draws stray from their mean (averaged over the prompts):
at t = T, x_T says nothing about x_0, so the best prediction ignores it (0); a model that reads
layouts into the noise lets the seed, not the prompt, decide where things go. `pos@.95T` is the
position column one step of a 20-step sampler below T (noise in, as the sampler's x_t there):
the world's 0.23 again for a model that has learned the word at every high noise level, not only
at t = T. `leak@.9T` is |k_t r_phi(x_0, c, t)| / |sqrt(abar_t) x_0| at t = 0.9 T on world images:
how much louder the adapter's bias speaks of x_0 than x_0 itself does there (0 without adapter).

    python benchmarks/word_use.py MODEL [MODEL ...] [--samples 16]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from ctxdiff.data.shapes import ShapesWorld, render_scene, scene_from_caption
from ctxdiff.diffusion.process import context_bias
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
    unet, T = pipe.base.unet, pipe.sched.T
    c = unet.config
    noise = torch.randn(samples, c.in_channels, c.image_size, c.image_size, generator=torch.Generator().manual_seed(0))

    def predictions(prompts: tuple[str, str], t: int) -> list[torch.Tensor]:
        return [unet(noise, torch.full((samples,), t), pipe.encode([p] * samples)) for p in prompts]

    result, strays = {}, []
    for attribute, prompts in SWAPS.items():
        pair = predictions(prompts, T)
        means = [p.mean(0) for p in pair]
        result[attribute] = float((means[0] - means[1]).abs().mean())
        strays += [float((p - m).abs().mean()) for p, m in zip(pair, means)]
    below = [p.mean(0) for p in predictions(SWAPS["position"], round(0.95 * T))]
    return result | {"noise": float(np.mean(strays)), "pos@.95T": float((below[0] - below[1]).abs().mean()),
                     "leak@.9T": leak(pipe, samples, round(0.9 * T))}


@torch.no_grad()
def leak(pipe: Text2Image, samples: int, t: int) -> float:
    """|k_t r_phi(x_0, c, t)| / |sqrt(abar_t) x_0| over world scenes and their captions."""
    if pipe.base.adapter is None:
        return 0.0
    size = pipe.base.unet.config.image_size
    world = ShapesWorld(seed=1, image_size=size)
    images, captions = zip(*(world.sample(i) for i in range(samples)))
    x0 = torch.tensor(np.stack(images), dtype=torch.float32).permute(0, 3, 1, 2) / 127.5 - 1
    bias = context_bias(pipe.sched, x0, t, pipe.base.adapter, pipe.encode(list(captions)))
    return float(bias.abs().mean() / (pipe.sched.at("alpha_bar", t, x0).sqrt() * x0).abs().mean())


def world_reference(size: int, scenes: int = 400) -> dict[str, float]:
    def mean_image(prompt: str) -> np.ndarray:
        return np.mean([render_scene(scene_from_caption(prompt, seed=s), size) / 127.5 - 1 for s in range(scenes)], 0)

    values = {attribute: float(np.abs(mean_image(a) - mean_image(b)).mean()) for attribute, (a, b) in SWAPS.items()}
    return values | {"noise": 0.0, "pos@.95T": values["position"], "leak@.9T": 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--samples", type=int, default=16, help="noise draws per prompt")
    args = parser.parse_args()
    print("mean |E[x0 | prompt] - E[x0 | prompt with one word changed]| at t = T (pixels in [-1, 1])")
    columns = [*SWAPS, "noise", "pos@.95T", "leak@.9T"]
    print(f"{'model':<48}" + "".join(f"{a:>11}" for a in columns))
    pipes = {model: Text2Image.from_bundle(model) for model in args.models}
    rows = {"the shapes world (target)": world_reference(next(iter(pipes.values())).base.unet.config.image_size)}
    rows |= {model: word_use(pipe, args.samples) for model, pipe in pipes.items()}
    for name, row in rows.items():
        print(f"{name[-48:]:<48}" + "".join(f"{row[a]:>11.4f}" for a in columns))


if __name__ == "__main__":
    main()
