"""The client library's own cost per request: submit, write, read, reply dispatch, result.

    python -m benches.client_session [--requests 100000] [--runs 5] [--in-flight 64]

One client against `benches._echo_server` (a uvloop server that answers every COMMAND at once and
does nothing else), so the client process is the bottleneck and requests/s measures its hot path:
`submit` (encode, window check, in-flight table, frame into the send buffer) and the reply side
(read, decode, take from the in-flight table, advance the acked id, wake the waiter). Commands are
raw bytes with no schema, so no app encoding is counted. Closed loop: `in_flight` requests
outstanding, the oldest awaited before the next is submitted. Blocking `Client` and `AsyncClient`
under uvloop. The first run is a warm-up and is discarded; the median and best of the rest print,
and the client process's CPU time per request (`time.process_time`), which a loaded machine
disturbs less than the wall-clock rate.

Napkin math: at ~2 us of Python per request on each side, one client process tops out near 250 k
requests/s; the echo server's share is about the same, so on 2 shared cores expect ~100 k/s.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvloop

from sequencer.client import AsyncClient, Client

PAYLOAD = b"c" * 64


def run_blocking(path: str, requests: int, in_flight: int) -> tuple[float, float]:
    with Client(path, in_flight_max=in_flight) as client:
        window: collections.deque = collections.deque()
        started, started_cpu = time.perf_counter(), time.process_time()
        for _ in range(requests):
            if len(window) >= in_flight:
                window.popleft().result()
            window.append(client.submit(PAYLOAD))
        while window:
            window.popleft().result()
        return _rates(requests, started, started_cpu)


def _rates(requests: int, started: float, started_cpu: float) -> tuple[float, float]:
    """Requests per second, and client CPU microseconds per request."""
    elapsed, cpu = time.perf_counter() - started, time.process_time() - started_cpu
    return requests / elapsed, cpu * 1e6 / requests


async def _run_async(path: str, requests: int, in_flight: int) -> tuple[float, float]:
    async with AsyncClient(path, in_flight_max=in_flight) as client:
        window: collections.deque = collections.deque()
        started, started_cpu = time.perf_counter(), time.process_time()
        for _ in range(requests):
            if len(window) >= in_flight:
                await window.popleft()
            window.append(await client.submit(PAYLOAD))
        while window:
            await window.popleft()
        return _rates(requests, started, started_cpu)


def run_async(path: str, requests: int, in_flight: int) -> tuple[float, float]:
    return uvloop.run(_run_async(path, requests, in_flight))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benches.client_session")
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--in-flight", type=int, default=64)
    args = parser.parse_args(argv)
    directory = Path(tempfile.mkdtemp(prefix="seqd-client-bench-", dir="/tmp"))
    path = str(directory / "echo.sock")
    server = subprocess.Popen(
        [sys.executable, "-m", "benches._echo_server", path], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready"
        print(f"python {platform.python_version()}, {os.cpu_count()} cpus, "
              f"load {os.getloadavg()[0]:.1f}, {args.requests} requests, in flight {args.in_flight}")
        for name, run in (("Client", run_blocking), ("AsyncClient", run_async)):
            runs = [run(path, args.requests, args.in_flight) for _ in range(args.runs + 1)][1:]
            rates, cpu_us = [rate for rate, _ in runs], [cpu for _, cpu in runs]
            print(f"{name:<12} median {statistics.median(rates):>9,.0f} requests/s   "
                  f"best {max(rates):>9,.0f}   client CPU median {statistics.median(cpu_us):.2f} "
                  f"us/request, best {min(cpu_us):.2f}")
    finally:
        server.terminate()
        server.wait(timeout=10)
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
