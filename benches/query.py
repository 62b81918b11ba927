"""Query replicas under load: queries per second, and what they cost the node's commands.

    python -m benches.query --quick --json      # CI-sized (each figure measured >= 2 s)

One ledger node with `[replicas] count = 2`, in one run:

- `node_cmds_per_s_alone`: pipelined transfers (`daemon.load`, closed loop), no query load;
- `query_per_s` / `node_cmds_per_s_with_queries`: the same transfers while query clients (one
  process each, one query in flight, consistency `local`, the ledger's `balance`) ask replica 0
  only; `query_per_s_2_replicas` / `node_cmds_per_s_with_queries_2_replicas`: the query clients
  spread over both replicas;
- `replica_idle_cpu_percent`: a replica with nothing to follow (polling the commit counter);
- `replica_cpu_us_per_record` (following the log, replica 1 in the one-replica run) and
  `replica_cpu_us_per_query` (replica 0's CPU beyond that, per query answered): process CPU
  time, which the load of a shared machine disturbs less than the rates;
- `live_event_delay_ms_p50` / `_p99`: a subscriber at the live end, how long after a command's
  reply its event arrives (one command at a time): what tailing the journal, with the commit
  counter polled every `replicas.poll_ms`, costs a live subscriber over the reply itself.

The machine has few cores: the node's roles, the replicas, the load generator and the query
clients share them, so the query figures measure what the node leaves over, and the drop in
command throughput is the CPU the queries took, not contention inside the node (a replica reads
no ring and takes no lock the pipeline takes).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psutil

from benches._measure import MEASURE_S_MIN, sized_for
from benches.e2e import machine
from daemon.harness import NodeProcess
from daemon.layout import COMMIT_INDEX, REPLICA_COUNTERS
from daemon.load import LoadResult, account_name, run_load, setup_accounts

TRANSFERS_PER_CLIENT_MAX = 2_000_000
QUERY_CLIENTS = 2  # processes asking queries during the loaded runs
LIVE_DELAY_COMMANDS = 300
IDLE_MEASURE_S = 2.0  # a replica with nothing to follow, measured this long


def _query_worker(socket_paths: list[str], accounts: int, stop: Any, results: Any) -> None:
    from sequencer.client import ReplicaQueries

    queries = ReplicaQueries(socket_paths, timeout_s=30.0)
    count = 0
    started = time.perf_counter()
    while not stop.is_set():
        queries.query("balance", {"account": account_name(count % accounts)})
        count += 1
    results.put((count, time.perf_counter() - started))
    queries.close()


def loaded_run(node: NodeProcess, replicas: list[str] | None, clients: int, transfers: int,
               in_flight: int, accounts: int) -> tuple[LoadResult, float]:
    """Transfers (and, with `replicas`, query clients on them): (load result, queries/s)."""
    if not replicas:
        return run_load(node.socket_path, clients, transfers, in_flight, accounts), 0.0
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    results = context.Queue()
    workers = [
        context.Process(target=_query_worker, args=([replicas[n % len(replicas)]], accounts, stop, results),
                        daemon=True)
        for n in range(QUERY_CLIENTS)
    ]  # fmt: skip
    for worker in workers:
        worker.start()
    time.sleep(0.5)  # the workers connect before the load starts
    try:
        load = run_load(node.socket_path, clients, transfers, in_flight, accounts)
    finally:
        stop.set()
    counted = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=10)
    return load, sum(count / elapsed_s for count, elapsed_s in counted)


def live_delays_ms(node: NodeProcess, commands: int) -> list[float]:
    """Per command: from its reply to its event at a subscriber on the live end (ms)."""
    from sequencer.apps.ledger import Ledger, Transfer
    from sequencer.client import Client

    delays: list[float] = []
    with Client(node.socket_path, schema=Ledger.schema) as client:
        client.call(Transfer(account_name(0), account_name(1), 1))
        with client.subscribe(from_index=client.last_index + 1) as subscription:
            for _ in range(commands):
                client.call(Transfer(account_name(0), account_name(1), 1))
                replied = time.perf_counter()
                item = subscription.next(timeout_s=10)
                assert item.index == client.last_index, (item.index, client.last_index)
                delays.append((time.perf_counter() - replied) * 1000)
    return sorted(delays)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benches.query")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--transfers", type=int, default=0, help="per client, at least (default: 2000 quick, 20000)")
    parser.add_argument("--min-seconds", type=float, default=MEASURE_S_MIN,
                        help=f"measure each figure at least this long (default {MEASURE_S_MIN}; 0 for a smoke run)")
    args = parser.parse_args(argv)
    transfers = args.transfers or (2_000 if args.quick else 20_000)
    accounts = 100
    directory = Path(tempfile.mkdtemp(prefix="seqd-bench-", dir="/tmp"))
    results: dict[str, Any] = {"machine": machine(), "clients": args.clients, "in_flight": args.in_flight,
                               "query_clients": QUERY_CLIENTS, "measure_s_min": args.min_seconds}
    node = NodeProcess(directory, f"bq{uuid.uuid4().hex[:6]}", {"replicas": {"count": 2}})
    node.start()
    try:
        replicas = node.config.replica_socket_paths()
        setup_accounts(node.socket_path, accounts)
        run_load(node.socket_path, args.clients, max(200, transfers // 10), args.in_flight, accounts)  # warm-up
        alone = sized_for(
            lambda count: run_load(node.socket_path, args.clients, count, args.in_flight, accounts),
            lambda result: result.elapsed_s, transfers, TRANSFERS_PER_CLIENT_MAX, args.min_seconds,
        )  # fmt: skip
        count = alone.transfers // args.clients
        processes = [psutil.Process(node.read_counters()[block.pid.name]) for block in REPLICA_COUNTERS[:2]]
        idle_started = sum(processes[1].cpu_times()[:2])
        time.sleep(IDLE_MEASURE_S)  # nothing to follow: what polling the commit counter costs
        idle_percent = (sum(processes[1].cpu_times()[:2]) - idle_started) * 100 / IDLE_MEASURE_S
        before = [sum(process.cpu_times()[:2]) for process in processes]
        counters_before = node.read_counters()
        one, one_qps = loaded_run(node, replicas[:1], args.clients, count, args.in_flight, accounts)
        counters_after = node.read_counters()
        cpu_s = [sum(process.cpu_times()[:2]) - start for process, start in zip(processes, before, strict=True)]
        queries = counters_after[REPLICA_COUNTERS[0].queries.name] - counters_before[REPLICA_COUNTERS[0].queries.name]
        records = counters_after[COMMIT_INDEX.name] - counters_before[COMMIT_INDEX.name]
        two, two_qps = loaded_run(node, replicas, args.clients, count, args.in_flight, accounts)
        delays = live_delays_ms(node, LIVE_DELAY_COMMANDS if args.min_seconds else 30)
        values = node.read_counters()
        results.update({
            "node_cmds_per_s_alone": round(alone.per_s),
            "node_alone_measured_s": round(alone.elapsed_s, 3),
            "query_per_s": round(one_qps),
            "node_cmds_per_s_with_queries": round(one.per_s),
            "with_queries_measured_s": round(one.elapsed_s, 3),
            # Replica 1 only followed the log in that run; replica 0 followed it and answered.
            "replica_idle_cpu_percent": round(idle_percent, 2),
            "replica_cpu_us_per_record": round(cpu_s[1] * 1e6 / max(records, 1), 2),
            "replica_cpu_us_per_query": round((cpu_s[0] - cpu_s[1]) * 1e6 / max(queries, 1), 2),
            "query_per_s_2_replicas": round(two_qps),
            "node_cmds_per_s_with_queries_2_replicas": round(two.per_s),
            "with_queries_2_replicas_measured_s": round(two.elapsed_s, 3),
            "live_event_delay_ms_p50": round(statistics.median(delays), 3),
            "live_event_delay_ms_p99": round(delays[min(len(delays) - 1, int(len(delays) * 0.99))], 3),
            "replica_poll_ms": node.config.replicas.poll_ms,
            "replica_lag_records_at_end": values[COMMIT_INDEX.name] - min(
                values[block.applied_index.name] for block in REPLICA_COUNTERS[:2]),
        })
    finally:
        node.stop()
        node.remove_shared_memory()
        shutil.rmtree(directory, ignore_errors=True)
    results["machine"]["load_average_after"] = os.getloadavg()[0]
    if args.json:
        print(json.dumps(results))
    else:
        for key, value in results.items():
            print(f"{key:<45} {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
