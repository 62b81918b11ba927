"""A writer killed with SIGKILL mid-append loses nothing it had synced, and the journal reopens.

The child appends batches of varying size into small segments (so rolls happen) and prints each
durable index after `sync` returns; the parent kills it at an arbitrary moment, reopens, checks
every synced record byte for byte, and lets the next child continue the same journal.
"""

from __future__ import annotations

import select
import signal
import subprocess
import sys
from pathlib import Path

from sequencer.journal import Journal, read_records
from tests.test_journal import SMALL_SEGMENT_BYTES, record_for

CHILD = f"""
import sys
from sequencer.journal import Journal
from tests.test_journal import make_batch
journal = Journal.open(sys.argv[1], segment_bytes={SMALL_SEGMENT_BYTES})
for round_ in range(100_000):  # bounded; the parent kills us long before
    size = 1 + (round_ * 7 + journal.last_index) % 23
    journal.append(make_batch(journal.last_index + 1, size))
    if round_ % 3 != 2:  # leave some appends unsynced when the kill lands
        print(journal.sync(), flush=True)
"""

SYNCS_BEFORE_KILL = (5, 17, 40)
LINE_TIMEOUT_S = 30.0  # a child that prints nothing for this long is stuck: fail, don't hang


def run_child_until_killed(directory: Path, syncs: int) -> int:
    """Start a writer, kill it with SIGKILL after `syncs` reported syncs; the last durable index."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(directory)],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parent.parent,
    )
    durable = 0
    try:
        assert child.stdout is not None
        seen = 0
        while seen < syncs:
            ready, _, _ = select.select([child.stdout], [], [], LINE_TIMEOUT_S)
            assert ready, f"writer printed nothing for {LINE_TIMEOUT_S} s"
            line = child.stdout.readline()
            assert line, f"writer exited early with {child.wait(5)}"
            durable = int(line)
            seen += 1
        child.send_signal(signal.SIGKILL)
        # Lines already in the pipe were synced before the kill too.
        for line in child.stdout.read().splitlines():
            durable = int(line)
    finally:
        child.kill()
        child.wait(10)
        if child.stdout is not None:
            child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    return durable


def test_every_synced_record_survives_a_sigkill_of_the_writer(tmp_dir):
    directory = tmp_dir / "journal"
    for syncs in SYNCS_BEFORE_KILL:
        durable = run_child_until_killed(directory, syncs)
        with Journal.open(directory, segment_bytes=SMALL_SEGMENT_BYTES) as journal:
            assert journal.last_index >= durable
            last = journal.last_index
        records = list(read_records(directory))
        assert [r.index for r in records] == list(range(1, last + 1))
        assert all(bytes(r.raw) == record_for(r.index) for r in records)
        assert durable > 0
