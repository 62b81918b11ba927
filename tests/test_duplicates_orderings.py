"""Every ordering of one node's node_start, SESSION_OPEN and SESSION_CLOSE, and of their resent
copies, leaves one state: no session open for good that its node will never close (a zombie:
its client never idle, its dedup entry never expiring, on every replica), no live session
closed, and the same after a restart from a snapshot (sequencer/dedup.py, the orderings in its
docstring).

Where the copies come from: a follower resends its pending records to each new leader, those
already in its own log included (sequencer/cluster/forwards.py), and a forward lost on the way
(its node_start, sent before the peer link was up) is resent later, behind records that went
through. X is the node's running start, W an earlier one; s a session X opened.
"""

from __future__ import annotations

import msgspec
import pytest

from sequencer.apps.ledger import Ledger, OpenAccount
from sequencer.egress import ReplyStatus
from sequencer.processor import Processor
from sequencer.record import ADMIN_RULES_VERSION, RecordType, encode_admin
from sequencer.rules_versions import RULES_VERSION
from tests.fixtures.feeder import Feeder, feed
from tests.test_processor_duplicates import node_start, replies, session, started

W, X, Y = 0x000111, 0x000222, 0x000333  # three starts of node 1, in this order
OTHER_NODE = 2  # a node whose start makes the log one that carries incarnations


def copy_of(feeder: Feeder, opening: bytes, session_id: int) -> bytes:
    """The same SESSION_OPEN again at the next index (a resend)."""
    return feeder._record(RecordType.SESSION_OPEN, 1, session_id, 0, opening[48:].rstrip(b"\0"))


def carrying_incarnations() -> tuple[Processor[Ledger], Feeder]:
    """A processor whose log already carries incarnations (another node started) and applies
    today's session rules (sequencer/rules_versions.py), as in any cluster of today's seqd."""
    processor, feeder = started()
    feed(processor, node_start(feeder, 0x000999, node="n2", number=OTHER_NODE))
    feed(processor, feeder._record(RecordType.ADMIN, 1, 0, 0, encode_admin(ADMIN_RULES_VERSION, version=RULES_VERSION)))
    assert processor.rules_versions.active == RULES_VERSION
    return processor, feeder


def assert_no_zombie(processor: Processor[Ledger], client_id: int) -> None:
    assert processor.session_ids() == []
    assert processor._table.clients[client_id].sessions == 0
    assert client_id in processor._table.idle  # idle, so its entry expires in time


def test_a_copy_of_an_open_that_closed_before_its_late_node_start_does_not_reopen_it():
    # The review's ordering: s opens, closes, then X's node_start (its first forward lost), then
    # a copy of s's open. The start once kept only the sessions still open: s looked new.
    processor, feeder = carrying_incarnations()
    s = session(1, X, 1)
    opening = feeder.open_session(s, client_id=7)
    feed(processor, opening)
    feed(processor, feeder.close_session(s))
    feed(processor, node_start(feeder, X))
    feed(processor, copy_of(feeder, opening, s))
    assert_no_zombie(processor, 7)
    assert processor.duplicate_records == 1


def test_a_copy_of_an_early_open_before_its_node_start_does_not_reopen_it():
    # The same copy one step earlier: before X's node_start (with W's start in the log, or not).
    for earlier_start in (False, True):
        processor, feeder = carrying_incarnations()
        if earlier_start:
            feed(processor, node_start(feeder, W))
        s = session(1, X, 1)
        opening = feeder.open_session(s, client_id=7)
        feed(processor, opening)
        feed(processor, feeder.close_session(s))
        feed(processor, copy_of(feeder, opening, s))
        feed(processor, node_start(feeder, X))
        assert_no_zombie(processor, 7)
        assert processor.duplicate_records == 1, earlier_start


def test_the_next_session_of_a_late_started_incarnation_still_opens():
    processor, feeder = carrying_incarnations()
    first, second = session(1, X, 1), session(1, X, 2)
    feed(processor, feeder.open_session(first, client_id=7))
    feed(processor, node_start(feeder, X))
    feed(processor, feeder.open_session(second, client_id=8))
    assert processor.session_ids() == [first, second]
    (reply,) = replies(feed(processor, feeder.command(second, 1, OpenAccount("alice"))))
    assert reply.status == ReplyStatus.OK


def test_a_record_of_an_ended_start_opens_no_session():
    # W opened s1 and s2; X's start closed s1. W's open of s2 arriving after that (or any copy
    # of W's opens) would be a session of a start that no longer runs: nothing would close it.
    processor, feeder = carrying_incarnations()
    feed(processor, node_start(feeder, W))
    s1, s2 = session(1, W, 1), session(1, W, 2)
    feed(processor, feeder.open_session(s1, client_id=7))
    feed(processor, node_start(feeder, X))
    assert processor.session_ids() == []
    feed(processor, feeder.open_session(s2, client_id=7))
    assert_no_zombie(processor, 7)
    assert processor.duplicate_records == 1


def test_a_start_whose_node_start_never_came_ends_with_the_next_start_of_its_node():
    # W's sessions reached the log but its node_start never did (W stopped before a resend). X's
    # start, which names W as the start before it, closes them and ends W: W's late open is
    # refused and its late node_start closes none of X's live sessions.
    processor, feeder = carrying_incarnations()
    w1, w2, x1 = session(1, W, 1), session(1, W, 2), session(1, X, 1)
    feed(processor, feeder.open_session(w1, client_id=7))
    feed(processor, node_start(feeder, X, previous=W))
    feed(processor, feeder.open_session(x1, client_id=8))
    feed(processor, feeder.open_session(w2, client_id=7))
    feed(processor, node_start(feeder, W))
    assert processor.session_ids() == [x1]
    assert processor.duplicate_records == 2
    (reply,) = replies(feed(processor, feeder.command(x1, 1, OpenAccount("alice"))))
    assert reply.status == ReplyStatus.OK


def test_early_opens_survive_a_snapshot_and_old_bodies_still_load():
    processor, feeder = carrying_incarnations()
    s = session(1, X, 1)
    opening = feeder.open_session(s, client_id=7)
    feed(processor, opening)
    feed(processor, feeder.close_session(s))
    body = processor.snapshot_bytes()
    assert len(msgspec.msgpack.decode(body)[14]) == 1  # the early opens (then the rules version)
    restored = Processor.restore(Ledger, body)
    assert restored.state_hash() == processor.state_hash()
    feeder.index = restored.applied_index
    feed(restored, node_start(feeder, X))
    feed(restored, copy_of(feeder, opening, s))
    assert_no_zombie(restored, 7)
    # A body without the field (what the previous seqd wrote) loads with no early opens.
    fields = msgspec.msgpack.decode(body)
    older = Processor.restore(Ledger, msgspec.msgpack.encode(fields[:14]))
    assert older._table.opened_early == {}
    assert older.session_ids() == restored.session_ids() == []


def test_a_late_node_start_of_the_start_before_closes_none_of_the_live_starts_sessions():
    # X's forwards were still on their way (a TCP segment retransmitted after a loss) when its
    # node restarted as Y. Y's node_start names X (`previous`): X's late node_start and opens then
    # change nothing. Before, X's node_start closed Y's live sessions (their commands dropped
    # with no reply), and X's open stayed open for good.
    processor, feeder = carrying_incarnations()
    feed(processor, node_start(feeder, W))
    feed(processor, feeder.open_session(session(1, W, 1), client_id=7))
    feed(processor, node_start(feeder, Y, previous=X))
    y1 = session(1, Y, 1)
    feed(processor, feeder.open_session(y1, client_id=8))
    feed(processor, node_start(feeder, X, previous=W))  # late
    feed(processor, feeder.open_session(session(1, X, 1), client_id=9))  # late
    assert processor.session_ids() == [y1]
    assert processor.duplicate_records == 2
    (reply,) = replies(feed(processor, feeder.command(y1, 1, OpenAccount("alice"))))
    assert reply.status == ReplyStatus.OK
    assert processor.commands_without_session == 0


def test_a_replica_restored_while_a_node_start_had_emptied_its_early_opens_encodes_the_same_bytes():
    # Node 1's session opened before its node_start, which then took the early open over: the
    # node's early entry was left empty in the live table but not written to the snapshot, so a
    # replica restored from it re-created the entry elsewhere in the order when the node's next
    # start opened early again, and the two replicas' snapshots (and state hashes) differed.
    live, feeder = carrying_incarnations()
    feed(live, feeder.open_session(session(1, X, 1), client_id=7))
    feed(live, node_start(feeder, X))
    restored = Processor.restore(Ledger, live.snapshot_bytes())
    records = [feeder.open_session(session(OTHER_NODE, 0x000999, 1), client_id=8),
               feeder.open_session(session(3, 0x000444, 1), client_id=9),  # a third node, early
               feeder.open_session(session(1, Y, 1), client_id=10)]  # node 1 restarted, early
    for record in records:
        feed(live, record)
        feed(restored, record)
    assert restored.snapshot_bytes() == live.snapshot_bytes()
    assert restored.state_hash() == live.state_hash()


def test_a_late_node_start_of_an_earlier_start_before_the_live_starts_own_closes_none_of_its_sessions():
    # W ran; X started, its node_start still on its way when X died; Y started, and its own
    # node_start was lost and resent behind its first open (issue 11's case). X's late node_start
    # landed between Y's open and Y's node_start, and closed Y's live session: its client's
    # commands were dropped with no reply (found in review). Ids go up by one a start.
    w, x, y = 0x000111, 0x000112, 0x000113
    processor, feeder = carrying_incarnations()
    feed(processor, node_start(feeder, w))
    s = session(1, y, 1)
    feed(processor, feeder.open_session(s, client_id=7))
    feed(processor, node_start(feeder, x, previous=w))  # late
    assert processor.session_ids() == [s]
    feed(processor, node_start(feeder, y, previous=x))
    assert processor.session_ids() == [s]
    (reply,) = replies(feed(processor, feeder.command(s, 1, OpenAccount("alice"))))
    assert reply.status == ReplyStatus.OK
    assert processor.commands_without_session == 0


@pytest.mark.parametrize("late_start_before_the_switch", [True, False])
def test_a_late_node_start_of_the_start_before_applied_around_the_switch_leaves_the_live_start_open(
    late_start_before_the_switch: bool,
) -> None:
    # Node 1's start x names w (`previous`), but its node_start is applied under rules 1, which
    # ignore `previous`: w is not marked ended. w's lost node_start arrives late, before or after
    # the switch to rules 2, and is applied after x's. Rules 2 once took the last applied start
    # for the running one: every new open of x was refused as an ended start's (found in review),
    # and node 1's clients stalled until it restarted.
    w, x = 0x000111, 0x000112  # ids go up by one a start
    processor, feeder = started()
    feed(processor, node_start(feeder, 0x000999, node="n2", number=OTHER_NODE))
    feed(processor, node_start(feeder, x, previous=w))
    for late in (late_start_before_the_switch, not late_start_before_the_switch):
        if late:
            feed(processor, node_start(feeder, w))
        else:
            feed(processor, feeder._record(RecordType.ADMIN, 1, 0, 0, encode_admin(ADMIN_RULES_VERSION, version=RULES_VERSION)))
    assert processor.rules_versions.active == RULES_VERSION
    x1, w1 = session(1, x, 1), session(1, w, 1)
    feed(processor, feeder.open_session(x1, client_id=7))
    feed(processor, feeder.open_session(w1, client_id=8))  # w's late open: refused, w ended
    assert processor.session_ids() == [x1]
    (reply,) = replies(feed(processor, feeder.command(x1, 1, OpenAccount("alice"))))
    assert reply.status == ReplyStatus.OK
    assert processor.commands_without_session == 0
    # A replica restored from a snapshot goes on to the same bytes.
    restored = Processor.restore(Ledger, processor.snapshot_bytes())
    for record in (feeder.open_session(session(1, x, 2), client_id=9), node_start(feeder, w)):  # and a copy
        feed(processor, record)
        feed(restored, record)
    assert restored.snapshot_bytes() == processor.snapshot_bytes()
    assert processor.session_ids() == [x1, session(1, x, 2)]


def test_a_late_node_start_of_the_start_before_closes_its_own_sessions_rules_1_opened():
    # x named w, but rules 1 ignore `previous`: w's late open opened its session. After the switch
    # w's late node_start ends w there, and closes that session (nothing else would: a zombie).
    w, x = 0x000111, 0x000112
    processor, feeder = started()
    feed(processor, node_start(feeder, 0x000999, node="n2", number=OTHER_NODE))
    feed(processor, node_start(feeder, x, previous=w))
    feed(processor, feeder.open_session(session(1, w, 1), client_id=7))  # late, rules 1 open it
    feed(processor, feeder._record(RecordType.ADMIN, 1, 0, 0, encode_admin(ADMIN_RULES_VERSION, version=RULES_VERSION)))
    x1 = session(1, x, 1)
    feed(processor, feeder.open_session(x1, client_id=8))
    feed(processor, node_start(feeder, w))  # late
    assert processor.session_ids() == [x1]
    client = processor._table.clients[7]
    assert client.sessions == 0 and 7 in processor._table.idle  # idle, so its entry expires
