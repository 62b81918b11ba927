"""Cluster mode on the blp core: every record is idempotent, and each node emits its own replies.

A follower's replicator resends every record it forwarded and has not yet seen in its log when the
leader changes, so a record may reach the log twice (docs/contracts.md, "Records"). A second copy
must change nothing. And every node applies every record but emits only its own sessions'
replies, chosen by the node number in the session id, which changes no state and no hash.
"""

from __future__ import annotations

from typing import Any

import msgspec

from sequencer.apps.ledger import LEDGER_SCHEMA, Deposit, Ledger, OpenAccount, Reserve
from sequencer.egress import Reply, ReplyStatus, TimerCancel, TimerSchedule
from sequencer.processor import Processor
from sequencer.record import ADMIN_NODE_START, RecordType, encode_admin
from sequencer.rules_versions import RULES_VERSION
from tests.fixtures.feeder import Feeder, feed

NODE_NUMBER = 1
EARLIER = 0x000111  # two starts of node 1 (incarnation ids)
LATER = 0x000222


def session(node_number: int, incarnation: int, counter: int) -> int:
    """A session id as the gateway makes it: node number, incarnation, counter."""
    return node_number << 56 | incarnation << 32 | counter


def node_start(
    feeder: Feeder, incarnation: int, node: str = "n1", number: int = NODE_NUMBER, previous: int | None = None,
    rules_version: int | None = RULES_VERSION, members: list[int] | None = None, app_version: int | None = None,
) -> bytes:
    """A node_start as today's gateway writes it: with its incarnation (and the one before), its
    members (by default itself alone: then its report makes its rules due) and the session rules
    its seqd applies (sequencer/rules_versions.py). `rules_version` None: as the seqd before rules
    versions wrote it (with no `previous` either, then)."""
    extra: dict[str, Any] = {"members": [number] if members is None else members}
    if previous is not None:
        extra["previous"] = previous
    if rules_version is not None:
        extra["rules_version"] = rules_version
    if app_version is not None:
        extra["app_version"] = app_version
    payload = encode_admin(ADMIN_NODE_START, node=node, number=number, incarnation=incarnation, **extra)
    return feeder._record(RecordType.ADMIN, 1, 0, 0, payload)


def replies(outputs: list[Any]) -> list[Reply]:
    return [output for output in outputs if isinstance(output, Reply)]


def started() -> tuple[Processor[Ledger], Feeder]:
    return Processor(Ledger), Feeder(LEDGER_SCHEMA)


def test_a_second_copy_of_a_session_open_changes_nothing():
    processor, feeder = started()
    s1 = session(1, EARLIER, 1)
    opening = feeder.open_session(s1, client_id=7)
    feed(processor, opening)
    feed(processor, feeder.command(s1, 1, OpenAccount("alice")))
    # The same record again, at a later index (the resend after a leader change).
    feed(processor, feeder._record(RecordType.SESSION_OPEN, 1, s1, 0, opening[48:].rstrip(b"\0")))
    assert processor.duplicate_records == 1
    assert processor.session_ids() == [s1]
    feed(processor, feeder.close_session(s1))
    # One close ends the session: the client is idle (a second open would have left it counted
    # as still connected, never idle, never expiring).
    assert processor._table.clients[7].sessions == 0
    assert 7 in processor._table.idle


def test_a_second_copy_of_a_session_open_after_its_close_does_not_reopen_it():
    # A resent suffix holds the open and the close: the copies come after the first close.
    processor, feeder = started()
    feed(processor, node_start(feeder, LATER))
    first, second = session(1, LATER, 1), session(1, LATER, 2)
    opening = feeder.open_session(first, client_id=7)
    feed(processor, opening)
    feed(processor, feeder.close_session(first))
    feed(processor, feeder._record(RecordType.SESSION_OPEN, 1, first, 0, opening[48:].rstrip(b"\0")))
    assert processor.session_ids() == []
    assert processor.duplicate_records == 1
    assert 7 in processor._table.idle  # the client stays idle: nothing reopened it
    feed(processor, feeder.open_session(second, client_id=7))  # the next session opens
    assert processor.session_ids() == [second]


def test_session_counters_that_wrap_open_new_sessions():
    processor, feeder = started()
    feed(processor, node_start(feeder, LATER))
    last = session(1, LATER, (1 << 32) - 1)
    feed(processor, feeder.open_session(last, client_id=7))
    feed(processor, feeder.open_session(session(1, LATER, 0), client_id=8))  # the counter wrapped
    assert processor.session_ids() == [last, session(1, LATER, 0)]
    assert processor.duplicate_records == 0


def test_a_second_copy_of_a_node_start_keeps_the_sessions_its_incarnation_opened_since():
    processor, feeder = started()
    old = session(1, EARLIER, 1)
    feed(processor, node_start(feeder, EARLIER))
    feed(processor, feeder.open_session(old, client_id=7))
    feed(processor, node_start(feeder, LATER))  # a restart: the earlier start's sessions close
    assert processor.session_ids() == []
    new = session(1, LATER, 1)
    feed(processor, feeder.open_session(new, client_id=7))
    feed(processor, node_start(feeder, LATER))  # the resend of this start's node_start
    feed(processor, node_start(feeder, EARLIER))  # a copy of an earlier start's, even later
    assert processor.session_ids() == [new]
    assert processor.duplicate_records == 2
    (reply,) = replies(feed(processor, feeder.command(new, 1, OpenAccount("alice"))))
    assert reply.status == ReplyStatus.OK  # applied: the session is open


def test_a_node_start_that_reaches_the_log_after_its_own_sessions_keeps_them_open():
    # Issue 11: a follower's node_start was forwarded before its peer link to the leader was up
    # (dropped), and resent at the next leader change after its first client's open and
    # commands. Closing that live session would drop its later commands with no reply and no
    # resend (the client is still connected): the client stalled for good.
    processor, feeder = started()
    old, mine = session(1, EARLIER, 1), session(1, LATER, 1)
    feed(processor, node_start(feeder, EARLIER))
    feed(processor, feeder.open_session(old, client_id=7))
    feed(processor, feeder.open_session(mine, client_id=8))  # LATER's start not in the log yet
    (first,) = replies(feed(processor, feeder.command(mine, 1, OpenAccount("alice"))))
    feed(processor, node_start(feeder, LATER))  # its first copy, late
    assert processor.session_ids() == [mine]  # the earlier start's session closed, not its own
    (reply,) = replies(feed(processor, feeder.command(mine, 2, Deposit("alice", 5))))
    assert (first.status, reply.status) == (ReplyStatus.OK, ReplyStatus.OK)
    assert processor.commands_without_session == 0
    # A copy of the early open, even after its session closed, is still a second copy.
    feed(processor, feeder.close_session(mine))
    feed(processor, feeder.open_session(mine, client_id=8))
    assert processor.session_ids() == []
    assert processor.duplicate_records == 1


def test_a_node_start_closes_only_its_own_nodes_sessions_whatever_the_names():
    # Three machines may all keep the default node name: the node number tells them apart.
    processor, feeder = started()
    mine, theirs = session(1, EARLIER, 1), session(2, EARLIER, 1)
    feed(processor, feeder.open_session(mine, client_id=7, node="n1"))
    feed(processor, feeder.open_session(theirs, client_id=8, node="n1"))
    feed(processor, node_start(feeder, LATER, node="n1", number=1))
    assert processor.session_ids() == [theirs]


def test_a_node_start_of_an_older_seqd_closes_every_session_of_its_node_name_as_before():
    processor, feeder = started()
    first, second = session(1, EARLIER, 1), session(1, EARLIER, 2)
    feed(processor, feeder.open_session(first, client_id=7))
    feed(processor, feeder.node_start("n1"))  # no incarnation: written by an older seqd
    feed(processor, feeder.open_session(second, client_id=8))
    feed(processor, feeder.node_start("n1"))
    assert processor.session_ids() == []
    assert processor.duplicate_records == 0


def test_the_started_incarnations_survive_a_snapshot_and_old_bodies_keep_their_bytes():
    processor, feeder = started()
    s1 = session(1, LATER, 1)
    feed(processor, feeder.open_session(s1, client_id=7))
    # No node_start with an incarnation yet: the body has the layout an older seqd wrote.
    assert len(msgspec.msgpack.decode(processor.snapshot_bytes())) == 11
    feed(processor, node_start(feeder, LATER, rules_version=None))  # as the seqd before rules versions
    feed(processor, feeder.open_session(session(1, LATER, 2), client_id=8))
    body = processor.snapshot_bytes()
    assert len(msgspec.msgpack.decode(body)) == 12
    restored = Processor.restore(Ledger, body)
    assert restored.state_hash() == processor.state_hash()
    feeder.index = restored.applied_index
    feed(restored, node_start(feeder, LATER))  # a second copy after the restart from snapshot
    # s1 is LATER's own session (it reached the log before LATER's node_start): it stays open.
    assert restored.session_ids() == [s1, session(1, LATER, 2)]


def test_a_second_copy_of_a_command_gets_the_saved_reply_on_its_session_and_applies_once():
    processor, feeder = started()
    s1 = session(1, EARLIER, 1)
    feed(processor, feeder.open_session(s1, client_id=7))
    feed(processor, feeder.command(s1, 1, OpenAccount("alice")))
    record = feeder.command(s1, 2, Deposit("alice", 5))
    (first,) = replies(feed(processor, record))
    copy = feeder.command(s1, 2, Deposit("alice", 5))  # the same record at the next index
    (second,) = replies(feed(processor, copy))
    assert (second.session_id, second.request_id) == (s1, 2)
    assert (second.index, second.status, second.payload) == (first.index, first.status, first.payload)
    assert processor.app.accounts["alice"].balance == 5


def test_a_second_copy_of_a_timer_fire_runs_on_timer_once_and_every_node_learns_of_the_fire():
    processor, feeder = started()
    processor.emit_for(NODE_NUMBER, cluster=True)
    plain = Processor(Ledger)  # a single node's blp: no fire notices
    s1 = session(1, EARLIER, 1)
    for record in (
        feeder.open_session(s1, client_id=7),
        feeder.command(s1, 1, OpenAccount("alice")),
        feeder.command(s1, 2, OpenAccount("bob")),
        feeder.command(s1, 3, Deposit("alice", 50)),
    ):
        feed(processor, record)
        feed(plain, record)
    reserve = feeder.command(s1, 4, Reserve(1, "alice", "bob", 20, timeout_ms=5))
    (schedule,) = [o for o in feed(processor, reserve) if isinstance(o, TimerSchedule)]
    feed(plain, reserve)
    fire = feeder.timer_fired(schedule.timer_id, schedule.deadline_ns)
    outputs = feed(processor, fire)
    assert outputs[0] == TimerCancel(schedule.timer_id)  # the sequencers drop it from their queue
    assert not [o for o in feed(plain, fire) if isinstance(o, TimerCancel)]
    assert processor.rolling_hash == plain.rolling_hash  # the notice is plumbing, not hashed
    assert processor.app.accounts["alice"].held == 0  # the reservation expired once
    copy = feeder.timer_fired(schedule.timer_id, schedule.deadline_ns)
    assert feed(processor, copy) == []
    assert processor.app.accounts["alice"].held == 0
    assert processor.stale_timer_fires == 1


def test_each_node_emits_the_replies_of_its_own_sessions_by_number_with_equal_hashes():
    nodes = {number: Processor(Ledger, node="n1") for number in (1, 2)}
    for number, processor in nodes.items():
        processor.emit_for(number, cluster=True)
    feeder = Feeder(LEDGER_SCHEMA)
    on_1, on_2 = session(1, EARLIER, 1), session(2, EARLIER, 1)
    seen: dict[int, list[int]] = {1: [], 2: []}
    for record in (
        feeder.open_session(on_1, client_id=7, node="n1"),  # both nodes named n1
        feeder.open_session(on_2, client_id=8, node="n1"),
        feeder.command(on_1, 1, OpenAccount("alice")),
        feeder.command(on_2, 1, OpenAccount("bob")),
    ):
        for number, processor in nodes.items():
            seen[number] += [reply.session_id for reply in replies(feed(processor, record))]
    assert seen == {1: [on_1], 2: [on_2]}
    assert nodes[1].rolling_hash == nodes[2].rolling_hash
    assert nodes[1].state_hash() == nodes[2].state_hash()
