"""The replicator's choices of when to make a pass, on a replicator driven in this process
(tests/replicator_driven.py): its real core, rings and counters; the other processes and the
peers played by the test.

A follower's tick makes a pass only when something is due (daemon/roles/replicator_ticks.py,
`Replicator._on_tick`): `QuietTicks` is tested on its own in test_replicator_ticks.py, and here
each thing a tick looks at is shown through the replicator (with it left out, the tick is quiet
and the work waits up to `QUIET_PASS_S`): entries made durable (acknowledged within the tick),
entries waiting for room in the log ring (written within the tick once the ring has room),
records forwarded and not yet committed (sent again within the tick once overdue), a query
replica's read round (asked within the tick), and a pass scheduled that the tick came before (a
lost election's standing published within the tick). A tick with none of these makes no pass.
The outbox of records to send is not looked at: a follower's pass that knows a leader empties it
(asserted at every tick, `QuietTicks.quiet`), shown at the change of leader that fills it.

And a leader's peer messages that make no pass still arm the commit-notice timer: an answer
that frees a follower's full window leaves a commit notice held for it, which nothing else would
send before the next tick (daemon/roles/commit_notices.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

import daemon.roles.replicator as replicator_module
from daemon.roles.commit_notices import COMMIT_NOTICE_DELAY_S
from daemon.roles.hard_state_saver import HARD_STATE_COMMIT_SAVE_S
from sequencer.hard_state import HardState, HardStateError, HardStateFile
from sequencer.raft.config import NO_NODE
from sequencer.raft.messages import (
    AppendEntries,
    AppendEntriesResponse,
    Heartbeat,
    Message,
    ReadIndexRequest,
    RequestVote,
    RequestVoteResponse,
    TimeoutNow,
)
from sequencer.raft.raft_role import CANDIDATE, FOLLOWER, LEADER
from tests.replicator_driven import CLUSTER_ID, DrivenReplicator, append, command, driven_replicator
from tests.sim.direct import DirectCluster

pytestmark = pytest.mark.timeout(60)
LEADER_ID = 1
FOLLOWED_ENTRIES = 2  # entries the follower holds, durable and acknowledged, before each test
FOLLOWER_RING_BYTES = 4096  # a few dozen entries: a ring a test fills


def following(driven: DrivenReplicator) -> None:
    """Node 2 follows node 1 in term 1 and has acknowledged its first entries; then a quiet tick
    makes no pass, with quiet ticks left to show one that does."""
    driven.run_scheduled()  # `serve`'s first pass
    entries = [command(request_id) for request_id in range(1, FOLLOWED_ENTRIES + 1)]
    driven.step(LEADER_ID, append(1, 0, 0, 0, entries))
    driven.run_scheduled()
    driven.durable_index.set(FOLLOWED_ENTRIES)  # the journaller's fdatasync, and its doorbell:
    driven.replicator._on_bell()
    driven.run_scheduled()
    (ack,) = driven.transport.take(AppendEntriesResponse)
    assert ack.success and ack.index == FOLLOWED_ENTRIES, ack
    core = driven.replicator.core
    assert (core.raft_role, core.term, core.leader_id) == (FOLLOWER, 1, LEADER_ID)
    assert_quiet_tick(driven)


def assert_quiet_tick(driven: DrivenReplicator) -> None:
    """A tick with nothing due makes no pass and sends nothing; at least one more would not."""
    while driven.quiet_ticks_left() < 2:  # the QUIET_PASS_S pass: not the tick under test
        driven.tick()
    passes = driven.passes
    driven.tick()
    assert driven.passes == passes, "a quiet tick made a pass"
    assert driven.transport.sent == [] and driven.transport.forwarded == []
    assert driven.quiet_ticks_left() >= 1


def tick_makes_a_pass(driven: DrivenReplicator) -> None:
    assert driven.quiet_ticks_left() >= 1  # without the work, this tick would be quiet
    passes = driven.passes
    driven.tick()
    assert driven.passes == passes + 1, "the tick made no pass: the work waits for QUIET_PASS_S"


@pytest.fixture
def follower(tmp_dir: Path, unique: str) -> Iterator[DrivenReplicator]:
    with driven_replicator(tmp_dir, unique, 2, log_ring_bytes=FOLLOWER_RING_BYTES) as driven:
        following(driven)
        yield driven


def test_a_followers_tick_acknowledges_entries_made_durable_since_the_last_pass(follower: DrivenReplicator) -> None:
    # The journaller's doorbell is the usual wake-up; the tick's look (`_has_work_outside`) is its
    # safety net: a bell lost (or rung while the loop was busy) costs a tick, not QUIET_PASS_S.
    entries = [command(request_id) for request_id in (3, 4)]
    follower.step(LEADER_ID, append(1, FOLLOWED_ENTRIES, 1, 0, entries))
    follower.run_scheduled()
    assert follower.transport.take(AppendEntriesResponse) == []  # not durable yet: no answer
    assert_quiet_tick(follower)
    follower.durable_index.set(FOLLOWED_ENTRIES + 2)  # no bell heard
    tick_makes_a_pass(follower)
    (ack,) = follower.transport.take(AppendEntriesResponse)
    assert ack.success and ack.index == FOLLOWED_ENTRIES + 2, ack


def test_a_followers_tick_writes_entries_waiting_for_room_in_the_log_ring(follower: DrivenReplicator) -> None:
    # A follower's ring full of entries not yet read (the journaller or the blp behind): the rest
    # waits in the feed, and nothing rings the replicator when a reader frees room.
    ring_records = FOLLOWER_RING_BYTES // len(command(0))
    entries = [command(request_id) for request_id in range(3, 3 + 3 * ring_records)]
    follower.step(LEADER_ID, append(1, FOLLOWED_ENTRIES, 1, 0, entries))
    follower.run_scheduled()
    follower.run_scheduled()  # the feed flows while the ring takes entries, then waits
    assert follower.replicator.process_scheduled is None
    written = follower.written_index()
    assert FOLLOWED_ENTRIES < written < FOLLOWED_ENTRIES + len(entries), written
    assert len(follower.replicator.feed) == FOLLOWED_ENTRIES + len(entries) - written
    assert follower.free_ring() > 0  # the journaller and the blp read all of it
    tick_makes_a_pass(follower)
    assert follower.written_index() > written


def test_a_followers_tick_resends_its_overdue_forwards(
    follower: DrivenReplicator, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Records forwarded to the leader and not seen committed: the age resend (RESEND_AFTER_S) is
    # looked at in a tick's pass, which sends them again at once (through the outbox, which the
    # same pass empties).
    records = [command(request_id, 24) for request_id in (101, 102)]
    follower.propose(*records)
    follower.replicator._on_bell()  # the sequencer's doorbell
    follower.run_scheduled()
    assert follower.transport.forwarded == records
    assert len(follower.replicator.pending) == 2 and follower.replicator.outbox == []
    follower.transport.forwarded.clear()
    monkeypatch.setattr(replicator_module, "RESEND_AFTER_S", 0.0)  # overdue at once
    tick_makes_a_pass(follower)
    assert follower.transport.forwarded == records


def test_a_follower_sends_its_pending_records_to_a_new_leader_in_the_pass_that_sees_it(
    follower: DrivenReplicator,
) -> None:
    # The outbox is no reason for a tick's pass (`QuietTicks.quiet`): a follower's pass that knows
    # a leader leaves it empty. The change of leader is what fills it (`_check_standing`: every
    # pending record, for the new leader), and the same pass sends it; a tick then finds it empty
    # (the harness's `tick` checks that before it ticks).
    records = [command(request_id, 24) for request_id in (101, 102)]
    follower.propose(*records)
    follower.replicator._on_bell()
    follower.run_scheduled()
    assert (follower.transport.forwarded, follower.transport.forwarded_to) == (records, [LEADER_ID] * 2)
    follower.transport.forwarded.clear()
    follower.transport.forwarded_to.clear()
    follower.step(3, append(2, FOLLOWED_ENTRIES, 1, 0, [], leader=3))  # node 3 leads term 2
    follower.run_scheduled()
    assert (follower.transport.forwarded, follower.transport.forwarded_to) == (records, [3, 3])  # again, to node 3
    assert follower.replicator.standing == (2, 3) and follower.replicator.outbox == []
    follower.tick()


def test_a_followers_tick_asks_a_query_replicas_read_round(follower: DrivenReplicator) -> None:
    # A replica's linearizable query waits for the round: asked in the tick (`ReadRounds.ask`),
    # whose core then has the ReadIndex request to send, so the tick makes a pass to send it.
    follower.read_asked.set(1)
    tick_makes_a_pass(follower)
    (request,) = follower.transport.take(ReadIndexRequest)
    assert request.target == LEADER_ID


def test_a_followers_tick_makes_the_pass_its_peer_messages_scheduled(follower: DrivenReplicator) -> None:
    # A follower schedules a pass after every peer message (`answer_needs_pass`), and a tick that
    # comes first in the loop's turn (a timer and a socket ready together) cancels it: the tick's
    # pass is to do its work. Not every message leaves a trace the tick's look sees: a candidate
    # that lost its election is a follower again at the same term with no leader, as its last pass
    # saw it, and with nothing to send (a pre-vote lost the same way: the common case, a follower
    # that missed heartbeats, refused by peers that hear the leader). Only the pass publishes its
    # standing (`raft.role`), so without `scheduled` in the look the counter would say candidate
    # until the QUIET_PASS_S pass.
    follower.step(LEADER_ID, TimeoutNow(CLUSTER_ID, LEADER_ID, 2, 1))  # a leadership transfer
    follower.run_scheduled()
    assert follower.raft_role() is CANDIDATE
    (request, _) = follower.transport.take(RequestVote)
    assert request.term == 2 and not request.pre_vote, request
    follower.step(1, RequestVoteResponse(CLUSTER_ID, 1, 2, 2, False, False))
    follower.step(3, RequestVoteResponse(CLUSTER_ID, 3, 2, 2, False, False))  # lost: a follower
    core = follower.replicator.core
    assert (core.raft_role, core.term, core.leader_id) == (FOLLOWER, 2, NO_NODE) and not core.has_ready()
    assert follower.replicator.process_scheduled is not None and follower.raft_role() is CANDIDATE
    tick_makes_a_pass(follower)  # before the scheduled pass
    assert follower.raft_role() is FOLLOWER


# -- the leader's commit-notice timer --------------------------------------------------------------


def route(driven: DrivenReplicator, peers: DirectCluster, drop_to: int | None = None) -> list[Message]:
    """Until nothing moves: the replicator's messages to the peers' cores, their answers back,
    its ring read and its entries made durable at once. Returns the messages to `drop_to`,
    which it loses."""
    dropped: list[Message] = []
    for _ in range(1000):
        driven.run_scheduled()
        driven.free_ring()
        if driven.durable_index.get() != driven.written_index():
            driven.durable_index.set(driven.written_index())
            driven.replicator._on_bell()
            continue
        sent, driven.transport.sent = driven.transport.sent, []
        for message in sent:
            if message.target == drop_to:
                dropped.append(message)
            else:
                peers.core(message.target).step(message)
        peers.process()
        answers, peers.outbox = peers.outbox, []
        for answer in answers:
            driven.step(answer.source, answer)
        if not (sent or answers or driven.replicator.process_scheduled):
            return dropped
    raise AssertionError("the replicator and its peers did not settle")


def elected(driven: DrivenReplicator) -> DirectCluster:
    """The driven replicator (node 1) elected leader of nodes 2 and 3 (node 1 of the peers' cluster
    crashed: it stands for the driven one), its TERM_START committed: it proposes. Returns the peers."""
    peers = DirectCluster(3, cluster_id=CLUSTER_ID)
    peers.crash(LEADER_ID)
    driven.run_scheduled()
    while not driven.transport.sent:  # its election timeout: a PreVote
        driven.tick()
    assert all(type(message) is RequestVote for message in driven.transport.sent)
    route(driven, peers)
    assert driven.replicator.core.raft_role is LEADER
    return peers


def wait_for_the_timer(driven: DrivenReplicator) -> None:
    """Run the loop until the commit-notice timer armed has fired (and its pass has run)."""
    loop = driven.loop
    deadline = loop.time() + 10.0  # a bound on the wait, not a timed assertion
    while driven.replicator.notice_timer._handle is not None and loop.time() < deadline:
        loop.run_until_complete(asyncio.sleep(COMMIT_NOTICE_DELAY_S))


def test_a_leaders_answer_that_makes_no_pass_still_arms_the_commit_notice_timer(tmp_dir: Path, unique: str) -> None:
    cluster = {"inflight_bytes_max": 64 << 10}  # the least allowed: two large entries fill it
    with driven_replicator(tmp_dir, unique, 1, cluster=cluster) as driven:
        peers = elected(driven)
        replicator = driven.replicator
        # Node 3 stops answering while two entries of 40 KiB go to both: its window fills.
        held: list[AppendEntries] = []
        for request_id in (1, 2):
            driven.propose(command(request_id, 40 << 10))
            replicator._on_bell()
            held += [m for m in route(driven, peers, drop_to=3) if type(m) is AppendEntries and m.terms]
        assert [len(m.terms) for m in held] == [1, 1], held
        core = replicator.core
        assert core.commit_index == core.log.last_index  # committed by node 2
        # A heartbeat carries the commit to node 2 (to node 3 only what it matches): nothing is
        # held back from anyone with room (node 3 lacks the commit: its window is full), and the
        # timer the commit armed fires for nothing.
        while not any(type(m) is Heartbeat for m in driven.transport.sent):
            driven.tick()
        route(driven, peers, drop_to=3)
        assert not core.commit_notices_held()
        passes = driven.passes
        wait_for_the_timer(driven)
        assert driven.transport.sent == [] and replicator.notice_timer._handle is None
        assert driven.passes == passes  # a timer that finds the commit carried makes no pass
        # Node 3 answers the first: room in its window, and the commit is held back for it. The
        # answer moves nothing else (node 2 made the commit), so no pass follows it.
        peers.core(3).step(held[0])
        peers.process(3)
        (answer,) = peers.outbox
        peers.outbox = []
        passes = driven.passes
        driven.step(3, answer)
        assert replicator.process_scheduled is None and driven.passes == passes
        assert core.commit_notices_held()
        wait_for_the_timer(driven)
        (notice,) = driven.transport.sent
        assert type(notice) is AppendEntries and notice.target == 3 and notice.notice, notice
        assert notice.commit_index == core.commit_index


def test_a_failed_commit_hint_save_stops_the_role_at_its_next_tick(follower: DrivenReplicator) -> None:
    # The commit hint is saved by the worker thread (daemon/roles/hard_state_saver.py); its
    # failure (an fsync: never retried) is raised by the next tick's pass, as a save on the loop was.
    saver = follower.replicator.hard_state_saver
    attempts: list[str] = []

    def fail(step: str) -> None:
        attempts.append(step)
        raise OSError(5, "Input/output error (planted)")

    saver.file.step_hook = fail
    follower.step(LEADER_ID, append(1, FOLLOWED_ENTRIES, 1, FOLLOWED_ENTRIES, []))  # the commit moves
    follower.run_scheduled()
    assert saver.unsaved is not None and saver.unsaved.commit_index == FOLLOWED_ENTRIES
    saver.saved_s -= HARD_STATE_COMMIT_SAVE_S  # the hint is due at the next tick
    while saver.unsaved is not None:
        follower.tick()  # the tick that hands it to the worker returns: the role runs on
    saver.thread.join(10.0)  # the worker failed and ended (a bound, not a timing)
    assert not saver.thread.is_alive()
    with pytest.raises(HardStateError, match="Input/output error"):
        for _ in range(follower.replicator.quiet_ticks.quiet_ticks_max + 1):  # a pass among them
            follower.tick()
    assert attempts == ["temp_written"]  # not retried
    assert HardStateFile.read(saver.file.directory).commit_index == 0


def test_a_granted_vote_is_on_disk_before_its_answer_leaves(follower: DrivenReplicator) -> None:
    # Raft's persist-before-send, in the replicator (the simulator checks it in the core only):
    # the term and vote are saved, and waited for, before the answer granting the vote is sent.
    directory = follower.replicator.hard_state_saver.file.directory
    seen: list[tuple[Message, HardState]] = []
    send = follower.transport.send

    def noting(messages: Sequence[Message]) -> None:
        seen.extend((message, HardStateFile.read(directory)) for message in messages)
        send(messages)

    follower.transport.send = noting  # type: ignore[method-assign]
    # Node 3 campaigns at term 5 on a leadership transfer (granted though the leader is heard).
    follower.step(3, RequestVote(CLUSTER_ID, 3, 2, 5, FOLLOWED_ENTRIES, 1, False, True))
    follower.run_scheduled()
    answers = [(message, on_disk) for message, on_disk in seen if type(message) is RequestVoteResponse]
    assert answers, seen
    for message, on_disk in answers:
        assert message.granted and (on_disk.term, on_disk.vote) == (5, 3), (message, on_disk)


def test_a_leaders_pending_bytes_are_its_held_records_lengths_until_they_commit(tmp_dir: Path, unique: str) -> None:
    """`PendingForwards.bytes` (its bound: `full()` stops the leader reading proposals) is the sum of
    the records it holds, when `_propose` hands it the region's length for the stamped copies:
    a proposal region of commands of several sizes, held, then released by their commit."""
    with driven_replicator(tmp_dir, unique, 1) as driven:
        peers = elected(driven)
        replicator = driven.replicator
        pending = replicator.pending
        driven.propose(*(command(request_id, size) for request_id, size in enumerate((16, 21, 300, 7, 1000), 1)))
        replicator._on_bell()
        driven.run_scheduled()  # the pass: stamped, proposed, held by index
        assert len(pending) == 5
        assert pending.bytes == sum(map(len, pending.records(True))) > 0
        route(driven, peers)  # answered: committed, released
        assert replicator.core.commit_index == replicator.core.log.last_index
        assert len(pending) == 0 and pending.bytes == 0
