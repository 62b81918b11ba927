"""Recovery (`sequencer.recovery`): a snapshot, then the journal after it, is the state a replay
from genesis builds; the earliest start survives retention; the oldest retained snapshot is the
one retention keeps the journal after."""

from __future__ import annotations

from pathlib import Path

import pytest

from sequencer import snapshot as snapshots
from sequencer.apps.ledger import Deposit, Ledger, OpenAccount, Transfer
from sequencer.journal import Journal
from sequencer.processor import Processor
from sequencer.record import RecordType, encode_command, encode_record, encode_session_open
from sequencer.recovery import RecoveryError, earliest_start, recover

RECORDS = 400
SNAPSHOT_AT = (150, 300)
SEGMENT_BYTES = 8192  # several segments, so retention can delete some


def ledger_records() -> list[bytes]:
    records = [encode_record(RecordType.SESSION_OPEN, 1, 1, 1, 1, 5, 0, encode_session_open(9, "n1"))]
    commands = [OpenAccount("a"), OpenAccount("b"), Deposit("a", 10_000)]
    commands += [Transfer("a", "b", 1 + number % 7) for number in range(RECORDS - 4)]
    for index, command in enumerate(commands, start=2):
        version, payload = Ledger.schema.encode_command(command)
        records.append(encode_record(RecordType.COMMAND, version, index, 1, index, 5, index,
                                     encode_command(index - 1, payload)))  # fmt: skip
    return records


@pytest.fixture
def node_files(tmp_path: Path) -> tuple[Path, Path, Processor[Ledger]]:
    """A journal of RECORDS ledger records and snapshots at SNAPSHOT_AT, as a node leaves them;
    and the processor a record-by-record replay from genesis built."""
    journal_dir, snapshot_dir = tmp_path / "journal", tmp_path / "snapshots"
    snapshot_dir.mkdir()
    records = ledger_records()
    genesis = Processor(Ledger)
    with Journal.open(journal_dir, segment_bytes=SEGMENT_BYTES) as journal:
        for start in range(0, RECORDS, 25):
            journal.append(b"".join(records[start : start + 25]))
        journal.sync()
    for index, record in enumerate(records, start=1):
        genesis.apply_records(record)
        genesis.drain_outputs()
        if index in SNAPSHOT_AT:
            snapshots.write_snapshot(snapshot_dir, *genesis.snapshot_file_contents())
    return journal_dir, snapshot_dir, genesis


def test_snapshot_plus_the_journal_after_it_is_the_state_a_replay_from_genesis_builds(node_files):
    journal_dir, snapshot_dir, genesis = node_files
    progress: list[int] = []
    found = snapshots.newest_valid_snapshot(snapshot_dir)
    assert found is not None and found.header.index == SNAPSHOT_AT[-1]
    recovered = recover(Ledger, journal_dir, found, RECORDS, progress=progress.append)
    assert recovered.snapshot is found
    assert recovered.replayed == RECORDS - SNAPSHOT_AT[-1]
    assert progress[-1] == recovered.replayed and progress == sorted(progress)
    processor = recovered.processor
    assert processor.applied_index == genesis.applied_index == RECORDS
    assert processor.state_hash() == genesis.state_hash()
    assert processor.rolling_hash == genesis.rolling_hash
    from_genesis = recover(Ledger, journal_dir, None).processor
    assert from_genesis.state_hash() == genesis.state_hash()


def test_after_each_sees_every_replayed_record_in_order_with_its_rolling_hash(node_files):
    journal_dir, _snapshot_dir, _genesis = node_files
    reference = Processor(Ledger)
    expected = []
    for record in ledger_records():
        reference.apply_records(record)
        expected.append((reference.applied_index, reference.rolling_hash))
    seen: list[tuple[int, int]] = []
    recover(Ledger, journal_dir, None, 120,
            after_each=lambda processor: seen.append((processor.applied_index, processor.rolling_hash)))  # fmt: skip
    assert seen == expected[:120]


def test_recover_to_an_index_at_or_before_the_snapshot_replays_nothing(node_files):
    journal_dir, snapshot_dir, _genesis = node_files
    found = snapshots.newest_valid_snapshot(snapshot_dir)
    recovered = recover(Ledger, journal_dir, found, SNAPSHOT_AT[-1])
    assert recovered.replayed == 0 and recovered.processor.applied_index == SNAPSHOT_AT[-1]


def test_earliest_start_is_genesis_until_retention_then_the_oldest_snapshot_covering_the_journal(node_files):
    journal_dir, snapshot_dir, genesis = node_files
    assert earliest_start(snapshot_dir, journal_dir) is None
    with Journal.open(journal_dir, segment_bytes=SEGMENT_BYTES) as journal:
        assert journal.delete_segments_before(snapshots.oldest_valid_index(snapshot_dir) + 1)
        first_index = journal.first_index
    assert 1 < first_index <= SNAPSHOT_AT[0] + 1
    start = earliest_start(snapshot_dir, journal_dir)
    assert start is not None and start.header.index == SNAPSHOT_AT[0]
    assert recover(Ledger, journal_dir, start).processor.state_hash() == genesis.state_hash()
    for info in snapshots.list_snapshots(snapshot_dir):
        if info.index == SNAPSHOT_AT[0]:
            info.path.unlink()
    start = earliest_start(snapshot_dir, journal_dir)
    assert start is not None and start.header.index == SNAPSHOT_AT[1]
    for info in snapshots.list_snapshots(snapshot_dir):
        info.path.unlink()
    with pytest.raises(RecoveryError, match=f"starts at index {first_index}"):
        earliest_start(snapshot_dir, journal_dir)


def test_oldest_valid_index_skips_invalid_snapshots_and_is_zero_without_one(node_files):
    _journal_dir, snapshot_dir, _genesis = node_files
    assert snapshots.oldest_valid_index(snapshot_dir) == SNAPSHOT_AT[0]
    oldest = snapshots.snapshot_path(snapshot_dir, SNAPSHOT_AT[0])
    data = bytearray(oldest.read_bytes())
    data[-1] ^= 0xFF  # the body's CRC no longer matches
    oldest.write_bytes(bytes(data))
    assert snapshots.oldest_valid_index(snapshot_dir) == SNAPSHOT_AT[1]
    for path in snapshot_dir.iterdir():
        path.unlink()
    assert snapshots.oldest_valid_index(snapshot_dir) == 0
