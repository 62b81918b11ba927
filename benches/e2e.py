"""End-to-end benchmark: a ledger node versus the transport's ceiling and Redis Streams.

    python -m benches.e2e --quick --json       # CI-sized (each figure measured >= 2 s), about a minute on 2 cores
    python -m benches.e2e                       # bigger runs
    python -m benches.e2e --scale               # clients 1, 8, 64, 256: plots in benches/out/

In one run, with the same Python load generator (`daemon.load`: pipelined clients, each in its own
process, the same window of requests in flight):

- node: a single seqd node on the ledger app, every reply after group-committed fdatasync;
- echo: a uvloop Unix-socket server that answers each COMMAND frame at once with the same codec
  (no sequencing, no journal, no logic): the ceiling of the transport and the client library;
- redis: `XADD` to a stream on a `redis-server` with `appendonly yes` and `appendfsync always`
  over a Unix socket, pipelined to the same depth (skipped with a note when redis-server is absent,
  or with `--no-redis`; Debian: `apt-get install redis-server`, for benchmarks only).

Latency is measured at a fixed offered rate of half the node's measured maximum (capped at what
one open-loop client process can offer, LATENCY_RATE_PER_S_MAX), from each request's due time
(coordinated omission corrected), and again at half the maximum uncapped (`node_half_max_*`: the
achieved rate beside it says whether the one generator could offer it). Server CPU per command
is every role process's CPU time (psutil, user + system) over the maximum run, divided by its
commands; fdatasync p50 is measured on the node's data directory in the same run
(`benches.call_rtt.fdatasync_p50_us`). Each figure is measured for at least MEASURE_S_MIN seconds
(`benches._measure`; `--min-seconds 0` for a smoke run), and its seconds are in the JSON
(`*_measured_s`). Replay speed is the blp's recovery path (`recovery.recover`:
`read_runs` + `Processor.replay_run`) over the journal the run wrote.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from benches import _redis
from benches._measure import MEASURE_S_MIN, repeat_for, sized_for
from benches.call_rtt import fdatasync_p50_us
from daemon.harness import NodeProcess
from daemon.layout import node_roles
from daemon.load import LoadResult, run_load, setup_accounts

OUT = Path(__file__).resolve().parent / "out"
LATENCY_RATE_PER_S_MAX = 10_000  # one open-loop client process sending each request at once: ~20k/s saturates 2 cores
LATENCY_RUN_S = 3.0
TRANSFERS_PER_CLIENT_MAX = 2_000_000  # sizing by time stops here (~20 s per client at 100k/s)


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "load_average": os.getloadavg()[0],
    }


@dataclass
class NodeFigures:
    maximum: LoadResult
    latency: LoadResult  # at min(half the maximum, LATENCY_RATE_PER_S_MAX)
    latency_offered_per_s: float
    half_max: LoadResult  # at half the maximum, uncapped: one open-loop generator
    half_max_offered_per_s: float
    cpu_us_per_cmd: float  # server CPU (every role's process) per command of the maximum run
    cpu_us_per_cmd_by_role: dict[str, float]
    fdatasync_p50_us: float
    fdatasync_measured_s: float
    replay_per_s: float
    replay_measured_s: float


def role_cpu_s(processes: dict[str, psutil.Process]) -> dict[str, float]:
    return {role: sum(process.cpu_times()[:2]) for role, process in processes.items()}


def bench_node(directory: Path, clients: int, transfers: int, in_flight: int, accounts: int,
               seconds_min: float) -> NodeFigures:
    node = NodeProcess(directory, f"bench{uuid.uuid4().hex[:6]}")
    node.start()
    cpu_per_cmd: dict[str, float] = {}

    def closed_loop(count: int) -> LoadResult:
        processes = {role.value: psutil.Process(node.role_pid(role.value)) for role in node_roles()}
        before = role_cpu_s(processes)
        result = run_load(node.socket_path, clients, count, in_flight, accounts)
        after = role_cpu_s(processes)
        commands = max(1, result.transfers)
        cpu_per_cmd.clear()
        cpu_per_cmd.update({role: (after[role] - before[role]) * 1e6 / commands for role in processes})
        return result

    def open_loop(rate: float) -> LoadResult:
        duration_s = max(LATENCY_RUN_S, seconds_min) if seconds_min > 0 else 0.0  # 0: a smoke run
        count = max(500, int(rate * duration_s))
        return run_load(node.socket_path, 1, count, in_flight, accounts, rate_per_s=rate)

    try:
        setup_accounts(node.socket_path, accounts)
        run_load(node.socket_path, clients, max(200, transfers // 10), in_flight, accounts)  # warm-up
        maximum = sized_for(closed_loop, lambda result: result.elapsed_s, transfers, TRANSFERS_PER_CLIENT_MAX,
                            seconds_min)
        # One open-loop client process: on 2 cores, several open-loop generators starve each
        # other and the node of CPU, and their own lag (counted in full, as it must be) swamps
        # the node's latency. One process sending each request as it falls due (no batching) plus
        # the node saturate 2 cores near 20k/s, hence the cap.
        rate = min(maximum.per_s / 2, LATENCY_RATE_PER_S_MAX)
        latency = open_loop(rate)
        # Issue 13's "p99 at half the measured maximum", uncapped: where the one generator
        # cannot offer it, its achieved rate (reported beside) says so.
        half_rate = maximum.per_s / 2
        half_max = open_loop(half_rate)
        # The disk under the node's data directory, in the same run (as benches.call_rtt).
        fsync_p50_us, fsync_s = fdatasync_p50_us(directory, seconds_min=seconds_min)
    finally:
        node.stop()
        node.remove_shared_memory()
    replays, replay_s = repeat_for(lambda: bench_replay(node), 1, seconds_min)
    return NodeFigures(maximum, latency, rate, half_max, half_rate, sum(cpu_per_cmd.values()), cpu_per_cmd,
                       fsync_p50_us, fsync_s, statistics.median(replays), replay_s)


def bench_replay(node: NodeProcess) -> tuple[float, float]:
    """(records/s, seconds) of the blp's recovery path (`recovery.recover`) from genesis over
    the run's journal."""
    from sequencer.recovery import recover
    from sequencer.state_machine import load_app

    recovered = recover(load_app(node.config.node.app), node.config.journal_dir, None)
    return (recovered.replayed / recovered.replay_s if recovered.replay_s else 0.0), recovered.replay_s


def bench_echo(directory: Path, clients: int, transfers: int, in_flight: int, accounts: int,
               seconds_min: float) -> LoadResult:
    path = str(directory / "echo.sock")
    server = subprocess.Popen([sys.executable, "-m", "benches._echo_server", path], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready"
        run_load(path, clients, max(200, transfers // 10), in_flight, accounts)
        return sized_for(lambda count: run_load(path, clients, count, in_flight, accounts),
                         lambda result: result.elapsed_s, transfers, TRANSFERS_PER_CLIENT_MAX, seconds_min)
    finally:
        server.terminate()
        server.wait(timeout=10)


def _redis_worker(path: str, count: int, depth: int, results: Any) -> None:
    import redis

    connection = redis.Redis(unix_socket_path=path)
    payload = {"source": "acct-000001", "target": "acct-000002", "amount": "7"}
    started = time.perf_counter()
    sent = 0
    while sent < count:
        batch = min(depth, count - sent)
        pipeline = connection.pipeline(transaction=False)
        for _ in range(batch):
            pipeline.xadd("ledger", payload)
        pipeline.execute()
        sent += batch
    results.put(time.perf_counter() - started)


def bench_redis(directory: Path, clients: int, transfers: int, in_flight: int,
                seconds_min: float) -> tuple[float, float] | None:
    """(XADDs/s, seconds measured), or None without redis-server."""
    if not _redis.available():
        return None

    def measure(path: str, count: int) -> tuple[float, float]:
        context = multiprocessing.get_context("spawn")
        results = context.Queue()
        workers = [context.Process(target=_redis_worker, args=(path, count, in_flight, results)) for _ in range(clients)]
        for worker in workers:
            worker.start()
        elapsed = max(results.get(timeout=300) for _ in workers)
        for worker in workers:
            worker.join()
        return clients * count / elapsed, elapsed

    with _redis.redis_server(directory, fsync_always=True) as path:
        measure(path, max(200, transfers // 10))  # warm-up, discarded
        return sized_for(lambda count: measure(path, count), lambda figure: figure[1], transfers,
                         TRANSFERS_PER_CLIENT_MAX, seconds_min)  # fmt: skip


def scale(directory: Path, in_flight: int, accounts: int) -> dict[str, Any]:
    from benches._plot import line_chart

    node = NodeProcess(directory, f"scale{uuid.uuid4().hex[:6]}")
    node.start()
    rows = []
    try:
        setup_accounts(node.socket_path, accounts)
        for clients in (1, 8, 64, 256):
            transfers = max(100, 40_000 // clients)
            result = run_load(node.socket_path, clients, transfers, in_flight, accounts, processes_max=8)
            rows.append({
                "clients": clients,
                "cmds_per_s": result.per_s,
                "p50_us": result.percentile_us(0.5),
                "p99_us": result.percentile_us(0.99),
                "p999_us": result.percentile_us(0.999),
            })
            print(f"  {clients:>4} clients: {result.per_s:>10,.0f}/s  p50 {rows[-1]['p50_us']:,.0f} us  p99 {rows[-1]['p99_us']:,.0f} us")
    finally:
        node.stop()
        node.remove_shared_memory()
    line_chart(OUT / "e2e_throughput_vs_clients.svg", "ledger node: throughput vs clients", "clients", "commands/s",
               {"node": [(row["clients"], row["cmds_per_s"]) for row in rows]}, log_x=True)
    line_chart(OUT / "e2e_latency_vs_clients.svg", "ledger node: latency percentiles vs clients", "clients", "us",
               {name: [(row["clients"], row[f"{name}_us"]) for row in rows] for name in ("p50", "p99", "p999")},
               log_x=True, log_y=True)
    return {"scale": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benches.e2e")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--scale", action="store_true", help="clients 1, 8, 64, 256 and plots")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--min-seconds", type=float, default=MEASURE_S_MIN,
                        help=f"measure each figure at least this long (default {MEASURE_S_MIN}; 0 for a smoke run)")
    parser.add_argument("--no-redis", action="store_true", help="skip the Redis peer (smoke runs)")
    args = parser.parse_args(argv)
    transfers = 3_000 if args.quick else 25_000  # per client, at least: runs grow to --min-seconds
    accounts = 100
    directory = Path(tempfile.mkdtemp(prefix="seqd-bench-", dir="/tmp"))
    results: dict[str, Any] = {"machine": machine(), "clients": args.clients, "in_flight": args.in_flight,
                               "transfers_per_client_min": transfers, "measure_s_min": args.min_seconds}
    try:
        if args.scale:
            results.update(scale(directory, args.in_flight, accounts))
        else:
            (directory / "node").mkdir()
            node = bench_node(directory / "node", args.clients, transfers, args.in_flight, accounts, args.min_seconds)
            maximum, latency, half_max = node.maximum, node.latency, node.half_max
            echo = bench_echo(directory, args.clients, transfers, args.in_flight, accounts, args.min_seconds)
            redis = None if args.no_redis else bench_redis(directory, args.clients, transfers, args.in_flight,
                                                              args.min_seconds)  # fmt: skip
            redis_rate = redis[0] if redis else None
            results.update({
                "node_cmds_per_s": round(maximum.per_s),
                "node_measured_s": round(maximum.elapsed_s, 3),
                "transfers_per_client": maximum.transfers // args.clients,
                "node_cpu_us_per_cmd": round(node.cpu_us_per_cmd, 2),
                "node_cpu_us_per_cmd_by_role": {role: round(us, 2) for role, us in node.cpu_us_per_cmd_by_role.items()},
                "echo_msgs_per_s": round(echo.per_s),
                "echo_measured_s": round(echo.elapsed_s, 3),
                "redis_xadd_per_s": round(redis_rate) if redis_rate else None,
                "redis_measured_s": round(redis[1], 3) if redis else None,
                "redis_note": None if redis_rate else
                "--no-redis: skipped" if args.no_redis else "redis-server is not installed: skipped",
                "latency_offered_per_s": round(node.latency_offered_per_s),
                "latency_achieved_per_s": round(latency.per_s),
                "latency_measured_s": round(latency.elapsed_s, 3),
                "node_p50_us": round(latency.percentile_us(0.50)),
                "node_p99_us": round(latency.percentile_us(0.99)),
                "node_p999_us": round(latency.percentile_us(0.999)),
                "node_half_max_offered_per_s": round(node.half_max_offered_per_s),
                "node_half_max_achieved_per_s": round(half_max.per_s),
                "node_half_max_measured_s": round(half_max.elapsed_s, 3),
                "node_half_max_p99_us": round(half_max.percentile_us(0.99)),
                "fdatasync_p50_us": round(node.fdatasync_p50_us, 1),
                "fdatasync_measured_s": round(node.fdatasync_measured_s, 3),
                "node_closed_loop_p50_us": round(maximum.percentile_us(0.50)),
                "replay_records_per_s": round(node.replay_per_s),
                "replay_measured_s": round(node.replay_measured_s, 3),
                "node_vs_echo": round(maximum.per_s / echo.per_s, 3),
                "node_vs_redis": round(maximum.per_s / redis_rate, 3) if redis_rate else None,
            })
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    results["machine"]["load_average_after"] = os.getloadavg()[0]
    if args.json:
        print(json.dumps(results))
    elif not args.scale:
        print(f"machine: {results['machine']}")
        print(f"{'node (ledger, fsync group commit)':<40}{results['node_cmds_per_s']:>12,} cmds/s")
        print(f"{'echo (transport ceiling)':<40}{results['echo_msgs_per_s']:>12,} msgs/s   node/echo {results['node_vs_echo']:.2f}")
        if results["redis_xadd_per_s"]:
            print(f"{'redis XADD, appendfsync always':<40}{results['redis_xadd_per_s']:>12,} /s       node/redis {results['node_vs_redis']:.2f}")
        else:
            print(results["redis_note"])
        print(f"latency at {results['latency_offered_per_s']:,}/s offered: p50 {results['node_p50_us']:,} us  "
              f"p99 {results['node_p99_us']:,} us  p99.9 {results['node_p999_us']:,} us")
        print(f"latency at {results['node_half_max_offered_per_s']:,}/s offered (half the maximum): "
              f"p99 {results['node_half_max_p99_us']:,} us; fdatasync p50 {results['fdatasync_p50_us']:,} us")
        print(f"server CPU per command: {results['node_cpu_us_per_cmd']} us {results['node_cpu_us_per_cmd_by_role']}")
        print(f"{'replay (blp recovery path)':<40}{results['replay_records_per_s']:>12,} records/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
