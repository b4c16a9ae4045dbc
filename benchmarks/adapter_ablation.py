"""Does context help? The adapter ablation on the shapes world (paper claims: better alignment at
every guidance weight, faster convergence, a tighter likelihood bound), for text, class and layout
models (paper Sec. 4.2-4.3).

Two runs of the same recipe, seed and steps, one with the adapter and one with `model.adapter: null`
(r = 0): `recipes/shapes-base.yaml` and `recipes/shapes-base-noadapter.yaml` (the shipped base
stage and its ablation arm), or `recipes/shapes-class.yaml` / `shapes-layout.yaml` and the same with
`--set model.adapter=null`.
Compares their base stages (32x32) on held-out conditions (prompts, labels or layouts of a world seed
and noise seeds the runs never saw): judge accuracy per attribute (no neural network; layouts: per
object, with the IoU of the drawn box), FID on the shapes CLIP's image features (and, for text, CLIP
score), bits/dim on held-out images, the guidance sweep, and the loss / judge-accuracy curves over
training steps. Writes results.json, a Markdown table, curves.png and guidance.png.

    python benchmarks/adapter_ablation.py runs/shapes-bounded-base runs/shapes-bounded-noadapter --out results/ablation
    python benchmarks/adapter_ablation.py runs/shapes-class-adapter runs/shapes-class-noadapter --out results/class
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
from ctxdiff.data.conditions import ShapesConditions
from ctxdiff.evaluation import bits_per_dim
from ctxdiff.formats.t2i import DEFAULT_MODEL
from ctxdiff.metrics.clip_score import embed_images, embed_prompts, scores_from_embeddings
from ctxdiff.metrics.fid import feature_stats, frechet_distance
from ctxdiff.models.encoders import ClipConfig, load_clip
from ctxdiff.pipelines.batch_generate import sample_uint8
from ctxdiff.pipelines.text2image import Text2Image
from ctxdiff.shapes.datasets import ShapesDataset
from ctxdiff.shapes.judge import condition_accuracy, judge_many
from ctxdiff.shapes.render import render_scene
from ctxdiff.shapes.world import ShapesWorld, held_out_prompts, scene_from_caption

ATTRIBUTES = ("colour", "shape", "size", "position", "relation", "background", "count")
HELD_OUT_WORLD = 7777   # the shapes world seed of held-out layouts and bits/dim images (training: 0)
HEADLINE = {"text": "judge_all_single", "class": "judge_all", "layout": "judge_all"}


def held_out(kind: str, n: int, seed: int, size: int) -> tuple[list, list[int], np.ndarray]:
    """(conditions, noise seeds, the world's own drawing of each condition at `size`)."""
    seeds = [seed * 100_000 + i for i in range(n)]
    if kind == "text":
        prompts = held_out_prompts(n // 2, seed=seed, kind="single") + held_out_prompts(n - n // 2, seed=seed, kind="two")
        return prompts, seeds, np.stack([render_scene(scene_from_caption(p, seed=s), size) for p, s in zip(prompts, seeds)])
    data = ShapesConditions(kind, size, n, seed=HELD_OUT_WORLD + seed)
    items = [data[i] for i in range(n)]
    images = np.stack([((x.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy() for x, _ in items])
    return [c for _, c in items], seeds, images


def generate(pipe: Text2Image, conditions, seeds, guidance: float, steps: int, batch: int) -> np.ndarray:
    return sample_uint8(pipe, conditions, seeds, replace(pipe.defaults, guidance=guidance, steps=steps), batch)


def judge(kind: str, images: np.ndarray, conditions: list) -> dict:
    """The judge's accuracies (no neural network): per attribute and all-correct per group for
    prompts; colour, shape, all (and for layouts placed and the mean IoU) for labels and layouts."""
    if kind != "text":
        scores = condition_accuracy(list(images), conditions)
        return {f"judge_{k}" if k != "n" else "n_judged": v for k, v in scores.items()}
    report = judge_many(list(images), conditions)
    record = {f"judge_{a}": report.accuracy(a) for a in ATTRIBUTES if report.accuracy(a) is not None}
    return record | {"judge_all_single": report.all_correct_rate("single"), "judge_all_two": report.all_correct_rate("two")}


def alignment(kind: str, clip, images: np.ndarray, conditions: list, reference_feats: np.ndarray) -> dict:
    """The judge, FID on the shapes CLIP's image features against the world's drawings, and for
    prompts the CLIP score."""
    feats = embed_images(clip, list(images))
    mu_r, s_r = feature_stats(reference_feats)
    mu_f, s_f = feature_stats(feats.double().numpy())
    record = judge(kind, images, conditions) | {"fid_clip": frechet_distance(mu_r, s_r, mu_f, s_f)}
    if kind == "text":
        record["clip_mean_cosine"] = scores_from_embeddings(feats, embed_prompts(clip, conditions))["mean_cosine"]
    return record


def held_out_images(kind: str, size: int, n: int):
    """(image, condition) pairs the runs never saw, for bits/dim."""
    if kind == "text":
        return ShapesDataset(ShapesWorld(seed=4242, image_size=size), n)
    return ShapesConditions(kind, size, n, seed=HELD_OUT_WORLD)


def feature_clip(pipe: Text2Image, device):
    """The CLIP whose image features FID uses: a text model's own (the shapes CLIP); for class and
    layout models (whose bundle CLIP is not trained) the bundled model's shapes CLIP."""
    if pipe.condition_kind == "text":
        return pipe.clip
    return load_clip(ClipConfig(arch="ViT-B-32", weights=str(DEFAULT_MODEL)), device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("with_adapter", type=Path, help="run folder of a base stage with the adapter")
    parser.add_argument("without_adapter", type=Path, help="run folder of the same recipe with r = 0")
    parser.add_argument("--out", type=Path, default=Path("results/ablation"))
    parser.add_argument("--n", type=int, default=500, help="held-out conditions (prompts: half single-, half two-object)")
    parser.add_argument("--curve-n", type=int, default=200, help="conditions per checkpoint for the judge curve")
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
    arms = {"adapter": args.with_adapter, "no adapter": args.without_adapter}
    results: dict = {"n_prompts": args.n, "steps": args.steps, "arms": {}}
    started = time.time()
    for name, run in arms.items():
        pipe = Text2Image.from_bundle(run / "model.safetensors", device)
        pipe.sr = None  # the ablation compares base stages
        kind = results["condition"] = pipe.condition_kind
        results["default_guidance"] = pipe.defaults.guidance
        size = pipe.base.unet.config.image_size
        clip = feature_clip(pipe, device)
        conditions, seeds, reference = held_out(kind, args.n, seed=7, size=size)
        reference_feats = embed_images(clip, list(reference)).double().numpy()
        arm: dict = {"guidance": {}}
        for g in [float(v) for v in args.guidance.split(",")]:
            images = generate(pipe, conditions, seeds, g, args.steps, args.batch)
            arm["guidance"][g] = alignment(kind, clip, images, conditions, reference_feats)
            print(f"{name} guidance {g}: {json.dumps(arm['guidance'][g])}", flush=True)
        arm["bits_per_dim"] = bits_per_dim(pipe, held_out_images(kind, size, args.bpd_n), batch_size=args.batch,
                                           adapter=name == "adapter", num_timesteps=args.bpd_timesteps).bits_per_dim
        curve_conditions, curve_seeds, _ = held_out(kind, args.curve_n, seed=11, size=size)
        arm["judge_curve"] = []
        for step, checkpoint in numbered_checkpoints(run / "checkpoints"):
            if step % args.curve_every:
                continue
            pipe.load_base_checkpoint(checkpoint)
            images = generate(pipe, curve_conditions, curve_seeds, pipe.defaults.guidance, args.steps, args.batch)
            arm["judge_curve"].append({"step": step, **judge(kind, images, curve_conditions)})
            print(f"{name} step {step}: {json.dumps(arm['judge_curve'][-1])}", flush=True)
        arm["loss_curve"] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        results["arms"][name] = arm
    results["seconds"] = time.time() - started
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "table.md").write_text(markdown_table(results))
    plot(results, args.out)
    print(markdown_table(results))


def markdown_table(results: dict) -> str:
    arms = results["arms"]
    kind = results.get("condition", "text")
    sweep = sorted(next(iter(arms.values()))["guidance"])
    default_g = results["default_guidance"] if results["default_guidance"] in sweep else sweep[len(sweep) // 2]
    keys = [k for k in next(iter(arms.values()))["guidance"][default_g]]
    what = {"text": "prompts", "class": "labels", "layout": "layouts"}[kind]
    lines = [f"| metric (guidance {default_g}, {results['n_prompts']} held-out {what}) | " + " | ".join(arms) + " |",
             "|---|" + "---|" * len(arms)]
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(f"{arm['guidance'][default_g][key]:.3f}" for arm in arms.values()) + " |")
    lines.append("| bits/dim (held-out) | " + " | ".join(f"{arm['bits_per_dim']:.3f}" for arm in arms.values()) + " |")
    columns = [HEADLINE[kind], *(["clip_mean_cosine"] if kind == "text" else []), "fid_clip"]
    lines += ["", "| guidance | " + " | ".join(f"{a}: {' / '.join(columns)}" for a in arms) + " |",
              "|---|" + "---|" * len(arms)]
    for g in sweep:
        cells = [" / ".join(f"{a['guidance'][g][c]:.3f}" for c in columns) for a in arms.values()]
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kind = results.get("condition", "text")
    headline = HEADLINE[kind]
    fig, (ax_loss, ax_judge) = plt.subplots(1, 2, figsize=(10, 4))
    for name, arm in results["arms"].items():
        steps = [r["step"] for r in arm["loss_curve"]]
        losses = np.array([r["loss"] for r in arm["loss_curve"]])
        window = max(1, len(losses) // 50)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax_loss.plot(steps[window - 1:], smooth, label=name)
        curve = arm["judge_curve"]
        ax_judge.plot([c["step"] for c in curve], [c[headline] for c in curve], marker="o", label=name)
    ax_loss.set(xlabel="step", ylabel="training loss (Eq. 6, smoothed)", yscale="log")
    ax_judge.set(xlabel="step", ylabel=f"judge: all attributes right ({'single-object' if kind == 'text' else kind})")
    ax_loss.legend()
    ax_judge.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, arm in results["arms"].items():
        gs = sorted(arm["guidance"])
        y = "clip_mean_cosine" if kind == "text" else headline
        ax.plot([arm["guidance"][g]["fid_clip"] for g in gs], [arm["guidance"][g][y] for g in gs], marker="o", label=name)
        for g in gs:
            ax.annotate(str(g), (arm["guidance"][g]["fid_clip"], arm["guidance"][g][y]), fontsize=7)
    ax.set(xlabel="FID (shapes-CLIP features)", ylabel="CLIP score (mean cosine)" if kind == "text" else
           f"judge: all right ({kind})", title="guidance")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "guidance.png", dpi=100)


if __name__ == "__main__":
    main()
