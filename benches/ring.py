"""Benchmark: the ipc ring against the usual Python inter-process queues, in one run.

    python -m benches.ring --quick --json      # ~15 s on 2 cores
    python -m benches.ring                     # full: longer runs, 3 repetitions, medians

Napkin math first. A CPython call that touches a few memoryview items costs ~0.3-0.6 us on a
2-3 GHz core, so a per-record ring hop (one `try_write`, one `read`) should carry ~1.5-2 M msgs/s;
`multiprocessing.Queue` pickles, takes a lock and does a pipe write per message in a feeder thread
(~5-10 us), so ~100-200 k msgs/s; pyzmq pays a C++ queue hop and an I/O thread (~1-3 us). The
batch API writes 256 frames with one join and one copy, so its cost moves to the reader's per-frame
loop (~0.2-0.3 us). A busy-spin ping-pong costs two writes, two reads and two cache-line transfers:
~1.5-2 us.

Measurements: 64-byte messages, 1 producer process to 1 consumer process (each pinned to its own
CPU when there are two) for: the ring per record (`try_write` / `read`), the ring in batches
(`try_write_batch` of 256 / `poll(256)`), `multiprocessing.Queue`, faster-fifo and pyzmq
PUSH/PULL over ipc://; then 1 producer to 3 consumers (the daemon's shape: sequencer to
journaller, replicator, blp): the ring in batches versus three `multiprocessing.Queue`s. Rates are
counted at the consumers after a warm-up. Then a busy-spin ping-pong over two rings: round-trip
percentiles. Idle strategies: spin for 1 to 1 (two processes, two cores), yield for 1 to 3 (four
processes on two cores: spinning would starve the producer).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import ipc
from benches import _ring_workers as workers
from benches._measure import MEASURE_S_MIN

CONTEXT = multiprocessing.get_context("fork")
JOIN_TIMEOUT_S = 60.0  # a run that takes longer than this is hung: kill it and fail loudly

TARGETS = {
    # name: (numerator key, denominator key, ratio wanted)
    "ring_vs_mp_queue": ("ring_msgs_per_s", "mp_queue_msgs_per_s", 10.0),
    "ring_vs_pyzmq": ("ring_msgs_per_s", "pyzmq_msgs_per_s", 1.5),
    "batch_vs_ring": ("ring_batch_msgs_per_s", "ring_msgs_per_s", 3.0),
    "fanout3_ring_vs_mp_queues": ("ring_fanout3_msgs_per_s", "mp_queue_fanout3_msgs_per_s", 20.0),
}
RTT_P50_US_TARGET = 2.0


def _cpus() -> tuple[int | None, int | None]:
    cpus = ipc.available_cpus()
    if len(cpus) >= 2:
        return cpus[0], cpus[1]
    return None, None


def _run(processes: list[Any], results: Any, expected: int) -> list[Any]:
    """Start `processes`, collect `expected` reports, always reap them."""
    try:
        for process in processes:
            process.start()
        reports: list[Any] = []
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while len(reports) < expected:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not results.poll(remaining):
                raise TimeoutError(f"benchmark run produced {len(reports)}/{expected} reports in time")
            reports.append(results.recv())
        for process in processes:
            process.join(JOIN_TIMEOUT_S)
        return reports
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
            process.join(5)


def _rate(reports: list[tuple[int, float]]) -> float:
    # The slowest consumer sets the rate at which every consumer got every message.
    return min(count / seconds for count, seconds in reports)


def _report_pipe() -> tuple[Any, Callable[[Any], None]]:
    receiver, sender = CONTEXT.Pipe(duplex=False)
    return receiver, sender.send


def bench_ring(duration_s: float, warmup_s: float, batch: bool, consumers: int, idle: str) -> float:
    name = ipc.segment_name(f"bench{os.getpid()}", "ring")
    readers = tuple(f"c{i}" for i in range(consumers))
    ring = ipc.Ring.create(name, workers.RING_CAPACITY_BYTES, readers=readers)
    try:
        producer_cpu, consumer_cpu = _cpus() if consumers == 1 else (None, None)
        go = CONTEXT.Event()
        results, report = _report_pipe()
        processes = [
            CONTEXT.Process(
                target=workers.ring_consumer,
                args=(name, reader, batch, idle, warmup_s, consumer_cpu, report),
            )
            for reader in readers
        ]
        processes.append(
            CONTEXT.Process(
                target=workers.ring_producer, args=(name, duration_s, batch, idle, producer_cpu, go)
            )
        )
        go.set()
        return _rate(_run(processes, results, consumers))
    finally:
        ring.close()
        ring.unlink()


def bench_mp_queue(duration_s: float, warmup_s: float, consumers: int) -> float:
    queues = [CONTEXT.Queue(maxsize=1 << 16) for _ in range(consumers)]
    producer_cpu, consumer_cpu = _cpus() if consumers == 1 else (None, None)
    go = CONTEXT.Event()
    results, report = _report_pipe()
    processes = [
        CONTEXT.Process(target=workers.queue_consumer, args=(q, warmup_s, consumer_cpu, report))
        for q in queues
    ]
    processes.append(
        CONTEXT.Process(target=workers.queue_producer, args=(queues, duration_s, producer_cpu, go))
    )
    go.set()
    return _rate(_run(processes, results, consumers))


def bench_faster_fifo(duration_s: float, warmup_s: float) -> float | None:
    try:
        import faster_fifo
    except ImportError:
        return None
    queue = faster_fifo.Queue(max_size_bytes=workers.RING_CAPACITY_BYTES)
    producer_cpu, consumer_cpu = _cpus()
    go = CONTEXT.Event()
    results, report = _report_pipe()
    processes = [
        CONTEXT.Process(target=workers.queue_consumer, args=(queue, warmup_s, consumer_cpu, report)),
        CONTEXT.Process(target=workers.fifo_producer, args=(queue, duration_s, producer_cpu, go)),
    ]
    go.set()
    return _rate(_run(processes, results, 1))


def bench_pyzmq(duration_s: float, warmup_s: float) -> float | None:
    try:
        import zmq  # noqa: F401
    except ImportError:
        return None
    with tempfile.TemporaryDirectory(prefix="seqd-bench-") as directory:
        address = f"ipc://{directory}/push"
        producer_cpu, consumer_cpu = _cpus()
        go = CONTEXT.Event()
        ready = CONTEXT.Event()
        results, report = _report_pipe()
        consumer = CONTEXT.Process(
            target=workers.zmq_consumer, args=(address, warmup_s, consumer_cpu, ready, report)
        )
        producer = CONTEXT.Process(
            target=workers.zmq_producer, args=(address, duration_s, producer_cpu, go)
        )
        try:
            consumer.start()
            if not ready.wait(JOIN_TIMEOUT_S):
                raise TimeoutError("pyzmq consumer did not bind")
            go.set()
            return _rate(_run([producer], results, 1))
        finally:
            if consumer.is_alive():
                consumer.join(JOIN_TIMEOUT_S)
            if consumer.is_alive():
                consumer.kill()
            consumer.join(5)


def bench_rtt(round_trips: int, warmup: int) -> dict[str, float]:
    node = f"bench{os.getpid()}"
    ping = ipc.Ring.create(ipc.segment_name(node, "ping"), 1 << 16, readers=("ponger",))
    pong = ipc.Ring.create(ipc.segment_name(node, "pong"), 1 << 16, readers=("pinger",))
    try:
        pinger_cpu, ponger_cpu = _cpus()
        results, report = _report_pipe()
        processes = [
            CONTEXT.Process(target=workers.rtt_ponger, args=(ping.name, pong.name, ponger_cpu)),
            CONTEXT.Process(
                target=workers.rtt_pinger,
                args=(ping.name, pong.name, round_trips, warmup, pinger_cpu, report),
            ),
        ]
        (samples,) = _run(processes, results, 1)
    finally:
        for ring in (ping, pong):
            ring.close()
            ring.unlink()
    samples.sort()

    def percentile_us(fraction: float) -> float:
        return samples[min(len(samples) - 1, int(fraction * len(samples)))] / 1000.0

    return {
        "ring_rtt_p50_us": percentile_us(0.50),
        "ring_rtt_p90_us": percentile_us(0.90),
        "ring_rtt_p99_us": percentile_us(0.99),
        "ring_rtt_p999_us": percentile_us(0.999),
    }


def machine() -> dict[str, Any]:
    model = platform.processor() or "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "commit": commit,
    }


def run(quick: bool) -> dict[str, Any]:
    duration_s, warmup_s, repeats = (MEASURE_S_MIN, 0.25, 1) if quick else (3.0, 0.5, 3)  # each figure >= 2 s
    rtt_round_trips, rtt_warmup = (20_000, 2_000) if quick else (200_000, 20_000)
    benches: dict[str, Callable[[], float | None]] = {
        "ring_msgs_per_s": lambda: bench_ring(duration_s, warmup_s, False, 1, "spin"),
        "ring_batch_msgs_per_s": lambda: bench_ring(duration_s, warmup_s, True, 1, "spin"),
        "mp_queue_msgs_per_s": lambda: bench_mp_queue(duration_s, warmup_s, 1),
        "faster_fifo_msgs_per_s": lambda: bench_faster_fifo(duration_s, warmup_s),
        "pyzmq_msgs_per_s": lambda: bench_pyzmq(duration_s, warmup_s),
        "ring_fanout3_msgs_per_s": lambda: bench_ring(duration_s, warmup_s, True, 3, "yield"),
        "mp_queue_fanout3_msgs_per_s": lambda: bench_mp_queue(duration_s, warmup_s, 3),
    }
    started_s = time.perf_counter()
    result: dict[str, Any] = {}
    for _ in range(repeats):
        for key, bench in benches.items():
            value = bench()
            result.setdefault(key, []).append(value)
    for key in benches:
        values = [v for v in result[key] if v is not None]
        result[key] = statistics.median(values) if values else None
    rtt = [bench_rtt(rtt_round_trips, rtt_warmup) for _ in range(repeats)]
    for key in rtt[0]:
        result[key] = statistics.median(r[key] for r in rtt)
    ratios: dict[str, Any] = {}
    for name, (numerator, denominator, wanted) in TARGETS.items():
        top, bottom = result.get(numerator), result.get(denominator)
        ratio = top / bottom if top and bottom else None
        ratios[name] = {"ratio": ratio, "target": wanted, "met": ratio is not None and ratio >= wanted}
    ratios["rtt_p50_us"] = {
        "value": result["ring_rtt_p50_us"],
        "target": RTT_P50_US_TARGET,
        "met": result["ring_rtt_p50_us"] < RTT_P50_US_TARGET,
    }
    result["targets"] = ratios
    result["mode"] = "quick" if quick else "full"
    result["measured_s_per_figure"] = duration_s * repeats
    result["payload_bytes"] = workers.PAYLOAD_BYTES
    result["machine"] = machine()
    result["wall_s"] = round(time.perf_counter() - started_s, 1)
    return result


def table(result: dict[str, Any]) -> str:
    lines = [f"{'measurement':34} {'value':>14}"]
    for key, value in result.items():
        if key.endswith("_msgs_per_s"):
            shown = f"{value:14,.0f}" if value is not None else f"{'n/a':>14}"
            lines.append(f"{key:34} {shown}")
        elif key.startswith("ring_rtt"):
            lines.append(f"{key:34} {value:14.2f}")
    lines.append("")
    lines.append(f"{'target':34} {'ratio':>8} {'wanted':>8} {'met':>5}")
    for name, target in result["targets"].items():
        value = target.get("ratio", target.get("value"))
        shown = f"{value:8.2f}" if value is not None else f"{'n/a':>8}"
        wanted = ("<" if name == "rtt_p50_us" else ">=") + f"{target['target']:g}"
        lines.append(f"{name:34} {shown} {wanted:>8} {'yes' if target['met'] else 'NO':>5}")
    info = result["machine"]
    lines.append("")
    lines.append(
        f"{result['mode']} run, {result['wall_s']} s; {info['cpu_model']}, {info['cpus']} CPUs, "
        f"Python {info['python']}, kernel {info['kernel']}, commit {info['commit']}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs, one repetition (<30 s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    result = run(args.quick)
    print(json.dumps(result, sort_keys=True) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
