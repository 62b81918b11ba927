"""seqd's own session rules change at one log index on every replica, by a version every member's
node_start reports (sequencer/rules_versions.py): a journal the previous seqd wrote replays to the
state that seqd computed, and a cluster in the middle of a rolling upgrade stays identical.

The previous seqd's states (`PREVIOUS_SEQD_*`) were computed by its own code, commit 16db81f^1
(the last before the new rules), replaying the records `previous_seqd_log()` and
`mixed_cluster_log()` build, written to a file:

    git archive 16db81f^1 sequencer | tar -x -C /tmp/previous
    PYTHONPATH=/tmp/previous python -S  # site-packages appended by hand, not the editable seqd
    >>> processor = Processor(Ledger); processor.apply_records(records)
    >>> processor.state_hash().hex(), processor.rolling_hash

Today's main before rules versions (rules 2 always) gives other states for both.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
import pytest

from daemon.exits import ExitCode, classify
from daemon.fault_hooks import FAULT_CLOCK_OFFSET_ENV
from daemon.harness import NodeProcess
from sequencer.apps.ledger import Ledger, OpenAccount
from sequencer.determinism import state_hash
from sequencer.journal import Journal
from sequencer.journal.reader import read_records
from sequencer.processor import Processor, ProcessorError
from sequencer.record import ADMIN_RULES_VERSION, RecordType, decode_admin, encode_admin
from sequencer.rules_versions import RULES_VERSION, RulesVersionError
from tests.fixtures.feeder import feed
from tests.node_fixtures import node_factory  # noqa: F401
from tests.test_duplicates_orderings import copy_of
from tests.test_processor_duplicates import node_start, session, started

HOUR_MS = 3600 * 1000
PREVIOUS_MEMBERS = [1, 2]  # the cluster of the previous seqd's log
W, X, Y, Z = 0x000111, 0x000112, 0x000113, 0x000114  # starts of node 1 (ids go up by one a start)
N2_FIRST, N2_SECOND = 0x000999, 0x00099A  # starts of node 2




def previous_seqd_log() -> list[bytes]:
    """A cluster's log as the previous seqd wrote it (node_starts with an incarnation, the app
    version and the members, no `previous`, no rules version), holding the three orderings in
    which the previous rules and today's decide differently. After each, a command on the
    session in question: applied (and answered) under one rules, dropped under the other."""
    _, feeder = started()

    def previous_start(incarnation: int, number: int = 1) -> bytes:
        return node_start(feeder, incarnation, node=f"n{number}", number=number, rules_version=None,
                          members=PREVIOUS_MEMBERS, app_version=1)  # fmt: skip

    w1, w2 = session(1, W, 1), session(1, W, 2)
    late, z1 = session(2, N2_SECOND, 1), session(1, Z, 1)
    records = [
        previous_start(N2_FIRST, number=2),
        previous_start(W),
        feeder.open_session(w1, client_id=7),
        feeder.command(w1, 1, OpenAccount("alice")),
        # An ended start's open: X's start closed W's sessions, then W's late open came.
        previous_start(X),
        feeder.open_session(w2, client_id=8),
        feeder.command(w2, 1, OpenAccount("bob")),
    ]
    # A copy of an open whose session closed before its start's late node_start.
    opening = feeder.open_session(late, client_id=10, node="n2")
    records += [opening, feeder.close_session(late), previous_start(N2_SECOND, number=2),
                copy_of(feeder, opening, late), feeder.command(late, 1, OpenAccount("carol"))]
    # A late node_start of an earlier start (Y) after the next start's (Z) first open.
    records += [feeder.open_session(z1, client_id=11), previous_start(Y),
                feeder.command(z1, 1, OpenAccount("dave")), previous_start(Z)]
    return records


# The previous seqd's state after `previous_seqd_log()` (16db81f^1's processor, see the docstring):
# W's late session w2 opened (bob's account made), node 2's copied open opened again for good
# (carol's made), Z's session was closed by Y's late node_start (dave's command dropped).
PREVIOUS_SEQD_STATE_HASH = "09a8a8fe3083eacc90d23f21400fff64"
PREVIOUS_SEQD_ROLLING_HASH = 2045722011


def replayed(records: list[bytes], **processor_args: Any) -> Processor[Ledger]:
    processor = Processor(Ledger, **processor_args)
    processor.apply_records(b"".join(records))
    return processor


def test_a_journal_the_previous_seqd_wrote_replays_to_the_state_it_computed() -> None:
    processor = replayed(previous_seqd_log())
    assert processor.rules_versions.active == 1  # nothing in the log reports more
    assert processor.state_hash().hex() == PREVIOUS_SEQD_STATE_HASH
    assert processor.rolling_hash == PREVIOUS_SEQD_ROLLING_HASH
    # What the previous rules did in each ordering (today's rules decide the opposite each time).
    assert processor.session_ids() == [session(2, N2_SECOND, 1)]  # w2 was closed by Z's start
    assert {"bob", "carol"} <= set(processor.app.accounts) and "dave" not in processor.app.accounts
    assert processor.commands_without_session == 1  # dave's, on Z's session closed by Y's start
    assert processor.duplicate_records == 0
    # Its body has no field the previous seqd lacked: the trim of `body_as_the_previous_seqd_wrote` (which other tests use to
    # stand in for the previous seqd's bodies) is the identity on it.
    body = processor.snapshot_bytes()
    assert body_as_the_previous_seqd_wrote(body) == body


def body_as_the_previous_seqd_wrote(body: bytes) -> bytes:
    """A snapshot body without the fields the previous seqd did not have (the early opens, the
    rules version), trimmed as it trimmed its trailing defaults."""
    fields = msgspec.msgpack.decode(body)[:14]
    while len(fields) > 11 and fields[-1] in ([], 0):
        fields.pop()
    return msgspec.msgpack.encode(fields)


MEMBERS = [1, 2, 3]
A1, A2, A3 = 0x000201, 0x000202, 0x000203  # starts of node 1
B1, B2, C1, C2 = 0x000301, 0x000302, 0x000401, 0x000402  # of nodes 2 and 3
REPORTED = 10  # the index of the last member's node_start reporting rules 2 in `mixed_cluster_log`
SWITCH = 11  # the index of the rules_version record a node's sequencer asked for then


def rules_version_record(feeder: Any, version: int) -> bytes:
    """An ADMIN rules_version, as a node's sequencer writes it (`Gateway.sequence_rules_version`)."""
    return feeder._record(RecordType.ADMIN, 1, 0, 0, encode_admin(ADMIN_RULES_VERSION, version=version))


def mixed_cluster_log() -> tuple[list[bytes], int]:
    """Three nodes of the previous seqd upgraded one by one (each new start reports rules 2 and
    names the start before it); node 1's first start's late opens arrive on the way. Returns the
    records and how many come before the last member's new start."""
    _, feeder = started()

    def start(number: int, incarnation: int, previous: int | None = None, upgraded: bool = True) -> bytes:
        return node_start(feeder, incarnation, node=f"n{number}", number=number, members=MEMBERS, app_version=1,
                          previous=previous if upgraded else None,
                          rules_version=RULES_VERSION if upgraded else None)  # fmt: skip

    a1, a2, a3 = session(1, A1, 1), session(1, A1, 2), session(1, A1, 3)
    records = [
        start(1, A1, upgraded=False), start(2, B1, upgraded=False), start(3, C1, upgraded=False),
        feeder.open_session(a1, client_id=7), feeder.command(a1, 1, OpenAccount("alice")),
        start(1, A2, previous=A1),  # node 1 upgraded: closes a1 (A1 not ended: rules 1)
        start(2, B2, previous=B1),  # node 2 upgraded; node 3 still runs the previous seqd
        feeder.open_session(a2, client_id=8),  # A1's late open: rules 1 open it, as node 3 does
        feeder.command(a2, 1, OpenAccount("bob")),
    ]
    before_switch = len(records)
    records += [
        start(3, C2, previous=C1),  # the last member upgraded: every member reported rules 2
        rules_version_record(feeder, 2),  # asked for by the nodes' sequencers: rules 2 from here
        rules_version_record(feeder, 2),  # another node asked too: nothing changes
        feeder.open_session(a3, client_id=9),  # A1's late open: now refused (A2's start ended A1)
        feeder.command(a3, 1, OpenAccount("carol")),
        start(1, A3, upgraded=False),  # node 1 rolled back: the active rules never go back
    ]  # fmt: skip
    return records, before_switch


# The previous seqd's state (16db81f^1's processor) after the first `before_switch` records of
# `mixed_cluster_log()`: what node 3 computed while it still ran the previous seqd.
PREVIOUS_SEQD_MIXED_STATE_HASH = "7f34feb38c2a864612af60914096a325"


def switch_index(processor: Processor[Ledger], records: list[bytes]) -> int:
    """Feeds `records` one by one; the index at which the active rules became 2 (0: never)."""
    switched = 0
    for record in records:
        before = processor.rules_versions.active
        feed(processor, record)
        if processor.rules_versions.active != before:
            assert (before, processor.rules_versions.active) == (1, 2), before
            switched = processor.applied_index
    return switched


def test_a_mixed_cluster_keeps_rules_1_until_every_member_reports_2_and_switches_at_one_index() -> None:
    records, before_switch = mixed_cluster_log()
    assert (before_switch + 1, before_switch + 2) == (REPORTED, SWITCH)
    # Four replicas of the new build: one from the start; node 3's (its own replies only); one
    # restored from a snapshot taken while only node 1 had reported rules 2; and node 2 upgraded
    # on a snapshot its previous seqd took after that (no reports in it: it never learns node
    # 1's, and deciding by the reports it would switch later than the others).
    fresh = Processor(Ledger)
    node3 = Processor(Ledger, "n3")
    node3.emit_for(3, cluster=True)
    restored = Processor.restore(Ledger, replayed(records[:6]).snapshot_bytes())  # at node 1's new start
    previous_body = body_as_the_previous_seqd_wrote(replayed(records[:6]).snapshot_bytes())
    node2 = Processor.restore(Ledger, previous_body, "n2")
    switched = [switch_index(fresh, records), switch_index(node3, records),
                switch_index(restored, records[6:]), switch_index(node2, records[6:])]  # fmt: skip
    assert switched == [SWITCH] * 4
    assert len({p.state_hash() for p in (fresh, node3, restored, node2)}) == 1
    assert len({p.rolling_hash for p in (fresh, node3, restored, node2)}) == 1
    # Before the switch, A1's late open opened its session (rules 1, what node 3's previous seqd
    # did); after it, A1's next late open is refused (rules 2).
    assert "bob" in fresh.app.accounts and "carol" not in fresh.app.accounts
    assert fresh.duplicate_records == 1 and fresh.commands_without_session == 1
    # The rollback's node_start reports rules 1 again: rules 2 stay active, none is due.
    assert (fresh.rules_versions.active, fresh.rules_versions.due) == (2, 0)
    assert fresh.rules_versions.known == {2: 2, 3: 2}
    assert fresh.session_ids() == []  # node 1's latest start closed A1's session bob used


def test_a_node_asks_for_the_rules_every_member_reported_and_one_that_missed_a_report_does_not() -> None:
    records, before_switch = mixed_cluster_log()
    fresh = replayed(records[:before_switch])
    assert fresh.rules_versions.due == 0  # node 3 runs the previous seqd
    feed(fresh, records[before_switch])  # node 3's new start
    assert (fresh.rules_versions.active, fresh.rules_versions.due) == (1, 2)  # its sequencer asks
    # A replica restored after node 1 reported did not see the report: it does not ask (another
    # node does), and still switches at the record.
    late = Processor.restore(Ledger, replayed(records[:6]).snapshot_bytes())
    late.apply_records(b"".join(records[6 : before_switch + 1]))
    assert late.rules_versions.due == 0
    assert late.state_hash() == fresh.state_hash()  # what it knows is not state


def test_until_the_switch_a_new_build_computes_the_previous_seqds_state_byte_for_byte() -> None:
    records, before_switch = mixed_cluster_log()
    processor = replayed(records[: before_switch + 1])  # node 3's report included
    assert processor.rules_versions.active == 1
    assert processor.session_ids() == [session(1, A1, 2)]
    # Its body has the previous seqd's bytes: what node 3 computed before its upgrade.
    assert state_hash(replayed(records[:before_switch]).snapshot_bytes()).hex() == PREVIOUS_SEQD_MIXED_STATE_HASH


def test_the_active_rules_survive_a_snapshot_and_an_older_body_loads_as_rules_1() -> None:
    records, _ = mixed_cluster_log()
    for count, active in ((SWITCH - 1, 1), (SWITCH, 2)):
        processor = replayed(records[:count])
        body = processor.snapshot_bytes()
        fields = msgspec.msgpack.decode(body)
        assert fields[15:] == ([] if active == 1 else [2])  # rules 1: the previous seqd's layout
        restored = Processor.restore(Ledger, body)
        assert restored.rules_versions.active == active
        assert restored.state_hash() == processor.state_hash()
        # Both go on the same: the switch (again), a late open of A1 (refused by rules 2).
        _, feeder = started()
        feeder.index = processor.applied_index
        tail = [rules_version_record(feeder, 2), feeder.open_session(session(1, A1, 4), client_id=12)]
        for record in tail:
            feed(processor, record)
            feed(restored, record)
        assert restored.state_hash() == processor.state_hash()
        assert processor.session_ids() == [session(1, A1, 2)]  # A1's open under rules 1 only
    # A body without the rules version (the previous seqd's, which applied rules 1) loads as 1.
    older = Processor.restore(Ledger, body_as_the_previous_seqd_wrote(body))
    assert older.rules_versions.active == 1


def test_a_development_builds_body_with_early_opens_and_no_rules_version_is_refused() -> None:
    # Builds between the early opens' tracking and rules versions applied rules 2 unmarked: such a
    # body loads as rules 1 with early opens, and went on to other bytes than a replay of its log.
    processor, feeder = started()
    feed(processor, node_start(feeder, W, rules_version=None))
    feed(processor, rules_version_record(feeder, 2))
    feed(processor, feeder.open_session(session(1, X, 1), client_id=7))  # X's, early
    fields = msgspec.msgpack.decode(processor.snapshot_bytes())
    assert fields[14] and fields[15:] == [2]
    development = msgspec.msgpack.encode(fields[:15])  # the same without the rules version
    with pytest.raises(ProcessorError, match=f"the snapshot at index {processor.applied_index} holds early "
                       "session opens but no session rules version.*Delete that snapshot file"):  # fmt: skip
        Processor.restore(Ledger, development)


def test_a_node_whose_code_knows_only_older_rules_stops_at_the_switch_and_on_a_later_snapshot() -> None:
    # A node started again with an older (version-aware) build after it reported rules 2, or
    # such a build replaying another node's journal: it must not apply rules 1 where the other
    # nodes apply rules 2.
    records, before_switch = mixed_cluster_log()
    older = Processor(Ledger, rules_version=1)
    older.apply_records(b"".join(records[:before_switch]))  # rules 1 until then: it applies them
    with pytest.raises(RulesVersionError) as stopped:
        older.apply_records(b"".join(records[before_switch:]))
    assert older.applied_index == SWITCH
    assert str(stopped.value) == (
        f"the log makes session rules version 2 active at index {SWITCH}, but this node's seqd applies session "
        "rules only up to version 1: it would read the records that follow differently from the other nodes. "
        "Install the seqd the cluster was upgraded to on this node, then start it again"
    )
    fatal = classify(stopped.value)  # raised while recovering; the blp's loop exits the same way
    assert fatal is not None and fatal.code == ExitCode.DATAERR  # 65, not a crash to restart from
    body = replayed(records[:SWITCH]).snapshot_bytes()
    with pytest.raises(RulesVersionError, match=f"the snapshot at index {SWITCH} was taken under session rules "
                       "version 2, but this node's seqd applies session rules only up to version 1"):  # fmt: skip
        Processor.restore(Ledger, body, rules_version=1)


def test_a_single_nodes_own_start_makes_its_rules_due_and_a_late_copy_of_an_earlier_start_reports_nothing() -> None:
    processor, feeder = started()
    feed(processor, node_start(feeder, W, rules_version=None))  # its previous seqd's start
    assert (processor.rules_versions.active, processor.rules_versions.due) == (1, 0)
    feed(processor, node_start(feeder, X, previous=W))  # upgraded: its members are itself alone
    assert (processor.rules_versions.active, processor.rules_versions.due) == (1, 2)
    # A late copy of the start before (its forward resent after the node restarted) is no
    # report: the node runs the new build.
    feed(processor, node_start(feeder, W, rules_version=None))
    assert processor.rules_versions.known == {1: 2}
    assert processor.duplicate_records == 1
    feed(processor, rules_version_record(feeder, 2))
    assert (processor.rules_versions.active, processor.rules_versions.due) == (2, 0)


def test_a_late_first_copy_of_an_earlier_start_leaves_the_newer_starts_report() -> None:
    # X names W, but rules 1 ignore `previous`: W's late node_start (its forward lost, an older
    # seqd's, no report) is a first copy. It once erased X's report of rules 2: none was due, and
    # the cluster stayed on rules 1.
    processor, feeder = started()
    feed(processor, node_start(feeder, X, previous=W))
    assert (processor.rules_versions.active, processor.rules_versions.due) == (1, 2)
    feed(processor, node_start(feeder, W, rules_version=None))  # late, first copy
    assert processor.duplicate_records == 0  # rules 1 took it for a new start
    assert processor.rules_versions.known == {1: 2}
    assert (processor.rules_versions.active, processor.rules_versions.due) == (1, 2)
    # The node's next start reports again, whatever it reports.
    feed(processor, node_start(feeder, Y, previous=X, rules_version=None))
    assert (processor.rules_versions.known, processor.rules_versions.due) == ({}, 0)


def test_a_real_node_restarted_on_the_previous_seqds_journal_replays_it_under_rules_1_then_its_start_switches(
    node_factory: Any,  # noqa: F811
) -> None:
    node: NodeProcess = node_factory(start=False)
    records = previous_seqd_log()
    with Journal.open(node.config.journal_dir, segment_bytes=8 << 20, preallocate=False) as journal:
        journal.append(b"".join(records))
        journal.sync()
    # Its wall clock an hour behind (the fault hook): the ask is stamped by it, as every record.
    offset = node.config.journal_dir.parent / "clock_offset_ms"
    offset.write_text(str(-HOUR_MS))
    node.start(environment={FAULT_CLOCK_OFFSET_ENV: str(offset)})
    # Its own node_start (a single node: its members are itself) makes rules 2 due after the
    # replay, and its sequencer asks the log to make them active; neither record has an output,
    # so the rolling hash is the replay's.
    deadline = time.monotonic() + 30
    while "session rules version 2 active" not in node.log_text():
        assert time.monotonic() < deadline, node.log_text()[-4000:]
        time.sleep(0.02)
    log = node.log_text()
    assert f"session rules version 1 active (applied up to index {len(records)})" in log
    values = node.read_counters()
    assert values["blp.rolling_hash"] == PREVIOUS_SEQD_ROLLING_HASH & 0x7FFF_FFFF_FFFF_FFFF
    assert (values["rules.version.active"], values["rules.version.due"]) == (2, 0)
    assert node.stop() == 0
    asks = [record for record in read_records(node.config.journal_dir)
            if record.type == RecordType.ADMIN and decode_admin(record.payload)["op"] == ADMIN_RULES_VERSION]  # fmt: skip
    assert asks and all(ask.timestamp_ns < time.time_ns() - HOUR_MS * 1_000_000 // 2 for ask in asks)
