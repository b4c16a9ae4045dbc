"""Cost of the context-aware adapter: seconds per training step and per sampling step, with and
without the adapter, on the same backbone (paper: 3B backbone + 188M adapter, training 0.83 vs
0.79 s/img (+5%), sampling 13.4 vs 13.2 s/img (+1.5%); targets here: <= 1.10x and <= 1.05x).

The adapter is sized so backbone : adapter parameters is about the paper's 16 : 1. A and B are
interleaved in one process and the median of the repetitions is reported (machines are noisy).

    python benchmarks/adapter_overhead.py                      # CPU, the shapes-base backbone
    python benchmarks/adapter_overhead.py --device cuda --backbone base64 --adapter paper --batch 16 --precision bf16
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext
from dataclasses import replace

import torch

from ctxdiff.diffusion import classifier_free_guidance, ddim_step, diffusion_loss, make_schedule
from ctxdiff.models.adapter import ADAPTER_PRESETS, AdapterConfig, ContextAdapter
from ctxdiff.models.conditioning import TextCondition
from ctxdiff.models.unet import UNET_PRESETS, UNet


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def make_cond(batch: int, length: int, text_dim: int, pooled_dim: int, device) -> TextCondition:
    return TextCondition(torch.randn(batch, length, text_dim, device=device),
                         torch.ones(batch, length, dtype=torch.bool, device=device),
                         torch.randn(batch, pooled_dim, device=device))


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="shapes-base", choices=sorted(UNET_PRESETS))
    parser.add_argument("--adapter", default="ratio16", help="an ADAPTER_PRESETS name, or ratio16 (sized to the backbone)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    unet_cfg = UNET_PRESETS[args.backbone]
    unet = UNet(unet_cfg).to(device)
    size, channels = unet_cfg.image_size, unet_cfg.in_channels
    if args.adapter == "ratio16":
        width = 32
        while True:  # the widest patch adapter whose size stays under 1/16 of the backbone
            cfg = AdapterConfig(x_shape=(channels, size, size), patch_size=4, width=width + 32, heads=8, blocks=4,
                                text_dim=unet_cfg.text_dim)
            if count(ContextAdapter(cfg)) > count(unet) / 16:
                break
            width += 32
        adapter_cfg = replace(cfg, width=width)
    else:
        adapter_cfg = replace(ADAPTER_PRESETS[args.adapter], image_branch="patch", image_dim=0,
                              x_shape=(channels, size, size), text_dim=unet_cfg.text_dim)
    adapter = ContextAdapter(adapter_cfg).to(device)
    torch.nn.init.normal_(adapter.head.weight, std=1e-3)  # a trained adapter is not zero
    sched = make_schedule("cosine", 1000)
    cond = make_cond(args.batch, 16, unet_cfg.text_dim, unet_cfg.pooled_dim, device)
    uncond = make_cond(1, 16, unet_cfg.text_dim, unet_cfg.pooled_dim, device)
    x0 = torch.randn(args.batch, channels, size, size, device=device)
    lowres = torch.randn_like(x0) if unet_cfg.lowres_cond else None
    amp = (torch.autocast(device.type, dtype=torch.bfloat16 if args.precision == "bf16" else torch.float16)
           if args.precision != "fp32" else nullcontext())

    def x0_fn(x, c, t):
        lr = None if lowres is None else lowres.repeat(x.shape[0] // lowres.shape[0], 1, 1, 1)
        return unet(x, t, c, lowres=lr)

    params = list(unet.parameters()) + list(adapter.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def train_step(use_adapter: bool) -> None:
        with amp:
            loss = diffusion_loss(sched, x0_fn, x0, cond, adapter if use_adapter else None)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    guided = classifier_free_guidance(x0_fn, uncond, 5.0)

    @torch.no_grad()
    def sample_step(use_adapter: bool) -> None:
        t = torch.full((args.batch,), 500, device=device)
        with amp:
            x0_hat = guided(x0, cond, t)
            ddim_step(sched, x0, 500, 480, x0_hat, adapter if use_adapter else None, cond)

    rows = []
    for name, fn in (("training step", train_step), ("sampling step (CFG)", sample_step)):
        times = {False: [], True: []}
        for rep in range(args.reps + 1):
            for use_adapter in (False, True):
                sync(device)
                start = time.perf_counter()
                fn(use_adapter)
                sync(device)
                if rep:  # the first repetition warms up
                    times[use_adapter].append(time.perf_counter() - start)
        base, with_adapter = statistics.median(times[False]), statistics.median(times[True])
        rows.append((name, base, with_adapter, with_adapter / base))
    print(f"device {device}, precision {args.precision}, batch {args.batch}, backbone {args.backbone} "
          f"({count(unet) / 1e6:.1f}M), adapter {count(adapter) / 1e6:.2f}M "
          f"(ratio {count(unet) / count(adapter):.1f} : 1; paper 3B : 188M = 16 : 1)")
    print(f"| {'':22} | {'no adapter s':>12} | {'adapter s':>10} | {'ratio':>6} |")
    print(f"|{'-' * 24}|{'-' * 14}|{'-' * 12}|{'-' * 8}|")
    for name, base, with_adapter, ratio in rows:
        print(f"| {name:22} | {base:12.4f} | {with_adapter:10.4f} | {ratio:6.3f} |")


if __name__ == "__main__":
    main()
