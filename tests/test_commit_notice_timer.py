"""The replicator's bound on a held commit notice (daemon/roles/commit_notices.py), on a real
event loop and a real leader core: a commit of the leader's own clients' records waits for
entries to ride on or for `COMMIT_NOTICE_DELAY_S`; one that covers a record a follower forwarded
(its client waits for that follower to learn the commit) goes at the end of the loop iteration.
A pass that finds the commit carried cancels the timer, and a timer that fires with proposals
waiting lets the pass take them first: their entries carry the commit, not a notice."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import pytest

from daemon.roles.commit_notices import COMMIT_NOTICE_DELAY_S, CommitNoticeTimer
from sequencer.raft import AppendEntries
from sequencer.raft.core import RaftCore
from tests.sim.direct import DirectCluster
from tests.test_raft_commit_notices import committed_with_the_notices_held


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    made = asyncio.new_event_loop()
    yield made
    made.close()


def notices_sent(cluster: DirectCluster) -> list[AppendEntries]:
    return [m for m in cluster.outbox if isinstance(m, AppendEntries) and m.notice]


def commit(cluster: DirectCluster, payload: bytes) -> int:
    """Node 1 proposes and commits one entry; the commit is held from both followers."""
    index = committed_with_the_notices_held(cluster, payload)
    assert cluster.core(1).commit_notices_held()
    return index


def no_batch() -> bool:
    return False  # no proposals wait in the ring


def wait_for_passes(loop: asyncio.AbstractEventLoop, passes: list[int], count: int) -> None:
    deadline = loop.time() + 10.0  # the bound passes (a bound on the wait, not a timed assertion)
    while len(passes) < count and loop.time() < deadline:
        loop.run_until_complete(asyncio.sleep(COMMIT_NOTICE_DELAY_S))


def led_cluster() -> tuple[DirectCluster, RaftCore, list[int], Callable[[], None]]:
    """Three cores, node 1 leading and quiet; the replicator's pass for node 1, which notes the
    commit index each pass saw."""
    cluster = DirectCluster(3, defer_commit_notices=True)
    cluster.elect(1)
    cluster.tick(1)
    cluster.stabilize()
    leader = cluster.core(1)
    passes: list[int] = []

    def process() -> None:  # the replicator's pass
        passes.append(leader.commit_index)
        cluster.process(1)

    return cluster, leader, passes, process


def test_a_commit_waits_the_bound_unless_it_covers_a_forwarded_record(
    loop: asyncio.AbstractEventLoop,
) -> None:
    cluster, leader, passes, process = led_cluster()

    # A bound far longer than the test: a loaded machine that stalls the test between the arm and
    # the loop's turn cannot make the held commit go early.
    held = CommitNoticeTimer(loop, leader, loop.create_future(), process, no_batch, delay_s=3600.0)
    commit(cluster, b"the leader's own client, held")
    held.arm()
    loop.run_until_complete(asyncio.sleep(0.05))  # iterations go by: still held
    assert passes == [] and notices_sent(cluster) == []
    assert leader.commit_notices_held()
    cluster.stabilize()

    timer = CommitNoticeTimer(loop, leader, loop.create_future(), process, no_batch)
    own = commit(cluster, b"the leader's own client")
    timer.arm()
    deadline = loop.time() + 10.0  # the bound passes (a bound on the wait, not a timed assertion)
    while not passes and loop.time() < deadline:
        loop.run_until_complete(asyncio.sleep(COMMIT_NOTICE_DELAY_S))
    assert passes == [own] and len(notices_sent(cluster)) == 2
    cluster.stabilize()

    first = leader.next_index()
    forwarded = commit(cluster, b"a follower's client")
    timer.forwarded(first, 1)
    timer.arm()
    loop.run_until_complete(asyncio.sleep(0))
    assert passes == [own, forwarded] and len(notices_sent(cluster)) == 2
    timer.arm()  # nothing held now: nothing armed
    loop.run_until_complete(asyncio.sleep(5 * COMMIT_NOTICE_DELAY_S))
    assert passes == [own, forwarded]


def test_a_pass_that_finds_the_commit_carried_cancels_the_timer(loop: asyncio.AbstractEventLoop) -> None:
    # Under load the next batch's entries carry most held commits within the bound: the pass that
    # sent them cancels the timer, which would wake the loop for nothing.
    cluster, leader, _passes, process = led_cluster()
    timer = CommitNoticeTimer(loop, leader, loop.create_future(), process, no_batch)
    commit(cluster, b"held")
    timer.arm()
    armed = timer._handle
    assert armed is not None
    leader.propose_batch([b"carries the commit"])
    cluster.process(1)
    timer.arm()  # the end of that pass
    assert timer._handle is None and armed.cancelled()


def test_a_fire_with_proposals_waiting_lets_their_entries_carry_the_commit(loop: asyncio.AbstractEventLoop) -> None:
    cluster, leader, passes, process = led_cluster()
    waiting: list[bytes] = []
    takes = [True]

    def pass_taking_proposals() -> None:  # the replicator's pass: proposals first, if it takes them
        if waiting and takes[0]:
            leader.propose_batch(waiting[:])
            waiting.clear()
        process()

    timer = CommitNoticeTimer(loop, leader, loop.create_future(), pass_taking_proposals, lambda: bool(waiting))
    own = commit(cluster, b"held")
    timer.arm()
    waiting.append(b"in the proposal ring when the bound passes")
    wait_for_passes(loop, passes, 1)
    carried = [m for m in cluster.outbox if isinstance(m, AppendEntries) and m.terms]
    assert passes == [own] and notices_sent(cluster) == [], "the commit went alone, not with the batch"
    assert sorted(m.target for m in carried) == [2, 3] and all(m.commit_index == own for m in carried)
    timer.arm()  # that pass's end: nothing held
    cluster.stabilize()
    # Proposals wait but the pass takes none (a transfer, a full pending set): still held after
    # it, so the notices go in the same fire, within the bound.
    takes[0] = False
    again = commit(cluster, b"held again")
    timer.arm()
    waiting.append(b"not taken")
    wait_for_passes(loop, passes, 3)
    assert passes == [own, again, again] and len(notices_sent(cluster)) == 2


def test_a_fire_that_finds_the_commit_carried_meanwhile_takes_no_pass(loop: asyncio.AbstractEventLoop) -> None:
    # Armed with a commit held, the bound passes after the next proposal's AppendEntries carried
    # it: nothing is held, so the timer runs no pass (before, it ran the whole pass for nothing).
    # (The pass that sent them would have cancelled it: here none ran.)
    cluster, leader, passes, process = led_cluster()

    timer = CommitNoticeTimer(loop, leader, loop.create_future(), process, no_batch)
    commit(cluster, b"held")
    timer.arm()
    leader.propose_batch([b"carries the commit"])
    cluster.process(1)  # the entries ride out with the commit
    assert not leader.commit_notices_held()
    fired = timer._handle
    assert fired is not None
    deadline = loop.time() + 10.0  # the bound passes (a bound on the wait, not a timed assertion)
    while timer._handle is fired and loop.time() < deadline:
        loop.run_until_complete(asyncio.sleep(COMMIT_NOTICE_DELAY_S))
    assert timer._handle is None, "the timer never fired"
    assert passes == []
