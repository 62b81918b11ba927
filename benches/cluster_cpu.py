"""CPU per committed command of every process of a 3-node cluster, under a closed-loop load.

    python -m benches.cluster_cpu [--clients 4] [--transfers 10000] [--in-flight 64] [--runs 1]
    python -m benches.cluster_cpu --py-spy /tmp/spy      # also py-spy each replicator and sequencer
    python -m benches.cluster_cpu --py-spy /tmp/spy --py-spy-role journaller   # other roles
    python -m benches.cluster_cpu --strace journaller    # system calls per 1,000 commands

Three nodes of four or five processes share this machine's cores, so the cluster's throughput is
its total CPU per command across every process plus the hand-offs between them; throughput moves
with the machine's load, CPU per command much less. So this is the figure a change to the cluster
path is judged by (`benches.pipeline_cpu` is the same for one node): psutil reads each role's CPU
time on each node before and after a closed-loop ledger load on the leader (`daemon.load`), divided
by the commands the leader committed. The nodes are `benches.cluster`'s (the config's ring sizes,
fsync on every node, direct peer links).

With `--py-spy DIR`, `py-spy record --format raw` samples every replicator and the leader's
sequencer during the last measured run (every node's: a follower's sequencer does work too) (DIR/<role>-n<node>-<raft role>.txt: collapsed stacks for
a flame graph or `sort -k2`). `--py-spy-role ROLE` (repeatable) samples those roles instead.

With `--strace ROLE`, the last run goes under `strace -c -f` of that role on every node and the
figures gain its system calls per 1,000 committed commands, by name (strace slows the role: read
the counts, not the times or the CPU of that run).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil

from benches.cluster import RINGS
from daemon.cluster_harness import Cluster
from daemon.layout import (
    RAFT_APPEND_ANSWERS_SENT,
    RAFT_APPENDS_SENT,
    RAFT_COMMIT_INDEX,
    RAFT_COMMIT_NOTICES_SENT,
    RAFT_EMPTY_APPENDS_SENT,
    RAFT_NOTICES_UNANSWERED,
    RAFT_PASSES,
    Role,
    node_roles,
)
from daemon.load import run_load, setup_accounts

ROLES = node_roles(clustered=True)
ACCOUNTS = 100
PY_SPY_RATE_HZ = 500  # samples per second: ~2% overhead on the sampled process
PY_SPY_ROLES = (Role.REPLICATOR, Role.SEQUENCER)
PY_SPY_STOP_TIMEOUT_S = 60.0  # it writes its profile within seconds of SIGINT
STRACE_ATTACH_S = 0.5  # strace attaches to every thread in this time (it prints nothing when ready)
STRACE_STOP_TIMEOUT_S = 10.0
# Peer messages per 1,000 commands, and each replicator's passes (the replicators copy these once
# a tick's pass, every 0.1 s on an idle follower: a reading waits that long).
MESSAGE_COUNTERS = (RAFT_APPENDS_SENT, RAFT_EMPTY_APPENDS_SENT, RAFT_COMMIT_NOTICES_SENT,
                    RAFT_APPEND_ANSWERS_SENT, RAFT_NOTICES_UNANSWERED)
COUNTERS_SETTLE_S = 0.15


def message_counts(cluster: Cluster) -> dict[str, int]:
    """Each message counter summed over the nodes, and each node's replicator passes."""
    time.sleep(COUNTERS_SETTLE_S)
    readings = {n: cluster[n].read_counters() for n in cluster.nodes}
    counts = {spec.name: sum(reading[spec.name] for reading in readings.values()) for spec in MESSAGE_COUNTERS}
    return counts | {f"n{n}.replicator passes": reading[RAFT_PASSES.name] for n, reading in readings.items()}


def cpu_seconds(process: psutil.Process) -> float:
    """CPU time of one role process: the scheduler's run time of its threads, in ns
    (/proc/<pid>/task/*/schedstat), where the kernel keeps it; else user + system time, which
    counts in clock ticks (10 ms: 0.25 us a command over a 40,000-command run). Only threads
    alive at the reading count: a thread that ended between two readings would take its run time
    out of the difference (none does in a role: uvloop's pool threads live as long as it)."""
    if not Path(f"/proc/{process.pid}/schedstat").exists():
        return sum(process.cpu_times()[:2])
    run_ns = 0
    for thread in Path(f"/proc/{process.pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile (uvloop's resolver's)
            run_ns += int((thread / "schedstat").read_text().split()[0])
    return run_ns / 1e9


def context_switches(process: psutil.Process) -> int:
    """Voluntary context switches of every thread of a role process: its wake-ups."""
    return sum(psutil.Process(thread.id).num_ctx_switches().voluntary for thread in process.threads())


def start_py_spy(directory: Path, pid: int, name: str) -> subprocess.Popen[bytes]:
    """py-spy sampling `pid` until it is sent SIGINT (then it writes its profile)."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return subprocess.Popen(
        [py_spy, "record", "--pid", str(pid), "--rate", str(PY_SPY_RATE_HZ), "--format", "raw",
         "--output", str(directory / f"{name}.txt")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def start_strace(pid: int) -> tuple[subprocess.Popen[bytes], Path]:
    """`strace -c -f` of `pid` until it is sent SIGINT, and the file its summary goes to."""
    output = Path(tempfile.mkstemp(prefix="seqd-strace-", suffix=".txt")[1])
    tracer = subprocess.Popen(["strace", "-c", "-f", "-o", str(output), "-p", str(pid)],
                              stderr=subprocess.DEVNULL)  # fmt: skip
    return tracer, output


def strace_counts(output: Path) -> dict[str, int]:
    """System calls by name from an `strace -c` summary (and the file removed); "<name> errors"
    counts those that failed (a futex wait's ETIMEDOUT: a park that timed out)."""
    counts = {}
    for line in output.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[3].isdigit() and fields[-1] != "total":
            counts[fields[-1]] = int(fields[3])
            if len(fields) == 6 and fields[4].isdigit():
                counts[f"{fields[-1]} errors"] = int(fields[4])
    output.unlink()
    return counts


def measure(cluster: Cluster, clients: int, transfers: int, in_flight: int, py_spy: Path | None,
            py_spy_roles: tuple[str, ...] = PY_SPY_ROLES, strace: str | None = None) -> dict[str, float]:  # fmt: skip
    """One closed-loop run on the leader: {"n<node>.<role>": us CPU per command, ..., "per_s": rate}."""
    leader = cluster.wait_leader().number
    processes = {f"n{n}{'L' if n == leader else ''}.{role}": psutil.Process(cluster[n].role_pid(role))
                 for n in cluster.nodes for role in ROLES}  # fmt: skip
    spies = []
    if py_spy is not None:
        for n in cluster.nodes:
            for role in py_spy_roles:
                standing = "leader" if n == leader else "follower"
                spies.append(start_py_spy(py_spy, cluster[n].role_pid(role), f"{role}-n{n}-{standing}"))
    tracers = {}
    if strace is not None:
        tracers = {f"n{n}{'L' if n == leader else ''}.{strace}": start_strace(cluster[n].role_pid(strace))
                   for n in cluster.nodes}  # fmt: skip
        time.sleep(STRACE_ATTACH_S)
    switches = {name: context_switches(process) for name, process in processes.items()}
    before = {name: cpu_seconds(process) for name, process in processes.items()}
    commit_before = cluster[leader].read_counters()[RAFT_COMMIT_INDEX.name]
    messages_before = message_counts(cluster)
    started = time.perf_counter()
    result = run_load(cluster[leader].socket_path, clients, transfers, in_flight, ACCOUNTS)
    elapsed = time.perf_counter() - started
    after = {name: cpu_seconds(process) for name, process in processes.items()}
    switches = {name: context_switches(process) - switches[name] for name, process in processes.items()}
    commands = cluster[leader].read_counters()[RAFT_COMMIT_INDEX.name] - commit_before
    messages = message_counts(cluster)
    for spy in spies:
        spy.send_signal(signal.SIGINT)
    for spy in spies:
        spy.wait(timeout=PY_SPY_STOP_TIMEOUT_S)
    for tracer, _output in tracers.values():
        tracer.send_signal(signal.SIGINT)
    figures = {name: 1e6 * (after[name] - before[name]) / commands for name in processes}
    for name, (tracer, output) in tracers.items():
        tracer.wait(timeout=STRACE_STOP_TIMEOUT_S)
        for call, count in sorted(strace_counts(output).items(), key=lambda item: -item[1]):
            figures[f"{name} {call}/kcmd"] = 1000 * count / commands
    figures["total"] = sum(figures.values())
    for name in processes:
        figures[f"{name} wakes/kcmd"] = 1000 * switches[name] / commands
    figures["total wakes/kcmd"] = 1000 * sum(switches.values()) / commands
    for name, count in messages.items():
        figures[f"{name.removeprefix('raft.')}/kcmd"] = 1000 * (count - messages_before[name]) / commands
    figures["per_s"] = result.per_s
    figures["cores"] = figures["total"] * result.per_s / 1e6  # at the load's rate
    figures["elapsed_s"] = elapsed
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benches.cluster_cpu")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--transfers", type=int, default=10_000, help="per client, per run")
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--py-spy", type=Path, default=None, help="directory for py-spy's raw profiles")
    parser.add_argument("--py-spy-role", choices=ROLES, action="append",
                        help="roles --py-spy samples (default: replicator and sequencer)")  # fmt: skip
    parser.add_argument("--strace", choices=ROLES, help="count this role's system calls (last run)")
    args = parser.parse_args(argv)
    directory = Path(tempfile.mkdtemp(prefix="seqd-ccpu-", dir="/tmp"))
    if args.py_spy is not None:
        args.py_spy.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    try:
        with Cluster(directory / "cluster", f"ccp{uuid.uuid4().hex[:6]}", proxied=False, settings=RINGS) as cluster:
            cluster.start()
            leader = cluster.wait_leader().number
            setup_accounts(cluster[leader].socket_path, ACCOUNTS)
            run_load(cluster[leader].socket_path, args.clients, min(2_000, args.transfers), args.in_flight, ACCOUNTS)  # warm-up
            runs = []
            for run in range(args.runs):
                last = run == args.runs - 1
                spy = args.py_spy if last else None
                runs.append(measure(cluster, args.clients, args.transfers, args.in_flight, spy,
                                    tuple(args.py_spy_role or PY_SPY_ROLES), args.strace if last else None))  # fmt: skip
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    names = list(dict.fromkeys(name for run in runs for name in run))
    print(f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after; us CPU per committed command")
    for name in names:
        values = [run.get(name, float("nan")) for run in runs]
        fmt = "{:10,.0f}" if name == "per_s" else "{:10.2f}"
        print(f"  {name:<28}" + "".join(fmt.format(v) for v in values))
    return 0


if __name__ == "__main__":
    sys.exit(main())
