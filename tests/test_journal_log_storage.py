"""The journal as the Raft log's storage (sequencer/journal/log_storage.py): entries and terms by
index, against an in-memory oracle with the `LogStorage` contract (the raftasync branch's
`MemoryLogStorage` loop: at least one entry, stop after the entry that reaches `bytes_max`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sequencer.journal import Journal, JournalError, JournalLogStorage, list_segments
from tests.test_journal import SMALL_SEGMENT_BYTES, fill, record_for

BATCHES = 30  # of 10 records: several segments of SMALL_SEGMENT_BYTES


def term_of(index: int) -> int:
    """Terms rise every 37 records, so a term changes inside batches and across segments."""
    return 1 + index // 37


def build(directory: Path) -> int:
    with Journal.open(directory, segment_bytes=SMALL_SEGMENT_BYTES) as journal:
        for _ in range(BATCHES):
            first = journal.last_index + 1
            journal.append(b"".join(record_for(i, term_of(i)) for i in range(first, first + 10)))
        return journal.sync()


def oracle(first: int, last: int, bytes_max: int) -> tuple[list[int], list[bytes]]:
    terms, payloads, total = [], [], 0
    for index in range(first, last + 1):
        terms.append(term_of(index))
        payloads.append(record_for(index, term_of(index)))
        total += len(payloads[-1])
        if total >= bytes_max:
            break
    return terms, payloads


@pytest.fixture
def journal_dir(tmp_dir: Path) -> Path:
    return tmp_dir / "journal"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_entries_match_the_records_written_for_any_range_and_byte_bound(tmp_path_factory, data):
    directory = tmp_path_factory.mktemp("storage") / "journal"
    last = build(directory)
    with JournalLogStorage(directory) as storage:
        for _ in range(5):
            first = data.draw(st.integers(1, last))
            to = data.draw(st.integers(first, last))
            bytes_max = data.draw(st.integers(1, 20_000))
            assert storage.entries(first, to, bytes_max) == oracle(first, to, bytes_max)


def test_payloads_are_whole_records_whose_header_carries_the_term(journal_dir):
    build(journal_dir)
    with JournalLogStorage(journal_dir) as storage:
        terms, payloads = storage.entries(36, 38, 1 << 20)
    assert terms == [1, 2, 2]  # index 37 starts term 2
    assert payloads == [record_for(i, term_of(i)) for i in (36, 37, 38)]
    assert all(len(p) % 8 == 0 for p in payloads)  # padded: concatenated, a run of records


def test_one_read_returns_at_least_one_entry_and_stops_after_the_bound(journal_dir):
    build(journal_dir)
    with JournalLogStorage(journal_dir) as storage:
        assert len(storage.entries(5, 100, 1)[0]) == 1
        one = len(record_for(5, term_of(5)))
        assert len(storage.entries(5, 100, one + 1)[0]) == 2  # the entry that reaches the bound


def test_sequential_reads_continue_without_seeking_and_jumps_seek(journal_dir):
    last = build(journal_dir)
    with JournalLogStorage(journal_dir) as storage:
        index = 1
        while index <= last:
            terms, _ = storage.entries(index, last, 2000)
            index += len(terms)
        assert storage.seeks == 0  # each read continued the last (the reader starts at 1)
        storage.entries(3, 4, 1 << 20)
        assert storage.seeks == 1


def test_term_of_every_index_and_of_the_index_before_the_first_retained(journal_dir):
    last = build(journal_dir)
    with JournalLogStorage(journal_dir) as storage:
        assert storage.term(0) == 0
        assert [storage.term(i) for i in range(1, last + 1)] == [term_of(i) for i in range(1, last + 1)]
        with Journal.open(journal_dir, segment_bytes=SMALL_SEGMENT_BYTES) as journal:
            journal.delete_segments_before(150)
            first = journal.first_index
        assert first > 1
        assert storage.first_index() == first
        assert storage.term(first - 1) == term_of(first - 1)  # from the segment header
        assert storage.term(first - 2) is None  # compacted
        with pytest.raises(JournalError, match="retention"):
            storage.entries(first - 1, first, 1 << 20)


def test_reads_after_a_truncation_and_new_appends_see_the_new_log(journal_dir):
    """A reader positioned in a segment that a truncation deleted (and a later roll re-created
    under the same name) must not serve the old records."""
    last = build(journal_dir)
    with JournalLogStorage(journal_dir) as storage:
        late = list_segments(journal_dir)[-1][0]
        storage.entries(late, late + 2, 1 << 20)  # the reader now sits in the last segment
        with Journal.open(journal_dir, segment_bytes=SMALL_SEGMENT_BYTES) as journal:
            journal.truncate_after(100)
            fill(journal, [10] * 20, term=9)
            assert journal.last_index == 300 == last
        terms, payloads = storage.entries(late + 3, late + 5, 1 << 20)
        assert terms == [9, 9, 9]
        assert payloads == [record_for(i, 9) for i in range(late + 3, late + 6)]
        assert storage.term(101) == 9
        assert storage.term(100) == term_of(100)


def test_reading_past_the_durable_end_is_refused(journal_dir):
    last = build(journal_dir)
    with JournalLogStorage(journal_dir) as storage:
        with pytest.raises(JournalError, match=f"does not hold index {last + 1}"):
            storage.entries(last + 1, last + 1, 1)


def test_an_empty_journal_holds_nothing_but_index_zero(journal_dir):
    Journal.open(journal_dir, segment_bytes=SMALL_SEGMENT_BYTES).close()
    with JournalLogStorage(journal_dir) as storage:
        assert storage.term(0) == 0
        assert storage.first_index() == 1
        with pytest.raises(JournalError):
            storage.entries(1, 1, 1)
