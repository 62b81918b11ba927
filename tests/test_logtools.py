"""`seqd log dump / tail / check` logic: decoding, filters, following a live journal, CRC check."""

from __future__ import annotations

import threading
from pathlib import Path

import msgspec
import pytest

from daemon import cli
from sequencer import logtools
from sequencer.journal import Journal, JournalCorruptError, list_segments
from sequencer.record import (
    RecordType,
    encode_admin,
    encode_command,
    encode_record,
    encode_session_open,
)
from sequencer.timers import encode_timer_fired
from tests.test_journal import (
    SMALL_SEGMENT_BYTES,
    batch_offsets,
    fill,
    flip_bit,
    open_journal,
    zero_range,
)

WAIT_S = 10.0  # a bound on every wait in these tests: a hang fails instead


class Deposit(msgspec.Struct):
    account: str
    amount: int


def mixed_records(first: int) -> bytes:
    """One record of each daemon-defined payload, then an app command, from index `first`."""
    specs = [
        (RecordType.SESSION_OPEN, 1, 7, 0, encode_session_open(42, "n1")),
        (RecordType.COMMAND, 3, 7, 1, encode_command(0, msgspec.msgpack.encode(Deposit("a", 5)))),
        (RecordType.TIMER_FIRED, 1, 0, 0, encode_timer_fired(9, 123)),
        (RecordType.ADMIN, 1, 0, 0, encode_admin("node_start", node="n1")),
        (RecordType.SESSION_CLOSE, 1, 7, 0, b""),
        (RecordType.COMMAND, 3, 8, 1, b"\x01"),  # too short for its acked_request_id prefix
    ]
    return b"".join(
        encode_record(t, v, first + i, 2, 1000 + i, session, request, payload)
        for i, (t, v, session, request, payload) in enumerate(specs)
    )


def decode_deposit(version: int, command: memoryview) -> Deposit:
    assert version == 3
    return msgspec.msgpack.decode(command, type=Deposit)


@pytest.fixture
def journal_dir(tmp_dir: Path) -> Path:
    return tmp_dir / "journal"


def test_dump_decodes_daemon_payloads_and_app_commands(journal_dir):
    with open_journal(journal_dir) as journal:
        journal.append(mixed_records(1))
        journal.sync()
    rows = list(logtools.dump(journal_dir, decode=decode_deposit))
    assert [row["type"] for row in rows] == [
        "SESSION_OPEN", "COMMAND", "TIMER_FIRED", "ADMIN", "SESSION_CLOSE", "COMMAND",
    ]  # fmt: skip
    assert rows[0]["payload"] == {"client_id": 42, "node": "n1"}
    assert rows[1]["payload"] == {"acked_request_id": 0, "command": {"account": "a", "amount": 5}}
    assert rows[2]["payload"] == {"timer_id": 9, "deadline_ns": 123}
    assert rows[3]["payload"] == {"op": "node_start", "node": "n1"}
    assert rows[4]["payload"] is None
    assert rows[5]["payload"]["hex"] == "01" and "error" in rows[5]["payload"]
    assert {k: rows[1][k] for k in ("index", "term", "timestamp_ns", "version", "session_id", "request_id", "length")} == {
        "index": 2, "term": 2, "timestamp_ns": 1001, "version": 3, "session_id": 7, "request_id": 1,
        "length": 48 + 8 + len(msgspec.msgpack.encode(Deposit("a", 5))),
    }  # fmt: skip


def test_dump_shows_command_bytes_as_hex_without_an_app(journal_dir):
    with open_journal(journal_dir) as journal:
        journal.append(mixed_records(1))
        journal.sync()
    row = next(logtools.dump(journal_dir, types=["command"]))
    assert row["payload"]["command"] == msgspec.msgpack.encode(Deposit("a", 5)).hex()


def test_dump_filters_by_index_range_type_and_session(journal_dir):
    with open_journal(journal_dir) as journal:
        for first in range(1, 60, 6):
            journal.append(mixed_records(first))
        journal.sync()
    rows = list(logtools.dump(journal_dir, from_index=10, to_index=40))
    assert [r["index"] for r in rows] == list(range(10, 41))
    rows = list(logtools.dump(journal_dir, types=[RecordType.TIMER_FIRED, "admin"]))
    assert {r["type"] for r in rows} == {"TIMER_FIRED", "ADMIN"} and len(rows) == 20
    rows = list(logtools.dump(journal_dir, session_id=8))
    assert [r["index"] for r in rows] == list(range(6, 61, 6))
    assert list(logtools.dump(journal_dir, from_index=100)) == []
    with pytest.raises(ValueError, match="unknown record type 'bogus'"):
        list(logtools.dump(journal_dir, types=["bogus"]))


def test_dump_notes_bad_bytes_at_the_end_after_the_good_records(journal_dir, capsys):
    # A stopped node's torn tail: records never durable, so never acknowledged; the dump ends
    # before them and says where they are (`seqd log check` tells a torn tail from corruption).
    with open_journal(journal_dir) as journal:
        fill(journal, [3, 3])
    path = list_segments(journal_dir)[-1][1]
    offset, total, _, _ = batch_offsets(path)[-1]
    zero_range(path, offset + total - 16, offset + total)
    notes: list[str] = []
    assert [row["index"] for row in logtools.dump(journal_dir, note=notes.append)] == [1, 2, 3]
    (line,) = notes
    assert f"byte offset {offset}" in line and "seqd log check" in line
    # `seqd log dump` prints the records, the note on stderr, and succeeds.
    assert cli.main(["log", "dump", "--journal", str(journal_dir)]) == 0
    printed = capsys.readouterr()
    assert [row.split()[0] for row in printed.out.splitlines()] == ["index=1", "index=2", "index=3"]
    assert printed.err.startswith("seqd: note: journal ") and f"byte offset {offset}" in printed.err


def test_tail_without_follow_shows_the_last_records(journal_dir):
    with open_journal(journal_dir) as journal:
        fill(journal, [10] * 30)
    assert len(list_segments(journal_dir)) > 1
    assert [r["index"] for r in logtools.tail(journal_dir, follow=False, last=5)] == [
        296,
        297,
        298,
        299,
        300,
    ]
    assert logtools.last_index(journal_dir) == 300
    assert list(logtools.tail(journal_dir / "absent", follow=False)) == []


def test_tail_follows_new_records_across_rolls_and_stops_when_told(journal_dir):
    stop = threading.Event()
    seen: list[int] = []
    done = threading.Event()
    with open_journal(journal_dir) as journal:
        fill(journal, [4])

        def consume() -> None:
            for row in logtools.tail(journal_dir, last=2, stop=stop, poll_interval_s_max=0.05):
                seen.append(row["index"])
            done.set()

        def wait_for(index: int) -> None:
            pause = threading.Event()
            for _ in range(int(WAIT_S / 0.02)):
                if seen and seen[-1] == index:
                    return
                pause.wait(0.02)

        thread = threading.Thread(target=consume, daemon=True)
        thread.start()
        try:
            wait_for(4)  # the last 2 of what was there when tail started
            for _ in range(30):
                fill(journal, [5])
            target = journal.last_index
            wait_for(target)
        finally:
            stop.set()
            thread.join(WAIT_S)
    assert done.is_set(), "tail did not stop when told"
    assert seen == list(range(3, target + 1))
    assert len(list_segments(journal_dir)) > 1


def test_check_passes_a_clean_journal_with_counts(journal_dir):
    with open_journal(journal_dir) as journal:
        fill(journal, [10] * 30)
    report = logtools.check(journal_dir)
    assert report.ok, str(report)
    assert (report.batches, report.records, report.first_index, report.last_index) == (
        30,
        300,
        1,
        300,
    )
    assert report.segments == len(list_segments(journal_dir)) > 1
    assert "ok" in str(report)


def test_check_reports_the_first_damaged_offset_mid_log(journal_dir):
    with open_journal(journal_dir) as journal:
        fill(journal, [10] * 30)
    path = list_segments(journal_dir)[0][1]
    offset, total, first, last = batch_offsets(path)[2]
    flip_bit(path, offset + total - 9)
    report = logtools.check(journal_dir)
    assert not report.ok and not report.torn_tail
    assert (report.damaged_path, report.damaged_offset) == (path, offset)
    assert f"claims records {first}..{last}" in report.problem
    assert report.last_index == first - 1 and report.batches == 2
    with pytest.raises(JournalCorruptError):
        Journal.open(journal_dir, segment_bytes=SMALL_SEGMENT_BYTES)


def test_check_tells_a_torn_tail_apart_and_repairs_nothing(journal_dir):
    with open_journal(journal_dir) as journal:
        fill(journal, [10] * 3)
    path = list_segments(journal_dir)[-1][1]
    offset, total, _, _ = batch_offsets(path)[-1]
    zero_range(path, offset + total - 24, offset + total)
    before = path.read_bytes()
    report = logtools.check(journal_dir)
    assert not report.ok and report.torn_tail
    assert report.damaged_offset == offset
    assert "next start cuts it" in str(report)
    assert path.read_bytes() == before
    with open_journal(journal_dir) as journal:
        assert journal.recovery.torn_tail is not None
    report = logtools.check(journal_dir)
    assert report.ok and len(report.broken_copies) == 1


def test_dump_of_a_live_journal_stops_before_the_batch_being_written(journal_dir):
    """The journaller of a running node appends while `seqd log dump` reads: the batch it is
    writing has its header and part of its records, so it fails its CRC until the write lands.
    The dump ends before it, with a note, instead of failing (a test's dump of a loaded node's
    journal did); once the write lands, the next dump has it."""
    with open_journal(journal_dir) as journal:  # the writer, live: it holds the journal's lock
        fill(journal, [10, 10, 10])
        path = list_segments(journal_dir)[-1][1]
        offset, total, first, last = batch_offsets(path)[-1]
        written = path.read_bytes()[offset + total - 24 : offset + total]
        zero_range(path, offset + total - 24, offset + total)  # the write's last bytes not there yet
        notes: list[str] = []
        rows = list(logtools.dump(journal_dir, note=notes.append))
        assert [row["index"] for row in rows] == list(range(1, first))
        (line,) = notes
        assert "a write in progress" in line and f"offset {offset}" in line
        with path.open("r+b") as file:  # the write lands
            file.seek(offset + total - 24)
            file.write(written)
        notes.clear()
        assert [row["index"] for row in logtools.dump(journal_dir, note=notes.append)] == list(range(1, last + 1))
        assert notes == []
