"""Snapshot files: round trip, corruption detection, fallback, leftovers, retention, forked writer."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from daemon.snapshot_writer import fork_and_write_snapshot, reap_snapshot_writer
from sequencer import snapshot as snapshots
from sequencer.apps.ledger import LEDGER_SCHEMA, Deposit, Ledger, OpenAccount, Transfer
from sequencer.determinism import state_hash
from sequencer.processor import Processor
from sequencer.snapshot import SnapshotError, SnapshotHeader
from tests.fixtures.feeder import Feeder, feed, frame_of, session_id_of

S1 = session_id_of(1, 1)
WAIT_S = 30  # a forked writer of a few accounts finishes in milliseconds; this only stops a hang


def header_for(index: int, body: bytes) -> SnapshotHeader:
    return SnapshotHeader("ledger", 1, index, 2, 1_000 + index, state_hash(body))


def write(directory, index: int, body: bytes = b"body") -> Path:
    return snapshots.write_snapshot(directory, header_for(index, body + bytes([index % 256])),
                                    body + bytes([index % 256]))  # fmt: skip


def test_written_snapshot_reads_back_with_its_header(tmp_path):
    path = snapshots.write_snapshot(tmp_path, header_for(42, b"state"), b"state")
    assert path == snapshots.snapshot_path(tmp_path, 42)
    header, body = snapshots.read_snapshot(path)
    assert header == header_for(42, b"state")
    assert body == b"state"
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("offset", [0, 10, 20, 50, 70, 99, 110])
def test_any_flipped_byte_is_detected(tmp_path, offset):
    path = snapshots.write_snapshot(tmp_path, header_for(7, b"0123456789"), b"0123456789")
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotError):
        snapshots.read_snapshot(path)


def test_truncated_snapshot_is_refused_with_a_clear_message(tmp_path):
    path = write(tmp_path, 3)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(SnapshotError, match="truncated"):
        snapshots.read_snapshot(path)


def test_snapshot_of_a_newer_format_is_refused(tmp_path):
    path = write(tmp_path, 3)
    data = bytearray(path.read_bytes())
    data[8] = snapshots.SNAPSHOT_FORMAT_VERSION + 1
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match="upgrade seqd"):
        snapshots.read_snapshot(path)


def test_newest_valid_snapshot_reports_a_corrupt_newer_one_and_falls_back(tmp_path):
    write(tmp_path, 10)
    newest = write(tmp_path, 20)
    data = bytearray(newest.read_bytes())
    data[-1] ^= 1
    newest.write_bytes(bytes(data))
    reported: list[snapshots.SnapshotInfo] = []
    loaded = snapshots.newest_valid_snapshot(tmp_path, reported.append)
    assert loaded is not None and loaded.header.index == 10
    assert [info.path for info in reported] == [newest]
    assert "CRC" in str(reported[0].error)
    listing = snapshots.list_snapshots(tmp_path)
    assert [(info.index, info.valid) for info in listing] == [(20, False), (10, True)]


def test_no_snapshot_at_all_gives_none(tmp_path):
    assert snapshots.newest_valid_snapshot(tmp_path) is None


def test_partial_tmp_file_is_ignored_and_removed(tmp_path):
    write(tmp_path, 10)
    partial = tmp_path / (snapshots.snapshot_path(tmp_path, 20).name + ".tmp")
    partial.write_bytes(b"SEQDSNAP half a fil")
    assert [info.index for info in snapshots.list_snapshots(tmp_path)] == [10]
    loaded = snapshots.newest_valid_snapshot(tmp_path)
    assert loaded is not None and loaded.header.index == 10
    assert snapshots.remove_partial(tmp_path) == [partial]
    assert not partial.exists()


def test_retention_keeps_the_newest_k_valid_snapshots(tmp_path):
    paths = [write(tmp_path, index) for index in (10, 20, 30, 40)]
    corrupt = paths[-1]
    corrupt.write_bytes(corrupt.read_bytes()[:-3])
    removed = snapshots.retain(tmp_path, keep=2)
    assert sorted(removed) == [paths[0]]
    assert [(i.index, i.valid) for i in snapshots.list_snapshots(tmp_path)] == [
        (40, False), (30, True), (20, True)
    ]
    with pytest.raises(ValueError):
        snapshots.retain(tmp_path, keep=0)


def wait_for_writer(pid: int) -> int:
    deadline = time.monotonic() + WAIT_S
    sleep_s = 0.001
    while True:
        code = reap_snapshot_writer(pid)
        if code is not None:
            return code
        assert time.monotonic() < deadline, "snapshot writer did not finish"
        time.sleep(sleep_s)
        sleep_s = min(sleep_s * 2, 0.05)


def test_forked_writer_writes_the_state_at_the_snapshot_index_while_the_parent_goes_on(tmp_path):
    processor = Processor(Ledger)
    feeder = Feeder(LEDGER_SCHEMA)
    feed(processor, feeder.open_session(S1, client_id=7))
    for request_id, command in enumerate(
        (OpenAccount("a"), OpenAccount("b"), Deposit("a", 50)), start=1
    ):
        feed(processor, feeder.command(S1, request_id, command))
    processor.apply_frame(*frame_of(feeder.snapshot()))
    assert processor.snapshot_requested
    expected_hash = processor.state_hash()
    snapshot_index = processor.applied_index
    pid = fork_and_write_snapshot(tmp_path, processor.snapshot_file_contents)
    processor.snapshot_requested = False
    # The parent keeps applying while the child writes.
    for request_id in range(4, 14):
        feed(processor, feeder.command(S1, request_id, Transfer("a", "b", 1)))
    assert wait_for_writer(pid) == 0
    loaded = snapshots.newest_valid_snapshot(tmp_path)
    assert loaded is not None
    assert loaded.header.index == snapshot_index < processor.applied_index
    assert loaded.header.state_hash == expected_hash == state_hash(loaded.body)
    restored = Processor.restore(Ledger, loaded.body)
    assert restored.app.accounts["b"].balance == 0
    assert processor.app.accounts["b"].balance == 10


def test_forked_writer_that_fails_exits_nonzero(tmp_path):
    def explode():
        raise RuntimeError("encoding failed")

    pid = fork_and_write_snapshot(tmp_path, explode)
    assert wait_for_writer(pid) == 1
    assert snapshots.list_snapshots(tmp_path) == []
