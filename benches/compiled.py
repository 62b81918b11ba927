"""What a compiled helper would give the hot loops: mypyc on the hot modules, beside the pure tree.

    python -m benches.compiled build [--tree build/compiled] [--modules sequencer/processor.py ...]
    python -m benches.compiled compare [--tree build/compiled] [--pairs 3] [--commands 50000]
    python -m benches.compiled compare --callgrind --commands 5000     # instruction counts
    python -m benches.compiled pipeline [--pairs 3] [--transfers 40000]    # a live node each way

Issue 13 asks whether Python itself is the limit of the per-command loops and what compiling
them would give; docs/dependencies.md ("A compiled helper") weighs the answer. This is the
experiment behind it, kept so the figures can be taken again.

`build` copies ipc/, sequencer/, daemon/ and benches/ into `--tree` (under the ignored build/)
and compiles `--modules` there with mypyc (the test extra's mypy, and a C compiler). The
worktree itself is never compiled: the README's commands and the tests stay pure Python. A
command run with the tree as its working directory imports the compiled modules, because
`python -m` puts the working directory first on sys.path and an extension module is found
before a .py of the same name.

`compare` runs `benches.hot_paths`' loops in the pure tree and the compiled one, alternated
pair by pair, and prints each side's figures: thread CPU us per command (median of the loop's
runs), or with `--callgrind` instructions per command (exact and repeatable under any load;
`hot_paths` runs each loop in its own thread, so `--toggle-collect=thread_run` counts the loop
alone). It also checks that both trees reach the same rolling hash over the same records.

`pipeline` runs `benches.pipeline_cpu` (a live node, its roles in their own processes) from each
tree, alternated; the compiled node's roles get the tree first on PYTHONPATH, and the figures
count only if every role was seen to map the tree's extension modules while it ran.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("ipc", "sequencer", "daemon", "benches")
# What the hot loops run per command and compiles without a change (see docs/dependencies.md for
# what does not: an app module with msgspec Structs, for one).
HOT_MODULES = (
    # the blp: apply_frame and the dedup table. Not state_machine.py: an app's class,
    # interpreted, cannot inherit from a compiled StateMachine. Not record.py (the record walk):
    # it defines a msgspec Struct (see STRUCT below).
    "sequencer/processor.py",
    "sequencer/dedup.py",
    # the sequencer: ingress (codec, admission, claim, stamp) and egress (poll, route, frame);
    # not gateway/sessions.py nor stamping.py: the role's Session and the standby's
    # StandingStamping (interpreted) inherit their classes
    "sequencer/gateway/core.py",
    "sequencer/client/connection.py",
    # the rings both sides poll and claim
    "ipc/ring_reader.py",
    "ipc/ring_writer.py",
)
# mypyc drops a compiled class's keywords: a msgspec Struct's `tag=True` is lost (the schema check
# refuses it at import), and its `frozen=True` too, silently (the record's SessionOpen became
# mutable and unhashable). So a module that defines one is never compiled.
STRUCT = re.compile(r"^class \w+\((msgspec\.)?Struct\b", re.M)
LOOPS = ("gateway_ingress", "gateway_egress", "processor", "replay")
COLLECTED = re.compile(r"Collected : (\d+)")
PIPELINE_RATE = re.compile(r"^([\d,]+) transfers/s", re.M)
PIPELINE_ROLE = re.compile(r"^  (\w+) +([\d.]+) us CPU per command", re.M)
ROLE_MODULE = "daemon.roles."  # a role process's command line: python -m daemon.roles.<role>
HASH_RECORDS = 5_000  # transfers replayed by each tree for the rolling-hash check


def build(tree: Path, modules: list[str]) -> None:
    """A copy of the packages in `tree`, with `modules` compiled by mypyc in place."""
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        raise SystemExit("no C compiler (gcc or cc) on PATH: mypyc needs one to build the modules")
    with_structs = [module for module in modules if STRUCT.search((REPO / module).read_text())]
    if with_structs:
        raise SystemExit(f"{', '.join(with_structs)} define msgspec Structs, whose class keywords "
                         "mypyc drops (tag, frozen): move the Structs to a module left pure first")  # fmt: skip
    if tree.exists():
        shutil.rmtree(tree)
    tree.mkdir(parents=True)
    for package in PACKAGES:
        shutil.copytree(REPO / package, tree / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tree / "pyproject.toml")  # mypy's configuration
    command = [sys.executable, "-m", "mypyc", *modules]
    completed = subprocess.run(command, cwd=tree, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise SystemExit(f"mypyc failed in {tree} ({' '.join(command)}):\n{completed.stdout[-4000:]}"
                         f"{completed.stderr[-4000:]}")  # fmt: skip
    compiled = sorted(str(path.relative_to(tree)) for package in PACKAGES for path in (tree / package).rglob("*.so"))
    print(f"compiled in {tree}: {', '.join(compiled)}")


def _hot_paths(tree: Path, loop: str, commands: int, runs: int, callgrind: bool) -> float:
    """One `benches.hot_paths` loop run with `tree` as the working directory: thread CPU us per
    command, or instructions per command under callgrind."""
    command = [sys.executable, "-m", "benches.hot_paths", "--only", loop, "--commands", str(commands),
               "--runs", str(runs), "--json"]  # fmt: skip
    if callgrind:
        command = ["valgrind", "--tool=callgrind", "--toggle-collect=thread_run",
                   "--callgrind-out-file=/dev/null", *command]  # fmt: skip
    completed = subprocess.run(command, cwd=tree, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise SystemExit(f"{' '.join(command)} in {tree} failed:\n{completed.stderr[-4000:]}")
    if callgrind:
        match = COLLECTED.search(completed.stderr)
        assert match is not None, completed.stderr[-2000:]
        return int(match.group(1)) / commands
    return float(json.loads(completed.stdout)[f"{loop}_cpu_us_per_cmd"])


def rolling_hash(tree: Path) -> str:
    """The rolling hash and state hash after HASH_RECORDS transfers, computed by `tree`'s code."""
    script = (
        "from benches.hot_paths import ACCOUNTS, _transfers\n"
        "from benches.processor import setup\n"
        f"processor, feeder = setup(ACCOUNTS)\n"
        f"processor.replay_run(memoryview(b''.join(_transfers(feeder.command_record, {HASH_RECORDS}))))\n"
        "import sequencer.processor as module\n"
        "print(processor.rolling_hash, processor.state_hash().hex(), module.__file__.endswith('.so'))\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], cwd=tree, capture_output=True, text=True,
                               check=True)  # fmt: skip
    return completed.stdout.strip()


def compare(tree: Path, loops: list[str], pairs: int, commands: int, runs: int, callgrind: bool) -> dict[str, Any]:
    if not (tree / "sequencer").is_dir():
        raise SystemExit(f"no compiled tree at {tree}: run `python -m benches.compiled build` first")
    pure_hash, compiled_hash = rolling_hash(REPO), rolling_hash(tree)
    assert pure_hash.endswith("False"), f"the pure tree imported a compiled processor: {pure_hash}"
    assert compiled_hash.endswith("True"), f"the compiled tree imported a pure processor: {compiled_hash}"
    assert pure_hash.split()[:2] == compiled_hash.split()[:2], (pure_hash, compiled_hash)
    unit = "instructions" if callgrind else "cpu_us"
    results: dict[str, Any] = {"commands": commands, "pairs": pairs, "unit": unit,
                               "load_average": os.getloadavg()[0], "same_hashes": True}  # fmt: skip
    for loop in loops:
        pure: list[float] = []
        compiled: list[float] = []
        for _ in range(pairs):
            pure.append(_hot_paths(REPO, loop, commands, runs, callgrind))
            compiled.append(_hot_paths(tree, loop, commands, runs, callgrind))
        results[f"{loop}_pure_{unit}_per_cmd"] = round(statistics.median(pure), 3)
        results[f"{loop}_compiled_{unit}_per_cmd"] = round(statistics.median(compiled), 3)
        results[f"{loop}_pure_runs"] = [round(figure, 3) for figure in pure]
        results[f"{loop}_compiled_runs"] = [round(figure, 3) for figure in compiled]
    results["load_average_after"] = os.getloadavg()[0]
    return results


def _roles_mapping(tree: Path, parent: int) -> set[str]:
    """The roles under `parent` that have an extension module of `tree` mapped."""
    import psutil

    roles = set()
    for process in psutil.Process(parent).children(recursive=True):
        try:
            command = " ".join(process.cmdline())
            if ROLE_MODULE in command and str(tree) in Path(f"/proc/{process.pid}/maps").read_text():
                roles.add(command.split(ROLE_MODULE)[1].split()[0])
        except (psutil.Error, OSError):
            continue  # exited between the listing and the read
    return roles


def _pipeline(tree: Path | None, transfers: int) -> dict[str, float]:
    """One `benches.pipeline_cpu` run, compiled from `tree` or pure (None): transfers/s and each
    role's CPU us per command, and how many roles mapped the compiled modules."""
    environment = dict(os.environ)
    if tree is not None:
        environment["PYTHONPATH"] = str(tree)
    command = [sys.executable, "-m", "benches.pipeline_cpu", "--transfers", str(transfers)]
    process = subprocess.Popen(command, cwd=tree or REPO, env=environment, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    compiled_roles: set[str] = set()
    while process.poll() is None:
        if tree is not None:
            compiled_roles |= _roles_mapping(tree, process.pid)
        time.sleep(0.5)
    stdout, stderr = process.communicate()
    rate = PIPELINE_RATE.search(stdout)
    if process.returncode != 0 or rate is None:
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}):\n{stdout}{stderr[-4000:]}")
    figures = {f"{role}_cpu_us": float(cpu) for role, cpu in PIPELINE_ROLE.findall(stdout)}
    figures["total_cpu_us"] = round(sum(figures.values()), 2)
    figures["transfers_per_s"] = float(rate.group(1).replace(",", ""))
    figures["compiled_roles"] = len(compiled_roles)
    return figures


def pipeline(tree: Path, pairs: int, transfers: int) -> dict[str, Any]:
    results: dict[str, Any] = {"transfers": transfers, "pairs": pairs, "load_average": os.getloadavg()[0]}
    runs: dict[str, list[dict[str, float]]] = {"pure": [], "compiled": []}
    for _ in range(pairs):
        runs["pure"].append(_pipeline(None, transfers))
        runs["compiled"].append(_pipeline(tree, transfers))
    roles_seen = min(run["compiled_roles"] for run in runs["compiled"])
    assert roles_seen >= 3, f"a compiled run's roles did not all map {tree}'s modules: {runs['compiled']}"
    for side, side_runs in runs.items():
        for key in side_runs[0]:
            if key != "compiled_roles":
                results[f"{side}_{key}"] = statistics.median(run[key] for run in side_runs)
        results[f"{side}_total_runs"] = [run["total_cpu_us"] for run in side_runs]
    results["load_average_after"] = os.getloadavg()[0]
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benches.compiled")
    parser.add_argument("action", choices=("build", "compare", "pipeline"))
    parser.add_argument("--tree", type=Path, default=REPO / "build" / "compiled")
    parser.add_argument("--modules", nargs="+", default=list(HOT_MODULES), help="paths to compile")
    parser.add_argument("--only", choices=LOOPS, action="append", help="compare these loops only")
    parser.add_argument("--pairs", type=int, default=3, help="pure/compiled runs, alternated")
    parser.add_argument("--commands", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=3, help="hot_paths runs per side per pair")
    parser.add_argument("--callgrind", action="store_true", help="instructions, not CPU time")
    parser.add_argument("--transfers", type=int, default=40_000, help="pipeline: per run")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.action == "build":
        build(args.tree.resolve(), args.modules)
        return 0
    if args.action == "pipeline":
        results = pipeline(args.tree.resolve(), args.pairs, args.transfers)
    else:
        runs = 1 if args.callgrind else args.runs
        results = compare(args.tree.resolve(), args.only or list(LOOPS), args.pairs, args.commands, runs,
                          args.callgrind)  # fmt: skip
    if args.json:
        print(json.dumps(results, sort_keys=True))
    else:
        for key, value in results.items():
            print(f"{key:40} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
