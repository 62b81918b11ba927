"""What the doorbell's store-load fences cost: one park, one publish, one park/wake round trip,
with membarrier fences and with lock fences (`SEQD_STORE_LOAD_FENCES`, `ipc.platform`).

    python -m benches.doorbell_park [--quick | --smoke] [--json]

Each mode runs in its own processes (a process chooses its fences once). Figures per mode:

- `park_ns`: `Doorbell.park()` + the re-check `ready()` + `unpark()`, nothing published (so no
  wait): what a reader pays each time it goes to sleep. With membarrier this is a system call
  that interrupts every CPU running a thread of a registered process.
- `park_busy_ns`: the same while another registered process spins on the other CPU (a node's
  roles are all registered): each membarrier then sends that CPU an interrupt, which on a VM is
  a VM exit on both sides.
- `neighbour_slowdown`: how much slower that spinning process's own loop ran while the parker
  parked in a loop (1.0 = not at all): the cost membarrier puts on the *other* roles.
- `publish_ns`: `RingWriter.publish()` with no reader parked: the ringer's side, a lock fence
  per publish in lock mode and nothing in membarrier mode.
- `roundtrip_us`: ping-pong between two processes that both park on every empty poll (blocking
  idle strategy, no yield): two park/wait/wake cycles per round trip.

The decision it informs (napkin math, figures in benches/RESULTS.md): per command a node parks
~0.01-0.03 times per role and publishes ~0.03-0.06 times per role, so membarrier costs
parks x (park_ns - lock park_ns) plus the interrupts it sends, and lock fences cost
publishes x publish_ns.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time
from typing import Any

import ipc
from benches.ring import machine

CONTEXT = multiprocessing.get_context("spawn")  # a fresh interpreter chooses its fences
MODES = ("membarrier", "lock")
RING_CAPACITY_BYTES = 1 << 16
JOIN_TIMEOUT_S = 120.0
SPIN_REPORT_LOOPS = 200_000  # the neighbour reports its loop rate this often


def _pin(cpu: int) -> None:
    if cpu in ipc.available_cpus():
        ipc.pin(cpu)


def _per_call_ns(function: Any, calls: int, repeats: int) -> float:
    """Median over `repeats` of the mean time per call in a loop of `calls`."""
    samples = []
    for _ in range(repeats):
        started = time.perf_counter_ns()
        for _ in range(calls):
            function()
        samples.append((time.perf_counter_ns() - started) / calls)
    return statistics.median(samples)


def _neighbour(name: str, stop: Any, rates: Any) -> None:
    """Spin on the other CPU as a registered process (it attaches a ring, so it chose fences)."""
    _pin(1)
    ring = ipc.Ring.attach(name)
    try:
        while not stop.is_set():
            started = time.perf_counter_ns()
            for _ in range(SPIN_REPORT_LOOPS):
                pass
            rates.put(SPIN_REPORT_LOOPS / (time.perf_counter_ns() - started))
    finally:
        ring.close()


def _spin_rate(rates: Any, seconds: float) -> float:
    """The neighbour's median loop rate over `seconds`."""
    deadline = time.monotonic() + seconds
    samples = []
    while time.monotonic() < deadline:
        samples.append(rates.get(timeout=JOIN_TIMEOUT_S))
    return statistics.median(samples)


def _echo(ping_name: str, pong_name: str) -> None:
    _pin(1)
    ping = ipc.Ring.attach(ping_name)
    pong = ipc.Ring.attach(pong_name)
    try:
        reader = ping.reader("echo")
        writer = pong.writer()
        idle = ipc.BlockingIdleStrategy(reader.doorbell, yields_before_park=0)
        while True:
            frame = reader.read()
            if frame is None:
                idle.idle(0)
                continue
            if frame[0] == 2:
                return
            assert writer.try_write(b"pong", 1)
    finally:
        ping.close()
        pong.close()


# (calls per timed loop, timed loops, seconds of the neighbour's rate, round trips) per size
SIZES = {"smoke": (1_000, 3, 0.2, 100), "quick": (20_000, 7, 1.0, 2_000), "full": (100_000, 15, 3.0, 20_000)}


def measure(mode: str, size: str, report: Any) -> None:
    """In a fresh process with SEQD_STORE_LOAD_FENCES=mode: every figure of that mode."""
    os.environ[ipc.platform.FENCES_ENV] = mode
    _pin(0)
    try:
        ipc.platform.store_load_fences()
    except ipc.platform.PlatformError as error:  # no membarrier here (kernel, seccomp)
        report.put({"mode": mode, "fences": None, "unavailable": str(error)})
        return
    calls, repeats, spin_seconds, rounds = SIZES[size]
    token = f"dpark{os.getpid()}"
    ring = ipc.Ring.create(ipc.segment_name(token, "park"), RING_CAPACITY_BYTES, readers=("reader",))
    ping = ipc.Ring.create(ipc.segment_name(token, "ping"), RING_CAPACITY_BYTES, readers=("echo",))
    pong = ipc.Ring.create(ipc.segment_name(token, "pong"), RING_CAPACITY_BYTES, readers=("parker",))
    try:
        fences = ipc.platform.store_load_fences().kind
        reader = ring.reader("reader")
        writer = ring.writer()
        doorbell = reader.doorbell

        def park() -> None:
            doorbell.park()
            doorbell.ready()
            doorbell.unpark()

        park_ns = _per_call_ns(park, calls, repeats)
        publish_ns = _per_call_ns(writer.publish, calls, repeats)

        stop = CONTEXT.Event()
        rates = CONTEXT.Queue()
        neighbour = CONTEXT.Process(target=_neighbour, args=(ring.name, stop, rates))
        neighbour.start()
        try:
            _spin_rate(rates, spin_seconds / 2)  # warm-up
            alone = _spin_rate(rates, spin_seconds)
            park_busy_ns = _per_call_ns(park, calls, repeats)
            parking = _spin_rate_while(rates, park, spin_seconds)
        finally:
            stop.set()
            neighbour.join(JOIN_TIMEOUT_S)

        echo = CONTEXT.Process(target=_echo, args=(ping.name, pong.name))
        echo.start()
        try:
            ping_writer = ping.writer()
            pong_reader = pong.reader("parker")
            idle = ipc.BlockingIdleStrategy(pong_reader.doorbell, yields_before_park=0)
            started = time.perf_counter_ns()
            for _ in range(rounds):
                assert ping_writer.try_write(b"ping", 1)
                while pong_reader.read() is None:
                    idle.idle(0)
            roundtrip_us = (time.perf_counter_ns() - started) / rounds / 1e3
            while not ping_writer.try_write(b"", 2):
                time.sleep(0.001)
        finally:
            echo.join(JOIN_TIMEOUT_S)
        report.put({
            "mode": mode,
            "fences": fences,
            "park_ns": round(park_ns),
            "park_busy_ns": round(park_busy_ns),
            "neighbour_slowdown": round(alone / parking, 3),
            "publish_ns": round(publish_ns),
            "roundtrip_us": round(roundtrip_us, 1),
            "roundtrip_waits": idle.wakes + idle.timeouts,
        })  # fmt: skip
    finally:
        for each in (ring, ping, pong):
            each.close()
            each.unlink()


def _spin_rate_while(rates: Any, work: Any, seconds: float) -> float:
    """The neighbour's median loop rate while this process calls `work` in a loop."""
    deadline = time.monotonic() + seconds
    samples = []
    while time.monotonic() < deadline:
        for _ in range(256):
            work()
        while not rates.empty():
            samples.append(rates.get())
    return statistics.median(samples) if samples else float("nan")


def run(size: str) -> dict[str, Any]:
    result: dict[str, Any] = {"mode": size, "machine": machine()}
    for mode in MODES:
        report = CONTEXT.Queue()
        process = CONTEXT.Process(target=measure, args=(mode, size, report))
        process.start()
        figures = report.get(timeout=JOIN_TIMEOUT_S)
        process.join(JOIN_TIMEOUT_S)
        for key, value in figures.items():
            if key != "mode":
                result[f"{mode}_{key}"] = value
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="a second per mode: for tests")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = run("smoke" if args.smoke else "quick" if args.quick else "full")
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        for key, value in result.items():
            print(f"{key:34} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
