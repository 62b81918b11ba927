"""Journal throughput: append, group-commit fdatasync, and replay, with raw baselines.

    python -m benches.journal [--quick] [--json] [--dir /path/on/the/disk/to/test]

Napkin math. Records of ~100 bytes (48 header + 52 payload, 104 aligned). At 500k records/s the
journal writes ~52 MB/s, far below a disk's sequential bandwidth; the cost is Python per record
(append validates each header: ~0.3 us) and the fdatasync (~0.1-2 ms on a VM disk), so a sync
per record caps a node at a few thousand records/s and group commit is what makes throughput:
at 1 ms per sync and 500k records/s one sync covers 500 records. Replay must beat the blp
(~200k commands/s) so recovery is never the bottleneck: target >= 500k records/s, i.e. < 2 us per
record for the batch CRC, one `unpack_from` and two memoryview slices.

Baselines in the same run: `raw_fdatasync_per_s` (one 104-byte `pwrite` + `fdatasync` on a
preallocated file, nothing else) bounds `sync_per_s`; `baseline_unpack_records_per_s` (a bare
`unpack_from` loop over the same bytes) bounds replay.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sequencer.journal import Journal, read_records
from sequencer.record import RECORD_HEADER, RecordType, encode_command, encode_record

PAYLOAD = encode_command(0, b"x" * 44)  # 52 bytes: a 100-byte record, 104 aligned
BATCH_RECORDS = 500  # ~52 KB: what a journaller pass takes at ~500k records/s and 1 ms per sync


def make_batch(first_index: int, count: int) -> bytes:
    return b"".join(
        encode_record(RecordType.COMMAND, 1, i, 1, i, 1, i, PAYLOAD)
        for i in range(first_index, first_index + count)
    )


def bench_append(directory: Path, records: int) -> float:
    """Records/s appended in batches of BATCH_RECORDS, one sync at the end (page cache speed)."""
    batches = [make_batch(first, BATCH_RECORDS) for first in range(1, records + 1, BATCH_RECORDS)]
    with Journal.open(directory) as journal:
        started = time.perf_counter()
        for batch in batches:
            journal.append(batch)
        elapsed = time.perf_counter() - started
        journal.sync()
    return len(batches) * BATCH_RECORDS / elapsed


def bench_sync(directory: Path, syncs: int, batch_records: int) -> tuple[float, float, list[float]]:
    """(syncs/s, records/s, per-sync latencies in us) for append of `batch_records` + sync."""
    with Journal.open(directory) as journal:
        first = journal.last_index + 1
        batches = [make_batch(first + i * batch_records, batch_records) for i in range(syncs)]
        latencies = []
        started = time.perf_counter()
        for batch in batches:
            begin = time.perf_counter()
            journal.append(batch)
            journal.sync()
            latencies.append((time.perf_counter() - begin) * 1e6)
        elapsed = time.perf_counter() - started
    return syncs / elapsed, syncs * batch_records / elapsed, latencies


def bench_raw_fdatasync(directory: Path, syncs: int) -> float:
    path = directory / "raw.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, syncs * 104 + 4096)
        os.fsync(fd)
        data = make_batch(1, 1)
        started = time.perf_counter()
        for i in range(syncs):
            os.pwrite(fd, data, i * len(data))
            os.fdatasync(fd)
        elapsed = time.perf_counter() - started
    finally:
        os.close(fd)
        path.unlink()
    return syncs / elapsed


def bench_replay(directory: Path) -> tuple[float, int]:
    started = time.perf_counter()
    count = 0
    for _record in read_records(directory):
        count += 1
    return count / (time.perf_counter() - started), count


def bench_unpack_baseline(records: int) -> float:
    """The bare walk, inlined on purpose (not `record.walk_records`): the ceiling of any replay in
    Python, which the walker's cost is read against."""
    data = memoryview(make_batch(1, records))
    unpack_from = RECORD_HEADER.unpack_from
    started = time.perf_counter()
    offset = 0
    end = len(data)
    while offset < end:
        offset += (unpack_from(data, offset)[0] + 7) & -8
    return records / (time.perf_counter() - started)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller runs (CI, a shared machine)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to write (default: a temp dir in /tmp)"
    )
    args = parser.parse_args(argv)
    records = 200_000 if args.quick else 1_000_000
    syncs = 200 if args.quick else 1000
    runs = 3 if args.quick else 5

    appends, replays, group = [], [], []
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="seqd-bench-journal-") as name:
        root = Path(name)
        bench_append(root / "warmup", 20_000)  # warm-up, discarded
        for run in range(runs):
            directory = root / f"run{run}"
            appends.append(bench_append(directory, records))
            replay_rate, replayed = bench_replay(directory)
            assert replayed == records // BATCH_RECORDS * BATCH_RECORDS, replayed
            replays.append(replay_rate)
        sync_rate, _, latencies = bench_sync(root / "sync", syncs, 1)
        _, group_rate, group_latencies = bench_sync(root / "group", max(syncs // 4, 20), 100)
        group.append(group_rate)
        raw_sync_rate = bench_raw_fdatasync(root, syncs)
        baseline = statistics.median(bench_unpack_baseline(records) for _ in range(runs))

    results = {
        "record_bytes": 104,
        "batch_records": BATCH_RECORDS,
        "append_records_per_s": round(statistics.median(appends)),
        "replay_records_per_s": round(statistics.median(replays)),
        "baseline_unpack_records_per_s": round(baseline),
        "sync_per_s": round(sync_rate),
        "sync_latency_us_p50": round(percentile(latencies, 0.5), 1),
        "sync_latency_us_p99": round(percentile(latencies, 0.99), 1),
        "raw_fdatasync_per_s": round(raw_sync_rate),
        "group_commit_100_records_per_s": round(statistics.median(group)),
        "group_commit_100_latency_us_p50": round(percentile(group_latencies, 0.5), 1),
        "runs": runs,
        "records_per_run": records,
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
    }
    if args.json:
        print(json.dumps(results))
    else:
        for key, value in results.items():
            print(f"{key:36} {value:>14,}" if isinstance(value, int) else f"{key:36} {value:>14}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
