"""How fast the `ctxdiff` command starts, against the interpreter itself (issue 17: a CLI that starts
at once; targets: `--version` <= 12x and `generate --help` <= 15x `python -c pass`).

Each command runs N times in fresh processes; the table shows the median wall time and its ratio to
`python -c pass` measured in the same run, so the ratios hold across machines.

    python benchmarks/cli_start.py [-n 15] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGETS = {"--version": 12.0, "generate --help": 15.0}   # ratio to `python -c pass`
COMMANDS = ["--version", "--help", "generate --help", "evaluate --help", "edit --help"]


def ctxdiff_command() -> list[str]:
    """The installed `ctxdiff` script beside this interpreter, else `python -m ctxdiff`."""
    script = Path(sys.executable).parent / "ctxdiff"
    if script.is_file():
        return [str(script)]
    found = shutil.which("ctxdiff")
    return [found] if found else [sys.executable, "-m", "ctxdiff"]


def median_seconds(argv: list[str], runs: int) -> float:
    """Median wall time of `runs` fresh processes (after one untimed warm-up for the file cache)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(argv, capture_output=True, env=env, check=True)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, capture_output=True, env=env, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(runs: int) -> dict:
    base = median_seconds([sys.executable, "-c", "pass"], runs)
    rows = [{"command": "python -c pass", "median_s": base, "ratio": 1.0, "target": None}]
    prefix = ctxdiff_command()
    for command in COMMANDS:
        seconds = median_seconds(prefix + command.split(), runs)
        rows.append({"command": f"ctxdiff {command}", "median_s": seconds, "ratio": seconds / base,
                     "target": TARGETS.get(command)})
    return {"runs": runs, "python": sys.version.split()[0], "rows": rows,
            "met": all(r["ratio"] <= r["target"] for r in rows if r["target"] is not None)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--runs", type=int, default=15, help="fresh processes per command (median)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = parser.parse_args()
    result = measure(args.runs)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{'command':<28} {'median ms':>10} {'x python':>9} {'target':>7}")
        for r in result["rows"]:
            target = "" if r["target"] is None else f"<= {r['target']:g}x"
            print(f"{r['command']:<28} {1000 * r['median_s']:>10.1f} {r['ratio']:>8.1f}x {target:>7}")
        print(f"median of {args.runs} runs each; targets {'met' if result['met'] else 'NOT met'}")
    return 0 if result["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
