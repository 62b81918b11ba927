"""`python -m tests.nemesis --seed N --duration S [--nodes 3|5] [--out DIR]`: one or more seeds of
the nemesis (tests/nemesis/run.py) against a real cluster on this machine.

Prints each seed's faults as they are applied, then its summary; exit status 1 when any seed
found a violation (each is listed), 0 otherwise. `--out DIR` keeps every seed's directory (nodes,
journals, histories, summary.json) under DIR/seed-N; without it a seed's directory is removed
when it passes and kept (and named) when it fails.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
from pathlib import Path

from tests.nemesis.run import run_nemesis
from tests.nemesis.schedule import FAULT_KINDS, make_schedule


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.nemesis", description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=1, help="the first seed (default 1)")
    parser.add_argument("--seeds", type=int, default=1, help="how many seeds from --seed (default 1)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of faults per seed (default 30)")
    parser.add_argument("--nodes", type=int, choices=(3, 5), default=3)
    parser.add_argument("--out", type=Path, help="keep each seed's directory under OUT/seed-N")
    parser.add_argument("--wipe", action="store_true",
                        help="include wiping a stopped node's data directory (off by default: safe only "
                             "while the others hold every committed entry, docs/cluster.md)")
    parser.add_argument("--kinds", help=f"comma-separated fault kinds to draw from ({', '.join(FAULT_KINDS)})")
    parser.add_argument("--schedule", action="store_true", help="print the seed's schedule and exit")
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the cluster's cleanup runs (nodes, shared memory, clients).
    signal.signal(signal.SIGTERM, lambda _signal, _frame: sys.exit(143))
    kinds = tuple(args.kinds.split(",")) if args.kinds else None
    try:
        make_schedule(args.seed, args.duration, args.nodes, wipe=args.wipe, kinds=kinds)
    except ValueError as error:
        parser.error(str(error))
    failed = []
    for seed in range(args.seed, args.seed + args.seeds):
        if args.schedule:
            for fault in make_schedule(seed, args.duration, args.nodes, wipe=args.wipe, kinds=kinds):
                print(fault.describe())
            continue
        directory = args.out / f"seed-{seed}" if args.out else None
        print(f"nemesis seed {seed}: {args.nodes} nodes, {args.duration:.0f} s of faults", flush=True)
        result = run_nemesis(seed, args.duration, args.nodes, directory, wipe=args.wipe, kinds=kinds,
                             log=lambda line: print(line, flush=True))  # fmt: skip
        print(result.summary(), flush=True)
        if not result.ok:
            failed.append(seed)
            print(f"  kept {result.directory} (nodes, journals, histories, summary.json)")
        elif args.out is None:
            shutil.rmtree(result.directory, ignore_errors=True)
    if failed:
        print(f"violations found with seeds {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
