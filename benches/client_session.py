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

The same loop with redis-py against a local `redis-server` (when installed; benches only), one
pipeline of `in_flight` XADDs (64-byte field) at a time, the idiom redis-py offers for
pipelining, with its pure-Python parser and with hiredis (when importable): the client CPU per
request of the library a user would otherwise pick (issue 13). The server keeps no AOF here: the
client's cost is what is measured, not the disk's.

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

from benches import _redis
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


def run_redis(path: str, requests: int, in_flight: int, parser: str) -> tuple[float, float]:
    import redis
    from redis import _parsers

    parser_class = _parsers._HiredisParser if parser == "hiredis" else _parsers._RESP2Parser
    pool = redis.ConnectionPool(connection_class=redis.UnixDomainSocketConnection, path=path,
                                parser_class=parser_class)  # fmt: skip
    client = redis.Redis(connection_pool=pool)
    try:
        client.delete("bench")
        fields = {"p": PAYLOAD}
        started, started_cpu = time.perf_counter(), time.process_time()
        sent = 0
        while sent < requests:
            batch = min(in_flight, requests - sent)
            pipeline = client.pipeline(transaction=False)
            for _ in range(batch):
                pipeline.xadd("bench", fields)  # type: ignore[arg-type]
            pipeline.execute()
            sent += batch
        return _rates(requests, started, started_cpu)
    finally:
        client.close()
        pool.disconnect()


def _redis_runs() -> list[tuple[str, str]]:
    """(name, parser) of the redis-py variants this machine can run; none without redis-server."""
    if not _redis.available():
        return []
    try:
        import redis  # noqa: F401
    except ImportError:
        return []
    runs = [("redis-py", "python")]
    try:
        import hiredis  # noqa: F401
    except ImportError:
        return runs
    return [*runs, ("redis-py+hiredis", "hiredis")]


def _report(name: str, runs: list[tuple[float, float]]) -> None:
    rates, cpu_us = [rate for rate, _ in runs], [cpu for _, cpu in runs]
    print(f"{name:<17} median {statistics.median(rates):>9,.0f} requests/s   "
          f"best {max(rates):>9,.0f}   client CPU median {statistics.median(cpu_us):.2f} "
          f"us/request, best {min(cpu_us):.2f}")


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
    redis_runs = _redis_runs()
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready"
        print(f"python {platform.python_version()}, {os.cpu_count()} cpus, "
              f"load {os.getloadavg()[0]:.1f}, {args.requests} requests, in flight {args.in_flight}")
        for name, run in (("Client", run_blocking), ("AsyncClient", run_async)):
            _report(name, [run(path, args.requests, args.in_flight) for _ in range(args.runs + 1)][1:])
        if not redis_runs:
            print("redis-server or redis-py is not installed: the redis-py comparison is skipped")
            return 0
        with _redis.redis_server(directory, fsync_always=False) as redis_path:
            for name, parser in redis_runs:
                _report(name, [run_redis(redis_path, args.requests, args.in_flight, parser)
                               for _ in range(args.runs + 1)][1:])  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=10)
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
