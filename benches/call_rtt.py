"""Round trip of one synchronous ledger transfer, per idle strategy: the floor under latency.

    python -m benches.call_rtt [--calls 2000] [blocking backoff yield spin]

One client, one request at a time: each call crosses sequencer -> journaller (fdatasync) -> blp ->
sequencer, so p50 minus one fdatasync is what the pipeline's hand-offs cost. On 2 cores `spin`
for three roles starves the machine; it is listed for pinned machines with cores to spare.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

from benches._measure import MEASURE_S_MIN
from daemon.harness import NodeProcess
from daemon.layout import node_roles
from daemon.load import account_name, setup_accounts
from sequencer.apps.ledger import Ledger, Transfer
from sequencer.client import Client

ROLES = node_roles()


PROBE_BYTES = 8 << 20  # the probe file's size: the writes cycle through it
PROBE_SAMPLES_MAX = 200_000  # stops a run on a very fast disk (RAM-backed) by itself


def fdatasync_p50_us(directory: Path, samples: int = 200, seconds_min: float = 0.0) -> tuple[float, float]:
    """(p50 us, seconds measured) of fdatasync after a 4 KiB write, on `directory`'s file system:
    at least `samples` samples and `seconds_min` seconds of fdatasync."""
    path = directory / "probe"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        os.posix_fallocate(fd, 0, PROBE_BYTES)
        timings: list[float] = []
        measured_s = 0.0
        while len(timings) < PROBE_SAMPLES_MAX and (len(timings) < samples or measured_s < seconds_min):
            os.pwrite(fd, b"x" * 4096, len(timings) * 4096 % PROBE_BYTES)
            started = time.perf_counter()
            os.fdatasync(fd)
            timings.append(time.perf_counter() - started)
            measured_s += timings[-1]
    finally:
        os.close(fd)
        path.unlink()
    return sorted(timings)[len(timings) // 2] * 1e6, measured_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benches.call_rtt")
    parser.add_argument("idle", nargs="*", default=["blocking", "backoff", "yield"])
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args(argv)
    directory = Path(tempfile.mkdtemp(prefix="seqd-rtt-", dir="/tmp"))
    try:
        print(f"fdatasync p50 on this disk: {fdatasync_p50_us(directory, seconds_min=MEASURE_S_MIN)[0]:.0f} us")
        for idle in args.idle:
            node_dir = directory / idle
            node_dir.mkdir()
            node = NodeProcess(node_dir, f"rtt{uuid.uuid4().hex[:6]}", {f"roles.{role}": {"idle": idle} for role in ROLES})
            try:
                node.start()
                setup_accounts(node.socket_path, 2)
                with Client(node.socket_path, schema=Ledger.schema) as client:
                    transfer = Transfer(account_name(0), account_name(1), 1)
                    timings = []
                    for _ in range(args.calls):
                        started = time.perf_counter()
                        client.call(transfer)
                        timings.append(time.perf_counter() - started)
                timings.sort()
                count = len(timings)
                print(f"{idle:<9} call p50 {timings[count // 2] * 1e6:6.0f} us   p99 {timings[count * 99 // 100] * 1e6:6.0f} us")
            finally:
                node.stop()
                node.remove_shared_memory()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
