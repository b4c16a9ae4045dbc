"""Does context help? The adapter ablation on the shapes world (paper claims: better alignment at
every guidance weight, faster convergence, a tighter likelihood bound).

Two runs of the same recipe, seed and steps, one with the adapter and one with `model.adapter: null`
(r = 0): `recipes/shapes-base.yaml` and `recipes/shapes-base-noadapter.yaml` (the shipped base
stage and its ablation arm).
Compares their base stages (32x32) on held-out prompts: judge accuracy per attribute (no neural
network), CLIP score and FID on the shapes CLIP's image features, bits/dim on held-out images, the
guidance sweep, and the loss / judge-accuracy curves over training steps. Writes results.json, a Markdown table, curves.png and guidance.png.

    python benchmarks/adapter_ablation.py runs/shapes-bounded-base runs/shapes-bounded-noadapter --out results/ablation
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ctxdiff.checkpoints import numbered_checkpoints
from ctxdiff.diffusion import variational_bound
from ctxdiff.metrics.clip_score import embed_images, embed_prompts, scores_from_embeddings
from ctxdiff.metrics.fid import feature_stats, frechet_distance
from ctxdiff.pipelines.batch_generate import sample_uint8
from ctxdiff.pipelines.text2image import Text2Image
from ctxdiff.shapes.datasets import ShapesDataset
from ctxdiff.shapes.judge import judge_many
from ctxdiff.shapes.render import render_scene
from ctxdiff.shapes.world import ShapesWorld, held_out_prompts, scene_from_caption

ATTRIBUTES = ("colour", "shape", "size", "position", "relation", "background", "count")


def prompts_and_seeds(n: int, seed: int) -> tuple[list[str], list[int]]:
    prompts = held_out_prompts(n // 2, seed=seed, kind="single") + held_out_prompts(n - n // 2, seed=seed, kind="two")
    return prompts, [seed * 100_000 + i for i in range(n)]


def generate(pipe: Text2Image, prompts, seeds, guidance: float, steps: int, batch: int) -> np.ndarray:
    return sample_uint8(pipe, prompts, seeds, replace(pipe.defaults, guidance=guidance, steps=steps), batch)


def alignment(pipe: Text2Image, images: np.ndarray, prompts: list[str], reference_feats: np.ndarray) -> dict:
    report = judge_many(list(images), prompts)
    feats = embed_images(pipe.clip, list(images))
    clip = scores_from_embeddings(feats, embed_prompts(pipe.clip, prompts))
    mu_r, s_r = feature_stats(reference_feats)
    mu_f, s_f = feature_stats(feats.double().numpy())
    record = {f"judge_{a}": report.accuracy(a) for a in ATTRIBUTES if report.accuracy(a) is not None}
    record.update({"judge_all_single": report.all_correct_rate("single"), "judge_all_two": report.all_correct_rate("two"),
                   "clip_mean_cosine": clip["mean_cosine"],
                   "fid_clip": frechet_distance(mu_r, s_r, mu_f, s_f)})
    return record


def bits_per_dim(pipe: Text2Image, adapter: bool, n: int, batch: int, timesteps: int | None, device) -> float:
    size = pipe.base.unet.config.image_size
    data = ShapesDataset(ShapesWorld(seed=4242, image_size=size), n)
    totals = []
    gen = torch.Generator().manual_seed(0)
    for i in range(0, n, batch):
        items = [data[j] for j in range(i, min(n, i + batch))]
        x0 = torch.stack([x for x, _ in items]).to(device)
        cond = pipe.encode([c for _, c in items])
        bound = variational_bound(pipe.sched, pipe.base.x0_fn(clip_x0=False), x0, cond,
                                  pipe.base.adapter if adapter else None,
                                  num_timesteps=timesteps, generator=gen)
        totals.append(bound.total.cpu())
    return torch.cat(totals).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("with_adapter", type=Path, help="run folder of a base stage with the adapter")
    parser.add_argument("without_adapter", type=Path, help="run folder of the same recipe with r = 0")
    parser.add_argument("--out", type=Path, default=Path("results/ablation"))
    parser.add_argument("--n", type=int, default=500, help="held-out prompts (half single-, half two-object)")
    parser.add_argument("--curve-n", type=int, default=200, help="prompts per checkpoint for the judge curve")
    parser.add_argument("--curve-every", type=int, default=1,
                        help="judge the checkpoints at multiples of this step (1: every checkpoint)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--guidance", default="1.5,3,4.5,6,7.5,9")
    parser.add_argument("--bpd-n", type=int, default=256)
    parser.add_argument("--bpd-timesteps", type=int, default=None, help="None: all T terms")
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    prompts, seeds = prompts_and_seeds(args.n, seed=7)
    arms = {"adapter": args.with_adapter, "no adapter": args.without_adapter}
    results: dict = {"n_prompts": args.n, "steps": args.steps, "arms": {}}
    started = time.time()
    for name, run in arms.items():
        pipe = Text2Image.from_bundle(run / "model.safetensors", device)
        pipe.sr = None  # the ablation compares base stages
        results["default_guidance"] = pipe.defaults.guidance
        size = pipe.base.unet.config.image_size
        reference = np.stack([render_scene(scene_from_caption(p, seed=s), size) for p, s in zip(prompts, seeds)])
        reference_feats = embed_images(pipe.clip, list(reference)).double().numpy()
        arm: dict = {"guidance": {}}
        for g in [float(v) for v in args.guidance.split(",")]:
            images = generate(pipe, prompts, seeds, g, args.steps, args.batch)
            arm["guidance"][g] = alignment(pipe, images, prompts, reference_feats)
            print(f"{name} guidance {g}: {json.dumps(arm['guidance'][g])}", flush=True)
        arm["bits_per_dim"] = bits_per_dim(pipe, name == "adapter", args.bpd_n, args.batch, args.bpd_timesteps, device)
        curve_prompts, curve_seeds = prompts_and_seeds(args.curve_n, seed=11)
        arm["judge_curve"] = []
        for step, checkpoint in numbered_checkpoints(run / "checkpoints"):
            if step % args.curve_every:
                continue
            pipe.load_base_checkpoint(checkpoint)
            images = generate(pipe, curve_prompts, curve_seeds, pipe.defaults.guidance, args.steps, args.batch)
            report = judge_many(list(images), curve_prompts)
            arm["judge_curve"].append({"step": step,
                                       "judge_all_single": report.all_correct_rate("single"),
                                       "judge_colour": report.accuracy("colour"), "judge_shape": report.accuracy("shape")})
        arm["loss_curve"] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        results["arms"][name] = arm
    results["seconds"] = time.time() - started
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "table.md").write_text(markdown_table(results))
    plot(results, args.out)
    print(markdown_table(results))


def markdown_table(results: dict) -> str:
    arms = results["arms"]
    sweep = sorted(next(iter(arms.values()))["guidance"])
    default_g = results["default_guidance"] if results["default_guidance"] in sweep else sweep[len(sweep) // 2]
    keys = [k for k in next(iter(arms.values()))["guidance"][default_g]]
    lines = [f"| metric (guidance {default_g}, {results['n_prompts']} held-out prompts) | " + " | ".join(arms) + " |",
             "|---|" + "---|" * len(arms)]
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(f"{arm['guidance'][default_g][key]:.3f}" for arm in arms.values()) + " |")
    lines.append("| bits/dim (held-out) | " + " | ".join(f"{arm['bits_per_dim']:.3f}" for arm in arms.values()) + " |")
    lines += ["", "| guidance | " + " | ".join(f"{a}: judge all (single) / CLIP cos / FID" for a in arms) + " |",
              "|---|" + "---|" * len(arms)]
    for g in sorted(next(iter(arms.values()))["guidance"]):
        cells = [f"{a['guidance'][g]['judge_all_single']:.3f} / {a['guidance'][g]['clip_mean_cosine']:.3f} / "
                 f"{a['guidance'][g]['fid_clip']:.4f}" for a in arms.values()]
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_judge) = plt.subplots(1, 2, figsize=(10, 4))
    for name, arm in results["arms"].items():
        steps = [r["step"] for r in arm["loss_curve"]]
        losses = np.array([r["loss"] for r in arm["loss_curve"]])
        window = max(1, len(losses) // 50)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax_loss.plot(steps[window - 1:], smooth, label=name)
        curve = arm["judge_curve"]
        ax_judge.plot([c["step"] for c in curve], [c["judge_all_single"] for c in curve], marker="o", label=name)
    ax_loss.set(xlabel="step", ylabel="training loss (Eq. 6, smoothed)", yscale="log")
    ax_judge.set(xlabel="step", ylabel="judge: all attributes right (single-object)")
    ax_loss.legend()
    ax_judge.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, arm in results["arms"].items():
        gs = sorted(arm["guidance"])
        ax.plot([arm["guidance"][g]["fid_clip"] for g in gs], [arm["guidance"][g]["clip_mean_cosine"] for g in gs],
                marker="o", label=name)
        for g in gs:
            ax.annotate(str(g), (arm["guidance"][g]["fid_clip"], arm["guidance"][g]["clip_mean_cosine"]), fontsize=7)
    ax.set(xlabel="FID (shapes-CLIP features)", ylabel="CLIP score (mean cosine)", title="guidance 1.5 .. 9")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "guidance.png", dpi=100)


if __name__ == "__main__":
    main()
