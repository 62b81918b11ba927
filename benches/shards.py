"""Sharded ledger benchmark (issue 15): completed transfers per second with 1, 2 and 3 shards
and 0%, 10% and 50% of the transfers across shards, on this machine.

    python -m benches.shards --quick --json     # each figure measured >= 2 s; a few minutes on 2 cores
    python -m benches.shards --min-seconds 0    # a smoke run

Each shard is a seqd node running `sequencer.apps.sharded_ledger:ShardedLedger`, with a bridge
(`seqd bridge`, journal source) per ordered pair of shards (`daemon.shard_harness.ShardSystem`),
all on this machine's cores. One load generator in this process (`ShardedClient`, a window of
`in_flight` pipelined requests per shard) sends random transfers between ACCOUNTS accounts; a
cross-shard one is a `SendTransfer` saga. A run counts as done when every transfer has its reply
**and every saga has finished on every shard** (the hold committed or refunded, the credit
settled), so `transfers_per_s` counts completed transfers, not accepted ones.

CPU: the user + system time of every process of every node and bridge during each run, per
transfer (`cpu_us_per_transfer`), and the busiest single process's (`busiest_us_per_transfer`:
a blp, or a bridge replaying its source's journal). From these, an ESTIMATE of the rate on a
machine where each shard has cores of its own: a shard's processes are single-threaded, so each
shard completes at most 1 / busiest transfers per second, and C cores complete at most
C / cpu_us_per_transfer; `estimate_per_s_by_cores` takes the lower of the two for 8, 16 and 32
cores at the measured shard count. It is an estimate from CPU, not a measurement: it ignores the
fdatasync latency a node waits on (hidden by group commit at these rates) and memory bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psutil

from benches._measure import MEASURE_S_MIN, sized_for
from benches.e2e import machine
from daemon.shard_harness import ShardSystem
from sequencer.apps.ledger import Deposit, OpenAccount, Transfer
from sequencer.apps.sharded_ledger import SendTransfer, shard_of

ACCOUNTS = 96
DEPOSIT = 10**12  # never short of funds: every transfer is accepted
CROSS_SHARES = (0.0, 0.1, 0.5)
ESTIMATE_CORES = (8, 16, 32)


def processes_of(system: ShardSystem) -> list[psutil.Process]:
    found: list[psutil.Process] = []
    for node in system.nodes:
        assert node.process is not None
        root = psutil.Process(node.process.pid)
        found += [root, *root.children(recursive=True)]
    for bridge in system.bridges.values():
        assert bridge.process is not None
        found.append(psutil.Process(bridge.process.pid))
    return found


def cpu_seconds(processes: list[psutil.Process]) -> dict[int, float]:
    seconds = {}
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        seconds[process.pid] = times.user + times.system
    return seconds


def transfers(names_by_shard: dict[int, list[str]], cross_share: float, count: int,
              rng: random.Random) -> list[Any]:  # fmt: skip
    shards = sorted(names_by_shard)
    made: list[Any] = []
    for _ in range(count):
        shard = rng.choice(shards)
        source = rng.choice(names_by_shard[shard])
        if len(shards) > 1 and rng.random() < cross_share:
            other = rng.choice([s for s in shards if s != shard])
            made.append(SendTransfer(source, rng.choice(names_by_shard[other]), 1, timeout_ms=60_000))
        else:
            target = rng.choice([n for n in names_by_shard[shard] if n != source])
            made.append(Transfer(source, target, 1))
    return made


def run_once(system: ShardSystem, client: Any, commands: list[Any], in_flight: int) -> dict[str, float]:
    processes = processes_of(system)
    before = cpu_seconds(processes)
    started = time.perf_counter()
    window: list[Any] = []
    for command in commands:
        window.append(client.submit(command))
        if len(window) >= in_flight * system.shard_count:
            window.pop(0).result()
    for request in window:
        request.result()
    system.wait_settled()
    elapsed_s = time.perf_counter() - started
    after = cpu_seconds(processes)
    used = {pid: after[pid] - before[pid] for pid in after if pid in before}
    return {"count": len(commands), "elapsed_s": elapsed_s, "per_s": len(commands) / elapsed_s,
            "cpu_s": sum(used.values()), "busiest_cpu_s": max(used.values())}  # fmt: skip


def bench_shards(directory: Path, shard_count: int, shares: tuple[float, ...], in_flight: int,
                 count_min: int, count_max: int, seconds_min: float) -> dict[str, Any]:  # fmt: skip
    results: dict[str, Any] = {}
    rng = random.Random(shard_count)
    with ShardSystem(directory, f"b{uuid.uuid4().hex[:6]}", shard_count) as system:
        with system.client(timeout_s=120, in_flight_max=in_flight) as client:
            names = [f"acct{number}" for number in range(ACCOUNTS)]
            pending = [client.submit(OpenAccount(name)) for name in names]
            pending += [client.submit(Deposit(name, DEPOSIT)) for name in names]
            for request in pending:
                request.result()
            by_shard: dict[int, list[str]] = {}
            for name in names:
                by_shard.setdefault(shard_of(name, shard_count), []).append(name)
            for share in shares:
                run = sized_for(
                    lambda count, share=share: run_once(system, client, transfers(by_shard, share, count, rng), in_flight),  # type: ignore[misc]
                    lambda figures: figures["elapsed_s"],
                    count_min, count_max, seconds_min,
                )  # fmt: skip
                key = f"shards{shard_count}_cross{round(share * 100)}"
                cpu_us = run["cpu_s"] / run["count"] * 1e6
                busiest_us = run["busiest_cpu_s"] / run["count"] * 1e6
                results[key] = {
                    "transfers_per_s": round(run["per_s"]),
                    "measured_s": round(run["elapsed_s"], 3),
                    "transfers": run["count"],
                    "cpu_us_per_transfer": round(cpu_us, 1),
                    "busiest_us_per_transfer": round(busiest_us, 1),
                    # None when the run was too short for the CPU clock (10 ms ticks) to see it.
                    "estimate_per_s_by_cores": {
                        str(cores): round(min(shard_count * 1e6 / busiest_us, cores * 1e6 / cpu_us))
                        if busiest_us > 0 else None
                        for cores in ESTIMATE_CORES
                    },
                }
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benches.shards")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--shards", type=int, nargs="*", default=[1, 2, 3])
    parser.add_argument("--in-flight", type=int, default=128, help="pipelined requests per shard")
    parser.add_argument("--min-seconds", type=float, default=MEASURE_S_MIN,
                        help=f"measure each figure at least this long (default {MEASURE_S_MIN}; 0 for a smoke run)")
    args = parser.parse_args(argv)
    count_min = 500 if args.quick or args.min_seconds == 0 else 5_000
    count_max = 200_000
    results: dict[str, Any] = {
        "machine": machine(), "in_flight_per_shard": args.in_flight, "measure_s_min": args.min_seconds,
        "note": "every node and bridge shares this machine's cores (2 here); estimate_per_s_by_cores "
                "is an ESTIMATE from measured CPU per transfer, not a measurement",
    }  # fmt: skip
    directory = Path(tempfile.mkdtemp(prefix="seqd-bsh-", dir="/tmp"))
    try:
        for shard_count in args.shards:
            shares = (0.0,) if shard_count == 1 else CROSS_SHARES
            results.update(bench_shards(directory / f"n{shard_count}", shard_count, shares,
                                        args.in_flight, count_min, count_max, args.min_seconds))  # fmt: skip
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    results["machine"]["load_average_after"] = os.getloadavg()[0]
    if args.json:
        print(json.dumps(results))
    else:
        for key, value in results.items():
            print(f"{key:<24} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
