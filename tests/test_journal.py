"""The journal: append, roll, replay, truncate, retention, fail-stop, and startup recovery.

Recovery rules under test (docs/journal.md): zeros after the last batch are normal; a bad batch
at the end of the last segment with nothing valid after it is a torn tail, cut once with the bytes
kept in `<segment>.broken-<offset>`; any other damage refuses to open with a message that names
the file and the byte offset.
"""

from __future__ import annotations

import errno
import os
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sequencer.journal import (
    BATCH_HEADER,
    BATCH_HEADER_BYTES,
    BATCH_MAGIC,
    SEGMENT_HEADER_BYTES,
    Journal,
    JournalCorruptError,
    JournalError,
    JournalReader,
    JournalSyncError,
    list_segments,
    read_records,
    scan_segment,
    segment_name,
)
from sequencer.record import RecordType, encode_command, encode_record

SMALL_SEGMENT_BYTES = 8192  # a few batches per segment: rolls happen in every test


# -- helpers (also used by the logtools and crash tests) ------------------------------------------


def payload_for(index: int) -> bytes:
    """A payload that differs by index and varies in size (so padding varies)."""
    return encode_command(index - 1, b"%d;" % index * (index % 7))


def record_for(index: int, term: int = 1) -> bytes:
    return encode_record(
        RecordType.COMMAND, 1, index, term, index * 1000, 1 + index % 3, index, payload_for(index)
    )


def make_batch(first_index: int, count: int, term: int = 1) -> bytes:
    return b"".join(record_for(i, term) for i in range(first_index, first_index + count))


def fill(journal: Journal, sizes: list[int], term: int = 1) -> list[tuple[int, int]]:
    """Append one batch per size and sync; returns each batch's (first, last) index."""
    spans = []
    for size in sizes:
        first = journal.last_index + 1
        journal.append(make_batch(first, size, term))
        spans.append((first, first + size - 1))
    journal.sync()
    return spans


def batch_offsets(path: Path) -> list[tuple[int, int, int, int]]:
    """(offset, total bytes, first index, last index) of each batch of a segment, read with the
    documented format only."""
    data = path.read_bytes()
    offset = SEGMENT_HEADER_BYTES
    found = []
    while offset + BATCH_HEADER_BYTES <= len(data):
        magic, length, _crc, _count, first, last = BATCH_HEADER.unpack_from(data, offset)
        if magic != BATCH_MAGIC:
            break
        found.append((offset, BATCH_HEADER_BYTES + length, first, last))
        offset += BATCH_HEADER_BYTES + length
    return found


def assert_records(directory: Path, first: int, last: int, term_of=lambda index: 1) -> None:
    got = list(read_records(directory, first))
    assert [r.index for r in got] == list(range(first, last + 1))
    for record in got:
        assert bytes(record.raw) == record_for(record.index, term_of(record.index)), record.index


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    with path.open("r+b") as file:
        file.seek(offset)
        byte = file.read(1)[0]
        file.seek(offset)
        file.write(bytes([byte ^ (1 << bit)]))


def zero_range(path: Path, start: int, end: int) -> None:
    with path.open("r+b") as file:
        file.seek(start)
        file.write(bytes(end - start))


@pytest.fixture
def journal_dir(tmp_dir: Path) -> Path:
    return tmp_dir / "journal"


def open_journal(directory: Path, **kwargs) -> Journal:
    kwargs.setdefault("segment_bytes", SMALL_SEGMENT_BYTES)
    return Journal.open(directory, **kwargs)


# -- appending and replay ----------------------------------------------------------------------


def test_new_journal_is_empty_and_reports_creation(journal_dir):
    with open_journal(journal_dir) as journal:
        assert (
            journal.first_index,
            journal.last_index,
            journal.last_term,
            journal.durable_index,
        ) == (1, 0, 0, 0)
        assert journal.recovery is not None and journal.recovery.created
        assert [p.name for p in journal.segments] == [segment_name(1)]
        assert list(read_records(journal_dir)) == []


def test_sync_makes_everything_appended_durable_in_one_call(journal_dir):
    with open_journal(journal_dir) as journal:
        journal.append(make_batch(1, 3))
        journal.append(make_batch(4, 2))
        assert (journal.last_index, journal.durable_index) == (5, 0)
        assert journal.sync() == 5
        assert journal.durable_index == 5


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=25),
    preallocate=st.booleans(),
    data=st.data(),
)
def test_replay_returns_every_appended_record_byte_for_byte(tmp_dir, sizes, preallocate, data):
    with tempfile.TemporaryDirectory(dir=tmp_dir) as name:
        directory = Path(name)
        with open_journal(directory, preallocate=preallocate) as journal:
            fill(journal, sizes)
            last = journal.last_index
        assert_records(directory, 1, last)
        start = data.draw(st.integers(1, last))
        stop = data.draw(st.integers(start, last))
        assert [r.index for r in read_records(directory, start, stop)] == list(
            range(start, stop + 1)
        )
        with open_journal(directory, preallocate=preallocate) as journal:
            assert journal.last_index == last
            assert journal.recovery is not None and journal.recovery.torn_tail is None


def test_segments_roll_by_size_and_are_named_by_first_index(journal_dir):
    with open_journal(journal_dir) as journal:
        fill(journal, [10] * 30)
        segments = list_segments(journal_dir)
        assert len(segments) >= 3
        for first, path in segments:
            assert path.name == segment_name(first)
            assert os.path.getsize(path) == SMALL_SEGMENT_BYTES  # preallocated
            batches = batch_offsets(path)
            assert batches[0][2] == first
            # a batch never spans segments: each ends inside its file
            assert all(offset + total <= SMALL_SEGMENT_BYTES for offset, total, _, _ in batches)
        lasts = [batch_offsets(path)[-1][3] for _, path in segments]
        assert [first for first, _ in segments[1:]] == [last + 1 for last in lasts[:-1]]


def test_replay_from_any_index_crosses_segments(journal_dir):
    with open_journal(journal_dir) as journal:
        fill(journal, [1, 5, 17, 3, 9] * 8)
        last = journal.last_index
    assert len(list_segments(journal_dir)) > 2
    for start in range(1, last + 1, 7):
        got = [r.index for r in read_records(journal_dir, start, min(last, start + 40))]
        assert got == list(range(start, min(last, start + 40) + 1))
    assert list(read_records(journal_dir, last + 1)) == []


def test_batch_larger_than_a_segment_is_cut_at_record_boundaries(journal_dir):
    with open_journal(journal_dir) as journal:
        journal.append(make_batch(1, 2))
        journal.append(make_batch(3, 300))  # ~30 KB into 8 KiB segments
        journal.sync()
        assert journal.last_index == 302
    assert_records(journal_dir, 1, 302)
    assert len(list_segments(journal_dir)) >= 4


def test_record_larger_than_a_segment_is_refused(journal_dir):
    with open_journal(journal_dir, segment_bytes=4096) as journal:
        huge = encode_record(RecordType.COMMAND, 1, 1, 1, 0, 0, 0, b"x" * 5000)
        with pytest.raises(JournalError, match="cannot fit a segment"):
            journal.append(huge)


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        (make_batch(2, 3), "index 2, expected 1"),
        (make_batch(1, 2) + make_batch(4, 1), "index 4, expected 3"),
        (make_batch(1, 2)[:-8], "not a whole record"),
        (make_batch(1, 1) + bytes(16), "too few for a record header"),
        (make_batch(1, 1, term=3) + make_batch(2, 1, term=2), "term 2 < 3"),
        (encode_record(RecordType.PADDING, 0xFFFF, 1, 1, 0, 0, 0, b""), "PADDING"),
    ],
)
def test_append_refuses_records_that_do_not_continue_the_log(journal_dir, batch, message):
    with open_journal(journal_dir) as journal:
        with pytest.raises(JournalError, match=message):
            journal.append(batch)
        assert journal.last_index == 0
        journal.append(make_batch(1, 2))  # still usable: validation errors are not fail-stop
        journal.sync()
    assert_records(journal_dir, 1, 2)


def test_second_writer_is_refused_while_the_first_holds_the_journal(journal_dir):
    with open_journal(journal_dir):
        with pytest.raises(JournalError, match="open for writing in another process"):
            open_journal(journal_dir)
    open_journal(journal_dir).close()


# -- live readers --------------------------------------------------------------------------------


def test_reader_follows_a_journal_being_appended_across_rolls(journal_dir):
    with open_journal(journal_dir) as journal, JournalReader(journal_dir) as reader:
        assert list(reader.read()) == []
        seen = []
        for round_ in range(30):
            fill(journal, [7, 3])
            seen += [r.index for r in reader.read()]
            assert seen == list(range(1, journal.last_index + 1)), round_
        assert len(journal.segments) > 2


def test_reader_returns_only_complete_batches_and_picks_up_the_rest_later(journal_dir):
    with open_journal(journal_dir) as journal:
        fill(journal, [4, 4])
        journal.append(make_batch(9, 6))
        journal.sync()
        path = journal.segments[-1]
        offset, total, _, _ = batch_offsets(path)[-1]
        whole = path.read_bytes()
        zero_range(path, offset + total - 100, offset + total)  # the writer is mid-way
        with JournalReader(journal_dir) as reader:
            assert [r.index for r in reader.read()] == list(range(1, 9))
            assert reader.stopped_at is not None and reader.stopped_at.offset == offset
            with pytest.raises(JournalError, match="ends before index 14"):
                list(read_records(journal_dir, 1, 14))
            path.write_bytes(whole)  # the write completes
            assert [r.index for r in reader.read()] == list(range(9, 15))


def test_reader_reads_any_index_range_forwards_and_backwards_across_segments(journal_dir):
    """What a leader's replicator needs for a lagging follower: any range, in any order, as
    records or as the raw bytes of whole records."""
    with open_journal(journal_dir) as journal:
        fill(journal, [1, 5, 17, 3, 9] * 8)
        last = journal.last_index
    assert len(list_segments(journal_dir)) > 2
    ranges = [(40, 60), (3, 9), (last - 5, last), (1, 1), (25, 25), (2, last)]
    with JournalReader(journal_dir) as reader:
        for first, end in ranges:
            reader.seek(first)
            assert [r.index for r in reader.read(end)] == list(range(first, end + 1))
            assert reader.next_index == end + 1
        for first, end in reversed(ranges):
            reader.seek(first)
            runs = b"".join(bytes(run) for run in reader.read_runs(end))
            assert runs == make_batch(first, end - first + 1), (first, end)


@pytest.mark.timeout(20)
def test_reader_refuses_a_misplaced_batch_in_a_segment_that_a_newer_one_follows(journal_dir):
    """A CRC-valid batch with the wrong indexes at the end of a complete segment is corruption:
    the reader raises (it once looked at it again forever)."""
    with open_journal(journal_dir) as journal:
        fill(journal, [10] * 12)
    segments = list_segments(journal_dir)
    assert len(segments) > 1
    path = segments[0][1]
    offset, total, _, _ = batch_offsets(path)[-1]
    stale = make_batch(500, 1)
    stray = batch_header_bytes(stale, 500, 500) + stale
    assert offset + total + len(stray) <= SMALL_SEGMENT_BYTES
    with path.open("r+b") as file:
        file.seek(offset + total)
        file.write(stray)
    with pytest.raises(JournalCorruptError, match="A newer segment follows"):
        list(read_records(journal_dir))


def batch_header_bytes(records: bytes, first: int, last: int) -> bytes:
    from sequencer.journal.format import batch_header

    return batch_header(memoryview(records), last - first + 1, first, last)


def test_breaking_out_of_a_read_loses_no_record(journal_dir):
    with open_journal(journal_dir) as journal:
        fill(journal, [10, 10])
    with JournalReader(journal_dir, 3) as reader:
        for record in reader.read():
            if record.index == 6:
                break
        assert reader.next_index == 7
        assert [r.index for r in reader.read()] == list(range(7, 21))


# -- torn tails ----------------------------------------------------------------------------------


def last_batch(directory: Path) -> tuple[Path, int, int, int]:
    path = list_segments(directory)[-1][1]
    offset, total, first, _ = batch_offsets(path)[-1]
    return path, offset, total, first


@pytest.mark.parametrize("preallocate", [True, False])
@pytest.mark.parametrize("cut", [1, 4, 16, 31, 32, 33, 100, -8, -1])
def test_torn_last_batch_is_cut_once_and_its_bytes_kept(journal_dir, preallocate, cut):
    with open_journal(journal_dir, preallocate=preallocate) as journal:
        fill(journal, [5, 6, 12])
    path, offset, total, first = last_batch(journal_dir)
    keep = cut if cut > 0 else total + cut
    original = path.read_bytes()
    if preallocate:
        # A crash persisted only the first bytes; zeroing must change something, so the cut is
        # before the last non-zero byte (a batch may end in zero padding).
        keep = min(keep, len(original[offset : offset + total].rstrip(b"\0")) - 1)
        zero_range(path, offset + keep, offset + total)
    else:
        os.truncate(path, offset + keep)

    with open_journal(journal_dir, preallocate=preallocate) as journal:
        torn = journal.recovery.torn_tail
        assert torn is not None
        assert (torn.path, torn.offset) == (path, offset)
        assert journal.last_index == first - 1
        broken = torn.broken_path.read_bytes()
        assert 0 < len(broken) <= keep
        assert broken == original[offset : offset + len(broken)]
        assert torn.broken_path.name == f"{path.name}.broken-{offset}"
    assert_records(journal_dir, 1, first - 1)

    with open_journal(journal_dir, preallocate=preallocate) as journal:
        assert journal.recovery.torn_tail is None  # repaired once, for good
        assert journal.last_index == first - 1
        fill(journal, [12])  # the lost records can be appended again
    assert_records(journal_dir, 1, first + 11)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(sizes=st.lists(st.integers(1, 20), min_size=1, max_size=12), data=st.data())
def test_any_truncation_of_the_last_batch_recovers_every_earlier_record(tmp_dir, sizes, data):
    with tempfile.TemporaryDirectory(dir=tmp_dir) as name:
        directory = Path(name)
        with open_journal(directory, preallocate=False) as journal:
            fill(journal, sizes)
        path, offset, total, first = last_batch(directory)
        keep = data.draw(st.integers(0, total - 1))
        os.truncate(path, offset + keep)
        with open_journal(directory, preallocate=False) as journal:
            assert journal.last_index == first - 1
            assert (journal.recovery.torn_tail is None) == (keep == 0)
        assert_records(directory, 1, first - 1)


def test_zero_filled_tail_of_the_last_batch_is_a_torn_tail(journal_dir):
    with open_journal(journal_dir) as journal:
        fill(journal, [4, 20])
    path, offset, total, first = last_batch(journal_dir)
    zero_range(path, offset + total - 512 if total > 600 else offset + total // 2, offset + total)
    with open_journal(journal_dir) as journal:
        assert journal.recovery.torn_tail is not None
        assert journal.recovery.torn_tail.offset == offset
        assert journal.last_index == first - 1


def test_zero_filled_whole_last_batch_reads_as_the_end_of_the_log(journal_dir):
    with open_journal(journal_dir) as journal:
        fill(journal, [4, 20])
    path, offset, total, first = last_batch(journal_dir)
    zero_range(path, offset, offset + total)
    with open_journal(journal_dir) as journal:
        assert journal.recovery.torn_tail is None
        assert journal.last_index == first - 1


def test_flipped_bit_in_the_last_batch_is_a_torn_tail(journal_dir):
    with open_journal(journal_dir) as journal:
        fill(journal, [4, 4, 4])
    path, offset, total, first = last_batch(journal_dir)
    flip_bit(path, offset + total - 20, 3)
    with open_journal(journal_dir) as journal:
        assert journal.recovery.torn_tail is not None
        assert "CRC-32C mismatch" in journal.recovery.torn_tail.reason
        assert journal.last_index == first - 1


# -- corruption in the middle of the log ---------------------------------------------------------


@pytest.mark.parametrize(
    "where",
    [
        lambda total: 0,  # batch magic
        lambda total: 5,  # length
        lambda total: 9,  # crc
        lambda total: 17,  # first index
        lambda total: BATCH_HEADER_BYTES + 3,  # first record's length
        lambda total: total - 1,  # last byte of the records
    ],
)
def test_flipped_bit_mid_log_refuses_to_open_naming_file_and_offset(journal_dir, where):
    with open_journal(journal_dir, segment_bytes=1 << 16) as journal:
        fill(journal, [5, 6, 7, 8])
    path = list_segments(journal_dir)[-1][1]
    offset, total, _, _ = batch_offsets(path)[1]
    flip_bit(path, offset + where(total), 1)
    before = path.read_bytes()
    with pytest.raises(JournalCorruptError) as raised:
        open_journal(journal_dir, segment_bytes=1 << 16)
    message = str(raised.value)
    assert str(path) in message
    assert f"byte offset {offset}" in message
    assert "replica" in message and "backup" in message
    assert path.read_bytes() == before  # nothing repaired, nothing cut
    assert not list(journal_dir.glob("*.broken-*"))


def test_corruption_message_names_the_batch_first_index(journal_dir):
    with open_journal(journal_dir, segment_bytes=1 << 16) as journal:
        fill(journal, [5, 6, 7])
    path = list_segments(journal_dir)[-1][1]
    offset, total, first, last = batch_offsets(path)[1]
    flip_bit(path, offset + total - 3)
    with pytest.raises(JournalCorruptError, match=f"claims records {first}..{last}"):
        open_journal(journal_dir, segment_bytes=1 << 16)


def test_damage_in_a_segment_that_is_not_the_last_refuses_to_open(journal_dir):
    with open_journal(journal_dir) as journal:
        fill(journal, [10] * 40)
    segments = list_segments(journal_dir)
    assert len(segments) >= 3
    path = segments[0][1]
    offset, total, _, _ = batch_offsets(path)[-1]  # even its last batch: a newer segment follows
    flip_bit(path, offset + total - 5)
    with pytest.raises(JournalCorruptError, match="not the last one") as raised:
        open_journal(journal_dir)
    assert f"{path} at byte offset {offset}" in str(raised.value)
    with pytest.raises(JournalCorruptError, match=str(path)):
        list(read_records(journal_dir))


def test_missing_middle_segment_refuses_to_open(journal_dir):
    with open_journal(journal_dir) as journal:
        fill(journal, [10] * 40)
    segments = list_segments(journal_dir)
    segments[1][1].unlink()
    with pytest.raises(JournalCorruptError, match="records are missing"):
        open_journal(journal_dir)


def test_segment_from_another_journal_refuses_to_open(tmp_dir):
    first, second = tmp_dir / "a", tmp_dir / "b"
    for directory in (first, second):
        with open_journal(directory) as journal:
            fill(journal, [10] * 30)
    (second / list_segments(second)[-1][1].name).replace(first / list_segments(second)[-1][1].name)
    with pytest.raises(JournalCorruptError, match="belongs to another journal"):
        open_journal(first)


def test_damaged_segment_header_refuses_to_open(journal_dir):
    with open_journal(journal_dir) as journal:
        fill(journal, [3])
    path = list_segments(journal_dir)[0][1]
    flip_bit(path, 20)
    with pytest.raises(JournalCorruptError, match="header CRC-32C mismatch"):
        open_journal(journal_dir)


def test_unfinished_new_segment_is_removed_on_open(journal_dir):
    with open_journal(journal_dir) as journal:
        fill(journal, [3])
    stray = journal_dir / (segment_name(4)[: -len(".seg")] + ".seg.tmp")
    stray.write_bytes(b"half a segment")
    with open_journal(journal_dir) as journal:
        assert journal.recovery.removed_temp_files == [stray]
        assert journal.last_index == 3
    assert not stray.exists()


# -- truncation and retention --------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0, 1, 10, 11, 15, 37, 64, 99])
def test_truncate_after_drops_later_records_durably(journal_dir, keep):
    with open_journal(journal_dir) as journal:
        fill(journal, [10] * 10)  # batches end at 10, 20, ...
        journal.truncate_after(keep)
        assert journal.last_index == keep
        assert journal.durable_index == keep
        assert journal.last_term == (1 if keep else 0)
        journal.append(make_batch(keep + 1, 5, term=2))
        journal.sync()
    with open_journal(journal_dir) as journal:
        assert journal.last_index == keep + 5
        assert journal.last_term == 2
        assert journal.recovery.torn_tail is None
    assert_records(journal_dir, 1, keep + 5, term_of=lambda i: 1 if i <= keep else 2)


def test_truncate_after_into_an_earlier_segment_removes_later_segments(journal_dir):
    with open_journal(journal_dir) as journal:
        fill(journal, [10] * 40)
        segments_before = journal.segments
        journal.truncate_after(15)
        assert journal.segments == [p for p in segments_before if int(p.stem) <= 16]
        assert all(not p.exists() for p in segments_before if int(p.stem) > 16)
        assert journal.term_at(15) == 1


def test_truncate_after_before_the_first_retained_record_is_refused(journal_dir):
    with open_journal(journal_dir) as journal:
        fill(journal, [10] * 40)
        journal.delete_segments_before(100)
        with pytest.raises(JournalError, match="install a snapshot"):
            journal.truncate_after(journal.first_index - 2)


def test_delete_segments_before_keeps_every_segment_still_needed(journal_dir):
    with open_journal(journal_dir) as journal:
        fill(journal, [10] * 40)
        segments = list_segments(journal_dir)
        cut = segments[2][0] + 3  # inside the third segment
        deleted = journal.delete_segments_before(cut)
        assert deleted == [segments[0][1], segments[1][1]]
        assert journal.first_index == segments[2][0] <= cut
        assert journal.delete_segments_before(10**9)  # everything wholly before...
        assert journal.segments == [segments[-1][1]]  # ...but never the active segment
        fill(journal, [5])
        last = journal.last_index
    assert_records(journal_dir, segments[-1][0], last)
    with pytest.raises(JournalError, match="retention"):
        list(read_records(journal_dir, 1))
    with open_journal(journal_dir) as journal:
        assert (journal.first_index, journal.last_index) == (segments[-1][0], last)


def test_term_at_reads_terms_across_segments(journal_dir):
    with open_journal(journal_dir) as journal:
        fill(journal, [20], term=1)
        fill(journal, [20], term=4)
        assert [journal.term_at(i) for i in (0, 1, 20, 21, 40)] == [0, 1, 1, 4, 4]
        with pytest.raises(JournalError, match="outside"):
            journal.term_at(41)


# -- fail-stop -----------------------------------------------------------------------------------


def failing_once(real):
    calls = []

    def fake(fd):
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd)

    return fake, calls


def test_failed_fdatasync_is_never_retried_and_stops_the_journal(journal_dir, monkeypatch):
    journal = open_journal(journal_dir)
    try:
        fill(journal, [3])
        journal.append(make_batch(4, 3))
        fake, calls = failing_once(os.fdatasync)
        monkeypatch.setattr(os, "fdatasync", fake)
        with pytest.raises(JournalSyncError, match="fsyncgate"):
            journal.sync()
        assert journal.durable_index == 3
        for call in (
            journal.sync,
            lambda: journal.append(make_batch(7, 1)),
            lambda: journal.truncate_after(1),
        ):
            with pytest.raises(JournalSyncError, match="fail-stop"):
                call()
        assert len(calls) == 1  # the fsync was not retried behind our back
    finally:
        journal.close()


def test_failed_fdatasync_during_a_roll_stops_the_journal(journal_dir, monkeypatch):
    journal = open_journal(journal_dir)
    try:
        fake, calls = failing_once(os.fdatasync)
        monkeypatch.setattr(os, "fdatasync", fake)
        with pytest.raises(JournalSyncError):
            for first in range(1, 400, 10):  # no explicit sync: the roll syncs the full segment
                journal.append(make_batch(first, 10))
        with pytest.raises(JournalSyncError):
            journal.sync()
        assert len(calls) == 1
        assert len(list_segments(journal_dir)) == 1  # no segment was created after the failure
    finally:
        journal.close()


def test_segment_header_format_is_as_documented(journal_dir):
    with open_journal(journal_dir) as journal:
        fill(journal, [3])
        path = journal.segments[0]
    data = path.read_bytes()
    assert data[:8] == b"SEQDJRNL"
    assert struct.unpack_from("<HH", data, 8) == (1, SEGMENT_HEADER_BYTES)
    assert struct.unpack_from("<QQ", data, 16) == (1, 0)
    scan = scan_segment(path, walk_records=True)
    assert (scan.batches, scan.records, scan.last_index, scan.damage) == (1, 3, 3, None)


def test_torn_tail_is_repaired_even_when_a_payload_inside_it_looks_like_a_later_batch(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Client bytes that form a CRC-valid batch inside the torn batch must not make the torn
    tail look like mid-log corruption (which refuses to start)."""
    from sequencer.journal import BATCH_HEADER, BATCH_MAGIC, Journal
    from sequencer.journal.format import batch_crc as _batch_crc
    from sequencer.record import RecordType, encode_command, encode_record

    inner = encode_record(RecordType.COMMAND, 1, 99, 1, 0, 1, 1, b"")
    fake = BATCH_HEADER.pack(BATCH_MAGIC, len(inner), _batch_crc(len(inner), 1, 99, 99, memoryview(inner)), 1, 99, 99) + inner
    record = encode_record(RecordType.COMMAND, 1, 1, 1, 1, 1, 1, encode_command(0, fake + b"\x01" * 4000))
    with Journal.open(tmp_path, segment_bytes=1 << 20) as journal:
        journal.append(record)
        journal.sync()
    segment = sorted(tmp_path.glob("*.seg"))[0]
    with open(segment, "r+b") as file:  # the last 2000 bytes of the batch never reached the disk
        end = 64 + 32 + len(record)
        file.seek(end - 2000)
        file.write(bytes(2000))
    with Journal.open(tmp_path, segment_bytes=1 << 20) as journal:
        assert journal.recovery.torn_tail is not None
        assert journal.last_index == 0
