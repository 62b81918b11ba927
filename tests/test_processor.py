"""The blp core: replies, exactly-once dedup, rejection, routing, sessions, timers, snapshots."""

from __future__ import annotations

import msgspec
import pytest

from sequencer.apps.ledger import (
    LEDGER_SCHEMA,
    AccountBalance,
    Balance,
    CommitReservation,
    Deposit,
    Ledger,
    OpenAccount,
    ReservationExpired,
    Reserve,
    Transfer,
    Transferred,
    VoidReservation,
)
from sequencer.egress import (
    Event,
    Reply,
    ReplyStatus,
    TimerCancel,
    TimerSchedule,
    decode,
    encode_event,
    encode_reply,
    encode_timer_cancel,
    encode_timer_schedule,
)
from sequencer.processor import SAVED_REPLIES_MAX, Processor
from sequencer.schema import Schema
from sequencer.state_machine import Rejected, StateMachine
from tests.fixtures.feeder import Feeder, feed, frame_of, session_id_of

S1 = session_id_of(1, 1)
S2 = session_id_of(2, 1)


def replies(outputs):
    return [o for o in outputs if isinstance(o, Reply)]


def reply_value(output: Reply):
    return LEDGER_SCHEMA.decode_reply(output.version, output.payload)


@pytest.fixture
def ledger():
    processor = Processor(Ledger)
    feeder = Feeder(LEDGER_SCHEMA)
    feed(processor, feeder.open_session(S1, client_id=7))
    request_id = 0
    for command in (OpenAccount("alice"), OpenAccount("bob"), Deposit("alice", 100)):
        request_id += 1
        feed(processor, feeder.command(S1, request_id, command))
    return processor, feeder


def test_ledger_commands_get_replies_carrying_their_index(ledger):
    processor, feeder = ledger
    outputs = feed(processor, feeder.command(S1, 4, Transfer("alice", "bob", 30)))
    (reply,) = replies(outputs)
    assert (reply.session_id, reply.request_id, reply.index) == (S1, 4, feeder.index)
    assert reply.status == ReplyStatus.OK
    assert reply_value(reply) == Transferred("alice", "bob", 30, 70)
    events = [o for o in outputs if isinstance(o, Event)]
    assert len(events) == 1 and events[0].index == feeder.index
    (balance,) = replies(feed(processor, feeder.command(S1, 5, Balance("bob"))))
    assert reply_value(balance) == AccountBalance("bob", 30, 0)


def test_resent_request_returns_saved_reply_and_applies_once(ledger):
    processor, feeder = ledger
    (first,) = replies(feed(processor, feeder.command(S1, 4, Transfer("alice", "bob", 30))))
    # The client reconnects on another session and resends everything unacknowledged.
    feed(processor, feeder.open_session(S2, client_id=7, node="n2"))
    outputs = feed(processor, feeder.command(S2, 4, Transfer("alice", "bob", 30)))
    assert outputs == [first._replace(session_id=S2)]  # the same reply, its original index
    assert processor.app.accounts["bob"].balance == 30
    processor.app.invariants()


def test_acked_request_id_prunes_saved_replies_and_a_later_resend_is_duplicate(ledger):
    processor, feeder = ledger
    assert processor.saved_reply_ids(7) == [1, 2, 3]
    feed(processor, feeder.command(S1, 4, Transfer("alice", "bob", 1), acked=2))
    assert processor.saved_reply_ids(7) == [3, 4]
    (reply,) = replies(feed(processor, feeder.command(S1, 2, OpenAccount("bob"), acked=2)))
    assert reply.status == ReplyStatus.DUPLICATE
    assert reply.payload == b""
    (kept,) = replies(feed(processor, feeder.command(S1, 3, Deposit("alice", 100), acked=2)))
    assert kept.status == ReplyStatus.OK
    assert processor.app.accounts["alice"].balance == 99


def test_saved_replies_per_client_are_bounded_and_the_oldest_goes_first():
    processor = Processor(Ledger)
    feeder = Feeder(LEDGER_SCHEMA)
    feed(processor, feeder.open_session(S1, client_id=7))
    for request_id in range(1, SAVED_REPLIES_MAX + 3):
        feed(processor, feeder.command(S1, request_id, Balance("@mint")))
    saved = processor.saved_reply_ids(7)
    assert len(saved) == SAVED_REPLIES_MAX
    assert saved[0] == 3
    (reply,) = replies(feed(processor, feeder.command(S1, 1, Balance("@mint"))))
    assert reply.status == ReplyStatus.DUPLICATE


def test_rejected_command_replies_with_code_and_leaves_app_state_unchanged(ledger):
    processor, feeder = ledger
    before = LEDGER_SCHEMA.encode_snapshot(processor.app.snapshot())
    (reply,) = feed(processor, feeder.command(S1, 4, Transfer("alice", "bob", 1000)))
    assert reply.status == ReplyStatus.REJECTED
    assert msgspec.msgpack.decode(reply.payload)["code"] == "insufficient_funds"
    assert LEDGER_SCHEMA.encode_snapshot(processor.app.snapshot()) == before
    # A rejection is the request's result: a resend gets the same rejection.
    (again,) = feed(processor, feeder.command(S1, 4, Transfer("alice", "bob", 1)))
    assert again == reply


class _Command(msgspec.Struct, tag=True):
    mode: str


class _Reply(msgspec.Struct, tag=True):
    value: int


class _Event(msgspec.Struct, tag=True):
    value: int


class _State(msgspec.Struct):
    value: int


MANY_EVENTS = 5_000  # ~190 KB of event frames from one command: past UNHASHED_BYTES_MAX


class Misbehaving(StateMachine):
    schema = Schema("misbehaving", 1, (_Command,), (_Reply,), (_Event,), _State)

    def apply(self, ctx, command):
        if command.mode == "publish-then-reject":
            ctx.publish(_Event(1))
            raise Rejected("late", "too late")
        if command.mode == "cancel-unknown":
            ctx.cancel(12345)
            return _Reply(0)
        if command.mode.startswith("publish-many"):
            for value in range(MANY_EVENTS):
                ctx.publish(_Event(value))
            if command.mode.endswith("then-reject"):
                raise Rejected("late", "too late")
            return _Reply(MANY_EVENTS)
        raise KeyError("a bug in the app")

    def snapshot(self):
        return _State(0)

    @classmethod
    def restore(cls, snapshot):
        return cls()


def misbehaving_processor():
    processor = Processor(Misbehaving)
    feeder = Feeder(Misbehaving.schema)
    feed(processor, feeder.open_session(S1, client_id=1))
    return processor, feeder


@pytest.mark.parametrize("emit_events", [True, False])
def test_rejected_after_an_output_is_a_programmer_error(emit_events):
    """Also on a node whose blp emits no events (no subscriber): the event was computed and
    hashed all the same, and every replica must stop on it, not only those with a subscriber."""
    processor, feeder = misbehaving_processor()
    processor.emit_events = emit_events
    with pytest.raises(AssertionError, match="validate the whole command"):
        feed(processor, feeder.command(S1, 1, _Command("publish-then-reject")))


def test_a_record_with_many_outputs_is_hashed_in_bounded_pieces_to_the_same_hash(monkeypatch):
    """A record's outputs are hashed with its reply in one call, but not joined without bound: a
    record of thousands of events copied them quadratically (10,000: 2.5 s against 6 ms). Folded
    early, the hash is the same as in one piece, and a rejection after them is still seen."""
    import sequencer.processor as processor_module

    def run(bound: int) -> tuple[int, list[int]]:
        monkeypatch.setattr(processor_module, "UNHASHED_BYTES_MAX", bound)
        lengths: list[int] = []
        crc = processor_module._crc32c

        def spy(data, value):
            lengths.append(len(data))
            return crc(data, value)

        monkeypatch.setattr(processor_module, "_crc32c", spy)
        processor, feeder = misbehaving_processor()
        replies_seen = replies(feed(processor, feeder.command(S1, 1, _Command("publish-many"))))
        assert [r.status for r in replies_seen] == [ReplyStatus.OK]
        rolling_hash = processor.rolling_hash
        with pytest.raises(AssertionError, match="validate the whole command"):
            feed(processor, feeder.command(S1, 2, _Command("publish-many-then-reject")))
        monkeypatch.setattr(processor_module, "_crc32c", crc)
        return rolling_hash, lengths

    bound = processor_module.UNHASHED_BYTES_MAX
    bounded, pieces = run(bound)
    whole, one_piece = run(1 << 40)
    assert bounded == whole
    assert max(one_piece) > 100_000, max(one_piece)  # the app's events are past the bound
    assert max(pieces) <= bound + 64, max(pieces)


def test_an_app_exception_other_than_rejected_propagates_to_crash_the_blp():
    processor, feeder = misbehaving_processor()
    with pytest.raises(KeyError, match="a bug in the app"):
        feed(processor, feeder.command(S1, 1, _Command("crash")))


def test_cancel_of_a_timer_that_is_not_pending_emits_nothing():
    processor, feeder = misbehaving_processor()
    outputs = feed(processor, feeder.command(S1, 1, _Command("cancel-unknown")))
    assert [type(o) for o in outputs] == [Reply]


def test_replies_go_only_to_local_sessions_but_every_node_has_the_same_hashes():
    nodes = {name: Processor(Ledger, node=name) for name in ("n1", "n2")}
    feeder = Feeder(LEDGER_SCHEMA)
    records = [
        feeder.open_session(S1, client_id=1, node="n1"),
        feeder.open_session(S2, client_id=2, node="n2"),
        feeder.command(S1, 1, OpenAccount("a")),
        feeder.command(S2, 1, OpenAccount("b")),
    ]
    seen: dict[str, list[Reply]] = {name: [] for name in nodes}
    for record in records:
        for name, processor in nodes.items():
            seen[name] += replies(feed(processor, record))
    assert [r.session_id for r in seen["n1"]] == [S1]
    assert [r.session_id for r in seen["n2"]] == [S2]
    assert nodes["n1"].rolling_hash == nodes["n2"].rolling_hash
    assert nodes["n1"].state_hash() == nodes["n2"].state_hash()


def test_node_start_closes_that_nodes_sessions_and_their_late_commands_are_dropped(ledger):
    processor, feeder = ledger
    feed(processor, feeder.open_session(S2, client_id=8, node="n2"))
    feed(processor, feeder.node_start("n1"))
    assert processor.session_ids() == [S2]
    assert feed(processor, feeder.command(S1, 4, Transfer("alice", "bob", 1))) == []
    assert processor.commands_without_session == 1
    assert processor.app.accounts["bob"].balance == 0


def test_records_must_come_gapless(ledger):
    processor, feeder = ledger
    feeder.index += 1  # skip one
    with pytest.raises(AssertionError):
        processor.apply_frame(*frame_of(feeder.term_start()))


def test_snapshot_record_requests_a_snapshot_before_the_next_record(ledger):
    processor, feeder = ledger
    processor.apply_frame(*frame_of(feeder.snapshot()))
    assert processor.snapshot_requested
    with pytest.raises(AssertionError, match="fork the snapshot writer"):
        processor.apply_frame(*frame_of(feeder.term_start()))


def test_snapshot_restore_gives_the_same_state_hash_and_the_same_future(ledger):
    processor, feeder = ledger
    feed(processor, feeder.command(S1, 4, Reserve(5, "alice", "bob", 10, 1000)))
    restored = Processor.restore(Ledger, processor.snapshot_bytes())
    assert restored.state_hash() == processor.state_hash()
    assert restored.applied_index == processor.applied_index
    later = [feeder.command(S1, 5, Transfer("alice", "bob", 20)), feeder.command(S1, 4, Balance("x"))]
    assert [feed(processor, r) for r in later] == [feed(restored, r) for r in later]
    assert restored.rolling_hash == processor.rolling_hash


def test_two_processors_fed_the_same_records_agree_on_both_hashes(ledger):
    _, feeder = ledger
    for n in range(5):
        feeder.command(S1, 4 + n, Transfer("alice", "bob", 1 + n))
    first, second = Processor(Ledger), Processor(Ledger)
    for record in feeder.records:
        feed(first, record)
        feed(second, record)
    assert first.applied_index == len(feeder.records)
    assert first.rolling_hash == second.rolling_hash != 0
    assert first.state_hash() == second.state_hash()


def test_egress_frames_round_trip():
    assert decode(1, encode_reply(1, 2, 3, 1, 4, b"xy")) == Reply(1, 2, 3, 1, 4, b"xy")
    assert decode(2, encode_event(9, 2, b"e")) == Event(9, 2, b"e")
    assert decode(3, encode_timer_schedule(5, -1)) == TimerSchedule(5, -1)
    assert decode(4, encode_timer_cancel(5)) == TimerCancel(5)


# -- timers ------------------------------------------------------------------------------------


def test_schedule_emits_a_timer_request_and_the_fire_runs_on_timer_once(ledger):
    processor, feeder = ledger
    (schedule, reply) = feed(processor, feeder.command(S1, 4, Reserve(5, "alice", "bob", 10, 1)))
    assert schedule == TimerSchedule(5, reply_value(reply).deadline_ns)
    assert processor.timers() == {5: schedule.deadline_ns}
    outputs = feed(processor, feeder.timer_fired(5, schedule.deadline_ns))
    assert [o for o in outputs if isinstance(o, Event)]
    assert LEDGER_SCHEMA.decode_event(1, outputs[0].payload) == ReservationExpired(5, "alice", 10)
    assert processor.timers() == {}
    assert feed(processor, feeder.timer_fired(5, schedule.deadline_ns)) == []
    assert processor.stale_timer_fires == 1
    assert processor.app.accounts["alice"].held == 0
    processor.app.invariants()


def test_fire_of_a_cancelled_timer_is_ignored_and_cancel_after_fire_is_a_no_op(ledger):
    processor, feeder = ledger
    (schedule, _) = feed(processor, feeder.command(S1, 4, Reserve(5, "alice", "bob", 10, 1)))
    (cancel, _) = feed(processor, feeder.command(S1, 5, VoidReservation(5)))
    assert cancel == TimerCancel(5)
    assert feed(processor, feeder.timer_fired(5, schedule.deadline_ns)) == []
    assert processor.app.accounts["alice"].balance == 100
    # Fire first, then the commit: the reservation is gone, the commit is rejected, no cancel.
    (schedule, _) = feed(processor, feeder.command(S1, 6, Reserve(6, "alice", "bob", 10, 1)))
    feed(processor, feeder.timer_fired(6, schedule.deadline_ns))
    (reply,) = feed(processor, feeder.command(S1, 7, CommitReservation(6)))
    assert reply.status == ReplyStatus.REJECTED
    processor.app.invariants()


class Alarm(msgspec.Struct, tag=True):
    timer_id: int
    deadline_ns: int


class Fired(msgspec.Struct, tag=True):
    timer_id: int
    at_ns: int


class AlarmState(msgspec.Struct):
    fired: list[tuple[int, int]]


class Alarms(StateMachine):
    """Schedules whatever it is told; records each fire."""

    schema = Schema("alarms", 1, (Alarm,), (), (Fired,), AlarmState)

    def __init__(self, fired=None):
        self.fired = fired or []

    def apply(self, ctx, command):
        ctx.schedule(command.timer_id, command.deadline_ns)

    def on_timer(self, ctx, timer_id):
        self.fired.append((timer_id, ctx.now))
        ctx.publish(Fired(timer_id, ctx.now))

    def snapshot(self):
        return AlarmState(self.fired)

    @classmethod
    def restore(cls, snapshot):
        return cls([tuple(f) for f in snapshot.fired])


def test_rescheduling_replaces_so_a_fire_with_the_old_deadline_is_ignored():
    processor = Processor(Alarms)
    feeder = Feeder(Alarms.schema)
    feed(processor, feeder.open_session(S1, client_id=1))
    feed(processor, feeder.command(S1, 1, Alarm(3, 100)))
    feed(processor, feeder.command(S1, 2, Alarm(3, 200)))
    assert processor.timers() == {3: 200}
    assert feed(processor, feeder.timer_fired(3, 100)) == []
    assert processor.app.fired == []
    feed(processor, feeder.timer_fired(3, 200))
    assert [t for t, _ in processor.app.fired] == [3]


def test_pending_timers_are_rearmed_after_restore_and_an_overdue_one_fires_once():
    processor = Processor(Alarms)
    feeder = Feeder(Alarms.schema)
    feed(processor, feeder.open_session(S1, client_id=1))
    feed(processor, feeder.command(S1, 1, Alarm(3, feeder.now + 5)))
    feed(processor, feeder.command(S1, 2, Alarm(4, feeder.now + 10**12)))
    body = processor.snapshot_bytes()
    # The node is down past the first deadline; recovery re-arms both timers.
    restored = Processor.restore(Alarms, body)
    rearm = [TimerSchedule(*decode(kind, frame)) for kind, frame in restored.pending_timers()]
    assert rearm == [TimerSchedule(3, processor.timers()[3]), TimerSchedule(4, processor.timers()[4])]
    # The sequencer sees 3 overdue and fires it; a duplicate fire (say, also sequenced by the
    # old incarnation) is ignored.
    feeder.advance(10**9)
    feed(restored, feeder.timer_fired(3, rearm[0].deadline_ns))
    feed(restored, feeder.timer_fired(3, rearm[0].deadline_ns))
    assert [t for t, _ in restored.app.fired] == [3]
    assert restored.timers() == {4: rearm[1].deadline_ns}


def test_undecodable_command_is_rejected_not_fatal_but_a_newer_version_stops_the_replay() -> None:
    """A record in the log for good must never crash the blp when it is garbage (it would crash
    at every recovery); a command of a newer app version must stop it: rejecting what the newer
    version accepted would silently build another state."""
    import pytest

    from sequencer.apps.ledger import Ledger, OpenAccount
    from sequencer.egress import REPLY_HEADER, ReplyStatus
    from sequencer.processor import Processor
    from sequencer.record import RecordType, encode_command, encode_record, encode_session_open
    from sequencer.schema import VersionError

    processor = Processor(Ledger)
    version, payload = Ledger.schema.encode_command(OpenAccount("a"))
    records = [
        encode_record(RecordType.SESSION_OPEN, 1, 1, 1, 10, 7, 0, encode_session_open(99, "n1")),
        encode_record(RecordType.COMMAND, version, 2, 1, 11, 7, 1, encode_command(0, b"\xc1\xc1garbage")),
        encode_record(RecordType.COMMAND, version, 3, 1, 12, 7, 2, encode_command(0, b"\x80")),
        encode_record(RecordType.COMMAND, version, 4, 1, 13, 7, 3, encode_command(0, payload)),
    ]
    processor.apply_records(b"".join(records))
    statuses = [REPLY_HEADER.unpack_from(frame, 0)[3] for _, frame in processor.drain_outputs()]
    assert statuses == [ReplyStatus.REJECTED, ReplyStatus.REJECTED, ReplyStatus.OK]
    assert processor.applied_index == 4
    newer = encode_record(RecordType.COMMAND, 99, 5, 1, 14, 7, 4, encode_command(0, payload))
    with pytest.raises(VersionError, match="99"):
        processor.apply_records(newer)


def test_replay_of_journal_runs_reaches_the_same_state_as_record_by_record() -> None:
    """The recovery fast path (read_runs + replay_run) and the plain path agree, from any index."""
    import tempfile

    from sequencer.apps.ledger import Deposit, Ledger, OpenAccount, Transfer
    from sequencer.journal import Journal, read_records, read_runs
    from sequencer.processor import Processor
    from sequencer.record import RecordType, encode_command, encode_record, encode_session_open

    records = [encode_record(RecordType.SESSION_OPEN, 1, 1, 1, 1, 5, 0, encode_session_open(9, "n1"))]
    commands = [OpenAccount("a"), OpenAccount("b"), Deposit("a", 1000)]
    commands += [Transfer("a", "b", 1 + number % 7) for number in range(300)]
    for number, command in enumerate(commands, start=2):
        version, payload = Ledger.schema.encode_command(command)
        records.append(encode_record(RecordType.COMMAND, version, number, 1, number, 5, number, encode_command(0, payload)))
    with tempfile.TemporaryDirectory() as directory:
        with Journal.open(directory, segment_bytes=1 << 20, preallocate=False) as journal:
            for start in range(0, len(records), 37):
                journal.append(b"".join(records[start : start + 37]))
            journal.sync()
        slow = Processor(Ledger)
        for record in read_records(directory):
            slow.apply_frame(record.type | record.version << 16, record.raw[8 : record.length])
        for middle in (1, 2, 38, 150):
            fast = Processor(Ledger)
            if middle > 1:
                for record in read_records(directory, 1, middle - 1):
                    fast.apply_frame(record.type | record.version << 16, record.raw[8 : record.length])
            for run in read_runs(directory, middle, len(records)):
                fast.replay_run(run)
            assert fast.applied_index == slow.applied_index == len(records)
            assert fast.state_hash() == slow.state_hash()
            assert fast.rolling_hash == slow.rolling_hash


def test_clients_without_a_session_for_the_expiry_are_forgotten_deterministically() -> None:
    """The dedup table is bounded: a client id idle (no session) past the expiry is dropped, at
    the same record on every replica and after a restore; one with a session never is."""
    from sequencer.apps.ledger import Ledger, OpenAccount
    from sequencer.processor import Processor
    from sequencer.record import RecordType, encode_command, encode_record, encode_session_open

    expiry = 1_000
    version, payload = Ledger.schema.encode_command(OpenAccount("x"))
    records = [
        encode_record(RecordType.SESSION_OPEN, 1, 1, 1, 10, 1, 0, encode_session_open(101, "n1")),
        encode_record(RecordType.COMMAND, version, 2, 1, 11, 1, 1, encode_command(0, payload)),
        encode_record(RecordType.SESSION_CLOSE, 1, 3, 1, 20, 1, 0),  # client 101 idle from 20
        encode_record(RecordType.SESSION_OPEN, 1, 4, 1, 30, 2, 0, encode_session_open(202, "n1")),
        encode_record(RecordType.SESSION_OPEN, 1, 5, 1, 1_019, 3, 0, encode_session_open(303, "n1")),
        encode_record(RecordType.SESSION_OPEN, 1, 6, 1, 1_020, 4, 0, encode_session_open(404, "n1")),
    ]
    live = Processor(Ledger, client_expiry_ns=expiry)
    live.apply_records(b"".join(records[:5]))
    assert live.saved_reply_ids(101) == [1]  # idle for 999 ns at index 5: kept
    restored = Processor.restore(Ledger, live.snapshot_bytes(), client_expiry_ns=expiry)
    for processor in (live, restored):
        processor.apply_records(records[5])
        assert processor.clients_expired == 1  # idle for the whole expiry at index 6
        assert processor.saved_reply_ids(101) == []
        assert sorted(processor._table.clients) == [202, 303, 404]  # 202 has a session: kept
    assert live.state_hash() == restored.state_hash()
