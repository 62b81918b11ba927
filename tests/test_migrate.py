"""Copy-and-transform of the journal (`seqd log migrate`, issue 16 part 1).

The worked example runs end to end on real nodes (ledger v1 with clients, stopped, migrated,
ledger v2 started on the new journal); the rules of the migration (exactly-once across split,
merge and drop; sessions, time and timers carried over; the index map; refusals) are proven on
journals written record by record and replayed by the real processor.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.harness import NodeProcess
from daemon.journal_pipe import JournalWriterProcess
from daemon.migrate import (
    INDEX_MAP_FILE,
    REPORT_FILE,
    MigrationFailed,
    migrate,
    read_index_map,
    replay_journal,
)
from sequencer import egress, logtools
from sequencer.apps.ledger import (
    LEDGER_SCHEMA,
    Balance,
    CommitReservation,
    Deposit,
    Ledger,
    OpenAccount,
    Reserve,
    Transfer,
)
from sequencer.apps.ledger_v2 import Account, Credit, Credited, Debit, FromLedgerV1, LedgerV2
from sequencer.client import Client, CommandRejected, Duplicate
from sequencer.journal import Journal, JournalError, read_records
from sequencer.migrate import (
    COMMANDS_PER_REQUEST_MAX,
    IndexMap,
    Migration,
    Origin,
    Transform,
    TransformError,
)
from sequencer.processor import Processor
from sequencer.record import (
    ADMIN_NODE_START,
    FRAME_HEADER_BYTES,
    RecordType,
    encode_admin,
    encode_command,
    encode_record,
    encode_session_open,
    frame_type,
)
from sequencer.schema import Schema
from sequencer.state_machine import Context, Rejected, StateMachine
from sequencer.timers import encode_timer_fired
from tests.node_fixtures import node_factory  # noqa: F401

SEGMENT_BYTES = 1 << 20
CLI_TIMEOUT_S = 120.0  # a migration of a test journal takes a second or two; this bounds a hang
WAIT_S = 60.0
NODE = "n1"
SESSION = 1 << 56 | 7  # as node 1 would number a session
OTHER_SESSION = 1 << 56 | 8


# -- a tiny app whose state is the list of what it applied ------------------------------------------


class Note(msgspec.Struct, tag=True):
    value: int


class Noted(msgspec.Struct, tag=True):
    value: int


class NotesSnapshot(msgspec.Struct):
    applied: list[tuple[int, int]]


NOTES_SCHEMA = Schema("notes", 1, (Note,), (Noted,), (), NotesSnapshot)


class Notes(StateMachine):
    """Applies Note(value) by appending (client id, value); refuses a negative value."""

    schema = NOTES_SCHEMA

    def __init__(self, applied: list[tuple[int, int]] | None = None) -> None:
        self.applied = applied if applied is not None else []

    def apply(self, ctx: Context, command: Note) -> Noted:
        if command.value < 0:
            raise Rejected("negative", str(command.value))
        self.applied.append((ctx.client_id, command.value))
        return Noted(command.value)

    def snapshot(self) -> NotesSnapshot:
        return NotesSnapshot(self.applied)

    @classmethod
    def restore(cls, snapshot: NotesSnapshot) -> Notes:
        return cls(snapshot.applied)


class SameNotes(Transform):
    source = Notes
    target = Notes


class MergePairs(Transform):
    """Merges each two consecutive notes of one client into one (their sum); a note left
    waiting at the end comes out of finish()."""

    source = Notes
    target = Notes

    def __init__(self) -> None:
        self.waiting: Note | None = None

    def command(self, command: Any, origin: Origin) -> Iterable[Any]:
        if self.waiting is None:
            self.waiting = command
            return ()
        merged = Note(self.waiting.value + command.value)
        self.waiting = None
        return (merged,)

    def finish(self) -> Iterable[Any]:
        return () if self.waiting is None else (self.waiting,)


class Twice(Transform):
    """Note(v) becomes Note(v), Note(v + 100): a refused Note(-1) stops before its second part."""

    source = Notes
    target = Notes

    def command(self, command: Any, origin: Origin) -> Iterable[Any]:
        return (command, Note(command.value + 100))


class SplitNotes(Transform):
    """Note(v) becomes Note(v) then Note(-1) then Note(v): the second part is always refused."""

    source = Notes
    target = Notes

    def command(self, command: Any, origin: Origin) -> Iterable[Any]:
        return (Note(command.value), Note(-1), Note(command.value))


# -- journals written record by record ----------------------------------------------------------------


class JournalBuilder:
    """Records as a node would stamp them: gapless indexes, time that never goes backwards."""

    def __init__(self, schema: Schema = LEDGER_SCHEMA) -> None:
        self.schema = schema
        self.records: list[bytes] = []
        self.timestamp_ns = 1_700_000_000_000_000_000

    @property
    def index(self) -> int:
        return len(self.records)

    def _add(self, record_type: int, version: int, session_id: int, request_id: int, payload: bytes,
             advance_ns: int = 1000) -> int:  # fmt: skip
        self.timestamp_ns += advance_ns
        self.records.append(encode_record(record_type, version, self.index + 1, 1, self.timestamp_ns,
                                          session_id, request_id, payload))  # fmt: skip
        return self.index

    def open(self, session_id: int, client_id: int, node: str = NODE) -> int:
        return self._add(RecordType.SESSION_OPEN, 1, session_id, 0, encode_session_open(client_id, node))

    def close(self, session_id: int, advance_ns: int = 1000) -> int:
        return self._add(RecordType.SESSION_CLOSE, 1, session_id, 0, b"", advance_ns)

    def node_start(self, node: str = NODE) -> int:
        return self._add(RecordType.ADMIN, 1, 0, 0, encode_admin(ADMIN_NODE_START, node=node, number=1))

    def command(self, session_id: int, request_id: int, command: Any, acked: int = 0) -> int:
        version, data = self.schema.encode_command(command)
        return self._add(RecordType.COMMAND, version, session_id, request_id, encode_command(acked, data))

    def raw_command(self, session_id: int, request_id: int, data: bytes, version: int = 1) -> int:
        return self._add(RecordType.COMMAND, version, session_id, request_id, encode_command(0, data))

    def timer_fired(self, timer_id: int, deadline_ns: int) -> int:
        self.timestamp_ns = max(self.timestamp_ns, deadline_ns)
        return self._add(RecordType.TIMER_FIRED, 1, 0, timer_id, encode_timer_fired(timer_id, deadline_ns))

    def snapshot(self) -> int:
        return self._add(RecordType.SNAPSHOT, 1, 0, 0, b"")

    def write(self, directory: Path) -> Path:
        with Journal.open(directory, segment_bytes=SEGMENT_BYTES, preallocate=False) as journal:
            journal.append(b"".join(self.records))
            journal.sync()
        return directory


def run_migration(source: Path, target: Path, transform: Transform, **options: Any) -> Any:
    return migrate(source, target, transform, segment_bytes=SEGMENT_BYTES, preallocate=False,
                   say=lambda line: None, **options)  # fmt: skip


def resend(processor: Processor[Any], client_id: int, request_id: int, command: Any,
           schema: Schema) -> egress.Reply:  # fmt: skip
    """The reply a client gets for (client_id, request_id) on a new session after the replay."""
    session_id = 0xFE << 56 | processor.applied_index + 1  # no collision with the journal's
    records = [
        encode_record(RecordType.SESSION_OPEN, 1, processor.applied_index + 1, 1,
                      processor.last_timestamp_ns, session_id, 0, encode_session_open(client_id, NODE)),
    ]  # fmt: skip
    version, data = schema.encode_command(command)
    records.append(encode_record(RecordType.COMMAND, version, processor.applied_index + 2, 1,
                                 processor.last_timestamp_ns, session_id, request_id,
                                 encode_command(request_id - 1, data)))  # fmt: skip
    processor.drain_outputs()
    for record in records:
        header_type = int.from_bytes(record[4:6], "little")
        length = int.from_bytes(record[0:4], "little")
        processor.apply_frame(frame_type(header_type, version if header_type == RecordType.COMMAND else 1),
                              memoryview(record)[FRAME_HEADER_BYTES:length])  # fmt: skip
    replies = [egress.decode(kind, frame) for kind, frame in processor.drain_outputs()
               if kind == egress.EgressKind.REPLY]  # fmt: skip
    assert len(replies) == 1, replies
    reply = replies[0]
    assert isinstance(reply, egress.Reply)
    return reply


# -- exactly-once across split, merge and drop ------------------------------------------------------


def test_a_split_request_is_one_request_on_resend_and_stops_at_its_first_rejected_part(tmp_path: Path) -> None:
    journal = JournalBuilder(NOTES_SCHEMA)
    journal.open(SESSION, client_id=11)
    journal.command(SESSION, 1, Note(5))
    journal.command(SESSION, 2, Note(6))
    old = journal.write(tmp_path / "old")

    run_migration(old, tmp_path / "new", SplitNotes())

    processor = replay_journal(tmp_path / "new", Notes)
    # Each request applied its first part; the refused second part stopped it: the third never ran.
    assert processor.app.applied == [(11, 5), (11, 6)]
    assert processor.command_parts_skipped == 2
    # A resend of the last request gets its saved reply (the rejection that stopped it), and
    # nothing is applied again; the first's reply was acknowledged by the second's acked id.
    reply = resend(processor, 11, 2, Note(6), NOTES_SCHEMA)
    assert reply.status == egress.ReplyStatus.REJECTED
    assert msgspec.msgpack.decode(reply.payload)["code"] == "negative"
    assert processor.app.applied == [(11, 5), (11, 6)]
    parts = [r for r in read_records(tmp_path / "new") if r.type == RecordType.COMMAND_PART]
    assert [(r.session_id, r.request_id) for r in parts] == [(SESSION, 1)] * 3 + [(SESSION, 2)] * 3


def test_merged_and_dropped_requests_are_answered_duplicate_and_never_applied_twice(tmp_path: Path) -> None:
    journal = JournalBuilder(NOTES_SCHEMA)
    journal.open(SESSION, client_id=11)
    for request_id, value in enumerate((1, 2, 3, 4, 5), start=1):
        journal.command(SESSION, request_id, Note(value))
    old = journal.write(tmp_path / "old")

    report = run_migration(old, tmp_path / "new", MergePairs())

    processor = replay_journal(tmp_path / "new", Notes)
    # 1+2 at request 2, 3+4 at request 4; 5 was still waiting at the end: finish() wrote it on
    # the migration's own session (client id 0).
    assert processor.app.applied == [(11, 3), (11, 7), (0, 5)]
    assert report.counts_out["SESSION_OPEN (migration session)"] == 1
    reply = resend(processor, 11, 4, Note(100), NOTES_SCHEMA)  # carried the merge: its saved reply
    assert reply.status == egress.ReplyStatus.OK
    assert msgspec.msgpack.decode(reply.payload, type=Noted) == Noted(7)
    for request_id in (1, 3, 5):  # absorbed: applied as part of a merge, their reply does not exist
        assert resend(processor, 11, request_id, Note(100), NOTES_SCHEMA).status == egress.ReplyStatus.DUPLICATE
    assert processor.app.applied == [(11, 3), (11, 7), (0, 5)]


class Ignore(Transform):
    source = Notes
    target = Notes

    def command(self, command: Any, origin: Origin) -> Iterable[Any]:
        return ()


def test_a_request_dropped_as_the_clients_last_is_still_recorded_so_a_resend_is_not_applied(tmp_path: Path) -> None:
    journal = JournalBuilder(NOTES_SCHEMA)
    journal.open(SESSION, client_id=11)
    journal.command(SESSION, 1, Note(1))
    old = journal.write(tmp_path / "old")
    run_migration(old, tmp_path / "new", Ignore())
    processor = replay_journal(tmp_path / "new", Notes)
    assert processor.app.applied == []
    # Without the part that records request 1, this resend would be applied as new.
    assert resend(processor, 11, 1, Note(1), NOTES_SCHEMA).status == egress.ReplyStatus.DUPLICATE
    assert processor.app.applied == []


def test_resends_commands_without_a_session_and_snapshot_records_are_dropped(tmp_path: Path) -> None:
    journal = JournalBuilder(NOTES_SCHEMA)
    journal.open(SESSION, client_id=11)
    journal.command(SESSION, 1, Note(1))
    journal.snapshot()
    journal.command(SESSION, 1, Note(1))  # a resend after a reconnect: deduplicated by the old node
    journal.close(SESSION)
    journal.command(SESSION, 2, Note(2))  # sequenced after its session closed: dropped by the old node
    old = journal.write(tmp_path / "old")

    report = run_migration(old, tmp_path / "new", SameNotes())

    assert report.counts_in == {"COMMAND (no session: dropped)": 1, "COMMAND (resent: dropped)": 1,
                                "COMMAND Note": 1, "SESSION_CLOSE": 1, "SESSION_OPEN": 1,
                                "SNAPSHOT (dropped)": 1}  # fmt: skip
    assert [r.type for r in read_records(tmp_path / "new")] == [
        RecordType.SESSION_OPEN, RecordType.COMMAND, RecordType.SESSION_CLOSE]
    index_map = read_index_map(tmp_path / "new")
    assert [list(index_map.targets(i)) for i in range(1, 7)] == [[1], [2], [], [], [3], []]
    assert replay_journal(tmp_path / "new", Notes).app.applied == [(11, 1)]


def test_command_parts_follow_the_processors_rules(tmp_path: Path) -> None:
    """A request's parts: the first starts it, a later one continues it (also after a part with no
    command), a rejected one stops it; a part of an older request changes nothing."""
    journal = JournalBuilder(NOTES_SCHEMA)
    journal.open(SESSION, client_id=11)

    def part(request_id: int, command: Note | None) -> None:
        data = b"" if command is None else NOTES_SCHEMA.encode_command(command)[1]
        journal._add(RecordType.COMMAND_PART, 1, SESSION, request_id, encode_command(0, data))

    part(1, None)
    part(1, Note(1))  # continues request 1 after its empty first part
    part(2, Note(2))
    part(2, Note(-1))  # refused: stops request 2
    part(2, Note(3))
    part(1, Note(4))  # request 1 is over
    processor = Processor(Notes)
    processor.apply_records(b"".join(journal.records))
    assert processor.app.applied == [(11, 1), (11, 2)]
    assert processor.command_parts_skipped == 2
    assert resend(processor, 11, 2, Note(9), NOTES_SCHEMA).status == egress.ReplyStatus.REJECTED


# -- the dedup decisions follow the old node's processor ---------------------------------------------

EXPIRY_NS = 60 * 1_000_000_000


@st.composite
def session_histories(draw: st.DrawFn) -> JournalBuilder:
    """Sessions opening and closing (by record or by a node_start), clients reconnecting with
    resends, requests out of order, long idle gaps past the client expiry, refused commands."""
    journal = JournalBuilder(NOTES_SCHEMA)
    open_sessions: dict[int, int] = {}
    next_session = 1
    for _ in range(draw(st.integers(1, 60))):
        action = draw(st.sampled_from(["open", "close", "command", "command", "command", "restart", "idle"]))
        if action == "open" or not open_sessions:
            session_id = 1 << 56 | next_session
            next_session += 1
            client_id = draw(st.integers(1, 4))
            open_sessions[session_id] = client_id
            journal.open(session_id, client_id)
        elif action == "close":
            session_id = draw(st.sampled_from(sorted(open_sessions)))
            del open_sessions[session_id]
            journal.close(session_id)
        elif action == "restart":
            open_sessions.clear()
            journal.node_start()
        elif action == "idle":
            journal.timestamp_ns += draw(st.sampled_from([1, EXPIRY_NS // 2, EXPIRY_NS, 2 * EXPIRY_NS]))
        else:
            session_id = draw(st.sampled_from(sorted(open_sessions)))
            if draw(st.booleans()) and len(open_sessions) > 1:
                session_id = draw(st.sampled_from(sorted(set(open_sessions) | {1 << 56 | 999})))
            journal.command(session_id, draw(st.integers(1, 8)), Note(draw(st.integers(-1, 9))))
    return journal


@settings(max_examples=150, deadline=None)
@given(session_histories())
def test_the_migration_applies_exactly_the_requests_the_old_node_applied(journal: JournalBuilder) -> None:
    """The migration drops resends and session-less commands by following the processor's dedup
    decisions, and splits each request the old node applied in two: a resend taken for a new
    request, or a new one taken for a resend, shows as a different list of applied notes."""
    old = Processor(Notes, client_expiry_ns=EXPIRY_NS)
    run = b"".join(journal.records)
    old.apply_records(run)
    migration = Migration(Twice(), client_expiry_ns=EXPIRY_NS)
    new_run = migration.feed(run) + migration.finish()
    new = Processor(Notes, client_expiry_ns=EXPIRY_NS)
    new.apply_records(new_run)
    assert new.app.applied == [note for client_id, value in old.app.applied
                               for note in ((client_id, value), (client_id, value + 100))]  # fmt: skip
    assert new.commands_without_session == 0


# -- time, timers, bounds and errors -------------------------------------------------------------------


def ledger_with_timers() -> JournalBuilder:
    journal = JournalBuilder()
    journal.open(SESSION, client_id=21)
    journal.command(SESSION, 1, OpenAccount("alice"))
    journal.command(SESSION, 2, OpenAccount("bob"))
    journal.command(SESSION, 3, Deposit("alice", 100))
    journal.command(SESSION, 4, Reserve(7, "alice", "bob", 10, timeout_ms=1))
    deadline_ns = journal.timestamp_ns + 1_000_000
    journal.command(SESSION, 5, Transfer("alice", "bob", 30))
    journal.timer_fired(7, deadline_ns)  # runs on_timer: the hold of 10 is released
    journal.timer_fired(7, deadline_ns)  # a second fire (a re-arm after a restart): ignored
    return journal


def test_timestamps_and_timer_fires_are_carried_over(tmp_path: Path) -> None:
    old = ledger_with_timers().write(tmp_path / "old")
    report = run_migration(old, tmp_path / "new", FromLedgerV1())
    records = list(read_records(tmp_path / "new"))
    times = [r.timestamp_ns for r in records]
    assert times == sorted(times)
    index_map = read_index_map(tmp_path / "new")
    for record in read_records(old):
        for new_index in index_map.targets(record.index):
            assert records[new_index - 1].timestamp_ns == record.timestamp_ns
    processor = replay_journal(tmp_path / "new", LedgerV2)
    assert processor.app.accounts["alice"].held == 0  # the fire ran under v2 too
    assert report.timer_fires == 2
    assert report.timer_fires_ignored == 1 == processor.stale_timer_fires


class RenumberReservations(FromLedgerV1):
    """Changes the reservation ids, and so the timer ids the new app schedules."""

    def command(self, command: Any, origin: Origin) -> Iterable[Any]:
        if type(command) is Reserve:
            return (msgspec.structs.replace(command, reservation_id=command.reservation_id + 1000),)
        return super().command(command, origin)


def test_a_transform_that_breaks_the_timers_is_refused_by_the_verification(tmp_path: Path) -> None:
    old = ledger_with_timers().write(tmp_path / "old")
    with pytest.raises(MigrationFailed, match="timer fires ignored: 2 under ledger v2, 1 under ledger v1"):
        run_migration(old, tmp_path / "new", RenumberReservations())
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


class Explode(FromLedgerV1):
    def command(self, command: Any, origin: Origin) -> Iterable[Any]:
        if type(command) is Transfer:
            raise ValueError("no transfers today")
        return super().command(command, origin)


def test_a_transform_that_raises_is_named_with_the_old_index_and_leaves_no_output(tmp_path: Path) -> None:
    old = ledger_with_timers().write(tmp_path / "old")
    target = tmp_path / "v2" / "journal"
    result = seqd_cli("log", "migrate", "--from", str(old), "--to", str(target),
                      "--transform", "tests.test_migrate:Explode")  # fmt: skip
    assert result.returncode == 70, result.stderr
    assert "raised ValueError: no transfers today on the record at old index 6 (Transfer(" in result.stderr
    assert "Nothing was written" in result.stderr
    assert 'raise ValueError("no transfers today")' in result.stderr  # the transform's traceback
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]  # not even the parent it made


class Foreign(FromLedgerV1):
    def command(self, command: Any, origin: Origin) -> Iterable[Any]:
        return (Transfer("a", "b", 1),) if type(command) is Transfer else super().command(command, origin)


class TooMany(FromLedgerV1):
    def command(self, command: Any, origin: Origin) -> Iterable[Any]:
        if type(command) is Transfer:
            return [Account("alice")] * (COMMANDS_PER_REQUEST_MAX + 1)
        return super().command(command, origin)


class Generates(FromLedgerV1):
    def command(self, command: Any, origin: Origin) -> Iterable[Any]:
        yield from super().command(command, origin)
        if type(command) is Transfer:
            raise ValueError("half a transfer")


class NotIterable(FromLedgerV1):
    def command(self, command: Any, origin: Origin) -> Any:
        return command  # forgot the list


@pytest.mark.parametrize("transform, message", [
    (Foreign(), "returned Transfer(source='a', target='b', amount=1) for the record at old index 6 "
                "(Transfer(source='alice', target='bob', amount=30)): Transfer is not a command of ledger v2"),
    (TooMany(), f"returned {COMMANDS_PER_REQUEST_MAX + 1} commands for the record at old index 6 "
                f"(Transfer(source='alice', target='bob', amount=30)), more than COMMANDS_PER_REQUEST_MAX"),
    (NotIterable(), "returned OpenAccount(account='alice', allow_negative=False) for the record at old "
                    "index 2: return an iterable of commands"),
    (Generates(), "raised ValueError: half a transfer on the record at old index 6 (Transfer("),
], ids=["foreign type", "more than the bound", "not a list", "a generator that raises"])  # fmt: skip
def test_what_a_transform_returns_is_checked_and_the_error_names_the_old_index(
    tmp_path: Path, transform: Transform, message: str
) -> None:
    old = ledger_with_timers().write(tmp_path / "old")
    with pytest.raises(MigrationFailed, match="old index") as caught:
        run_migration(old, tmp_path / "new", transform)
    assert message in str(caught.value)
    assert isinstance(caught.value.__cause__, TransformError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_a_migrated_journal_migrates_again_with_its_parts(tmp_path: Path) -> None:
    """v2 to v2 (identity): the requests the first migration split stay split, as one request."""
    old = ledger_with_timers().write(tmp_path / "old")
    run_migration(old, tmp_path / "v2", FromLedgerV1())

    class SameV2(Transform):
        source = LedgerV2
        target = LedgerV2

    run_migration(tmp_path / "v2", tmp_path / "v2again", SameV2())
    first = replay_journal(tmp_path / "v2", LedgerV2)
    again = replay_journal(tmp_path / "v2again", LedgerV2)
    assert msgspec.msgpack.encode(again.app.snapshot()) == msgspec.msgpack.encode(first.app.snapshot())
    assert [r.type for r in read_records(tmp_path / "v2again")] == [r.type for r in read_records(tmp_path / "v2")]


# -- refusals ---------------------------------------------------------------------------------------


def test_migrate_refuses_a_target_that_is_not_empty_and_overwrites_nothing(tmp_path: Path) -> None:
    old = ledger_with_timers().write(tmp_path / "old")
    target = tmp_path / "new"
    target.mkdir()
    (target / "precious").write_text("keep me")
    result = seqd_cli("log", "migrate", "--from", str(old), "--to", str(target),
                      "--transform", "sequencer.apps.ledger_v2:FromLedgerV1")  # fmt: skip
    assert result.returncode == 73, result.stderr
    assert f"the target {target} is not empty (1 entries: precious): migrate refuses to overwrite anything" in result.stderr
    assert (target / "precious").read_text() == "keep me"
    assert sorted(p.name for p in target.iterdir()) == ["precious"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "old"]
    # An empty directory is fine: it is replaced by the new journal.
    (target / "precious").unlink()
    run_migration(old, target, FromLedgerV1())
    assert (target / INDEX_MAP_FILE).exists()
    with pytest.raises(MigrationFailed, match="is inside the source journal"):
        run_migration(old, old / "inside", FromLedgerV1())


def test_migrate_refuses_a_journal_that_does_not_start_at_index_1(tmp_path: Path) -> None:
    journal = ledger_with_timers()
    for request_id in range(6, 100):
        journal.command(SESSION, request_id, Deposit("alice", 1))
    with Journal.open(tmp_path / "old", segment_bytes=4096, preallocate=False) as writer:
        for record in journal.records:  # one batch each: 4 KiB segments fill and roll
            writer.append(record)
        writer.sync()
        second_first_index = int(writer.segments[1].name.split(".")[0])
        assert writer.delete_segments_before(second_first_index)  # as retention after a snapshot
    with pytest.raises(MigrationFailed, match=r"starts at index \d+: the segments before it were deleted"):
        run_migration(tmp_path / "old", tmp_path / "new", FromLedgerV1())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_a_torn_tail_is_left_out_and_reported_but_damage_before_valid_records_is_refused(tmp_path: Path) -> None:
    journal = ledger_with_timers()
    old = journal.write(tmp_path / "old")
    segment = next(old.glob("*.seg"))
    intact = segment.read_bytes()
    torn = intact + b"SQBT" + bytes(60)  # a batch header cut short: the writer died mid-append
    segment.write_bytes(torn)
    report = run_migration(old, tmp_path / "new", FromLedgerV1())
    assert report.source_last_index == journal.index
    assert report.torn_tail is not None and "torn tail" in report.torn_tail
    assert segment.read_bytes() == torn  # the source is only read
    # Damage in a batch that a valid batch follows is no torn tail: refused.
    with Journal.open(tmp_path / "two", segment_bytes=SEGMENT_BYTES, preallocate=False) as writer:
        writer.append(b"".join(journal.records[:4]))
        writer.append(b"".join(journal.records[4:]))
        writer.sync()
    segment = next((tmp_path / "two").glob("*.seg"))
    damaged = bytearray(segment.read_bytes())
    damaged[200] ^= 0xFF  # inside the first batch
    segment.write_bytes(bytes(damaged))
    with pytest.raises(MigrationFailed, match=r"the source journal is damaged: .* a valid batch follows"):
        run_migration(tmp_path / "two", tmp_path / "again", FromLedgerV1())
    assert not (tmp_path / "again").exists()


def test_the_journal_writer_child_reports_its_error_and_a_bad_batch(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with JournalWriterProcess(tmp_path / "file" / "journal", SEGMENT_BYTES, False) as writer:
        with pytest.raises(JournalError, match="journal"):
            writer.append(b"x" * 64)
            writer.close()
    with JournalWriterProcess(tmp_path / "journal", SEGMENT_BYTES, False) as writer:
        writer.append(b"".join(ledger_with_timers().records))
        writer.append(bytes(48))  # not a record continuing the log
        with pytest.raises(JournalError, match=r"record 9|index 0, expected 9"):
            writer.close()


def seqd_cli(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daemon.cli", *arguments], capture_output=True,
                          text=True, timeout=CLI_TIMEOUT_S, check=False)  # fmt: skip


# -- the index map ----------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=60), st.integers(0, 3))
def test_the_index_map_says_where_every_old_index_went(per_record: list[int], added: int) -> None:
    runs: list[tuple[int, int, int, int]] = []
    new_first = 1
    for old_index, count in enumerate(per_record, start=1):
        if runs and runs[-1][3] == count:
            runs[-1] = (*runs[-1][:2], runs[-1][2] + 1, count)
        else:
            runs.append((old_index, new_first, 1, count))
        new_first += count
    index_map = IndexMap(runs, len(per_record), new_first - 1 + added)
    loaded = IndexMap.from_bytes(index_map.to_bytes())
    expected_next = 1
    for old_index, count in enumerate(per_record, start=1):
        targets = loaded.targets(old_index)
        assert targets == range(expected_next, expected_next + count)
        assert loaded.covering(old_index) == expected_next + count - 1
        for new_index in targets:
            assert loaded.source(new_index) == old_index
        expected_next += count
    for new_index in range(expected_next, expected_next + added):
        assert loaded.source(new_index) is None  # added by the migration itself
    with pytest.raises(KeyError):
        loaded.targets(len(per_record) + 1)


def test_a_damaged_index_map_is_refused(tmp_path: Path) -> None:
    data = bytearray(IndexMap([(1, 1, 3, 2)], 3, 6).to_bytes())
    data[-1] ^= 1
    with pytest.raises(Exception, match="fails its CRC-32C"):
        IndexMap.from_bytes(bytes(data))


# -- the worked example, on real nodes ------------------------------------------------------------


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_worked_example_ledger_v1_to_v2_on_real_nodes(tmp_dir: Path, unique: str) -> None:
    """docs/evolution.md's example: a v1 node serves clients (pipelined transfers, some refused,
    reads, reservations with timers, a snapshot), stops; its journal is migrated; a v2 node on the
    new journal has the same balances, answers resends of old requests from their saved replies
    or as duplicates without applying them again, and fires the timer left pending."""
    (tmp_dir / "v1").mkdir()
    (tmp_dir / "v2").mkdir()
    v1 = NodeProcess(tmp_dir / "v1", f"{unique}a")
    v2 = NodeProcess(tmp_dir / "v2", f"{unique}b", {"node": {"app": "sequencer.apps.ledger_v2:LedgerV2"}})
    names = ["alice", "bob", "carol"]
    rng = random.Random(16)
    with v1:
        v1.start()
        with Client(v1.socket_path, schema=Ledger.schema, timeout_s=30) as client:
            for name in names:
                client.call(OpenAccount(name))
            client.call(Deposit("alice", 1000))
            client.call(Deposit("bob", 1000))
            pending = []
            for number in range(300):  # pipelined; carol starts empty, so some are refused
                if number % 25 == 0:
                    pending.append(client.submit(Balance(rng.choice(names))))
                else:
                    source, target = rng.sample(names, 2)
                    pending.append(client.submit(Transfer(source, target, rng.randrange(1, 40))))
            pending.append(client.submit(Transfer("alice", "bob", 1)))
            refused = 0
            for request in pending:
                try:
                    request.result()
                except CommandRejected as error:
                    assert error.code == "insufficient_funds", error
                    refused += 1
            assert 0 < refused < 300
            client_a, first_a, last_a = client.client_id, pending[0].request_id, pending[-1].request_id
        with Client(v1.socket_path, schema=Ledger.schema, timeout_s=30) as client:
            # A reservation whose timer fires under v1, one committed (its timer cancelled).
            client.call(Reserve(1, "alice", "bob", 5, timeout_ms=50))
            client.call(Reserve(3, "bob", "alice", 3, timeout_ms=60_000))
            client.call(CommitReservation(3))
            wait_for(lambda: client.call(Balance("alice")).held == 0, "reservation 1 to expire under v1")
        with Client(v1.socket_path, schema=Ledger.schema, timeout_s=30) as client:
            with pytest.raises(CommandRejected, match="insufficient_funds"):
                client.call(Transfer("carol", "alice", 10**9))  # refused, and this client's last
            client_b, last_b = client.client_id, client.next_request_id - 1
        with Client(v1.socket_path, schema=Ledger.schema, timeout_s=30) as client:
            client.call(Balance("bob"))  # a read, and this client's last: dropped by the migration
            client_c, last_c = client.client_id, client.next_request_id - 1
        assert seqd_cli("snapshot", "--config", str(v1.config_path)).returncode == 0
        wait_for(lambda: any(v1.config.snapshot_dir.glob("*.seqsnap")), "the v1 snapshot")
        with Client(v1.socket_path, schema=Ledger.schema, timeout_s=30) as client:
            expected = {name: client.call(Balance(name)).balance for name in names}
            # Left pending at the migration: its timer must fire under v2.
            client.call(Reserve(2, "alice", "bob", 7, timeout_ms=15_000))
        v1.stop()

        old_journal = v1.config.journal_dir
        new_journal = v2.config.journal_dir
        result = seqd_cli("log", "migrate", "--from", str(old_journal), "--to", str(new_journal),
                          "--transform", "sequencer.apps.ledger_v2:FromLedgerV1")  # fmt: skip
        assert result.returncode == 0, result.stderr
        report = json.loads((new_journal / REPORT_FILE).read_text())
        assert report["counts_in"]["SNAPSHOT (dropped)"] >= 1
        assert report["counts_in"]["TIMER_FIRED"] == 1  # reservation 2 was still pending
        transfers = report["counts_in"]["COMMAND Transfer"]
        assert report["counts_out"]["COMMAND_PART Debit"] == transfers == report["counts_out"]["COMMAND_PART Credit"]
        balances_read = report["counts_in"]["COMMAND Balance"]
        assert report["counts_out"]["COMMAND_PART (no command)"] == balances_read
        for line in ("COMMAND Transfer", "COMMAND_PART Debit", "SNAPSHOT (dropped)", "verified: journal check ok"):
            assert line in result.stdout, result.stdout

    # The index map, the records it points to, and time.
    index_map = read_index_map(new_journal)
    new_records = {r.index: (r.type, r.version, r.session_id, r.request_id, r.timestamp_ns, bytes(r.payload))
                   for r in read_records(new_journal)}  # fmt: skip
    for record in read_records(old_journal):
        targets = [new_records[i] for i in index_map.targets(record.index)]
        if record.type == RecordType.COMMAND:
            command = LEDGER_SCHEMA.decode_command(record.version, bytes(record.payload[8:]))
            if type(command) is Transfer:
                assert [t[0] for t in targets] == [RecordType.COMMAND_PART] * 2
                debit, credit = (LedgerV2.schema.decode_command(2, t[5][8:]) for t in targets)
                assert debit == Debit(command.source, command.amount, command.target)
                assert credit == Credit(command.target, command.amount, command.source)
            elif type(command) is Balance:
                assert [(t[0], t[5][8:]) for t in targets] == [(RecordType.COMMAND_PART, b"")]
            else:
                assert [t[0] for t in targets] == [RecordType.COMMAND]
            for target in targets:  # the request's session, request id and time
                assert target[2:5] == (record.session_id, record.request_id, record.timestamp_ns)
        elif record.type == RecordType.SNAPSHOT:
            assert not targets
        else:
            assert targets == [(record.type, record.version, record.session_id, record.request_id,
                                record.timestamp_ns, bytes(record.payload))]  # fmt: skip
    times = [new_records[i][4] for i in sorted(new_records)]
    assert times == sorted(times)
    assert logtools.check(new_journal).ok

    with v2:
        v2.start()
        with Client(v2.socket_path, schema=LedgerV2.schema, timeout_s=30) as client:
            assert {name: client.call(Account(name)).balance for name in names} == expected
            wait_for(lambda: client.call(Account("alice")).held == 0, "reservation 2 to expire under v2")
        # Resends of old requests: saved replies or duplicates, never applied again.
        with Client(v2.socket_path, schema=LedgerV2.schema, client_id=client_a, first_request_id=last_a,
                    timeout_s=30) as client:  # fmt: skip
            saved = client.call(Debit("alice", 1, "bob"))
            assert type(saved) is Credited and (saved.account, saved.amount) == ("bob", 1)
        with Client(v2.socket_path, schema=LedgerV2.schema, client_id=client_a, first_request_id=first_a,
                    timeout_s=30) as client:  # fmt: skip
            with pytest.raises(Duplicate):
                client.call(Debit("alice", 1, "bob"))
        with Client(v2.socket_path, schema=LedgerV2.schema, client_id=client_b, first_request_id=last_b,
                    timeout_s=30) as client:  # fmt: skip
            with pytest.raises(CommandRejected, match="insufficient_funds"):
                client.call(Debit("alice", 1, "bob"))
        with Client(v2.socket_path, schema=LedgerV2.schema, client_id=client_c, first_request_id=last_c,
                    timeout_s=30) as client:  # fmt: skip
            with pytest.raises(Duplicate):
                client.call(Debit("alice", 1, "bob"))
        with Client(v2.socket_path, schema=LedgerV2.schema, timeout_s=30) as client:
            assert {name: client.call(Account(name)).balance for name in names} == expected
            client.call(Debit("alice", 10, "carol"))  # and v2 works as v2
            client.call(Credit("carol", 10, "alice"))
            assert client.call(Account("carol")).balance == expected["carol"] + 10
        # The journal v2 runs on starts with exactly the verified one; and v2's state is what a
        # replay of its journal gives (its snapshot verifies).
        prefix = replay_journal(new_journal, LedgerV2, to_index=report["target_last_index"])
        assert prefix.state_hash().hex() == report["state_hash"]
        assert seqd_cli("snapshot", "--config", str(v2.config_path)).returncode == 0
        wait_for(lambda: any(v2.config.snapshot_dir.glob("*.seqsnap")), "the v2 snapshot")
        verified = seqd_cli("snapshot", "verify", "--config", str(v2.config_path))
        assert verified.returncode == 0 and ": ok" in verified.stdout, verified.stdout + verified.stderr


def test_migrate_refuses_the_journal_of_a_running_node_but_migrates_a_copy(
    tmp_dir: Path, node_factory: Callable[..., NodeProcess],  # noqa: F811
) -> None:
    node = node_factory()
    with Client(node.socket_path, schema=Ledger.schema, timeout_s=30) as client:
        client.call(OpenAccount("alice"))
        client.call(Deposit("alice", 5))
    journal = node.config.journal_dir
    target = tmp_dir / "new"
    result = seqd_cli("log", "migrate", "--from", str(journal), "--to", str(target),
                      "--transform", "sequencer.apps.ledger_v2:FromLedgerV1")  # fmt: skip
    assert result.returncode == 73, result.stderr
    assert f"the journal {journal} belongs to a running node" in result.stderr
    assert "migrate a copy" in result.stderr
    assert not target.exists()
    copy = tmp_dir / "copy"
    shutil.copytree(journal, copy)  # the node is idle: a consistent copy
    result = seqd_cli("log", "migrate", "--from", str(copy), "--to", str(target),
                      "--transform", "sequencer.apps.ledger_v2:FromLedgerV1")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert replay_journal(target, LedgerV2).app.accounts["alice"].balance == 5
