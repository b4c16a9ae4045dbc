"""Video editing: cost against frame count, and the full-strength shapes-world edit check.

    python benchmarks/video_edit.py cost                       # CPU: frames 8/16/24, adapter on/off
    python benchmarks/video_edit.py cost --device cuda --frames 8 16 24
    python benchmarks/video_edit.py cost --device cuda --model sd15   # 512x512, SD 1.5-shaped, fp16
    python benchmarks/video_edit.py shapes --train-steps 1000 --seeds 12
    python benchmarks/video_edit.py inversion                  # reconstruction PSNR per method and clip

`cost` runs every (frames, adapter) pair in its own process on a model of the bundled default's
size (recipes/shapes-base.yaml: 32x32 U-Net, CLIP-branch adapter, shapes CLIP; random weights), on
`--model FILE` (a t2i bundle or a Stable Diffusion checkpoint), or with `--model sd15` on a
randomly initialised SD 1.5-shaped latent model (860M U-Net, VAE, ViT-L text; 512x512 frames,
64x64 latents; fp16 on CUDA; the adapter is a new spatio-temporal one on latent patches), and reports seconds per tuning
step (gradient checkpointing on, Tab. 8), seconds for inversion with stored attention maps and for
editing (T = 20 steps, guidance 7.5, fusion), and peak memory: on the CPU the process's peak RSS
and its rise over the loaded model (getrusage); on CUDA torch.cuda.max_memory_allocated.

`shapes` is the check the unit test runs at one seed, at full strength: a tiny model trained by
`Trainer` on large circles of four colours moving left/right on gray, then for each seed a red
circle moving right is tuned on (20 steps), inverted and edited to "a blue circle moving to the
right". A run passes when the judge finds blue in >= 80% of frames and the object's x path
correlates >= 0.9 with the source's. Rows compare the adapter with `--no-adapter` and the
inversion spacings.

`inversion` inverts held-out clips (shapes-world clips drawn with seeds no test or training run
uses, and the real clips of ../shared/data resized to the model's side) under their own prompt and
samples back without guidance, at the model's resolution, and prints the PSNR against the source
for each inversion method (docs/math.md#exact-inversion), with the adapter and without:
plain DDIM to t = T (the old default), DDIM stopped one step earlier (t_N = T - T/N) or where
abar_t >= 1e-3, DDIM with 2 fixed-point `refine` iterations, and EDICT stopped where abar_t >= 1e-3
or at t = T.
`--tune-steps N` first tunes the model on each clip (Tab. 8 settings) and inverts with the tuned one.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from timing import timed

SRC, TGT = "a red circle moving to the right", "a blue circle moving to the right"
SCENE = "a large {colour} circle moving to the {direction} on a gray background"


# -- cost ----------------------------------------------------------------------------------------

def default_sized_model(path: Path) -> Path:
    """A t2i bundle shaped like the bundled default's base stage (recipes/shapes-base.yaml), random weights."""
    from ctxdiff.models.encoders import load_clip
    from ctxdiff.models.unet import UNet
    from ctxdiff.models.adapter import build_adapter
    from ctxdiff.models.stage import Stage
    from ctxdiff.formats.t2i import save_t2i_bundle
    from ctxdiff.training.recipe import read_recipe

    recipe = read_recipe(Path(__file__).resolve().parent.parent / "recipes" / "shapes-base.yaml",
                         ["model.clip.weights=null"])
    torch.manual_seed(0)
    clip = load_clip(recipe.model.clip)
    stage = Stage(UNet(recipe.model.unet), build_adapter(recipe.model.adapter, clip))
    return save_t2i_bundle(path, clip, {"": stage}, {"diffusion": recipe.diffusion})


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20




def random_sd15(device: torch.device):
    """A LatentVideoModel shaped like Stable Diffusion 1.5, random weights (fp16 on CUDA)."""
    from ctxdiff.models.inflate import VideoUNet
    from ctxdiff.models.latent import (LatentModels, LatentSDConfig, LatentTextConfig, LatentTextEncoder, LatentUNet,
                                       LatentUNetConfig, LatentVAE, LatentVAEConfig, SchedulerInfo)
    from ctxdiff.pipelines.latent_video import LatentVideoModel
    from ctxdiff.formats.model_ref import ModelRef

    torch.manual_seed(0)
    config = LatentSDConfig(LatentUNetConfig.v1(), LatentVAEConfig(), LatentTextConfig.v1())
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    models = LatentModels(*(m.to(device, dtype).eval() for m in (LatentUNet(config.unet), LatentVAE(config.vae),
                                                                   LatentTextEncoder(config.text))),
                          config, "epsilon", SchedulerInfo())
    return LatentVideoModel(models, VideoUNet(models.unet).eval(), None, None, ModelRef("random SD 1.5-shaped", ""))


def measure_one(model: str, frames: int, adapter: bool, device: str, tune_steps: int, steps: int) -> dict:
    """One configuration, in this process: tuning step, inversion and edit times, peak memory."""
    from ctxdiff.shapes.world import moving_shape_video
    from ctxdiff.data.video import Video
    from ctxdiff.formats.inversion import InversionParams
    from ctxdiff.pipelines.video_edit import EditParams, edit_video, invert_video
    from ctxdiff.pipelines.video import load_video_model
    from ctxdiff.training.tune_video import TuneConfig, VideoTuner

    dev = torch.device(device)
    vmodel = random_sd15(dev) if model == "sd15" else load_video_model(model, device=dev)
    size = vmodel.image_size
    clip = moving_shape_video(SCENE.format(colour="red", direction="right"), frames=frames, size=size, seed=0)
    video = Video(clip.frames, 8.0, Path(f"shapes-{frames}.mp4"))
    loaded = _rss_mb()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    with tempfile.TemporaryDirectory() as run:
        tuner = VideoTuner(vmodel, video, SRC, TuneConfig(steps=1 + tune_steps, lr=1e-5, adapter=adapter,
                                                          checkpoint_every=10**6), run)
        tuner.train_step()  # warm-up
        tune_s = timed(lambda: [tuner.train_step() for _ in range(tune_steps)], dev) / tune_steps
        tuner.end_tuning()
    params = InversionParams(steps=steps, adapter=adapter, attention=True, attention_on_cpu=dev.type == "cuda")
    holder = {}
    invert_s = timed(lambda: holder.setdefault("inv", invert_video(vmodel, video, SRC, params)), dev)
    edit_s = timed(lambda: edit_video(vmodel, holder["inv"], TGT, EditParams(adapter=adapter)), dev)
    stored_mb = sum(m.numel() * m.element_size() for m in holder["inv"].attention.values()) / 2**20
    record = {"size": size, "frames": frames, "adapter": adapter, "tune_s_per_step": tune_s, "invert_s": invert_s,
              "edit_s": edit_s, "stored_attention_mb": stored_mb}
    if dev.type == "cuda":
        record["peak_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        record.update(peak_mb=peak, rise_mb=peak - loaded)
    return record


def cost(args) -> None:
    with tempfile.TemporaryDirectory() as folder:
        model = args.model or str(default_sized_model(Path(folder) / "model.safetensors"))
        rows = []
        for frames in args.frames:
            for adapter in (True, False):
                command = [sys.executable, __file__, "_one", "--model", model, "--frames", str(frames),
                           "--device", args.device, "--tune-steps", str(args.tune_steps), "--steps", str(args.steps)]
                command += [] if adapter else ["--no-adapter"]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode:   # e.g. out of memory: a row that says so, and the next configuration
                    last = (done.stderr.strip().splitlines() or ["?"])[-1]
                    print(f"frames {frames}, adapter {'on' if adapter else 'off'}: failed: {last}")
                    continue
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    memory = "peak MB (CUDA allocated)" if args.device.startswith("cuda") else "peak RSS MB"
    size = rows[0]["size"] if rows else "?"
    print(f"video editing cost, {size}x{size} frames, {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, "
          f"inversion and edit T = {args.steps} steps, tuning step = 1 clip, gradient checkpointing on")
    header = (f"{'frames':>6} {'adapter':>7} {'tune s/step':>11} {'invert s':>9} {'edit s':>7} {'maps MB':>8} "
              f"{memory:>24}")
    print(header + ("" if args.device.startswith("cuda") else f" {'rise MB':>8}"))
    for r in rows:
        line = (f"{r['frames']:>6} {'on' if r['adapter'] else 'off':>7} {r['tune_s_per_step']:>11.3f} "
                f"{r['invert_s']:>9.2f} {r['edit_s']:>7.2f} {r['stored_attention_mb']:>8.1f} {r['peak_mb']:>24.0f}")
        print(line + (f" {r['rise_mb']:>8.0f}" if "rise_mb" in r else ""))


# -- the shapes check ----------------------------------------------------------------------------

TRAIN_RECIPE = """
output: {output}
model:
  clip: {{arch: tiny-clip}}
  unet: {{image_size: 16, base_channels: 16, channel_mults: [1, 2], num_res_blocks: 1, attention_levels: [1],
          heads: 2, text_dim: 32, pooled_dim: 32, timesteps: 100}}
  adapter: {{x_shape: [3, 16, 16], patch_size: 4, width: 32, heads: 2, blocks: 1, text_dim: 32, timesteps: 100}}
diffusion: {{schedule: cosine, timesteps: 100, cond_drop_prob: 0.1}}
data: {{source: {data}, image_size: 16}}
train: {{steps: {steps}, batch_size: 8, lr: 0.003, warmup_steps: 20, ema_decay: 0.99, checkpoint_every: {steps},
         keep_last: 1, sample_every: 0, log_every: 100, seed: 0}}
"""


def train_shapes_model(folder: Path, steps: int) -> Path:
    """The unit test's narrow world, trained for `steps` steps."""
    from PIL import Image

    from ctxdiff.shapes.world import moving_shape_video
    from ctxdiff.training.recipe import read_recipe
    from ctxdiff.training.trainer import Trainer

    data = folder / "data"
    data.mkdir(parents=True)
    n = 0
    for colour in ("red", "blue", "green", "yellow"):
        for direction in ("right", "left"):
            for seed in range(16):
                clip = moving_shape_video(SCENE.format(colour=colour, direction=direction), 8, 16, 100 + seed)
                for frame in clip.frames[::2]:
                    Image.fromarray(frame).save(data / f"{n:05d}.png")
                    (data / f"{n:05d}.txt").write_text(f"a {colour} circle moving to the {direction}")
                    n += 1
    recipe = folder / "recipe.yaml"
    recipe.write_text(TRAIN_RECIPE.format(output=folder / "run", data=data, steps=steps))
    Trainer(read_recipe(recipe), torch.device("cpu")).run()
    return folder / "run" / "model.safetensors"


def edit_scores(frames: np.ndarray, centres: np.ndarray) -> tuple[float, float]:
    """(share of frames the judge finds blue in, correlation of the object's x with the source's)."""
    from ctxdiff.shapes.judge import judge

    verdicts = [judge(frame, TGT) for frame in frames]
    xs = np.array([v.detections[0].cx if v.detections[0] is not None else np.nan for v in verdicts])
    found = ~np.isnan(xs)
    corr = float(np.corrcoef(xs[found], centres[found, 0])[0, 1]) if found.sum() > 2 else float("nan")
    return float(np.mean([bool(v.colour) for v in verdicts])), corr


def shapes(args) -> None:
    from ctxdiff.shapes.world import moving_shape_video
    from ctxdiff.data.video import Video
    from ctxdiff.formats.inversion import InversionParams
    from ctxdiff.pipelines.video_edit import EditParams, edit_video, invert_video
    from ctxdiff.pipelines.video_model import VideoModel
    from ctxdiff.training.tune_video import TuneConfig, VideoTuner

    folder = Path(tempfile.mkdtemp())
    try:
        model = args.model or str(train_shapes_model(folder, args.train_steps))
        variants = {"adapter, leading": (True, "leading"), "no adapter, leading": (False, "leading"),
                    "adapter, trailing": (True, "trailing"), "no adapter, trailing": (False, "trailing")}
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
        for seed in range(1, args.seeds + 1):
            clip = moving_shape_video(SCENE.format(colour="red", direction="right"), 8, 16, seed)
            video = Video(clip.frames, 8.0, Path("red-circle"))
            for name, (adapter, spacing) in variants.items():
                vmodel = VideoModel.load(model)
                VideoTuner(vmodel, video, SRC, TuneConfig(steps=args.tune_steps, lr=args.lr, adapter=adapter,
                                                          checkpoint_every=10**6), folder / f"tune-{seed}-{name}").run()
                inversion = invert_video(vmodel, video, SRC, InversionParams(spacing=spacing, adapter=adapter,
                                                                             attention=True))
                edited = edit_video(vmodel, inversion, TGT, EditParams(adapter=adapter)).frames
                results[name].append(edit_scores(edited, clip.centres))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"shapes edit '{SRC}' -> '{TGT}', {args.seeds} source clips, tuned {args.tune_steps} steps at lr {args.lr}, "
          f"T = 20, guidance 7.5, fusion on; pass: blue in >= 80% of frames and x-path correlation >= 0.9")
    print(f"{'variant':<22} {'pass':>6} {'blue frames':>11} {'path corr (mean)':>16} {'path corr (min)':>15}")
    for name, scores in results.items():
        colour, corr = np.array(scores).T
        passed = int(((colour >= 0.8) & (corr >= 0.9)).sum())
        print(f"{name:<22} {passed:>3}/{len(scores):<2} {colour.mean():>11.2f} {np.nanmean(corr):>16.3f} "
              f"{np.nanmin(corr):>15.3f}")


# -- inversion: which method can be undone ---------------------------------------------------------

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
JEEP_PROMPT = "a silver jeep driving down a curvy road in the countryside"
HELD_OUT_CLIPS = [   # (caption, seed): seeds 9001.. are used by no test, training set or other benchmark
    ("a red circle moving to the right", 9001),
    ("a small blue square moving up on a black background", 9002),
    ("a large yellow triangle moving to the left on a gray background", 9003),
    ("a green cross moving down on a white background", 9004),
]
REAL_CLIPS = [("videos/car-turn.mp4", JEEP_PROMPT, 4), ("videos/man-skiing.mp4", "a man is skiing", 4),
              ("frames/jeep", JEEP_PROMPT, 1)]


def inversion_methods(sched, steps: int) -> dict[str, dict]:
    from ctxdiff.diffusion.samplers import highest_invertible_step

    top = highest_invertible_step(sched)
    early = sched.T - sched.T // steps
    return {"ddim, t_N = T": {},
            f"ddim, t_N = {early}": {"steps": steps - 1, "max_t": early},
            f"ddim, t_N = {top} (abar 1e-3)": {"max_t": top},
            "ddim + refine 2, t_N = T": {"refine": 2},
            f"edict, t_N = {top} (abar 1e-3)": {"method": "edict", "max_t": top},
            "edict, t_N = T": {"method": "edict"}}


def held_out_clips(size: int, frames: int) -> list[tuple[str, "object", str]]:
    """(name, Video, prompt) of the held-out clips at the model's side `size`."""
    from ctxdiff.data.video import Video
    from ctxdiff.pipelines.video_edit import read_source
    from ctxdiff.shapes.world import moving_shape_video

    clips = []
    for caption, seed in HELD_OUT_CLIPS:
        clip = moving_shape_video(caption, frames=frames, size=size, seed=seed)
        clips.append((f"shapes {seed}", Video(clip.frames, 8.0, Path(f"shapes-{seed}")), caption))
    for rel, prompt, stride in REAL_CLIPS:
        if (DATA / rel).exists():
            clips.append((Path(rel).stem, read_source(DATA / rel, frames, stride, 0, size), prompt))
    return clips


def inversion(args) -> None:
    from ctxdiff.formats.inversion import InversionParams
    from ctxdiff.pipelines.video import load_video_model
    from ctxdiff.pipelines.video_edit import invert_video, reconstruct
    from ctxdiff.training.tune_video import TuneConfig, VideoTuner

    torch.set_num_threads(args.threads)
    base = load_video_model(args.model)
    methods = inversion_methods(base.sched, args.steps)
    rows = []
    for name, video, prompt in held_out_clips(base.image_size, args.frames):
        model = base
        if args.tune_steps:
            model = load_video_model(args.model)
            with tempfile.TemporaryDirectory() as run:
                VideoTuner(model, video, prompt, TuneConfig(steps=args.tune_steps, frames=len(video), stride=1,
                                                            checkpoint_every=10**6), run).run()
        for adapter in (True, False):
            row = {"clip": name, "adapter": adapter}
            for method, settings in methods.items():
                params = InversionParams(**{"steps": args.steps, "adapter": adapter, **settings})
                row[method] = reconstruct(model, invert_video(model, video, prompt, params)).psnr
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    tuned = f"tuned {args.tune_steps} steps per clip" if args.tune_steps else "zero-shot"
    print(f"same-prompt reconstruction PSNR (dB; inf: every pixel back), {args.model or 'bundled model'} ({tuned}), "
          f"{base.image_size}x{base.image_size}, {args.frames} frames, {args.steps} steps, no guidance")
    print("| clip | adapter | " + " | ".join(methods) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in methods) + " |")
    for row in rows:
        print(f"| {row['clip']} | {'on' if row['adapter'] else 'off'} | "
              + " | ".join(f"{row[m]:.1f}" for m in methods) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("cost", help="time and peak memory against frame count, adapter on/off")
    c.add_argument("--model", help="a t2i bundle or SD checkpoint, or sd15 (random SD 1.5-shaped weights; default: "
                                   "random weights of the bundled default's size)")
    c.add_argument("--device", default="cpu")
    c.add_argument("--frames", type=int, nargs="+", default=[8, 16, 24])
    c.add_argument("--tune-steps", type=int, default=2)
    c.add_argument("--steps", type=int, default=20)
    one = sub.add_parser("_one")
    one.add_argument("--model", required=True)
    one.add_argument("--device", default="cpu")
    one.add_argument("--frames", type=int, required=True)
    one.add_argument("--tune-steps", type=int, default=2)
    one.add_argument("--steps", type=int, default=20)
    one.add_argument("--no-adapter", action="store_true")
    s = sub.add_parser("shapes", help="the red -> blue circle edit over many seeds")
    s.add_argument("--model", help="a t2i bundle of the 16x16 shapes world (default: train one)")
    s.add_argument("--train-steps", type=int, default=1000)
    s.add_argument("--tune-steps", type=int, default=20)
    s.add_argument("--lr", type=float, default=1e-4)
    s.add_argument("--seeds", type=int, default=8)
    i = sub.add_parser("inversion", help="reconstruction PSNR per inversion method and held-out clip")
    i.add_argument("--model", help="a t2i bundle (default: the bundled model)")
    i.add_argument("--frames", type=int, default=8)
    i.add_argument("--steps", type=int, default=20)
    i.add_argument("--tune-steps", type=int, default=0, help="tune on each clip first (0: zero-shot)")
    i.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.mode == "inversion":
        inversion(args)
    elif args.mode == "_one":
        print(json.dumps(measure_one(args.model, args.frames, not args.no_adapter, args.device, args.tune_steps,
                                     args.steps)))
    elif args.mode == "cost":
        cost(args)
    else:
        shapes(args)


if __name__ == "__main__":
    main()
