"""`seqd demo --cluster 3`: a local cluster on the ledger app, its leader killed mid-run.

It creates a temporary directory, starts three (or five) nodes on loopback
(`daemon.cluster_harness.Cluster`), opens accounts, and runs a client process on every node, each
recording its history (`sequencer.history`). Halfway through it kills the leader's node
(`kill -9` of its process group), waits for the others to elect a new leader, and restarts the
killed node, which catches up. At the end it stops the clients (each takes every reply still
due), waits until the nodes agree, stops them, and prints the throughput, the latency
percentiles, the failover time and the verdict of the history checker over every client's
history and every node's journal. It removes everything it created (`--keep` keeps the
directory: journals, histories, node logs).

The failover time is measured twice: until a majority agrees on a new leader (the election), and
until the first reply to any client after the kill (what a client notices).
"""

from __future__ import annotations

import contextlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any, Final

from daemon.cluster_harness import Cluster, ClusterError
from daemon.harness import NodeError
from daemon.load import percentile
from sequencer.apps.ledger import Deposit, Ledger, OpenAccount, Transfer
from sequencer.client import Client, CommandRejected
from sequencer.history import HistoryWriter, RecordingClient, check_files, read_history

__all__ = ["run_cluster_demo"]

ACCOUNTS: Final = 20
OPENING_DEPOSIT: Final = 1_000_000
WINDOW: Final = 16  # requests in flight per client
# The config's defaults (docs/cluster.md): what a user runs.
TIMEOUTS: Final = {"tick_ms": 10, "heartbeat_ms": 50, "election_timeout_ms": 300}
# A client waits this long for a reply or its node: longer than a failover and a restart on a
# loaded machine.
CLIENT_TIMEOUT_S: Final = 60.0
CLIENT_STOP_TIMEOUT_S: Final = CLIENT_TIMEOUT_S + 30.0
DURATION_S_MIN: Final = 2.0  # half before the kill, half after: each long enough for traffic


def _account(number: int) -> str:
    return f"acct-{number:03d}"


def _client(socket_path: str, name: str, history: str, seed: int) -> None:
    """One client process: pipelined transfers until SIGTERM, then every reply still due."""
    stopping = [False]

    def stop(_signal: int, _frame: Any) -> None:
        stopping[0] = True

    signal.signal(signal.SIGTERM, stop)
    rng = random.Random(seed)
    with HistoryWriter(history) as sink, RecordingClient(
        Client(socket_path, schema=Ledger.schema, timeout_s=CLIENT_TIMEOUT_S,
               reconnect_timeout_s=CLIENT_TIMEOUT_S, in_flight_max=WINDOW, client_name=name),
        name, sink,
    ) as client:  # fmt: skip
        window: deque[Any] = deque()
        while not stopping[0] or window:
            if not stopping[0]:
                source, target = rng.sample(range(ACCOUNTS), 2)
                window.append(client.submit(Transfer(_account(source), _account(target), rng.randrange(1, 100))))
                if len(window) < WINDOW:
                    continue
            with contextlib.suppress(CommandRejected):
                window.popleft().result()


def _open_accounts(socket_path: str, history: Path) -> None:
    with HistoryWriter(history) as sink, RecordingClient(
        Client(socket_path, schema=Ledger.schema, timeout_s=CLIENT_TIMEOUT_S), "setup", sink
    ) as client:  # fmt: skip
        pending = [client.submit(command) for number in range(ACCOUNTS)
                   for command in (OpenAccount(_account(number)), Deposit(_account(number), OPENING_DEPOSIT))]  # fmt: skip
        for request in pending:
            request.result()


def run_cluster_demo(nodes: int = 3, duration_s: float = 10.0, keep: bool = False) -> int:
    if nodes not in (3, 5) or duration_s < DURATION_S_MIN:
        print(f"seqd demo: --cluster is 3 or 5 and --duration at least {DURATION_S_MIN} s", file=sys.stderr)
        return 2
    directory = Path(tempfile.mkdtemp(prefix="seqd-demo-cluster-", dir="/tmp"))
    prefix = f"dc{uuid.uuid4().hex[:6]}"
    print(f"seqd demo: a {nodes}-node cluster {prefix}n1..n{nodes} in {directory} (ledger app, loopback)")
    cluster = Cluster(directory, prefix, size=nodes, proxied=False, cluster=TIMEOUTS)
    clients: dict[int, subprocess.Popen[bytes]] = {}
    histories = [directory / "setup.jsonl"] + [directory / f"client-n{n}.jsonl" for n in cluster.nodes]
    code = 1
    try:
        cluster.start()
        leader = cluster.wait_leader()
        print(f"  {nodes} nodes serving; node {leader.number} leads term {leader.term}; opening {ACCOUNTS} accounts")
        _open_accounts(cluster[leader.number].socket_path, histories[0])
        for number, node in cluster.nodes.items():
            log = open(directory / f"client-n{number}.log", "ab")
            clients[number] = subprocess.Popen(
                [sys.executable, "-m", "daemon.demo_cluster", node.socket_path, f"n{number}",
                 str(directory / f"client-n{number}.jsonl"), str(number)],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
            log.close()
        print(f"  a client on every node, {WINDOW} transfers in flight each, for {duration_s:.0f} s")
        load_started_ns = time.monotonic_ns()
        time.sleep(duration_s / 2)
        print(f"  kill -9 of the leader, node {leader.number}")
        killed_ns = time.monotonic_ns()
        cluster.kill(leader.number)
        others = [n for n in cluster.nodes if n != leader.number]
        elected = cluster.wait_leader(among=others, term_above=leader.term or 0)
        election_ms = (time.monotonic_ns() - killed_ns) / 1e6
        print(f"  node {elected.number} elected for term {elected.term} {election_ms:,.0f} ms after the kill; "
              f"restarting node {leader.number}")  # fmt: skip
        cluster[leader.number].remove_shared_memory()
        cluster.start([leader.number])
        time.sleep(max(0.0, load_started_ns / 1e9 + duration_s - time.monotonic()))
        load_ended_ns = time.monotonic_ns()  # throughput counts what was acknowledged before this
        for process in clients.values():
            process.send_signal(signal.SIGTERM)
        for number, process in clients.items():
            if process.wait(CLIENT_STOP_TIMEOUT_S) != 0:
                raise NodeError(f"the client on node {number} exited with {process.returncode}: see "
                                f"{directory / f'client-n{number}.log'} (--keep keeps it)")  # fmt: skip
        applied = cluster.wait_converged()
        print(f"  the nodes agree: index {applied:,} applied everywhere with one rolling hash; stopping them")
        cluster.stop()
        code = _report(cluster, histories, load_started_ns, load_ended_ns, killed_ns, election_ms)
    except (ClusterError, NodeError, subprocess.TimeoutExpired) as error:
        print(f"  FAILED: {error}")
    except KeyboardInterrupt:
        print("\n  interrupted")
        code = 130
    finally:
        for process in clients.values():
            if process.poll() is None:
                process.kill()
                process.wait()
        cluster.close()
        if keep:
            print(f"  kept {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)
    return code


def _report(cluster: Cluster, histories: list[Path], started_ns: int, ended_ns: int, killed_ns: int,
            election_ms: float) -> int:  # fmt: skip
    operations = [op for path in histories[1:] for op in read_history(path)]
    done = sorted((op.complete_ns or 0) for op in operations if op.outcome == "ok" and (op.complete_ns or 0) <= ended_ns)
    latencies_us = sorted(((op.complete_ns or 0) - op.invoke_ns) / 1000 for op in operations if op.outcome == "ok")
    elapsed_s = (ended_ns - started_ns) / 1e9
    after_kill = [at for at in done if at > killed_ns]
    print(f"  throughput   {len(done) / elapsed_s:>10,.0f} transfers/s ({len(done):,} acknowledged in the "
          f"{elapsed_s:.1f} s of load, across the failover)")  # fmt: skip
    if latencies_us:
        print(f"  latency      p50 {percentile(latencies_us, 0.5):,.0f} us   p99 {percentile(latencies_us, 0.99):,.0f} us"
              f"   p99.9 {percentile(latencies_us, 0.999):,.0f} us   max {latencies_us[-1]:,.0f} us")  # fmt: skip
    gap = f"{(after_kill[0] - killed_ns) / 1e6:,.0f} ms" if after_kill else "none"
    print(f"  failover     new leader {election_ms:,.0f} ms after the kill; first reply to a client {gap} after it")
    report = check_files(
        histories,
        {f"n{n}": node.config.journal_dir for n, node in cluster.nodes.items()},
        {f"n{n}": node.config.snapshot_dir for n, node in cluster.nodes.items()},
    )
    verdict = "no violation" if report.ok else f"{len(report.violations)} VIOLATIONS"
    print(f"  checker      {verdict}: {report.operations.get('ok', 0):,} acknowledged operations, journals "
          f"{report.records} (every acknowledged command in the log once, journals equal, replies and "
          f"money as the replay gives)")  # fmt: skip
    if not report.ok:
        print("  " + str(report).replace("\n", "\n  "))
    return 0 if report.ok and operations else 1


if __name__ == "__main__":
    _client(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
