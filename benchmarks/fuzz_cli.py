"""Random command lines for every subcommand, 10,000 and more (issue 18): the strategies of
tests/test_fuzz_cli.py (tests/cli_fuzz.py) with work that succeeds allowed a few steps more, each
run checked the same way (no exception escapes `main`, exit 0/1/2, one `error:` line on failure,
no pre-existing file changed without --force). Prints the counts per subcommand and exit code,
and every failing command line with what was wrong.

    nice python benchmarks/fuzz_cli.py                   # 10,000 examples, workspace in /tmp
    python benchmarks/fuzz_cli.py -n 500 --cheap --seed 1
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["OMP_NUM_THREADS"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cli_fuzz import SUBCOMMANDS, Strategies, Workspace, counts_table  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--examples", type=int, default=10_000)
    parser.add_argument("--cheap", action="store_true", help="the CI strategies (work kept to one step)")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis' seed (the same seed, the same command lines)")
    parser.add_argument("--workspace", type=Path, default=Path(tempfile.gettempdir()) / "ctxdiff-fuzz" / "ws")
    parser.add_argument("--subcommand", choices=SUBCOMMANDS, action="append",
                        help="only these (repeatable; default: all seven)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    started = time.perf_counter()
    ws = Workspace(args.workspace)
    print(f"workspace {ws.root} ready in {time.perf_counter() - started:.1f} s", flush=True)
    strategies = Strategies(ws, cheap=args.cheap)
    names = args.subcommand or list(SUBCOMMANDS)
    counts: collections.Counter = collections.Counter()
    valid: collections.Counter = collections.Counter()
    failures: list[str] = []
    seconds: collections.Counter = collections.Counter()
    started = time.perf_counter()

    @settings(max_examples=args.examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(names).flatmap(strategies.command_line))
    def run(line) -> None:
        began = time.perf_counter()
        outcome = line.run(ws)
        seconds[line.subcommand] += time.perf_counter() - began
        code = outcome.code if outcome.code is not None else "raised"
        counts[(line.subcommand, code)] += 1
        valid[line.subcommand] += line.valid
        if outcome.problems():
            failures.append(outcome.describe())
            print(f"FAILED: {failures[-1]}\n", flush=True)
        done = sum(counts.values())
        if done % 500 == 0:
            print(f"{done} examples, {time.perf_counter() - started:.0f} s, {len(failures)} failed", flush=True)

    seed(args.seed)(run)()
    total = sum(counts.values())
    print(f"\n{total} examples in {time.perf_counter() - started:.0f} s; {len(failures)} failed the checks\n")
    print(counts_table(counts))
    print("\ndrawn valid (good values only) / seconds per subcommand:")
    for name in names:
        runs = sum(v for (n, _), v in counts.items() if n == name)
        print(f"  {name:11s} {valid[name]:5d} valid of {runs:5d}   {seconds[name]:7.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
