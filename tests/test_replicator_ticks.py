"""A follower's replicator ticks its Raft core every tick but makes a pass of its loop only when
something is due (daemon/roles/replicator_ticks.py): counted in a real cluster, and the rule
checked against a real `RaftCore`, whose election timeout keeps its one-tick resolution."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from daemon.cluster_harness import Cluster
from daemon.layout import RAFT_PASSES
from daemon.roles.replicator_ticks import QUIET_PASS_S, QuietTicks
from sequencer.raft.config import RaftConfig
from sequencer.raft.core import RaftCore
from sequencer.raft.messages import AppendEntries

pytestmark = pytest.mark.timeout(120)
TICK_MS = 10
TICKS_WATCHED = 100  # a second of ticks: ~10 housekeeping passes and ~20 heartbeats on a follower
WAIT_S = 60.0
POLL_S = 0.02
TICKS = "replicator.heartbeat"  # the replicator adds one each tick


def _follower(node_id: int = 2) -> RaftCore:
    return RaftCore(RaftConfig(node_id=node_id, voters=(1, 2, 3), cluster_id=7), random.Random(node_id))


def _heartbeat(core: RaftCore, term: int = 1) -> None:
    """An empty AppendEntries from leader 1, and its answer handed out (as a pass would)."""
    core.step(AppendEntries(7, 1, core.id, term, 0, 0, 0, [], []))
    core.advance(core.ready(), entries_durable=False)


def test_a_followers_tick_makes_a_pass_at_the_tick_its_election_timeout_passes() -> None:
    # Raft 5.2: "If a follower receives no communication over a period of time called the election
    # timeout, then it assumes there is no viable leader and begins an election." A quiet tick
    # must not hold that back by a tick: the tick whose timeout passes has a ready, so it passes.
    core = _follower()
    _heartbeat(core)
    ticks = QuietTicks(TICK_MS)
    standing = (core.term, core.leader_id)
    for tick in range(1, 10 * core.config.election_ticks):
        core.tick()
        quiet = ticks.quiet(core, standing, waiting=False)
        if core.has_ready():
            assert not quiet, tick
            assert tick >= core.config.election_ticks, tick
            return
    raise AssertionError("the follower never stood for election")


def test_a_quiet_follower_passes_once_every_quiet_pass_period_and_whenever_work_waits() -> None:
    core = _follower()
    _heartbeat(core)
    ticks = QuietTicks(TICK_MS)
    standing = (core.term, core.leader_id)
    period = round(QUIET_PASS_S * 1000 / TICK_MS)
    passes = []
    for tick in range(3 * period):
        _heartbeat(core)  # the leader is heard: the election timeout never passes
        core.tick()
        if not ticks.quiet(core, standing, waiting=False):
            passes.append(tick)
    assert passes == [period - 1, 2 * period - 1, 3 * period - 1], passes
    core.tick()
    assert not ticks.quiet(core, standing, waiting=True)  # work outside, or held: a pass
    core.tick()
    assert not ticks.quiet(core, (standing[0] - 1, standing[1]), waiting=False)  # a new standing
    core.read_index(1)  # a query replica's read round (ReadRounds.ask): a message to the leader
    core.tick()
    assert core.has_ready()
    assert not ticks.quiet(core, standing, waiting=False)  # it leaves in this tick's pass
    leader = RaftCore(RaftConfig(node_id=1, voters=(1,), cluster_id=7), random.Random(1))
    while not leader.has_ready():
        leader.tick()
    leader.advance(leader.ready(), entries_durable=False)
    leader.tick()
    assert not ticks.quiet(leader, (leader.term, leader.leader_id), waiting=False)  # a leader's: a pass


def _wait_ticks(cluster: Cluster, number: int, since: dict[str, int]) -> dict[str, int]:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        values = cluster[number].read_counters()
        if values[TICKS] - since[TICKS] >= TICKS_WATCHED:
            return values
        time.sleep(POLL_S)
    raise AssertionError(f"node {number}'s replicator did not tick {TICKS_WATCHED} times within {WAIT_S} s")


def test_an_idle_followers_ticks_make_no_pass_but_the_leaders_do(tmp_dir: Path, unique: str) -> None:
    with Cluster(tmp_dir, unique, proxied=False, cluster={"tick_ms": TICK_MS, "heartbeat_ms": 50}) as cluster:
        cluster.start()
        leader = cluster.wait_leader().number
        followers = [n for n in cluster.nodes if n != leader]
        for number in cluster.nodes:  # every replicator published its passes once (a tick's pass)
            deadline = time.monotonic() + WAIT_S
            while cluster[number].read_counters()[RAFT_PASSES.name] == 0:
                assert time.monotonic() < deadline, f"node {number} published no raft.passes"
                time.sleep(POLL_S)
        before = {n: cluster[n].read_counters() for n in cluster.nodes}
        after = {n: _wait_ticks(cluster, n, before[n]) for n in cluster.nodes}
        ticks = {n: after[n][TICKS] - before[n][TICKS] for n in cluster.nodes}
        passes = {n: after[n][RAFT_PASSES.name] - before[n][RAFT_PASSES.name] for n in cluster.nodes}
        # A leader's ticks each make a pass (heartbeats are sent from them); a follower's only
        # every QUIET_PASS_S (a tenth of its ticks) and for each heartbeat it answers (a fifth):
        # every tick made one before (one or more a tick).
        assert passes[leader] >= ticks[leader] - ticks[leader] // 10, (passes, ticks)
        for number in followers:
            # Idle, 26-40 passes a hundred ticks; the bound leaves room for a follower starved to
            # half the leader's tick rate (more heartbeats a tick) and still fails a revert.
            assert 4 * passes[number] < 3 * ticks[number], (number, passes, ticks)
        assert cluster.wait_leader().number == leader  # quiet ticks: no election meanwhile
