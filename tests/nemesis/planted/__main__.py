"""`python -m tests.nemesis.planted`: see the package docstring."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parents[3]
HERE: Final = Path(__file__).resolve().parent
COPIED: Final = ("ipc", "sequencer", "daemon", "tests", "pyproject.toml")
# The fault kinds each bug is run with (see the package docstring for why).
KINDS: Final = {
    "commit_on_leader_alone": "isolate_leader,partition,kill_node",
    "ack_before_fsync": "power_cut,slow_disk,kill_node",
    "follower_skips_truncation": "isolate_leader,partition,kill_node",
    "raft_id_from_clock": "restart_clock_back",
}
SEED_TIMEOUT_S: Final = 600.0  # one seed of the nemesis runs ~2x its duration; this bounds a hang


def copy_with_patch(bug: str, target: Path) -> None:
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, target / name)
    patch = HERE / f"{bug}.patch"
    applied = subprocess.run(["patch", "-p1", "--forward", "-i", str(patch)], cwd=target,
                             capture_output=True, text=True)  # fmt: skip
    if applied.returncode != 0:
        raise SystemExit(f"{patch.name} does not apply to this tree (refresh it): {applied.stdout}{applied.stderr}")


def hunt(bug: str, seeds: range, duration_s: float, nodes: int, every: bool = False) -> dict[str, object]:
    """Run seeds against a patched copy until one finds a violation (with `every`, all of them;
    the first that caught is returned)."""
    caught: dict[str, object] | None = None
    with tempfile.TemporaryDirectory(prefix=f"seqd-planted-{bug}-", dir="/tmp") as scratch:
        tree = Path(scratch) / "src"
        tree.mkdir()
        copy_with_patch(bug, tree)
        environment = dict(os.environ, PYTHONPATH=str(tree))
        for seed in seeds:
            out = Path(scratch) / "runs"
            started = time.monotonic()
            command = [sys.executable, "-m", "tests.nemesis", "--seed", str(seed), "--duration", str(duration_s),
                       "--nodes", str(nodes), "--kinds", KINDS[bug], "--out", str(out)]  # fmt: skip
            try:
                run = subprocess.run(command, cwd=tree, env=environment, capture_output=True, text=True,
                                     timeout=SEED_TIMEOUT_S)  # fmt: skip
                output = run.stdout + run.stderr
            except subprocess.TimeoutExpired as error:
                output = f"seed {seed} did not finish within {SEED_TIMEOUT_S} s: {error.stdout!r}"
            summary_path = out / f"seed-{seed}" / "summary.json"
            summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
            elapsed_s = time.monotonic() - started
            violations = summary["violations"] if summary else [output[-2000:]]
            print(f"  {bug} seed {seed}: {len(violations)} violations in {elapsed_s:.0f} s "
                  f"(faults {summary['applied'] if summary else '?'})", flush=True)  # fmt: skip
            if violations:
                kinds = summary["kinds"] if summary else {}
                print(f"    violations by kind {kinds}; liveness problems "
                      f"{len(violations) - sum(kinds.values())}", flush=True)  # fmt: skip
                caught = caught or {"bug": bug, "seed": seed, "caught": True, "violations": violations,
                                    "applied": summary["applied"] if summary else {}}  # fmt: skip
                if not every:
                    return caught
            shutil.rmtree(out, ignore_errors=True)
    return caught or {"bug": bug, "seed": None, "caught": False, "violations": [], "applied": {}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.nemesis.planted", description=__doc__)
    parser.add_argument("bugs", nargs="*", default=list(KINDS), help=f"which ({', '.join(KINDS)}); default all")
    parser.add_argument("--seed", type=int, default=1, help="first seed (default 1)")
    parser.add_argument("--seeds", type=int, default=5, help="seeds to try per bug (default 5)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of faults per seed (default 20)")
    parser.add_argument("--nodes", type=int, choices=(3, 5), default=3)
    parser.add_argument("--all", action="store_true", help="run every seed, not only until one catches the bug")
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C: the running seed is stopped and the copy removed.
    signal.signal(signal.SIGTERM, lambda _signal, _frame: sys.exit(143))
    unknown = [bug for bug in args.bugs if bug not in KINDS]
    if unknown:
        parser.error(f"unknown bugs {unknown}: choose among {', '.join(KINDS)}")
    missed = []
    for bug in args.bugs:
        print(f"{bug}: seeds {args.seed}..{args.seed + args.seeds - 1}, kinds {KINDS[bug]}", flush=True)
        found = hunt(bug, range(args.seed, args.seed + args.seeds), args.duration, args.nodes, args.all)
        if found["caught"]:
            first = str(found["violations"][0])  # type: ignore[index]
            print(f"CAUGHT {bug} with seed {found['seed']}: {first[:1500]}", flush=True)
        else:
            missed.append(bug)
            print(f"MISSED {bug}: no violation in {args.seeds} seeds", flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
