"""One image from a fresh process: the wall time of `ctxdiff generate "PROMPT"` with the bundled model,
start to exit (imports, model load, sampling, PNG), median of N fresh processes; each `--args` set is
measured in the same run, interleaved, so the machine's load falls on all of them alike. The issues'
target: <= 2.5 s on 2 cores with the default settings.

    python benchmarks/generate_start.py                                   # the model's defaults
    python benchmarks/generate_start.py --args "" "--sampler unipc --steps 10 --sr-steps 10"
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time


def one_run(extra: list[str], prompt: str, seed: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "ctxdiff", "--quiet", "generate", prompt, "--seed", str(seed),
                        "--out", out, *extra], check=True, capture_output=True)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--args", nargs="+", default=[""], help="argument sets to compare (each one string)")
    parser.add_argument("--prompt", default="a red circle above a blue square")
    parser.add_argument("-n", type=int, default=5, help="fresh processes per argument set")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    times: dict[str, list[float]] = {a: [] for a in args.args}
    for i in range(args.n):
        for a in args.args:
            times[a].append(one_run(shlex.split(a), args.prompt, seed=i))
    rows = [{"args": a or "(defaults)", "median_s": statistics.median(t), "min_s": min(t), "runs": len(t)}
            for a, t in times.items()]
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{'arguments':48s} {'median s':>9s} {'min s':>7s}   (one image, fresh process, target <= 2.5 s)")
    for row in rows:
        print(f"{row['args']:48s} {row['median_s']:9.2f} {row['min_s']:7.2f}")


if __name__ == "__main__":
    main()
