"""Which shape does a shapes model draw when asked for each one? For every size and shape, n
prompts "a <size> <colour> <shape>" (the colours in turn, seeds 0..n-1) are sampled and judged;
each row counts the shapes the judge reads (`none`: no object of that colour found). A model that
draws one blob for every shape word shows the same row four times.

    python benchmarks/shape_confusion.py [--model FILE] [--n 16] [--base-only] [--sizes large,small]
"""

from __future__ import annotations

import argparse
import collections
import json

import torch

from ctxdiff.data.png import to_uint8
from ctxdiff.data.shapes import OBJECT_COLOURS, SHAPES, SIZES
from ctxdiff.metrics.shapes_judge import judge
from ctxdiff.pipelines.text2image import DEFAULT_MODEL, Text2Image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--n", type=int, default=16, help="prompts per size and shape")
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--base-only", action="store_true", help="judge the 32x32 base stage")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    pipe = Text2Image.from_bundle(args.model, args.device)
    if args.base_only:
        pipe.sr = None
    colours = list(OBJECT_COLOURS)
    table = {}
    for size in args.sizes.split(","):
        for shape in SHAPES:
            prompts = [f"a {size} {colours[i % len(colours)]} {shape}" for i in range(args.n)]
            images = to_uint8(pipe.sample(prompts, list(range(args.n)), pipe.defaults))
            verdicts = [judge(image, prompt) for image, prompt in zip(images, prompts)]
            drawn = collections.Counter(v.detections[0].shape if v.detections[0] else "none" for v in verdicts)
            table[f"{size} {shape}"] = {s: drawn[s] for s in (*SHAPES, "none")}
    if args.json:
        print(json.dumps({"model": args.model, "base_only": args.base_only, "n": args.n, "drawn": table}, indent=1))
        return
    print(f"{args.model}{' (base stage)' if args.base_only else ''}: shape drawn, {args.n} prompts per row")
    print(f"{'asked':<15}" + "".join(f"{s:>9}" for s in (*SHAPES, "none")))
    for asked, drawn in table.items():
        print(f"{asked:<15}" + "".join(f"{drawn[s]:>9}" for s in (*SHAPES, "none")))


if __name__ == "__main__":
    main()
