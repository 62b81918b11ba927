"""Stress: hand-offs to a reader that is parking, counting the wakes by timeout that found work.

    python -m benches.doorbell --quick --json      # 3 s of hand-offs
    python -m benches.doorbell                     # 300 s: millions of hand-offs
    python -m benches.doorbell --waiter loop       # the reader in an event loop, on a FIFO

The park/wake protocol (`ipc.doorbell`) is correct if no reader ever sleeps past published work
without a ring. A miss is silent except for time: the reader sleeps until its timeout, then finds
the work. So this bench makes hand-offs land while the reader is parking, millions of them, and
counts `doorbell_timeout_wakes_with_work` (`BlockingIdleStrategy.timeouts_with_work`): it must be 0.

Shape: two rings between two processes on two CPUs. The *parker* publishes a ping, spins a random
0..`PAUSE_NS_MAX` ns, then reads the pong ring with the blocking idle strategy, parking on the
first empty poll. The *echo* busy-polls the ping ring, spins its own random pause, and publishes
the pong: the ringer. Both take ~1-2 us of their own between the ping and their park or pong, so
the two pauses put the pong's publish anywhere from a few microseconds before the park to a few
after: before the flag, between the flag and the re-check (the race a missing fence loses), and
during the wait. The parker publishes nothing more until its pong arrives, so a missed ring is
never rescued by a later publish: it costs the whole timeout and is counted.

`--waiter` chooses the reader's doorbell and wait: `idle` (the semaphore under the blocking idle
strategy: the blp, the journaller), `idle_fifo` (the same strategy on the FIFO doorbell,
`ipc.doorbell_fifo`) or `loop` (the sequencer's shape: a uvloop event loop whose `LoopWaiter`
parks once and watches the FIFO; each hand-off awaits the pong with the same timeout) or `limit`
(the blp's shape: the semaphore under the blocking strategy, the pong reader bounded by a limit
counter that the echo advances after each pong and then rings through `Ring.doorbell`; the
publish itself does not ring such a reader, so the limit's ring is the only one).

`TIMEOUT_MS` is long so that only a missed ring is counted: an echo preempted for a moment
between its publish and its ring delays the ring, but not by half a second.

Napkin math: a hand-off costs the parker a poll, a park (a membarrier, ~1 us) and often a futex
wait and wake (a context switch each, ~10-30 us on a VM), so ~20-50k hand-offs/s on two free
cores; on the 2-core VM shared with other work (load average ~10) it measured 3-4k/s, so the
full run's 300 s is 1 M hand-offs there and several million on a quiet machine. Measured there,
300 s each: the protocol without fences (seqd before this bench) 16 timeout wakes with work in
859k hand-offs; membarrier fences 0 in 1.01 M; lock fences 0 in 1.32 M.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import sys
import time
from typing import Any

import ipc
from benches.ring import machine
from ipc.doorbell_fifo import LoopWaiter
from ipc.platform import store_load_fences

CONTEXT = multiprocessing.get_context("fork")
JOIN_TIMEOUT_S = 60.0  # beyond the run's own length: a run that takes longer is hung
PAUSE_NS_MAX = 4_000  # each side's random pause (see the module docstring)
TIMEOUT_MS = 500.0  # the parker's wait: a miss costs this, a late ring never does
SPINS_BEFORE_YIELD = 256  # the echo yields now and then, so a shared machine keeps moving
DATA = 1
STOP = 2
RING_CAPACITY_BYTES = 1 << 16
PAYLOAD = b"hand-off"
LIMIT = "limit"  # the pong reader's limit counter (waiter "limit")
WAITERS = ("idle", "idle_fifo", "loop", "limit")


def _pin(cpu: int | None) -> None:
    if cpu is not None and cpu in ipc.available_cpus():
        ipc.pin(cpu)


def _cpus() -> tuple[int | None, int | None]:
    cpus = ipc.available_cpus()
    return (cpus[0], cpus[1]) if len(cpus) >= 2 else (None, None)


def parker(
    ping_name: str,
    pong_name: str,
    handoffs_max: int,
    seconds: float,
    seed: int,
    cpu: int | None,
    report: Any,
    waiter: str = "idle",
) -> None:
    """Ping, pause, then park until the pong; repeat for `seconds` or `handoffs_max` hand-offs."""
    _pin(cpu)
    ping_ring = ipc.Ring.attach(ping_name)
    pong_ring = ipc.Ring.attach(pong_name)
    limit = ipc.Counters.attach(_limit_name(pong_name)) if waiter == "limit" else None
    try:
        writer = ping_ring.writer()
        reader = pong_ring.reader("parker", limit=None if limit is None else limit[LIMIT])
        if waiter == "loop":
            report.send(_loop_parker(writer, reader, handoffs_max, seconds, seed))
            return
        idle = ipc.BlockingIdleStrategy(reader.doorbell, TIMEOUT_MS, yields_before_park=0)
        read = reader.read
        pauses = random.Random(seed)
        clock = time.perf_counter_ns
        early = 0  # parks that found the pong at the re-check and did not wait
        handoffs = 0
        started = time.perf_counter()
        deadline = started + seconds
        while handoffs < handoffs_max:
            if not handoffs & 0xFF and time.perf_counter() >= deadline:
                break
            assert writer.try_write(PAYLOAD, DATA)  # one in flight: the ring is never full
            until = clock() + pauses.randrange(PAUSE_NS_MAX)
            while clock() < until:
                pass
            while read() is None:
                waits = idle.wakes + idle.timeouts
                idle.idle(0)
                if idle.wakes + idle.timeouts == waits:
                    early += 1
            handoffs += 1
        elapsed = time.perf_counter() - started
        while not writer.try_write(b"", STOP):
            time.sleep(0.001)
        report.send({
            "handoffs": handoffs,
            "seconds": elapsed,
            "waits": idle.wakes + idle.timeouts,
            "wakes": idle.wakes,
            "early": early,
            "timeouts": idle.timeouts,
            "timeouts_with_work": idle.timeouts_with_work,
            "fences": store_load_fences().kind,
        })  # fmt: skip
    finally:
        ping_ring.close()
        pong_ring.close()
        if limit is not None:
            limit.close()


def _loop_parker(writer: Any, reader: Any, handoffs_max: int, seconds: float, seed: int) -> dict[str, Any]:
    """`parker` with the reader in a uvloop event loop (the sequencer's shape): parked once by a
    `LoopWaiter`, each pong awaited with the same timeout, and counted as in `parker`."""
    import uvloop

    loop = uvloop.new_event_loop()
    waiting: list[asyncio.Future[bool]] = []

    def on_ready() -> None:
        if waiting and not waiting[0].done() and reader.ready():
            waiting[0].set_result(True)

    def on_timeout(future: asyncio.Future[bool]) -> None:
        if not future.done():
            future.set_result(False)

    loop_waiter = LoopWaiter(loop, reader.doorbell, on_ready, timeout_ms=0)  # the ring alone: no safety net
    counts = {"waits": 0, "timeouts": 0, "timeouts_with_work": 0, "early": 0}

    async def run() -> int:
        loop_waiter.start()
        read = reader.read
        pauses = random.Random(seed)
        clock = time.perf_counter_ns
        handoffs = 0
        deadline = time.perf_counter() + seconds
        while handoffs < handoffs_max:
            if not handoffs & 0xFF and time.perf_counter() >= deadline:
                break
            assert writer.try_write(PAYLOAD, DATA)
            until = clock() + pauses.randrange(PAUSE_NS_MAX)
            while clock() < until:
                pass
            if read() is not None:
                counts["early"] += 1
            else:
                while read() is None:
                    future = loop.create_future()
                    waiting[:] = [future]
                    timer = loop.call_later(TIMEOUT_MS / 1000, on_timeout, future)
                    counts["waits"] += 1
                    if not await future:
                        counts["timeouts"] += 1
                        if reader.ready():
                            counts["timeouts_with_work"] += 1
                    timer.cancel()
            handoffs += 1
        loop_waiter.stop()
        return handoffs

    started = time.perf_counter()
    try:
        handoffs = loop.run_until_complete(run())
    finally:
        loop.close()
    elapsed = time.perf_counter() - started
    while not writer.try_write(b"", STOP):
        time.sleep(0.001)
    return {"handoffs": handoffs, "seconds": elapsed, "wakes": loop_waiter.wakes,
            "fences": store_load_fences().kind, **counts}  # fmt: skip


def _limit_name(pong_name: str) -> str:
    return f"{pong_name}.limit"


def echo(ping_name: str, pong_name: str, seed: int, cpu: int | None, waiter: str = "idle") -> None:
    """Busy-poll pings; answer each with a pong after a random pause (the ringer)."""
    _pin(cpu)
    ping_ring = ipc.Ring.attach(ping_name)
    pong_ring = ipc.Ring.attach(pong_name)
    limit = ipc.Counters.attach(_limit_name(pong_name)) if waiter == "limit" else None
    try:
        reader = ping_ring.reader("echo")
        writer = pong_ring.writer()
        if limit is not None:  # the blp's shape: the journaller advances its limit, then rings
            limit_counter = limit[LIMIT]
            limit_bell = pong_ring.doorbell("parker")
        pauses = random.Random(seed)
        clock = time.perf_counter_ns
        read = reader.read
        empty = 0
        while True:
            frame = read()
            if frame is None:
                empty += 1
                if empty >= SPINS_BEFORE_YIELD:
                    empty = 0
                    os.sched_yield()
                continue
            if frame[0] == STOP:
                return
            until = clock() + pauses.randrange(PAUSE_NS_MAX)
            while clock() < until:
                pass
            assert writer.try_write(PAYLOAD, DATA)
            if limit is not None:
                limit_counter.set(writer.published_position)
                limit_bell.ring()
    finally:
        ping_ring.close()
        pong_ring.close()
        if limit is not None:
            limit_bell.close()
            limit.close()


def stress(
    handoffs_max: int, seconds: float, token: str | None = None, seed: int = 1, waiter: str = "idle"
) -> dict[str, Any]:
    """Run the parker and the echo in their own processes; return the parker's counts.

    Args:
        handoffs_max: stop after this many hand-offs (a test's bound) ...
        seconds: ... or after this long (the bench's).
        token: a unique part for the ring names (tests pass theirs, so leaks are found).
        seed: the pauses (the echo's; the parker's from `seed + 1`).
        waiter: one of WAITERS (module docstring).
    """
    assert waiter in WAITERS, waiter
    node = token or f"dbell{os.getpid()}"
    ping = ipc.Ring.create(ipc.segment_name(node, "ping"), RING_CAPACITY_BYTES, readers=("echo",))
    pong = ipc.Ring.create(ipc.segment_name(node, "pong"), RING_CAPACITY_BYTES, readers=("parker",),
                           pollable=("parker",) if waiter in ("idle_fifo", "loop") else ())  # fmt: skip
    limit = ipc.Counters.create(_limit_name(pong.name), [LIMIT]) if waiter == "limit" else None
    processes: list[Any] = []
    try:
        parker_cpu, echo_cpu = _cpus()
        receiver, sender = CONTEXT.Pipe(duplex=False)
        processes = [
            CONTEXT.Process(target=echo, args=(ping.name, pong.name, seed, echo_cpu, waiter)),
            CONTEXT.Process(
                target=parker,
                args=(ping.name, pong.name, handoffs_max, seconds, seed + 1, parker_cpu, sender, waiter),
            ),
        ]
        for process in processes:
            process.start()
        if not receiver.poll(seconds + JOIN_TIMEOUT_S):
            raise TimeoutError(
                f"the doorbell stress run did not report within {seconds + JOIN_TIMEOUT_S:.0f} s"
            )
        result: dict[str, Any] = receiver.recv()
        for process in processes:
            process.join(JOIN_TIMEOUT_S)
            if process.exitcode != 0:
                raise RuntimeError(f"{process.name} exited with {process.exitcode}")
        return result
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
            process.join(5)
        for ring in (ping, pong):
            ring.close()
            ring.unlink()
        if limit is not None:
            limit.close()
            limit.unlink()


def run(quick: bool, seconds: float | None = None, waiter: str = "idle") -> dict[str, Any]:
    measured_s = seconds if seconds is not None else (3.0 if quick else 300.0)
    counts = stress(handoffs_max=1 << 62, seconds=measured_s, waiter=waiter)
    return {
        "doorbell_timeout_wakes_with_work": counts["timeouts_with_work"],
        "doorbell_handoffs": counts["handoffs"],
        "doorbell_handoffs_per_s": round(counts["handoffs"] / counts["seconds"]),
        "doorbell_waits": counts["waits"],
        "doorbell_wakes": counts["wakes"],
        "doorbell_parks_without_wait": counts["early"],
        "doorbell_timeouts": counts["timeouts"],
        "doorbell_fences": counts["fences"],
        "doorbell_waiter": waiter,
        "doorbell_seconds": round(counts["seconds"], 2),
        "mode": "quick" if quick else "full",
        "machine": machine(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 s of hand-offs instead of 300 s")
    parser.add_argument("--seconds", type=float, help="how long to run (overrides --quick)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    parser.add_argument("--waiter", choices=WAITERS, default="idle", help="the reader's doorbell and wait")
    args = parser.parse_args(argv)
    result = run(args.quick, args.seconds, args.waiter)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        for key, value in result.items():
            print(f"{key:34} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
