"""Where a training step of a recipe goes: seconds per step of the recipe as it is, with the
adapter's image branch reduced to its own patch embedding (no CLIP image tower on x_0), and
without the adapter (r = 0), or of arms given as `--arm NAME=KEY=VALUE;KEY=VALUE` (recipe overrides,
as `ctxdiff train --set` takes them; the recipe itself is always the first arm). The arms train side by
side in one process, alternating in blocks of `--block` steps after one warm-up step each; the median
block is reported (machines are noisy).

    python benchmarks/step_split.py recipes/shapes-bounded.yaml [--reps 6] [--block 3]
    python benchmarks/step_split.py recipes/shapes-bounded.yaml --arm "efficient=model.unet.efficient=true"
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from ctxdiff.training.recipe import read_recipe
from ctxdiff.training.trainer import Trainer

DEFAULT_ARMS = {"adapter, patch branch only": ["model.adapter.image_branch=patch", "model.adapter.image_dim=0"],
                "no adapter": ["model.adapter=null"]}


def parse_arm(text: str) -> tuple[str, list[str]]:
    """"NAME=KEY=VALUE;KEY=VALUE" -> (NAME, ["KEY=VALUE", ...])."""
    name, _, sets = text.partition("=")
    if not name or not sets:
        raise argparse.ArgumentTypeError(f"an arm is NAME=KEY=VALUE[;KEY=VALUE...], got {text!r}")
    return name, sets.split(";")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--block", type=int, default=3, help="steps per timed block")
    parser.add_argument("--arm", type=parse_arm, action="append", default=[],
                        help="NAME=KEY=VALUE[;KEY=VALUE...] (repeatable; default: the patch-branch and "
                             "no-adapter arms)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    arms = {"recipe": [], **(dict(args.arm) or DEFAULT_ARMS)}
    folder = tempfile.mkdtemp()
    trainers = {name: Trainer(read_recipe(args.recipe, [f"output={folder}/{i}", "train.sample_every=0", *sets]),
                              torch.device(args.device)) for i, (name, sets) in enumerate(arms.items())}
    for trainer in trainers.values():
        trainer.train_step()
    seconds = {name: [] for name in trainers}
    for _ in range(args.reps):
        for name, trainer in trainers.items():
            start = time.perf_counter()
            for _ in range(args.block):
                trainer.train_step()
            seconds[name].append((time.perf_counter() - start) / args.block)
    reference = statistics.median(seconds["recipe"])
    print(f"{args.recipe} on {args.device}: seconds per training step (median of {args.reps} blocks of {args.block})")
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"{name:<28} {median:7.3f} s   {reference / median:5.2f}x the recipe's speed")


if __name__ == "__main__":
    main()
