"""How many ledger transfers per second the blp core applies in-process, and the fork pause.

    python benches/processor.py [--transfers 300000] [--runs 5] [--accounts 1000]
    python benches/processor.py --fork-accounts 1000000

Napkin math: at 200k commands/s the core has 5 us per command for decode, dedup, the app, reply
encode, the rolling hash and the event. The records are encoded up front (the ring hands the blp
ready bytes), so this measures the core alone: no ring, no egress write.

The fork figure is the parent's pause while `os.fork()` copies the page tables of a blp holding
`--fork-accounts` accounts; the child writes the snapshot while the parent goes on.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time

from daemon.snapshot_writer import fork_and_write_snapshot
from sequencer import snapshot as snapshots
from sequencer.apps.ledger import LEDGER_SCHEMA, Deposit, Ledger, OpenAccount, Transfer
from sequencer.processor import Processor
from sequencer.record import (
    FRAME_HEADER_BYTES,
    RecordType,
    encode_command,
    encode_record,
    encode_session_open,
    frame_type,
)

SESSION_ID = 1 << 56 | 1
CLIENT_ID = 7


class Feeder:
    """Records of one session's client. `acked_lag`: how far its acknowledgement runs behind
    (0: each command acks the one before it; a client with N in flight lags ~N-1, so the blp
    keeps ~N saved replies and drops the oldest with each command)."""

    def __init__(self, acked_lag: int = 0) -> None:
        self.index = 0
        self.request_id = 0
        self.acked_lag = acked_lag

    def record(self, record_type: int, version: int, payload: bytes, session_id: int = SESSION_ID,
               request_id: int = 0) -> tuple[int, memoryview]:  # fmt: skip
        data = self.encoded(record_type, version, payload, session_id, request_id)
        length = 48 + len(payload)
        return frame_type(record_type, version), memoryview(data)[FRAME_HEADER_BYTES:length]

    def encoded(self, record_type: int, version: int, payload: bytes, session_id: int = SESSION_ID,
                request_id: int = 0) -> bytes:  # fmt: skip
        """The next whole record, as the journal holds it (the ring's frame is its tail)."""
        self.index += 1
        return encode_record(record_type, version, self.index, 1, 1_000_000 + self.index,
                             session_id, request_id, payload)  # fmt: skip

    def command(self, command: object) -> tuple[int, memoryview]:
        return self.record(*self._command(command))

    def command_record(self, command: object) -> bytes:
        """The next COMMAND as a whole record (a replay's run is these back to back)."""
        return self.encoded(*self._command(command))

    def _command(self, command: object) -> tuple[int, int, bytes, int, int]:
        self.request_id += 1
        version, data = LEDGER_SCHEMA.encode_command(command)
        return RecordType.COMMAND, version, encode_command(max(0, self.request_id - 1 - self.acked_lag), data), SESSION_ID, self.request_id


def setup(accounts: int, acked_lag: int = 0) -> tuple[Processor, Feeder]:
    processor = Processor(Ledger)
    feeder = Feeder(acked_lag)
    processor.apply_frame(*feeder.record(RecordType.SESSION_OPEN, 1,
                                         encode_session_open(CLIENT_ID, "n1")))  # fmt: skip
    for n in range(accounts):
        processor.apply_frame(*feeder.command(OpenAccount(f"acct-{n}")))
        processor.apply_frame(*feeder.command(Deposit(f"acct-{n}", 1_000_000_000)))
        processor.drain_outputs()
    return processor, feeder


def bench_transfers(transfers: int, runs: int, accounts: int) -> list[float]:
    rates = []
    for _ in range(runs + 1):  # the first run warms up and is discarded
        processor, feeder = setup(accounts)
        frames = [
            feeder.command(Transfer(f"acct-{n % accounts}", f"acct-{(n * 7 + 1) % accounts}", 1))
            for n in range(transfers)
        ]
        apply_frame = processor.apply_frame
        drain = processor.drain_outputs
        gc.collect()
        start = time.perf_counter()
        for n, (kind, view) in enumerate(frames):
            apply_frame(kind, view)
            if n & 63 == 63:
                drain()  # the role drains per polled batch
        elapsed = time.perf_counter() - start
        processor.app.invariants()  # type: ignore[attr-defined]
        rates.append(transfers / elapsed)
    return rates[1:]


def bench_fork(accounts: int) -> None:
    processor, _ = setup(0)
    ledger = processor.app
    from sequencer.apps.ledger import AccountState

    for n in range(accounts):
        ledger.accounts[f"acct-{n}"] = AccountState(n, 0, False)  # type: ignore[attr-defined]
    import psutil

    rss_mib = psutil.Process().memory_info().rss / 2**20
    pauses = []
    with tempfile.TemporaryDirectory() as directory:
        for _ in range(3):
            start = time.perf_counter()
            pid = fork_and_write_snapshot(directory, processor.snapshot_file_contents)
            pauses.append(time.perf_counter() - start)
            child_start = time.perf_counter()
            _, status = os.waitpid(pid, 0)
            child_s = time.perf_counter() - child_start
            assert os.waitstatus_to_exitcode(status) == 0
        size_mib = os.path.getsize(snapshots.snapshot_path(directory, processor.applied_index)) / 2**20
    print(f"fork pause with {accounts} accounts (RSS {rss_mib:.0f} MiB): "
          + ", ".join(f"{p * 1e3:.1f} ms" for p in pauses)
          + f"; child encode+write+fsync {child_s:.2f} s, file {size_mib:.1f} MiB")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--transfers", type=int, default=300_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument("--fork-accounts", type=int, default=0)
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus")
    if args.fork_accounts:
        bench_fork(args.fork_accounts)
        return
    rates = bench_transfers(args.transfers, args.runs, args.accounts)
    print(f"ledger transfers applied: median {statistics.median(rates):,.0f}/s, "
          f"min {min(rates):,.0f}/s, max {max(rates):,.0f}/s over {len(rates)} runs "
          f"of {args.transfers} (each: decode, dedup, apply, reply, event, rolling hash)")  # fmt: skip


if __name__ == "__main__":
    main()
