"""Context-aware fast solvers on the bundled model (issue 20 item 7's measurement): the shapes judge's
accuracy and seconds per image of each solver at 10/15/20/30 steps against DDIM 50 + 25 (today's
default), on the same held-out prompts and seeds, in one run, printed as a table.

    python benchmarks/solver_quality.py [--n 200] [--steps 10,15,20,30] [--samplers all] [--model FILE]
    python benchmarks/solver_quality.py --arms dpmpp-2m:15:8,dpmpp-2m:15:25    # explicit sampler:steps:sr_steps

Held-out prompts come from `ctxdiff.shapes.world.held_out_prompts` with a seed no other benchmark uses
(--prompt-seed), so nothing was tuned on them. Every arm samples the same prompts with the same image
seeds, so the difference to the baseline is paired: `diff` is arm minus baseline in the share of
prompts with every attribute right, `se` the standard error of that paired difference
(std of the per-prompt differences / sqrt n), and `within 1 se` says whether |diff| <= se of the
baseline's own rate, sqrt(p (1 - p) / n) (the issue's criterion). A second table gives each attribute the
captions state (colour, shape, ...): its accuracy per arm and the paired difference with its standard error,
so a solver that keeps the all-correct rate but loses an attribute shows; `all within` says whether every
attribute's |diff| is within the baseline's own standard error for it. The super-resolution stage runs
--sr-fraction of the base steps (DDIM 50 + 25: 0.5). Seconds per image: the wall clock of the arm's
sampling over its images (batches of --batch), judged apart. Pick a default on one --prompt-seed and
report it from a run on another (docs/measurements.md#fast-solvers-on-the-bundled-model).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import timed  # noqa: E402

from ctxdiff.formats.t2i import DEFAULT_MODEL  # noqa: E402
from ctxdiff.pipelines.batch_generate import sample_uint8  # noqa: E402
from ctxdiff.pipelines.text2image import Text2Image  # noqa: E402
from ctxdiff.recipes import SampleConfig  # noqa: E402
from ctxdiff.shapes.judge import ATTRIBUTES, judge_many  # noqa: E402
from ctxdiff.shapes.world import held_out_prompts  # noqa: E402

PROMPT_SEED = 4711           # held-out prompts no other benchmark draws (default_model_quality uses 2024)
IMAGE_SEED = 90_000          # image i: seed IMAGE_SEED + i, the same in every arm


def arm_result(pipe: Text2Image, prompts: list[str], params: SampleConfig, batch: int, device) -> dict:
    """Per-prompt all-correct verdicts, per-prompt attribute verdicts (NaN where the caption does not
    state it), mean attribute accuracy and seconds per image of one arm."""
    seeds = [IMAGE_SEED + i for i in range(len(prompts))]
    images: list[np.ndarray] = []
    seconds = timed(lambda: images.append(sample_uint8(pipe, prompts, seeds, params, batch)), torch.device(device))
    report = judge_many(list(images[0]), prompts)
    correct = np.array([v.all_correct for v in report.verdicts], dtype=float)
    per_attribute = {name: np.array([np.nan if v.attributes()[name] is None else float(v.attributes()[name])
                                     for v in report.verdicts]) for name in ATTRIBUTES}
    stated = np.concatenate([values[~np.isnan(values)] for values in per_attribute.values()])
    return {"correct": correct, "per_attribute": per_attribute,
            "attributes": float(stated.mean()) if stated.size else float("nan"), "seconds": seconds / len(prompts)}


def paired(arm: np.ndarray, base: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of the per-prompt difference arm - base over the prompts both state."""
    d = (arm - base)[~np.isnan(base)]
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else float("nan")


def rate_se(verdicts: np.ndarray) -> float:
    """The standard error of a rate on its own, sqrt(p (1 - p) / n), over the stated (non-NaN) verdicts."""
    stated = verdicts[~np.isnan(verdicts)]
    return math.sqrt(stated.mean() * (1 - stated.mean()) / stated.size) if stated.size else float("nan")


def print_attribute_table(results: list[tuple[str, SampleConfig, dict]]) -> None:
    """Accuracy of each stated attribute per arm, and arm - baseline with its paired standard error."""
    base = results[0][2]["per_attribute"]
    names = [name for name in ATTRIBUTES if (~np.isnan(base[name])).any()]
    print("\n" + f"{'sampler':<22} {'steps':>5} {'sr':>3} " + " ".join(f"{name:>18}" for name in names)
          + f" {'all within':>10}")
    print(f"{'(accuracy, diff +- se)':<32} " + " ".join(f"{'n = ' + str(int((~np.isnan(base[n])).sum())):>18}"
                                                     for n in names))
    for i, (label, params, result) in enumerate(results):
        cells, within = [], True
        for name in names:
            values = result["per_attribute"][name]
            if i == 0:
                cells.append(f"{np.nanmean(values):>18.3f}")
                continue
            diff, se = paired(values, base[name])
            outside = abs(diff) > rate_se(base[name])
            within &= not outside
            cells.append(f"{np.nanmean(values):.3f} {diff:+.3f}+-{se:.3f}{'*' if outside else ' '}".rjust(18))
        verdict = "baseline" if i == 0 else ("yes" if within else "no")
        print(f"{label:<22} {params.steps:>5} {params.sr_steps:>3} " + " ".join(cells) + f" {verdict:>10}", flush=True)
    print("# *: the attribute's |diff| is over the baseline's own standard error for it, sqrt(p (1 - p) / n stated)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--n", type=int, default=200, help="held-out prompts (mixed single- and two-object)")
    parser.add_argument("--steps", default="10,15,20,30", help="base-stage steps of every solver")
    parser.add_argument("--samplers", default="all",
                        help=f"comma-separated, or 'all' ({', '.join(SampleConfig.SAMPLERS[2:])})")
    parser.add_argument("--baseline", default="ddim:50:25", help="sampler:steps:sr_steps of the reference arm")
    parser.add_argument("--arms", default=None,
                        help="comma-separated sampler:steps:sr_steps arms, instead of --samplers x --steps")
    parser.add_argument("--sr-fraction", type=float, default=0.5, help="SR steps = round(fraction * steps), >= 1")
    parser.add_argument("--prompt-seed", type=int, default=PROMPT_SEED)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    samplers = list(SampleConfig.SAMPLERS[2:]) if args.samplers == "all" else args.samplers.split(",")
    steps = [int(s) for s in args.steps.split(",")]

    pipe = Text2Image.from_bundle(args.model, args.device)
    prompts = held_out_prompts(args.n, seed=args.prompt_seed, kind="mixed")
    pipe.sample(prompts[:1], [0], replace(pipe.defaults, steps=2, sr_steps=2))       # warm-up, not timed
    def arm(spec: str) -> SampleConfig:
        sampler, n, sr = spec.split(":")
        return replace(pipe.defaults, sampler=sampler, steps=int(n), sr_steps=int(sr))

    baseline = arm(args.baseline)
    arms = [(f"{baseline.sampler} (baseline)", baseline)]
    if args.arms:
        arms += [(params.sampler, params) for params in map(arm, args.arms.split(","))]
    else:
        arms += [(name, replace(pipe.defaults, sampler=name, steps=n, sr_steps=max(1, round(args.sr_fraction * n))))
                 for name in samplers for n in steps]

    n = len(prompts)
    print(f"# {args.model}: {n} held-out prompts (seed {args.prompt_seed}), images seeds {IMAGE_SEED}+i, "
          f"guidance {pipe.defaults.guidance}, device {args.device}, {torch.get_num_threads()} threads", flush=True)
    header = (f"{'sampler':<22} {'steps':>5} {'sr':>3} {'all correct':>11} {'attrs':>6} {'diff':>7} {'se':>6} "
              f"{'within 1 se':>11} {'s/image':>8} {'speedup':>7}")
    print(header)
    print("-" * len(header), flush=True)
    base = None
    results = []
    for label, params in arms:
        result = arm_result(pipe, prompts, params, args.batch, args.device)
        results.append((label, params, result))
        if base is None:
            base = result
            base["se_rate"] = rate_se(result["correct"])
        diff, se = paired(result["correct"], base["correct"])
        within = "baseline" if result is base else ("yes" if abs(diff) <= base["se_rate"] else "no")
        print(f"{label:<22} {params.steps:>5} {params.sr_steps:>3} {result['correct'].mean():>11.3f} "
              f"{result['attributes']:>6.3f} {diff:>+7.3f} {se:>6.3f} {within:>11} {result['seconds']:>8.3f} "
              f"{base['seconds'] / result['seconds']:>6.2f}x", flush=True)
    print(f"# baseline standard error of the all-correct rate: {base['se_rate']:.3f} (n = {n})")
    print_attribute_table(results)


if __name__ == "__main__":
    main()
