"""Cost of the latent adapter's two image branches over a Stable Diffusion backbone: "patch" (the
adapter embeds latent patches itself: fast) vs "clip" (decode x0 with the VAE, CLIP patch tokens
of the image: faithful to the paper's image CLIP), against plain SD (r = 0).

Table 1, measured: seconds per training step (`LatentAdapterTrainer.train_step`: VAE encoding,
Eq. 6 through the frozen U-Net, adapter update) and per sampling step (`LatentText2Image`, DDIM
with classifier-free guidance: the U-Net on the doubled batch, the adapter at t and s) on a small
random SD-shaped model written with `save_compvis`; median of the repetitions.

Table 2, counted (device-independent): GFLOPs per image at SD 1.5 scale (512 px: the 860M U-Net,
the KL VAE, CLIP ViT-B/32, the paper-scale adapter on 4x64x64 latents), from torch's
FlopCounterMode on meta tensors: no weights, no memory, seconds on any machine.

    python benchmarks/latent_adapter_branches.py                          # CPU, 128 px small config
    python benchmarks/latent_adapter_branches.py --device cuda --image-size 256 --batch 8
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from timing import timed
from torch.utils.flop_counter import FlopCounterMode

from ctxdiff.diffusion import diffusion_loss
from ctxdiff.models.adapter import AdapterConfig, ContextAdapter
from ctxdiff.models.conditioning import TextCondition
from ctxdiff.models.encoders import ClipConfig, load_clip
from ctxdiff.models.latent import (
    LatentModels, LatentSDConfig, LatentTextConfig, LatentTextEncoder, LatentUNet, LatentUNetConfig, LatentVAE,
    LatentVAEConfig, SchedulerInfo, save_compvis,
)
from ctxdiff.models.adapter import DecodedClipTokens
from ctxdiff.pipelines.latent import SD_DEFAULTS, LatentText2Image
from ctxdiff.training.latent_adapter import LatentAdapterTrainer
from ctxdiff.training.recipe import read_recipe

SMALL = LatentSDConfig(
    LatentUNetConfig(block_out_channels=(64, 128, 128), layers_per_block=1, attention_levels=(True, True, False),
                     num_attention_heads=4, cross_attention_dim=128),
    LatentVAEConfig(block_out_channels=(32, 64, 64, 64), layers_per_block=1),
    LatentTextConfig(width=128, layers=2, heads=2, intermediate_size=256))
SMALL_CLIP = "shapes-clip"     # 64 px ViT, 64 patch tokens of width 96
RECIPE = """
output: {output}
latent: {{sd_checkpoint: {sd}}}
model:
  clip: {{arch: {clip}}}
  adapter: {{x_shape: [4, {side}, {side}], patch_size: 2, width: 128, heads: 8, blocks: 4, text_dim: 128,
            image_branch: {branch}, image_dim: {image_dim}}}
diffusion: {{schedule: scaled_linear, timesteps: 1000}}
data: {{source: shapes, image_size: {size}, shapes_count: 256}}
train: {{steps: 1000, batch_size: {batch}, lr: 0.0001, warmup_steps: 0, sample_every: 0, checkpoint_every: 1000,
        precision: {precision}}}
"""




def measure(args, device: torch.device) -> list[list]:
    """Table 1 rows: branch, adapter parameters, s/train step, s/sampling step."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        models = LatentModels(LatentUNet(SMALL.unet), LatentVAE(SMALL.vae), LatentTextEncoder(SMALL.text), SMALL,
                              "epsilon", SchedulerInfo())
        sd = save_compvis(Path(tmp) / "small-sd.safetensors", models)
        for branch in ("none", "patch", "clip"):
            clip_dim = load_clip(ClipConfig(arch=SMALL_CLIP)).image_dim if branch == "clip" else 0
            recipe_path = Path(tmp) / f"{branch}.yaml"
            recipe_path.write_text(RECIPE.format(
                output=Path(tmp) / branch, sd=sd, clip=SMALL_CLIP, side=args.image_size // 8, size=args.image_size,
                batch=args.batch, branch="patch" if branch == "none" else branch, image_dim=clip_dim,
                precision=args.precision))
            trainer = LatentAdapterTrainer(read_recipe(recipe_path), device)
            train = "-"
            if branch != "none":
                trainer.train_step()   # warm-up
                train = statistics.median(timed(trainer.train_step, device) for _ in range(args.reps))
            torch.nn.init.normal_(trainer.adapter.head.weight, std=0.02)   # a trained adapter: r != 0
            pipe = LatentText2Image(trainer.models, trainer.adapter.eval(), source=str(sd),
                                    height=args.image_size, width=args.image_size)
            params = SD_DEFAULTS.__class__(steps=args.sample_steps, guidance=7.5, adapter=branch != "none")
            prompts, seeds = ["a red circle above a blue square"] * args.batch, list(range(args.batch))
            pipe.sample_latents(prompts, seeds, SD_DEFAULTS.__class__(steps=1, adapter=branch != "none"))  # warm-up
            sample = statistics.median(
                timed(lambda: pipe.sample_latents(prompts, seeds, params), device) / args.sample_steps
                for _ in range(args.reps))
            params_m = 0.0 if branch == "none" else sum(p.numel() for p in trainer.adapter.parameters()) / 1e6
            rows.append([branch, params_m, train, sample])
    return rows


def _gflops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def count_sd15() -> list[list]:
    """Table 2 rows: branch, GFLOPs per sampling step per image, GFLOPs per training image."""
    meta = torch.device("meta")
    with meta:
        unet = LatentUNet(LatentUNetConfig.v1()).requires_grad_(False)
        vae = LatentVAE(LatentVAEConfig()).requires_grad_(False)
        clip = load_clip(ClipConfig(arch="ViT-B-32"), meta)
    pipe = LatentText2Image(LatentModels(unet, vae, None, LatentSDConfig(unet.config, vae.config, LatentTextConfig()),
                                         "epsilon", SchedulerInfo()), None)
    z = torch.randn(1, 4, 64, 64, device=meta)
    context = torch.randn(2, 77, 768, device=meta)
    cond = TextCondition(torch.randn(1, 77, 768, device=meta), torch.ones(1, 77, dtype=torch.bool, device=meta),
                         torch.randn(1, 768, device=meta))
    two = TextCondition.cat([cond, cond])
    t = torch.tensor([500])
    unet_cfg = _gflops(lambda: unet(torch.cat([z, z]), t.repeat(2), context))   # cond + uncond
    decode_clip = _gflops(lambda: clip.encode_image(vae.from_latents(z)))
    encode = _gflops(lambda: vae.encode(torch.randn(1, 3, 512, 512, device=meta)))
    rows = [["none (plain SD)", unet_cfg, "-"]]
    for branch in ("patch", "clip"):
        config = AdapterConfig(x_shape=(4, 64, 64), patch_size=4, width=768, text_dim=768, image_branch=branch,
                               image_dim=768 if branch == "clip" else 0)
        with meta:
            adapter = ContextAdapter(config, DecodedClipTokens(vae, clip) if branch == "clip" else None)
        # Eq. 11: the adapter at t and s on one stacked batch; the clip tokens of one x0_hat once.
        tokens = (lambda: clip.encode_image(vae.from_latents(z))[0]) if branch == "clip" else None
        adapter_only = _adapter_gflops(config, tokens, z, two, meta)
        sample = unet_cfg + adapter_only + (decode_clip if branch == "clip" else 0.0)

        def train_step():
            z0 = vae.encode(torch.randn(1, 3, 512, 512, device=meta)).mean
            diffusion_loss(pipe.sched, pipe.x0_fn, z0, cond, adapter, t=t,
                           noise=torch.randn(1, 4, 64, 64, device=meta)).backward()

        rows.append([branch, sample, _gflops(train_step)])
    rows.append(["(VAE encode 512 px)", "-", encode])
    return rows


def _adapter_gflops(config: AdapterConfig, tokens, z, cond, meta) -> float:
    """The adapter alone on two rows (t and s), its image tokens precomputed (counted apart)."""
    with meta:
        image_tokens = None if tokens is None else tokens()
        adapter = ContextAdapter(config, None if tokens is None else (lambda x: torch.cat([image_tokens] * 2)))
    return _gflops(lambda: adapter(torch.cat([z, z]), cond, torch.tensor([500, 480])))


def _table(title: str, header: list[str], rows: list[list]) -> None:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [header] + [[fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image-size", type=int, default=128, help="pixels (latents are a 1/8 of it)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--sample-steps", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--skip-measure", action="store_true", help="only the SD 1.5-scale FLOP count")
    args = parser.parse_args()
    device = torch.device(args.device)
    if not args.skip_measure:
        rows = measure(args, device)
        base = rows[0][3]
        rows = [row + [row[3] / base] for row in rows]
        _table(f"measured on {device} ({args.precision}), small SD-shaped model, {args.image_size} px, "
               f"batch {args.batch}, clip branch: {SMALL_CLIP}",
               ["branch", "adapter M params", "s / train step", "s / sampling step", "sampling vs plain SD"], rows)
    rows = count_sd15()
    base = rows[0][1]
    rows = [row + [row[1] / base if isinstance(row[1], float) else "-"] for row in rows]
    _table("counted at SD 1.5 scale (512 px, CLIP ViT-B/32, adapter width 768 x 4 blocks), GFLOPs per image",
           ["branch", "per sampling step (CFG)", "per training image", "sampling vs plain SD"], rows)


if __name__ == "__main__":
    main()
