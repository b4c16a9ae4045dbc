"""CPU attention: PyTorch's fused (flash) SDPA kernel against the plain math kernel, per sequence length.

    python benchmarks/attention_cpu.py                        # bf16 and fp32, forward and forward+backward
    python benchmarks/attention_cpu.py --threads 2 --batch 32
    python benchmarks/attention_cpu.py --recipe recipes/shapes-base.yaml   # and whole training steps of a recipe

On the CPU the fused kernel's backward is slow for the short sequences of the pixel U-Nets and the
adapter (64-256 tokens): `ctxdiff.models.layers.attention` picks the kernel by this table. After a
warm-up the two kernels run alternately (the order flips each repetition) so both see the same
machine load; the table gives median milliseconds and math / fused. With --recipe, training steps
of that recipe (its output folder is not touched) alternate between `attention` as shipped and the
fused kernel everywhere.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch
from rich.console import Console
from rich.table import Table
from timing import timed
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
KERNELS = {"fused": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}


def run(kernel: str, q, k, v, backward: bool) -> None:
    with sdpa_kernel([KERNELS[kernel]]):
        out = scaled_dot_product_attention(q, k, v)
        if backward:
            out.sum().backward()


def measure(tokens: int, dtype: torch.dtype, backward: bool, args) -> dict[str, float]:
    shape = (args.batch, args.heads, tokens, args.head_dim)
    q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=backward) for _ in range(3))
    times = {name: [] for name in KERNELS}
    for rep in range(args.warmup + args.reps):
        order = list(KERNELS) if rep % 2 == 0 else list(KERNELS)[::-1]
        for name in order:
            seconds = timed(lambda: run(name, q, k, v, backward), torch.device("cpu"))
            if rep >= args.warmup:
                times[name].append(seconds)
    return {name: 1000 * statistics.median(ts) for name, ts in times.items()}


def train_steps(recipe_path: str, args) -> dict[str, float]:
    """Median seconds per training step with `attention`'s math branch on ("ctxdiff") and off ("fused")."""
    from ctxdiff.models import layers
    from ctxdiff.training.recipe import read_recipe
    from ctxdiff.training.trainer import Trainer

    shipped = layers.SHORT_SEQUENCE
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(read_recipe(recipe_path, [f"output={out}"]), torch.device("cpu"))
        times = {"fused": [], "ctxdiff": []}
        for rep in range(args.warmup + args.reps):
            order = list(times) if rep % 2 == 0 else list(times)[::-1]
            for name in order:
                layers.SHORT_SEQUENCE = shipped if name == "ctxdiff" else 0
                seconds = timed(trainer.train_step, torch.device("cpu"))
                if rep >= args.warmup:
                    times[name].append(seconds)
        layers.SHORT_SEQUENCE = shipped
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 64, 128, 256, 1024])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--recipe", help="also time training steps of this recipe (e.g. recipes/shapes-base.yaml)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    table = Table(title=f"CPU SDPA, batch {args.batch} x {args.heads} heads x {args.head_dim} dims, "
                        f"{args.threads} threads (median ms)")
    for column in ("dtype", "pass", "tokens", "fused", "math", "math / fused"):
        table.add_column(column, justify="right")
    for dtype_name, dtype in DTYPES.items():
        for backward in (False, True):
            for tokens in args.tokens:
                if tokens * tokens * args.batch * args.heads > 2**31:  # the math kernel's N x N scores
                    continue
                ms = measure(tokens, dtype, backward, args)
                table.add_row(dtype_name, "fwd+bwd" if backward else "fwd", str(tokens), f"{ms['fused']:.2f}",
                              f"{ms['math']:.2f}", f"{ms['math'] / ms['fused']:.2f}")
    Console().print(table)
    if args.recipe:
        seconds = train_steps(args.recipe, args)
        steps = Table(title=f"training steps of {args.recipe}, {args.threads} threads (median s/step)")
        for column in ("fused everywhere", "ctxdiff attention", "speed-up"):
            steps.add_column(column, justify="right")
        steps.add_row(f"{seconds['fused']:.3f}", f"{seconds['ctxdiff']:.3f}", f"{seconds['fused'] / seconds['ctxdiff']:.2f}x")
        Console().print(steps)


if __name__ == "__main__":
    main()
