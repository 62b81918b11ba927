"""Commit notices: a leader holds back a commit index that has no entries to ride on, and a
follower does not answer a commit notice that would repeat its acknowledgement
(`RaftConfig.defer_commit_notices`, `AppendEntries.notice`).

Figure 2 has the leader send AppendEntries with its commit index and no entries only as
heartbeats; the commit index is advisory to a follower ("commitIndex = min(leaderCommit, index of
last new entry)"), so holding it back delays only what the follower applies, never what is
committed. Driven message by message, like tests/test_raft_paper.py, then in the simulator.
"""

from __future__ import annotations

import pytest

from sequencer.raft import AppendEntries, AppendEntriesResponse, Heartbeat, Message
from sequencer.raft.core import RaftCore
from sequencer.raft.follower import Follower
from sequencer.raft.tracker import Progress
from tests.sim import SafetyViolation, Simulation
from tests.sim.direct import DirectCluster
from tests.sim.simulator import DELIVER

FOLLOWERS = (2, 3)


def appends(messages: list[Message], target: int) -> list[AppendEntries]:
    return [m for m in messages if isinstance(m, AppendEntries) and m.target == target]


def answers(messages: list[Message]) -> list[AppendEntriesResponse]:
    return [m for m in messages if isinstance(m, AppendEntriesResponse)]


def leading(defer: bool = True) -> DirectCluster:
    cluster = DirectCluster(3, defer_commit_notices=defer)
    cluster.elect(1)
    cluster.tick(1)
    cluster.stabilize()
    return cluster


def committed_with_the_notices_held(cluster: DirectCluster, payload: bytes = b"x") -> int:
    """Node 1 proposes one entry; both followers hold and acknowledge it; node 1 commits it.
    Returns its index."""
    leader = cluster.core(1)
    index = leader.propose_batch([payload])
    cluster.process(1)
    cluster.deliver()
    for node in FOLLOWERS:
        cluster.process(node)
    cluster.deliver()
    cluster.process(1)
    assert leader.commit_index == leader.log.last_index == index
    return index


def test_a_commit_with_no_entries_to_ride_on_waits_for_the_callers_bound() -> None:
    cluster = leading()
    leader = cluster.core(1)
    committed_with_the_notices_held(cluster)
    assert appends(cluster.outbox, 2) == [] and appends(cluster.outbox, 3) == []
    assert leader.commit_notices_held()
    assert all(cluster.core(n).commit_index < leader.commit_index for n in FOLLOWERS)
    notices_before = leader.commit_notices_sent
    leader.send_commit_notices()  # the caller's bound passed
    cluster.process(1)
    for node in FOLLOWERS:
        (notice,) = appends(cluster.outbox, node)
        assert notice.notice and not notice.terms and notice.commit_index == leader.commit_index
    assert not leader.commit_notices_held()
    assert leader.commit_notices_sent == notices_before + 2
    cluster.stabilize()
    assert all(cluster.core(n).commit_index == leader.commit_index for n in FOLLOWERS)


def test_without_deferral_the_commit_goes_at_once_and_is_no_notice() -> None:
    cluster = leading(defer=False)
    committed_with_the_notices_held(cluster)
    for node in FOLLOWERS:
        (sent,) = appends(cluster.outbox, node)
        assert not sent.terms and not sent.notice
    assert not cluster.core(1).commit_notices_held()


def test_a_held_commit_rides_on_the_next_appendentries_with_entries() -> None:
    cluster = leading()
    leader = cluster.core(1)
    committed_with_the_notices_held(cluster)
    commit_index = leader.commit_index
    leader.propose_batch([b"y"])
    cluster.process(1)
    for node in FOLLOWERS:
        (carrier,) = appends(cluster.outbox, node)  # one message: entries and the commit
        assert carrier.terms and carrier.commit_index == commit_index and not carrier.notice
    cluster.deliver()
    assert all(cluster.core(n).commit_index == commit_index for n in FOLLOWERS)


def test_a_heartbeat_carries_a_held_commit_and_no_notice_follows() -> None:
    cluster = leading()
    leader = cluster.core(1)
    committed_with_the_notices_held(cluster)
    leader.tick()  # heartbeat_ticks=1: heartbeats now, with the commit up to each one's match
    cluster.process(1)
    for node in FOLLOWERS:
        (heartbeat,) = [m for m in cluster.outbox if m.target == node]
        assert isinstance(heartbeat, Heartbeat) and heartbeat.commit_index == leader.commit_index
    assert not leader.commit_notices_held()
    cluster.deliver()
    assert all(cluster.core(n).commit_index == leader.commit_index for n in FOLLOWERS)
    leader.send_commit_notices()  # the caller's bound, after: nothing is held
    cluster.process(1)
    assert appends(cluster.outbox, 2) == [] and appends(cluster.outbox, 3) == []


def test_a_follower_does_not_answer_a_notice_that_repeats_its_acknowledgement() -> None:
    cluster = leading()
    leader = cluster.core(1)
    committed_with_the_notices_held(cluster)
    leader.send_commit_notices()
    cluster.process(1)
    answers_before = [cluster.core(n).append_answers_sent for n in FOLLOWERS]
    unanswered_before = [cluster.core(n).notices_unanswered for n in FOLLOWERS]
    cluster.deliver()
    for node in FOLLOWERS:
        cluster.process(node)
        assert cluster.core(node).commit_index == leader.commit_index
    assert [cluster.core(n).notices_unanswered for n in FOLLOWERS] == [
        count + 1 for count in unanswered_before]
    assert answers(cluster.outbox) == []
    assert [cluster.core(n).append_answers_sent for n in FOLLOWERS] == answers_before


def committed_with_an_answer_lost() -> tuple[DirectCluster, RaftCore, Progress, int]:
    """A leader that committed an entry both followers wrote, node 2's answer lost: (the
    cluster, the leader's core, its progress of node 2, the entry's index)."""
    cluster = leading()
    leader = cluster.core(1)
    assert leader._leader is not None
    progress = leader._leader.tracker.progress[2]
    leader.propose_batch([b"x"])
    cluster.process(1)
    cluster.deliver()
    for node in FOLLOWERS:
        cluster.process(node)
    cluster.deliver(drop=lambda m: m.source == 2)  # node 2's acknowledgement is lost
    cluster.process(1)
    last_index = leader.log.last_index
    assert leader.commit_index == last_index and progress.match_index < last_index
    return cluster, leader, progress, last_index


def test_a_follower_whose_answer_was_lost_is_probed_and_answers_the_probe() -> None:
    # The follower takes the notice for one it has answered, so stays silent; the leader learns
    # its match from the probe that the next heartbeat's answer brings (no notice: answered).
    cluster, leader, progress, last_index = committed_with_an_answer_lost()
    leader.send_commit_notices()
    cluster.process(1)
    cluster.deliver()
    cluster.process(2)
    assert answers(cluster.outbox) == [] and cluster.core(2).commit_index == last_index
    leader.tick()  # a heartbeat
    cluster.process(1)
    assert [type(m) for m in cluster.outbox if m.target == 2] == [Heartbeat]
    cluster.deliver()
    cluster.process(2)
    cluster.deliver()  # the heartbeat's answer: node 2 is behind its leader's log
    cluster.process(1)
    (probe,) = appends(cluster.outbox, 2)
    assert not probe.notice and not probe.terms
    cluster.deliver()
    cluster.process(2)
    (answer,) = answers(cluster.outbox)
    assert answer.success and answer.index == last_index
    cluster.deliver()
    assert progress.match_index == last_index


def test_a_restarted_follower_answers_a_notice_it_has_not_acknowledged() -> None:
    # Node 2 wrote the entry and answered, but its answer was lost and it restarted: its new start
    # has acknowledged nothing to this term's leader, so the notice is the first message that
    # can tell the leader node 2's match, and node 2 answers it (a silent node 2 would leave its
    # match short until a heartbeat's round trip and the probe after it).
    cluster, leader, progress, last_index = committed_with_an_answer_lost()
    cluster.crash(2)
    cluster.restart(2)  # its entry is durable: it survives the restart
    restarted = cluster.core(2)
    assert restarted.log.last_index == last_index and restarted.term == leader.term
    leader.send_commit_notices()
    cluster.process(1)
    (notice,) = appends(cluster.outbox, 2)
    assert notice.notice and notice.previous_index == last_index
    cluster.deliver(drop=lambda m: m.target != 2)
    cluster.process(2)
    (answer,) = answers(cluster.outbox)
    assert answer.success and answer.index == last_index
    assert restarted.notices_unanswered == 0
    cluster.deliver()
    assert progress.match_index == last_index


def test_a_notice_that_finds_the_write_in_progress_is_answered_once_it_is_durable() -> None:
    # Node 2 holds the entry but its write has not landed when the notice arrives (its leader
    # committed with node 3): it has acknowledged nothing, so it answers, once the write is
    # durable, and only once for the entry and the notice.
    cluster = leading()
    leader = cluster.core(1)
    follower = cluster.core(2)
    leader.propose_batch([b"x"])
    cluster.process(1)
    cluster.deliver()
    cluster.process(3)
    cluster.deliver(drop=lambda m: m.target != 1)
    cluster.process(1)
    last_index = leader.log.last_index
    assert leader.commit_index == last_index
    assert follower.log.last_index == last_index  # in its log, not yet written
    leader.send_commit_notices()
    cluster.process(1)
    (notice,) = appends(cluster.outbox, 2)
    assert notice.notice
    cluster.deliver(drop=lambda m: m.target != 2)
    assert follower.notices_unanswered == 0
    cluster.process(2)  # the write lands; the answer it waited for leaves
    (answer,) = answers(cluster.outbox)
    assert answer.success and answer.index == last_index


def test_a_notice_past_a_followers_log_is_refused_and_moves_no_commit() -> None:
    # Node 2 lost the entries (the message carrying them), so a notice of their commit finds its
    # log short: it refuses, as any AppendEntries, and its commit stays where its log matched.
    cluster = leading()
    leader = cluster.core(1)
    commit_before = cluster.core(2).commit_index
    leader.propose_batch([b"x"])
    cluster.process(1)
    cluster.deliver(drop=lambda m: m.target == 2)
    cluster.process(3)
    cluster.deliver()
    cluster.process(1)
    assert leader.commit_index == leader.log.last_index
    leader.send_commit_notices()
    cluster.process(1)
    (notice,) = appends(cluster.outbox, 2)
    assert notice.notice and notice.previous_index == leader.log.last_index
    cluster.deliver(drop=lambda m: m.target != 2)
    cluster.process(2)
    (refusal,) = answers(cluster.outbox)
    assert not refusal.success
    assert cluster.core(2).commit_index == commit_before
    cluster.stabilize()
    assert cluster.core(2).log.last_index == leader.log.last_index


def _steady_load(commit_notice_delay_us: int | None) -> Simulation:
    """A reliable 3-node cluster under a steady client load for 2 s of simulated time."""
    simulation = Simulation(5, 3, commit_notice_delay_us=commit_notice_delay_us)

    def client() -> None:
        if simulation.now_us < 2_000_000:
            simulation.propose(4)
            simulation.at_ms(3, client)

    simulation.at_ms(300, client)
    simulation.run_for_ms(2_000)
    simulation.await_convergence(1_000)
    return simulation


def test_held_commit_notices_send_fewer_messages_and_the_cluster_still_converges() -> None:
    counts = {}
    for delay_us in (None, 500, 0):
        simulation = _steady_load(delay_us)
        cores = [node.core for node in simulation.nodes.values()]
        assert all(core is not None for core in cores)
        assert len(simulation.acked) > 2000  # every proposal committed and acknowledged
        appends_sent = sum(core.appends_sent for core in cores if core is not None)
        answered = sum(core.append_answers_sent for core in cores if core is not None)
        counts[delay_us] = (appends_sent, answered, simulation.messages_sent)
    sent_at_once, held_500us, held_for_heartbeats = counts[None], counts[500], counts[0]
    # Commit-only AppendEntries are most of what holding them saves, and their answers.
    assert held_500us[0] < sent_at_once[0] and held_for_heartbeats[0] < held_500us[0]
    assert held_500us[1] < sent_at_once[1]


def _restart_before_the_notice(seed: int) -> Simulation:
    """A follower that answered the last entries restarts before their commit's notice reaches
    it: its new start owes the notice an answer (tests/sim/checks.py, `NoticeAnswers`)."""
    simulation = Simulation(seed, 3, commit_notice_delay_us=2_000)
    simulation.run_for_ms(500)
    leader_id = simulation.leader()
    assert leader_id is not None
    leader = simulation.nodes[leader_id].core
    assert leader is not None and leader._leader is not None
    simulation.propose(4, leader_id)
    last_index = leader.log.last_index
    progress = leader._leader.tracker.progress

    def quiet_follower() -> int | None:
        """A follower that acknowledged every entry, with nothing on its way to it."""
        if leader.commit_index != last_index or not leader.commit_notices_held():
            return None
        on_the_way = {event[3][1] for event in simulation._events if event[2] == DELIVER}
        return next((n for n in progress if n != leader_id and progress[n].match_index == last_index
                     and n not in on_the_way), None)  # fmt: skip

    assert simulation.run_until(lambda: quiet_follower() is not None, timeout_ms=200, step_ms=0.05)
    follower = quiet_follower()
    assert follower is not None
    simulation.crash(follower)
    simulation.restart(follower)
    simulation.run_for_ms(50)
    simulation.await_convergence(1_000)
    return simulation


def test_the_simulator_sees_a_restarted_follower_answer_the_notice_it_owes() -> None:
    simulation = _restart_before_the_notice(1)
    assert simulation.notice_answers.owed_answered >= 1


def test_the_simulator_catches_a_follower_that_never_answers_notices(monkeypatch: pytest.MonkeyPatch) -> None:
    answer = Follower.acknowledge

    def never_answer_notices(self: Follower, leader_id: int, index: int, term: int, notice: bool = False) -> None:
        if not notice:
            answer(self, leader_id, index, term)

    monkeypatch.setattr(Follower, "acknowledge", never_answer_notices)
    with pytest.raises(SafetyViolation, match=r"left node \d's notice unanswered"):
        _restart_before_the_notice(1)
