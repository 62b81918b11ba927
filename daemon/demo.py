"""`seqd demo`: a node on the embedded ledger app, driven by client processes, then torn down.

It creates a temporary directory (config, journal, snapshots, socket), starts `seqd run` as a
child, opens accounts, runs pipelined transfers from several client processes with a progress
bar, prints throughput and latency percentiles, checks that money was conserved, stops the node
with SIGTERM (a clean drain) and removes everything it created.

Alongside, `seqd project` keeps a read model of the balances in SQLite (the ledger's `Balances`
projection, docs/query-side.md): the progress line shows the index it has reached, live, and at
the end its balances are checked against the ledger's own.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from daemon.harness import NodeProcess, write_config
from daemon.layout import JOURNAL_DURABLE_INDEX, JOURNAL_SYNCS
from daemon.load import DEPOSIT_PER_ACCOUNT, account_name, run_load, setup_accounts, total_balance
from sequencer.apps.ledger import Balance, Ledger
from sequencer.client import Client

__all__ = ["run_demo"]

BAR_WIDTH = 30
READ_MODEL_CATCH_UP_S = 60.0  # the projector's lag after the load is seconds at the very worst
_POSITION = "SELECT last_index FROM seqd_projections WHERE name = 'balances' AND state = 'serving'"


class ReadModel:
    """`seqd project` into SQLite in a child process, and a reader of what it wrote."""

    def __init__(self, directory: Path, node: NodeProcess) -> None:
        self.path = directory / "read-model.db"
        config = write_config(directory / "projector.toml", {"": {
            "projection": "sequencer.apps.ledger_projection:Balances",
            "database": f"sqlite://{self.path}", "node_config": str(node.config_path)}})  # fmt: skip
        self.log = open(directory / "projector.log", "ab")
        self.process = subprocess.Popen([sys.executable, "-m", "daemon.cli", "project", "--config", str(config)],
                                        stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip

    def query(self, sql: str) -> list[tuple[object, ...]]:
        if not self.path.exists():
            return []
        connection = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5)
        try:
            return connection.execute(sql).fetchall()
        except sqlite3.OperationalError:
            return []  # the projector has not created its tables yet
        finally:
            connection.close()

    def index(self) -> int:
        rows = self.query(_POSITION)
        return int(rows[0][0]) if rows else 0  # type: ignore[call-overload]

    def balances(self) -> dict[str, int]:
        return {str(account): int(balance) for account, balance in  # type: ignore[call-overload]
                self.query("SELECT account, balance FROM balances")}  # fmt: skip

    def stop(self) -> int | None:
        if self.process.poll() is None:
            self.process.terminate()  # the projector commits its batch and exits
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode


def _ledger_balances(socket_path: str, accounts: int) -> dict[str, int]:
    with Client(socket_path, schema=Ledger.schema, timeout_s=30) as client:
        pending = {account_name(n): client.submit(Balance(account_name(n))) for n in range(accounts)}
        return {name: request.result().balance for name, request in pending.items()}


def _progress_line(read_model: ReadModel | None) -> Callable[[int, int, float], None]:
    def progress(done: int, total: int, elapsed_s: float) -> None:
        fraction = done / total if total else 1.0
        filled = int(BAR_WIDTH * fraction)
        rate = done / elapsed_s if elapsed_s > 0 else 0.0
        shown = f"  read model @ index {read_model.index():>9,}" if read_model is not None else ""
        sys.stdout.write(f"\r  [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {fraction:6.1%}  {done:>9,} transfers  "
                         f"{rate:>9,.0f}/s{shown}")  # fmt: skip
        sys.stdout.flush()

    return progress


def _check_read_model(read_model: ReadModel, socket_path: str, accounts: int) -> bool:
    """Waits for the read model to hold the ledger's balances; prints what it holds."""
    ledger = _ledger_balances(socket_path, accounts)
    deadline = time.monotonic() + READ_MODEL_CATCH_UP_S
    while True:
        held = read_model.balances()
        equal = all(held.get(name) == balance for name, balance in ledger.items())
        if equal or time.monotonic() > deadline or read_model.process.poll() is not None:
            break
        time.sleep(0.05)
    top = sorted(((b, a) for a, b in held.items() if not a.startswith("@")), reverse=True)[:3]
    print(f"  read model   SQLite {read_model.path.name} at index {read_model.index():,}: {len(held) - 1} accounts, "
          f"sum {sum(held.values())}; richest {', '.join(f'{a} {b:,}' for b, a in top)}")
    print(f"               balances {'equal' if equal else 'NOT EQUAL'} to the ledger's"
          f"{'' if equal else ' (see projector.log; --keep keeps it)'}")
    return equal


def run_demo(clients: int = 4, transfers: int = 20_000, accounts: int = 100, in_flight: int = 64, keep: bool = False) -> int:
    if clients < 1 or transfers < 1 or accounts < 2 or in_flight < 1:
        print("seqd demo: --clients, --transfers and --in-flight must be >= 1 and --accounts >= 2", file=sys.stderr)
        return 2
    directory = Path(tempfile.mkdtemp(prefix="seqd-demo-", dir="/tmp"))
    node_name = f"demo{uuid.uuid4().hex[:6]}"
    print(f"seqd demo: node {node_name} in {directory} (ledger app, {os.cpu_count()} CPUs)")
    node = NodeProcess(directory, node_name)
    read_model: ReadModel | None = None
    code = 1
    try:
        node.start()
        print(f"  node serving on {node.socket_path}; opening {accounts} accounts")
        setup_accounts(node.socket_path, accounts)
        read_model = ReadModel(directory, node)
        print(f"  read model of the balances: seqd project into {read_model.path} (live)")
        print(f"  {clients} clients x {transfers:,} transfers, {in_flight} in flight each")
        progress = _progress_line(read_model)
        result = run_load(node.socket_path, clients, transfers, in_flight, accounts, on_progress=progress)
        progress(result.transfers, result.transfers, result.elapsed_s)
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
        projected = _check_read_model(read_model, node.socket_path, accounts)
        code = 0 if conserved and projected else 1
    except KeyboardInterrupt:
        print("\n  interrupted")
        code = 130
    finally:
        if read_model is not None:
            print(f"  projector stopped (exit {read_model.stop()})")
        stopped = node.stop()
        node.remove_shared_memory()
        print(f"  node stopped (exit {stopped})")
        if keep:
            print(f"  kept {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)
    return code
