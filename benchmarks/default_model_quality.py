"""Quality of a shapes model (default: the bundled one) on held-out prompts, judged without any
neural network: per-attribute accuracy for single- and two-object prompts, at the cascade's
output size. Also times one `generate` call (the README's "under 15 s on 2 CPU cores").

    python benchmarks/default_model_quality.py [--model FILE] [--n 200] [--steps 50]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch

from ctxdiff.formats.t2i import DEFAULT_MODEL
from ctxdiff.pipelines.batch_generate import sample_uint8
from ctxdiff.pipelines.text2image import Text2Image
from ctxdiff.shapes.judge import judge_many
from ctxdiff.shapes.world import held_out_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--n", type=int, default=200, help="prompts of each kind (single, two)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--sampler", choices=("ddim", "ddpm"), default=None)
    parser.add_argument("--eta", type=float, default=None, help="DDIM stochasticity")
    parser.add_argument("--lowres-noise", type=float, default=None,
                        help="noise-augmentation level of the SR stage's low-res input (0: clean, 1: pure noise)")
    parser.add_argument("--kinds", default="single,two", help="which prompt kinds to judge")
    parser.add_argument("--no-adapter", action="store_true")
    parser.add_argument("--base-only", action="store_true", help="judge the 32x32 base stage")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    pipe = Text2Image.from_bundle(args.model, args.device)
    if args.base_only:
        pipe.sr = None
    given = {"sampler": args.sampler, "steps": args.steps, "eta": args.eta, "guidance": args.guidance,
             "lowres_noise_level": args.lowres_noise}
    params = replace(pipe.defaults, **{k: v for k, v in given.items() if v is not None}, adapter=not args.no_adapter)
    start = time.perf_counter()
    pipe.sample(["a red circle above a blue square"], [0], params)
    one_image = time.perf_counter() - start
    report = {"model": args.model, "params": params.__dict__, "seconds_one_image": one_image}
    for kind in args.kinds.split(","):
        prompts = held_out_prompts(args.n, seed=2024, kind=kind)
        result = judge_many(list(sample_uint8(pipe, prompts, list(range(len(prompts))), params, args.batch)), prompts)
        report[kind] = {row[1]: row[4] for row in result.rows() if row[0] == kind}
        report[kind]["all_correct"] = result.all_correct_rate(kind)
    print(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
