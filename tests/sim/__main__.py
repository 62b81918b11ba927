"""Command line of the simulator: sweep seeds, or replay one.

    python -m tests.sim --seeds 1000 [--start 0]     # exit 1 at the first failing seed
    python -m tests.sim --seed 4242 [--trace]        # replay one seed (every event with --trace)
    python -m tests.sim --seed 4242 --hash           # print only the trace hash (determinism)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import traceback
from pathlib import Path

from tests.sim.scenario import run_seed


def git_commit() -> str:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return result.stdout.strip() or "unknown"


def run_one(seed: int, *, trace: bool) -> tuple[bool, str]:
    """Run `seed`; on failure return False and the report to print."""
    try:
        _, result = run_seed(seed, trace=trace)
    except Exception as error:  # any failure of a seed is reported with its seed
        lines = [
            f"FAILED seed {seed} (commit {git_commit()}): {type(error).__name__}: {error}",
            "".join(traceback.format_exception(error)).rstrip(),
            f"replay: python -m tests.sim --seed {seed} --trace",
        ]
        return False, "\n".join(lines)
    summary = (
        f"seed {seed}: ok nodes={result.node_count} simulated={result.simulated_ms}ms "
        f"acked={result.acked} reads={result.reads} messages={result.messages} "
        f"faults={len(result.faults)} hash={result.trace_hash}"
    )
    return True, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.sim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--seeds", type=int, help="how many seeds to sweep")
    group.add_argument("--seed", type=int, help="replay one seed")
    parser.add_argument("--start", type=int, default=0, help="first seed of the sweep")
    parser.add_argument("--trace", action="store_true", help="print every event (with --seed)")
    parser.add_argument("--hash", action="store_true", help="print only the trace hash")
    parser.add_argument("--verbose", action="store_true", help="one line per seed")
    args = parser.parse_args(argv)

    if args.seed is not None:
        if args.hash:
            _, result = run_seed(args.seed)
            print(result.trace_hash)
            return 0
        ok, report = run_one(args.seed, trace=args.trace)
        if ok:
            _, result = run_seed(args.seed)
            print(report)
            for line in result.faults:
                print("  ", line)
        else:
            print(report)
        return 0 if ok else 1

    started = time.perf_counter()
    for seed in range(args.start, args.start + args.seeds):
        ok, report = run_one(seed, trace=False)
        if not ok:
            print(report)
            return 1
        if args.verbose:
            print(report, flush=True)
    elapsed = time.perf_counter() - started
    print(f"{args.seeds} seeds from {args.start} passed in {elapsed:.1f} s "
          f"(commit {git_commit()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
