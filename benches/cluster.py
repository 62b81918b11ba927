"""Cluster benchmark (issue 11): a 3-node seqd cluster against one node and PySyncObj.

    python -m benches.cluster --quick --json     # each figure measured >= 2 s; a few minutes on 2 cores
    python -m benches.cluster                     # bigger runs: 20 leader kills, a follower 1M records behind
    python -m benches.cluster --only pysyncobj    # the baseline alone
    python -m benches.cluster --only catchup --quick --json   # the catch-up figure alone

In one run, on this machine (three nodes share its cores, as the issue says):

- single: one seqd node on the ledger app (`daemon.harness.NodeProcess` with the config's default
  ring sizes, 16 MiB, as every seqd node here: fsync group commit), the same load generator as `benches.e2e` (`daemon.load`: client processes with a
  window of requests in flight) -> `single_cmds_per_s`;
- cluster3: three seqd nodes on loopback (`daemon.cluster_harness.Cluster`, direct peer links,
  no fault proxy), fsync on every node, default timeouts; the same load from clients on the
  leader (`cluster3_cmds_per_s`) and on a follower (`cluster3_follower_cmds_per_s`); latency at a
  fixed offered rate from one open-loop client on the leader (`cluster3_p50_us`, `cluster3_p99_us`,
  coordinated omission corrected as in `daemon.load`);
- failover: the leader's whole node is killed (SIGKILL to its process group) at least 10 times
  (20 in a full run) while one client on a surviving node sends one command at a time; a
  failover is the time from the kill to the completion of the first command that client sent
  after the kill (so it was committed under the new leader; this overstates by at most one
  round trip) -> `failover_ms_p50`, `failover_ms_max`. After each, the node is restarted and
  the three converge before the next kill;
- catch-up: a follower is stopped, the other two commit about `catchup_records` more records,
  and the follower is started again: `catchup_records_per_s` is the records it was behind over
  the time from when it had recovered its own journal until it had applied the leader's commit
  index (`catchup_total_s` adds its start-up). Quick mode: 200k records behind (at ~80-100k
  records/s, 2 s or more measured); a full run: 1M;
- pysyncobj3: PySyncObj (`pysyncobj` on PyPI), three processes on loopback, a replicated counter
  with its default configuration: the log in memory, **no journal file and no fsync** (so it is
  not durable on any node), commands submitted inside the leader's process (PySyncObj has no
  client protocol). PySyncObj batches what is queued once per tick (50 ms), so its rate grows
  with the commands outstanding: it is measured at seqd's window (clients x in_flight) and at
  PYSYNCOBJ_WINDOWS, and its best is `pysyncobj3_ops_per_s`.

Each figure is measured for at least MEASURE_S_MIN seconds (`benches._measure`; `--min-seconds
0` for a smoke run). The seqd parts need cluster mode's replication role; without it they stop
with a message saying so (`--only pysyncobj` still runs).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from benches._measure import MEASURE_S_MIN, sized_for
from benches.e2e import machine
from daemon.cluster_harness import Cluster, ClusterError
from daemon.config import RingConfig
from daemon.harness import NodeProcess
from daemon.load import LoadResult, account_name, run_load, setup_accounts

LATENCY_RATE_PER_S_MAX = 5_000  # one open-loop client on a 2-core machine that runs three nodes
TRANSFERS_PER_CLIENT_MAX = 2_000_000
# Every seqd node here (the single one too) runs with the config's ring sizes, what a user runs,
# not the 1 MiB rings of the test harness's defaults.
RINGS = {"ring": {"log_capacity_bytes": RingConfig().log_capacity_bytes,
                  "egress_capacity_bytes": RingConfig().egress_capacity_bytes}}  # fmt: skip
PROBE_TIMEOUT_S = 60.0  # a failover takes ~1 s; a probe call waiting a minute is a hung cluster
READY_TIMEOUT_S = 60.0  # PySyncObj nodes find each other and elect within a few seconds
# Commands outstanding in PySyncObj's leader: beyond 16k its rate stopped growing on 2 cores.
PYSYNCOBJ_WINDOWS = (4096, 16384)


class ClusterModeMissing(Exception):
    """seqd has no replication role yet: the cluster figures cannot be measured."""


# ---- PySyncObj --------------------------------------------------------------------------------------


def _pysyncobj_node(address: str, partners: list[str], seconds: float, in_flight: int,
                    ready: Any, go: Any, done: Any, results: Any) -> None:  # fmt: skip
    """One PySyncObj node in its own process. Once it knows a leader it says so; when told to go,
    the node that leads then drives `in_flight` outstanding increments for `seconds` and reports."""
    from pysyncobj import SyncObj, SyncObjConf, replicated
    from pysyncobj.config import FAIL_REASON

    class Counter(SyncObj):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(address, partners, SyncObjConf())  # defaults: no journal, no fsync
            self.value = 0

        @replicated  # type: ignore[misc]
        def add(self, amount: int) -> int:
            self.value += amount
            return self.value

    counter = Counter()
    deadline = time.monotonic() + READY_TIMEOUT_S
    while counter._getLeader() is None or not counter._isReady():
        if time.monotonic() > deadline:
            results.put((address, "error", "no leader within READY_TIMEOUT_S"))
            return
        time.sleep(0.01)
    ready.put(address)
    go.wait()
    # Whoever leads now drives; the others stay up as followers until it has reported.
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not counter._isLeader():
        if done.is_set() or time.monotonic() > deadline + seconds:
            counter.destroy()
            return
        time.sleep(0.01)
    window = threading.Semaphore(in_flight)
    outcomes = [0, 0]  # succeeded, failed: callbacks run on PySyncObj's one thread

    def finished(_result: Any, error: int) -> None:
        outcomes[0 if error == FAIL_REASON.SUCCESS else 1] += 1
        window.release()

    started = time.perf_counter()
    sent = 0
    while time.perf_counter() - started < seconds:
        window.acquire()
        counter.add(1, callback=finished)
        sent += 1
    for _ in range(in_flight):
        window.acquire()
    elapsed = time.perf_counter() - started
    results.put((address, "ok", {"ops": outcomes[0], "failed": outcomes[1], "sent": sent, "elapsed_s": elapsed,
                                 "value": counter.value}))  # fmt: skip
    done.wait(READY_TIMEOUT_S)
    counter.destroy()


def bench_pysyncobj(seconds: float, in_flight: int) -> dict[str, Any]:
    """(ops/s, details) of PySyncObj, 3 nodes on loopback, commands from inside the leader."""
    from daemon.faultproxy import free_loopback_ports

    addresses = [f"127.0.0.1:{port}" for port in free_loopback_ports(3)]
    context = multiprocessing.get_context("spawn")
    ready, results, go, done = context.Queue(), context.Queue(), context.Event(), context.Event()
    processes = [
        context.Process(target=_pysyncobj_node,
                        args=(address, [a for a in addresses if a != address], seconds, in_flight, ready, go, done, results),
                        daemon=True)
        for address in addresses
    ]
    for process in processes:
        process.start()
    try:
        for _ in processes:
            ready.get(timeout=READY_TIMEOUT_S)
        go.set()
        _address, status, figures = results.get(timeout=seconds + 2 * READY_TIMEOUT_S)
        done.set()
        if status != "ok":
            raise RuntimeError(f"PySyncObj: {figures}")
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()
    return {"ops_per_s": figures["ops"] / figures["elapsed_s"], **figures}


# ---- seqd -------------------------------------------------------------------------------------------


def require_cluster_mode() -> None:
    if importlib.util.find_spec("daemon.roles.replicator") is None:
        raise ClusterModeMissing(
            "seqd has no replication role yet (daemon/roles/replicator.py, issue 11): a [cluster] "
            "config would run three unconnected single nodes, so there is nothing to measure. Run "
            "`python -m benches.cluster --only pysyncobj` for the baseline alone"
        )


def closed_loop(socket_path: str, clients: int, transfers: int, in_flight: int, accounts: int,
                seconds_min: float) -> LoadResult:  # fmt: skip
    run_load(socket_path, clients, max(200, transfers // 10), in_flight, accounts)  # warm-up
    return sized_for(lambda count: run_load(socket_path, clients, count, in_flight, accounts),
                     lambda result: result.elapsed_s, transfers, TRANSFERS_PER_CLIENT_MAX, seconds_min)  # fmt: skip


def bench_single(directory: Path, clients: int, transfers: int, in_flight: int, accounts: int,
                 seconds_min: float) -> LoadResult:  # fmt: skip
    directory.mkdir()
    node = NodeProcess(directory, f"bcs{uuid.uuid4().hex[:6]}", RINGS)
    try:
        node.start()
        setup_accounts(node.socket_path, accounts)
        return closed_loop(node.socket_path, clients, transfers, in_flight, accounts, seconds_min)
    finally:
        node.stop()
        node.remove_shared_memory()


class Probe:
    """One client on a node sending one Deposit at a time, recording (invoke_ns, complete_ns)."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.calls: list[tuple[int, int]] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="failover-probe", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from sequencer.apps.ledger import Deposit, Ledger
        from sequencer.client import Client

        try:
            with Client(self.socket_path, schema=Ledger.schema, timeout_s=PROBE_TIMEOUT_S,
                        reconnect_timeout_s=PROBE_TIMEOUT_S) as client:  # fmt: skip
                while not self._stop.is_set():
                    invoked = time.monotonic_ns()
                    client.call(Deposit(account_name(0), 1))
                    self.calls.append((invoked, time.monotonic_ns()))
        except BaseException as error:
            self.error = error

    def first_completion_invoked_after(self, after_ns: int, timeout_s: float = PROBE_TIMEOUT_S) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.error is not None:
                raise RuntimeError(f"the failover probe failed: {self.error!r}")
            # One call at a time: the first call invoked after the kill is the first to end.
            for invoked, completed in list(self.calls):
                if invoked >= after_ns:
                    return completed
            time.sleep(0.001)
        raise RuntimeError(f"no probe command completed within {timeout_s} s after the kill")

    def wait_calls(self, count: int, timeout_s: float = PROBE_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.calls) < count:
            if self.error is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the failover probe made {len(self.calls)} calls: {self.error!r}")
            time.sleep(0.001)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(PROBE_TIMEOUT_S + 5)


def bench_failover(cluster: Cluster, kills: int) -> list[float]:
    """Milliseconds from each leader kill to the first command committed under the new leader."""
    failovers = []
    for _ in range(kills):
        leader = cluster.wait_leader().number
        survivor = next(n for n in cluster.nodes if n != leader)
        probe = Probe(cluster[survivor].socket_path)
        try:
            probe.wait_calls(20)  # warm: the probe's session is open and commands flow
            killed_ns = time.monotonic_ns()
            cluster.kill(leader)
            completed_ns = probe.first_completion_invoked_after(killed_ns)
            failovers.append((completed_ns - killed_ns) / 1e6)
        finally:
            probe.stop()
        cluster[leader].remove_shared_memory()
        cluster.start([leader])
        cluster.wait_leader()
        cluster.wait_converged()
    return failovers


def bench_catchup(cluster: Cluster, records: int, clients: int, in_flight: int, accounts: int) -> dict[str, Any]:
    """A follower stopped while the others commit `records` transfers, then started: records/s
    from the moment it has recovered what it had (its own journal replayed) until it has applied
    the leader's commit index; `total_s` also counts its start-up."""
    leader = cluster.wait_leader().number
    follower = next(n for n in cluster.nodes if n != leader)
    before = cluster.wait_converged()  # what the follower has applied when it stops
    cluster.stop([follower])
    run_load(cluster[leader].socket_path, clients, max(1, records // clients), in_flight, accounts)
    target = cluster[leader].view()
    assert target is not None and target.commit_index is not None
    started = time.perf_counter()
    cluster.start([follower], wait=False)
    deadline = time.monotonic() + max(600.0, records / 1000)
    running_at: tuple[float, int] | None = None
    while True:
        view = cluster[follower].view()
        applied = view.applied_index if view is not None else None
        if applied is not None and applied >= before and running_at is None:
            running_at = (time.perf_counter(), applied)  # its own journal is replayed
        if applied is not None and applied >= target.commit_index:
            break
        if time.monotonic() > deadline:
            raise ClusterError(f"the follower did not catch up; {cluster.describe()}")
        time.sleep(0.002)
    done = time.perf_counter()
    assert running_at is not None
    behind = target.commit_index - running_at[1]
    return {"records": behind, "seconds": done - running_at[0], "total_s": done - started,
            "per_s": behind / max(done - running_at[0], 1e-9)}


def bench_catchup_alone(directory: Path, clients: int, in_flight: int, accounts: int,
                        records: int) -> dict[str, Any]:
    """The catch-up figure alone, on a fresh cluster (what `bench_cluster` measures last)."""
    require_cluster_mode()
    with Cluster(directory, f"bcl{uuid.uuid4().hex[:6]}", proxied=False, settings=RINGS) as cluster:
        cluster.start()
        setup_accounts(cluster[cluster.wait_leader().number].socket_path, accounts)
        catchup = bench_catchup(cluster, records, clients, in_flight, accounts)
    return {"catchup_records": catchup["records"], "catchup_s": round(catchup["seconds"], 3),
            "catchup_total_s": round(catchup["total_s"], 3),
            "catchup_records_per_s": round(catchup["per_s"])}


def bench_cluster(directory: Path, clients: int, transfers: int, in_flight: int, accounts: int,
                  seconds_min: float, kills: int, catchup_records: int) -> dict[str, Any]:  # fmt: skip
    require_cluster_mode()
    results: dict[str, Any] = {}
    with Cluster(directory, f"bcl{uuid.uuid4().hex[:6]}", proxied=False, settings=RINGS) as cluster:
        cluster.start()
        leader = cluster.wait_leader().number
        follower = next(n for n in cluster.nodes if n != leader)
        setup_accounts(cluster[leader].socket_path, accounts)
        on_leader = closed_loop(cluster[leader].socket_path, clients, transfers, in_flight, accounts, seconds_min)
        on_follower = closed_loop(cluster[follower].socket_path, clients, transfers, in_flight, accounts,
                                  seconds_min)  # fmt: skip
        rate = min(on_leader.per_s / 2, LATENCY_RATE_PER_S_MAX)
        duration_s = max(3.0, seconds_min) if seconds_min > 0 else 0.0
        latency = run_load(cluster[leader].socket_path, 1, max(500, int(rate * duration_s)), in_flight, accounts,
                           rate_per_s=rate)  # fmt: skip
        failovers = bench_failover(cluster, kills)
        catchup = bench_catchup(cluster, catchup_records, clients, in_flight, accounts)
        results["leader_term_at_end"] = cluster.wait_leader().term
    results.update({
        "cluster3_cmds_per_s": round(on_leader.per_s),
        "cluster3_measured_s": round(on_leader.elapsed_s, 3),
        "cluster3_follower_cmds_per_s": round(on_follower.per_s),
        "cluster3_follower_measured_s": round(on_follower.elapsed_s, 3),
        "cluster3_latency_offered_per_s": round(rate),
        "cluster3_latency_achieved_per_s": round(latency.per_s),
        "cluster3_latency_measured_s": round(latency.elapsed_s, 3),
        "cluster3_p50_us": round(latency.percentile_us(0.50)),
        "cluster3_p99_us": round(latency.percentile_us(0.99)),
        "failover_kills": len(failovers),
        "failover_ms": [round(ms, 1) for ms in failovers],
        "failover_ms_p50": round(statistics.median(failovers), 1),
        "failover_ms_max": round(max(failovers), 1),
        "catchup_records": catchup["records"],
        "catchup_s": round(catchup["seconds"], 3),
        "catchup_total_s": round(catchup["total_s"], 3),
        "catchup_records_per_s": round(catchup["per_s"]),
    })
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benches.cluster")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--only", choices=("all", "pysyncobj", "seqd", "catchup"), default="all")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--kills", type=int, default=None, help="leader kills (default 10 quick, 20 full)")
    parser.add_argument("--catchup-records", type=int, default=None,
                        help="records a follower is behind (default 200,000 quick, 1,000,000 full)")
    parser.add_argument("--min-seconds", type=float, default=MEASURE_S_MIN,
                        help=f"measure each figure at least this long (default {MEASURE_S_MIN}; 0 for a smoke run)")
    args = parser.parse_args(argv)
    transfers = 2_000 if args.quick else 20_000  # per client, at least: runs grow to --min-seconds
    kills = args.kills if args.kills is not None else (10 if args.quick else 20)
    catchup_records = args.catchup_records or (200_000 if args.quick else 1_000_000)
    accounts = 100
    results: dict[str, Any] = {"machine": machine(), "clients": args.clients, "in_flight": args.in_flight,
                               "measure_s_min": args.min_seconds}  # fmt: skip
    code = 0
    if args.only in ("all", "pysyncobj"):
        # PySyncObj batches what is queued once per tick (autoTickPeriod 50 ms), so its rate
        # grows with the commands outstanding: measured at seqd's window (clients x in_flight)
        # and at larger ones; its best is the figure compared with.
        windows = sorted({args.clients * args.in_flight, *PYSYNCOBJ_WINDOWS})
        by_window = {window: bench_pysyncobj(max(args.min_seconds, 0.5), window) for window in windows}
        best = max(by_window, key=lambda window: by_window[window]["ops_per_s"])
        results.update({
            "pysyncobj3_ops_per_s": round(by_window[best]["ops_per_s"]),
            "pysyncobj3_window": best,
            "pysyncobj3_measured_s": round(by_window[best]["elapsed_s"], 3),
            "pysyncobj3_ops_per_s_by_window": {str(w): round(f["ops_per_s"]) for w, f in by_window.items()},
            "pysyncobj3_failed": sum(f["failed"] for f in by_window.values()),
            "pysyncobj3_note": "PySyncObj 3 nodes, default SyncObjConf: log in memory, no journal "
                               "file, no fsync (not durable); commands submitted inside the leader's "
                               "process, a replicated counter; best of the windows tried",
        })  # fmt: skip
    if args.only in ("all", "seqd"):
        directory = Path(tempfile.mkdtemp(prefix="seqd-bcl-", dir="/tmp"))
        try:
            single = bench_single(directory / "single", args.clients, transfers, args.in_flight, accounts,
                                  args.min_seconds)  # fmt: skip
            results["single_cmds_per_s"] = round(single.per_s)
            results["single_measured_s"] = round(single.elapsed_s, 3)
            results.update(bench_cluster(directory / "cluster", args.clients, transfers, args.in_flight,
                                         accounts, args.min_seconds, kills, catchup_records))  # fmt: skip
            results["cluster3_vs_single"] = round(results["cluster3_cmds_per_s"] / results["single_cmds_per_s"], 3)
            if "pysyncobj3_ops_per_s" in results:
                results["cluster3_vs_pysyncobj3"] = round(
                    results["cluster3_cmds_per_s"] / results["pysyncobj3_ops_per_s"], 3)
        except ClusterModeMissing as error:
            print(f"benches.cluster: {error}", file=sys.stderr)
            results["cluster_error"] = str(error)
            code = 2
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    if args.only == "catchup":
        directory = Path(tempfile.mkdtemp(prefix="seqd-bcl-", dir="/tmp"))
        try:
            results.update(bench_catchup_alone(directory, args.clients, args.in_flight, accounts,
                                               catchup_records))  # fmt: skip
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    results["machine"]["load_average_after"] = os.getloadavg()[0]
    if args.json:
        print(json.dumps(results))
    else:
        for key, value in results.items():
            print(f"{key:<36} {value}")
    return code


if __name__ == "__main__":
    sys.exit(main())
