"""Judge accuracy over training steps: every `--every`-th checkpoint of one or more runs (the base
stage's EMA weights), sampled at the base resolution with the bundle's defaults on held-out prompts
and judged without any neural network. Shows whether an attribute comes with steps, and, from a
least-squares line against log2(step) through the second half of each run, how much it gains per
doubling of the steps and at which step the line would reach `--target` (an extrapolation, no more).

    python benchmarks/lab/checkpoint_curve.py runs/shapes-base [runs/...] --n 100 --every 500 --out docs/x
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ctxdiff.checkpoints import numbered_checkpoints
from ctxdiff.pipelines.batch_generate import sample_uint8
from ctxdiff.pipelines.text2image import Text2Image
from ctxdiff.shapes.judge import judge_many
from ctxdiff.shapes.world import held_out_prompts


def curve(run: Path, n: int, kind: str, every: int, batch: int, device: str) -> list[dict]:
    """[{"step": s, attribute: accuracy, ..., "all correct": rate}], one per checkpoint at a multiple of `every`."""
    pipe = Text2Image.from_bundle(run / "model.safetensors", device)
    pipe.sr = None
    prompts = held_out_prompts(n, seed=2024, kind=kind)
    rows = []
    for step, path in numbered_checkpoints(run / "checkpoints"):
        if step % every:
            continue
        pipe.load_base_checkpoint(path)
        report = judge_many(list(sample_uint8(pipe, prompts, list(range(n)), pipe.defaults, batch)), prompts)
        rows.append({"step": step, **{r[1]: r[4] for r in report.rows() if r[0] == kind}})
        print(run.name, json.dumps(rows[-1]), flush=True)
    return rows


def doubling_fit(rows: list[dict], attribute: str, target: float) -> dict:
    """Gain per doubling of the steps and the step where the line reaches `target`, from the second half."""
    half = rows[len(rows) // 2:]
    if len(half) < 2:
        return {"gain_per_doubling": None, "steps_to_target": None}
    slope, intercept = np.polyfit(np.log2([r["step"] for r in half]), [r[attribute] for r in half], 1)
    reach = float(2 ** ((target - intercept) / slope)) if slope > 0 else None
    return {"gain_per_doubling": float(slope), "steps_to_target": reach}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (model.safetensors + checkpoints/)")
    parser.add_argument("--n", type=int, default=100, help="held-out prompts per checkpoint")
    parser.add_argument("--kind", choices=("single", "two"), default="single")
    parser.add_argument("--every", type=int, default=500, help="judge the checkpoints at multiples of this step")
    parser.add_argument("--attribute", default="shape", help="the attribute to fit and plot")
    parser.add_argument("--target", type=float, default=0.8)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("results/checkpoint-curve"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    results = {"n": args.n, "kind": args.kind, "attribute": args.attribute, "target": args.target, "runs": {}}
    for run in args.runs:
        rows = curve(run, args.n, args.kind, args.every, args.batch, args.device)
        results["runs"][str(run)] = {"curve": rows, "fit": doubling_fit(rows, args.attribute, args.target)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\n| run | steps | {args.attribute} | gain per doubling | step where the line reaches {args.target} |")
    print("|---|---|---|---|---|")
    for run, r in results["runs"].items():
        fit, curve_ = r["fit"], r["curve"]
        gain = "n/a" if fit["gain_per_doubling"] is None else f"{fit['gain_per_doubling']:+.3f}"
        reach = "never (no rise)" if fit["steps_to_target"] is None else f"{fit['steps_to_target']:,.0f}"
        values = " ".join(f"{c[args.attribute]:.2f}" for c in curve_)
        print(f"| {run} | {curve_[0]['step']}-{curve_[-1]['step']} | {values} | {gain} | {reach} |")
    plot(results, args.out / "curve.png")


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("no matplotlib here: curve.png not drawn (results.json has the numbers)")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for run, r in results["runs"].items():
        ax.plot([c["step"] for c in r["curve"]], [c[results["attribute"]] for c in r["curve"]], marker="o",
                label=Path(run).name)
    ax.axhline(results["target"], linestyle="--", color="gray", label=f"target {results['target']}")
    ax.set(xscale="log", xlabel="training step", ylabel=f"judge: {results['attribute']} ({results['kind']}, "
           f"n = {results['n']})", ylim=(0, 1))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
