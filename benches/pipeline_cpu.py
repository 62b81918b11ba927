"""CPU per command of each role of a running node, and the closed-loop rate it reached.

    python -m benches.pipeline_cpu [--clients 4] [--transfers 15000] [--in-flight 64] [--idle blocking]

Shows whether a node is CPU-bound or latency-bound: psutil reads each role's CPU time before and
after a closed-loop ledger load, divided by the commands applied. The figures behind the blp's
batch size and the idle-strategy defaults (benches/RESULTS.md) came from this script.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil

from daemon.harness import NodeProcess
from daemon.layout import COMMANDS_TOTAL, JOURNAL_SYNCS, node_roles
from daemon.load import run_load, setup_accounts

ROLES = node_roles()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benches.pipeline_cpu")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--transfers", type=int, default=15_000)
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--idle", default="blocking", choices=("spin", "yield", "backoff", "blocking"))
    args = parser.parse_args(argv)
    directory = Path(tempfile.mkdtemp(prefix="seqd-cpu-", dir="/tmp"))
    settings = {f"roles.{role}": {"idle": args.idle} for role in ROLES}
    node = NodeProcess(directory, f"cpu{uuid.uuid4().hex[:6]}", settings)
    try:
        node.start()
        setup_accounts(node.socket_path, 100)
        run_load(node.socket_path, args.clients, 2_000, args.in_flight, 100)  # warm-up
        processes = {role: psutil.Process(node.role_pid(role)) for role in ROLES}
        before = {role: sum(process.cpu_times()[:2]) for role, process in processes.items()}
        commands_before = node.read_counters()[COMMANDS_TOTAL.name]
        started = time.perf_counter()
        result = run_load(node.socket_path, args.clients, args.transfers, args.in_flight, 100)
        elapsed = time.perf_counter() - started
        after = {role: sum(process.cpu_times()[:2]) for role, process in processes.items()}
        values = node.read_counters()
        commands = values[COMMANDS_TOTAL.name] - commands_before
        print(f"{result.per_s:,.0f} transfers/s, {commands:,} commands, {values[JOURNAL_SYNCS.name]:,} fdatasyncs so far")
        for role in ROLES:
            used = after[role] - before[role]
            print(f"  {role:<11} {1e6 * used / commands:6.2f} us CPU per command  ({100 * used / elapsed:.0f}% of a core)")
    finally:
        node.stop()
        node.remove_shared_memory()
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
