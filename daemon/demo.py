"""`seqd demo`: a node on the embedded ledger app, driven by client processes, then torn down.

It creates a temporary directory (config, journal, snapshots, socket), starts `seqd run` as a
child, opens accounts, runs pipelined transfers from several client processes with a progress
bar, prints throughput and latency percentiles, checks that money was conserved, stops the node
with SIGTERM (a clean drain) and removes everything it created.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

from daemon.harness import NodeProcess
from daemon.layout import JOURNAL_DURABLE_INDEX, JOURNAL_SYNCS
from daemon.load import DEPOSIT_PER_ACCOUNT, run_load, setup_accounts, total_balance

__all__ = ["run_demo"]

BAR_WIDTH = 30


def _progress(done: int, total: int, elapsed_s: float) -> None:
    fraction = done / total if total else 1.0
    filled = int(BAR_WIDTH * fraction)
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    sys.stdout.write(f"\r  [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {fraction:6.1%}  {done:>9,} transfers  {rate:>9,.0f}/s")
    sys.stdout.flush()


def run_demo(clients: int = 4, transfers: int = 20_000, accounts: int = 100, in_flight: int = 64, keep: bool = False) -> int:
    if clients < 1 or transfers < 1 or accounts < 2 or in_flight < 1:
        print("seqd demo: --clients, --transfers and --in-flight must be >= 1 and --accounts >= 2", file=sys.stderr)
        return 2
    directory = Path(tempfile.mkdtemp(prefix="seqd-demo-", dir="/tmp"))
    node_name = f"demo{uuid.uuid4().hex[:6]}"
    print(f"seqd demo: node {node_name} in {directory} (ledger app, {os.cpu_count()} CPUs)")
    node = NodeProcess(directory, node_name)
    code = 1
    try:
        node.start()
        print(f"  node serving on {node.socket_path}; opening {accounts} accounts")
        setup_accounts(node.socket_path, accounts)
        print(f"  {clients} clients x {transfers:,} transfers, {in_flight} in flight each")
        result = run_load(node.socket_path, clients, transfers, in_flight, accounts, on_progress=_progress)
        _progress(result.transfers, result.transfers, result.elapsed_s)
        print()
        total = total_balance(node.socket_path, accounts)
        expected = accounts * DEPOSIT_PER_ACCOUNT
        counters = node.read_counters()
        durable, syncs = counters[JOURNAL_DURABLE_INDEX.name], counters[JOURNAL_SYNCS.name]
        print(f"  throughput   {result.per_s:>12,.0f} transfers/s ({result.transfers:,} in {result.elapsed_s:.2f} s, "
              f"{result.rejected} rejected)")
        print(f"  latency      p50 {result.percentile_us(0.50):,.0f} us   p99 {result.percentile_us(0.99):,.0f} us   "
              f"p99.9 {result.percentile_us(0.999):,.0f} us   max {result.latencies_us[-1]:,.0f} us")
        print(f"  journal      {durable:,} records durable in {syncs:,} fsyncs ({durable / max(1, syncs):.1f} records "
              "per fsync)")
        conserved = total == expected
        print(f"  ledger       total {total:,} {'==' if conserved else '!='} deposited {expected:,}: "
              f"{'money conserved' if conserved else 'INVARIANT BROKEN'}")
        code = 0 if conserved else 1
    except KeyboardInterrupt:
        print("\n  interrupted")
        code = 130
    finally:
        stopped = node.stop()
        node.remove_shared_memory()
        print(f"  node stopped (exit {stopped})")
        if keep:
            print(f"  kept {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)
    return code
