"""Forward time of ctxdiff's SD U-Net against diffusers' UNet2DConditionModel, same weights and inputs.

    python benchmarks/unet_speed.py                                  # CPU, float32
    python benchmarks/unet_speed.py --device cuda --dtype fp16 --channels 320 640 1280 1280 --size 64

One process; after a warm-up the two models run alternately (the order flips each repetition),
so both see the same machine load; the table gives median times and ours / diffusers.
Needs the parity extra (diffusers).
"""

from __future__ import annotations

import argparse
import statistics

import torch
from timing import timed
from diffusers import UNet2DConditionModel

from ctxdiff.models.latent import LatentUNet, LatentUNetConfig

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--channels", type=int, nargs="+", default=[64, 128, 256, 256])
    parser.add_argument("--size", type=int, default=32, help="latent height and width")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]

    levels = len(args.channels)
    kinds = ["CrossAttnDownBlock2D"] * (levels - 1) + ["DownBlock2D"]
    reference = UNet2DConditionModel(block_out_channels=tuple(args.channels), down_block_types=tuple(kinds),
                                     up_block_types=tuple(k.replace("Down", "Up") for k in reversed(kinds)),
                                     cross_attention_dim=768, attention_head_dim=8)
    config = LatentUNetConfig(block_out_channels=tuple(args.channels),
                              attention_levels=(True,) * (levels - 1) + (False,), num_attention_heads=8,
                              cross_attention_dim=768)
    ours = LatentUNet(config)
    ours.load_state_dict(reference.state_dict())
    ours, reference = (m.to(device=device, dtype=dtype).eval() for m in (ours, reference))

    g = torch.Generator().manual_seed(0)
    latents = torch.randn(args.batch, 4, args.size, args.size, generator=g).to(device, dtype)
    context = torch.randn(args.batch, 77, 768, generator=g).to(device, dtype)
    tau = torch.tensor([999, 500][: args.batch] + [250] * max(args.batch - 2, 0), device=device)
    runs = {"ctxdiff": lambda: ours(latents, tau, context),
            "diffusers": lambda: reference(latents, tau, context).sample}

    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        error = (runs["ctxdiff"]() - runs["diffusers"]()).abs().max().item()
        for _ in range(args.warmup):
            for run in runs.values():
                run()
        for rep in range(args.reps):
            for name in (list(runs) if rep % 2 == 0 else list(runs)[::-1]):
                times[name].append(timed(runs[name], device))

    medians = {name: statistics.median(ts) for name, ts in times.items()}
    params = sum(p.numel() for p in ours.parameters())
    print(f"U-Net forward, {params / 1e6:.1f}M params, channels {tuple(args.channels)}, latents "
          f"{args.batch}x4x{args.size}x{args.size}, context 77x768, {args.device} {args.dtype}, "
          f"{args.reps} interleaved reps, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"max |ours - diffusers| = {error:.2e}")
    print(f"{'model':<10} {'median ms':>10} {'min ms':>8} {'ratio':>6}")
    for name, ts in times.items():
        print(f"{name:<10} {medians[name] * 1e3:>10.1f} {min(ts) * 1e3:>8.1f} "
              f"{medians[name] / medians['diffusers']:>6.2f}")


if __name__ == "__main__":
    main()
