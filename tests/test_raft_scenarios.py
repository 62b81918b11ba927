"""The classic Raft test scenarios (MIT 6.824 labs, etcd-io/raft), run in the simulator.

Every scenario runs on simulated time and a seeded network, and every step is checked for
Election Safety, Log Matching, Leader Completeness, State Machine Safety, monotonic commit and
persist-before-send (`tests.sim.checks`). Each ends with the liveness check: once faults stop, a
leader is elected and all nodes converge, and every acknowledged proposal is applied exactly once
on every node.
"""

from __future__ import annotations

import pytest

from sequencer.raft import RaftRole
from tests.sim import NetworkProfile, Simulation
from tests.sim.simulator import MS, DiskProfile

CONVERGE_MS = 5000


def elect(simulation: Simulation) -> int:
    assert simulation.run_until(lambda: simulation.leader() is not None, 2000)
    leader = simulation.leader()
    assert leader is not None
    return leader


def propose_over(simulation: Simulation, duration_ms: int, *, batch: int = 2,
                 every_ms: int = 10) -> None:
    """Clients propose every `every_ms` for `duration_ms`, to whichever node they find."""
    for _ in range(duration_ms // every_ms):
        simulation.propose(batch)
        simulation.run_for_ms(every_ms)


def test_initial_election_elects_one_leader_that_stays() -> None:
    simulation = Simulation(1, 3)
    leader = elect(simulation)
    term = simulation.nodes[leader].core.term  # type: ignore[union-attr]
    simulation.run_for_ms(3000)  # 15-30 election timeouts with no faults: no new election
    assert simulation.leader() == leader
    assert {simulation.nodes[n].core.term for n in simulation.ids} == {term}  # type: ignore[union-attr]


def test_re_election_after_leader_failure() -> None:
    simulation = Simulation(2, 3)
    first = elect(simulation)
    simulation.crash(first)
    second = elect(simulation)
    assert second != first
    simulation.restart(first)
    simulation.run_for_ms(500)
    assert simulation.nodes[first].core.raft_role == RaftRole.FOLLOWER  # type: ignore[union-attr]
    simulation.await_convergence(CONVERGE_MS)


def test_many_elections_with_two_of_five_nodes_down_at_a_time() -> None:
    # The leader is always one of the two: a random pair held it only some of the time, so how
    # many elections ran (what the last line checks) depended on the seed's draws, not on Raft.
    simulation = Simulation(3, 5)
    for _ in range(10):
        leader = elect(simulation)
        down = [leader, simulation.rng.choice([n for n in simulation.ids if n != leader])]
        for node_id in down:
            simulation.crash(node_id)
        elect(simulation)
        propose_over(simulation, 100)
        for node_id in down:
            simulation.restart(node_id)
    simulation.await_convergence(CONVERGE_MS)
    assert len(simulation.checker.leader_of_term) >= 11  # the first leader, then one per round


def test_basic_agreement_every_node_applies_every_acknowledged_proposal() -> None:
    simulation = Simulation(4, 3)
    elect(simulation)
    propose_over(simulation, 500)
    simulation.await_convergence(CONVERGE_MS)
    assert len(simulation.acked) >= 80


def test_agreement_despite_a_failed_follower() -> None:
    simulation = Simulation(5, 3)
    leader = elect(simulation)
    follower = next(n for n in simulation.ids if n != leader)
    simulation.crash(follower)
    acked_before = len(simulation.acked)
    propose_over(simulation, 300)
    assert len(simulation.acked) > acked_before + 20  # a majority still commits
    simulation.restart(follower)
    simulation.await_convergence(CONVERGE_MS)


def test_no_agreement_without_a_majority_then_agreement_after_recovery() -> None:
    simulation = Simulation(6, 5)
    leader = elect(simulation)
    followers = [n for n in simulation.ids if n != leader]
    for node_id in followers[:3]:
        simulation.crash(node_id)
    core = simulation.nodes[leader].core
    assert core is not None
    commit = core.commit_index
    simulation.propose(3, node_id=leader)
    simulation.run_for_ms(50)
    assert core.commit_index == commit
    for node_id in followers[:3]:
        simulation.restart(node_id)
    simulation.await_convergence(CONVERGE_MS)


def test_leader_failure_during_proposals() -> None:
    simulation = Simulation(7, 3)
    for _ in range(5):
        leader = elect(simulation)
        propose_over(simulation, 50)
        simulation.crash(leader)
        propose_over(simulation, 300)
        simulation.restart(leader)
    simulation.await_convergence(CONVERGE_MS)


def test_rejoin_of_a_partitioned_leader_discards_its_uncommitted_entries() -> None:
    simulation = Simulation(8, 3)
    old = elect(simulation)
    simulation.isolate(old)
    simulation.propose(5, node_id=old)  # cannot commit: the leader is alone
    new = elect_other(simulation, old)
    propose_over(simulation, 200)
    simulation.heal()
    simulation.await_convergence(CONVERGE_MS)
    assert new != old
    stranded = [p for p, (node, _, _) in simulation.proposals.items() if node == old]
    assert stranded, "the isolated leader's proposals must not be acknowledged"
    for payload in stranded:
        assert payload not in simulation.nodes[old].applied


def elect_other(simulation: Simulation, old: int) -> int:
    assert simulation.run_until(
        lambda: any(
            (c := simulation.nodes[n].core) is not None and c.raft_role == RaftRole.LEADER
            for n in simulation.ids if n != old
        ),
        3000,
    )
    return next(n for n in simulation.ids if n != old
                and simulation.nodes[n].core.raft_role == RaftRole.LEADER)  # type: ignore[union-attr]


def test_backup_divergent_logs_are_repaired_quickly() -> None:
    # 6.824 TestBackup: a leader and one follower take many entries that never commit, the other
    # three commit many of their own, and the logs are reconciled.
    simulation = Simulation(9, 5, election_ticks=10)
    leader = elect(simulation)
    others = [n for n in simulation.ids if n != leader]
    partner, rest = others[0], others[1:]
    simulation.partition((leader, partner), tuple(rest))
    for _ in range(20):
        simulation.propose(10, node_id=leader)
        simulation.run_for_ms(5)
    second = elect_other_in(simulation, rest)
    for _ in range(20):
        simulation.propose(10, node_id=second)
        simulation.run_for_ms(5)
    simulation.heal()
    simulation.partition((leader, partner, rest[0]), (second, *[n for n in rest if n != second
                                                                 and n != rest[0]]))
    simulation.run_for_ms(500)
    simulation.heal()
    simulation.await_convergence(CONVERGE_MS)


def elect_other_in(simulation: Simulation, group: list[int]) -> int:
    assert simulation.run_until(
        lambda: any(simulation.nodes[n].core.raft_role == RaftRole.LEADER  # type: ignore[union-attr]
                    for n in group),
        3000,
    )
    return next(n for n in group
                if simulation.nodes[n].core.raft_role == RaftRole.LEADER)  # type: ignore[union-attr]


def test_persistence_across_crashes_keeps_every_acknowledged_entry() -> None:
    simulation = Simulation(10, 3)
    for round_number in range(6):
        elect(simulation)
        propose_over(simulation, 100)
        victim = simulation.ids[round_number % 3]
        simulation.crash(victim, torn=round_number % 2 == 0)
        propose_over(simulation, 100)
        simulation.restart(victim)
    simulation.await_convergence(CONVERGE_MS)
    assert len(simulation.acked) > 50


@pytest.mark.parametrize("seed", [7, 8, 9])
def test_leader_that_crashes_before_its_write_is_durable_loses_no_committed_entry(
    seed: int,
) -> None:
    # Thesis 10.2.1: "The leader may even commit an entry before it has been written to its own
    # disk, if a majority of followers have written it to their disks; this is still safe." The
    # leader's disk stalls; its followers' writes land; it commits and dies with its write lost.
    simulation = Simulation(seed, 3, disk_profiles=[DiskProfile(100, 500)] * 3)
    leader = elect(simulation)
    node = simulation.nodes[leader]
    node.disk_profile = DiskProfile(200 * MS, 200 * MS)
    assert simulation.propose(5, node_id=leader) == 5
    core = node.core
    assert core is not None
    assert simulation.run_until(lambda: core.commit_index > core.stable_index, 100, step_ms=1)
    committed = {index: core.log.payloads[index - core.log.offset_index - 1]
                 for index in range(core.stable_index + 1, core.commit_index + 1)}
    assert node.writes  # sent and committed, not yet on its own disk
    simulation.crash(leader)
    simulation.run_for_ms(300)
    simulation.restart(leader)
    simulation.await_convergence(CONVERGE_MS)
    for node_id in simulation.ids:
        applied = simulation.nodes[node_id].applied
        assert {index: applied[index - 1] for index in committed} == committed, node_id


@pytest.mark.parametrize("seed", range(5))
def test_figure_8_old_term_entries_are_never_committed_by_counting(seed: int) -> None:
    # 6.824 TestFigure8: leaders crash at random moments right after proposing, so entries of old
    # terms sit on some nodes while new leaders come and go. Small messages make followers
    # acknowledge old-term entries one at a time; the checks fail if one is committed by counting
    # and later overwritten.
    simulation = Simulation(100 + seed, 5, entries_per_message_max=1, inflight_messages_max=1)
    rng = simulation.rng
    for _ in range(30):
        leader = simulation.leader()
        if leader is not None:
            simulation.propose(rng.randint(1, 3), node_id=leader)
        simulation.run_for_ms(rng.choice((1, 5, 20, 200)))
        leader = simulation.leader()
        if leader is not None and rng.random() < 0.6:
            simulation.crash(leader, torn=rng.random() < 0.5)
        live = simulation.live()
        if len(live) < 3:
            simulation.restart(rng.choice([n for n in simulation.ids if n not in live]))
    for node_id in simulation.ids:
        simulation.restart(node_id)
    simulation.await_convergence(CONVERGE_MS)


def test_unreliable_network_churn() -> None:
    simulation = Simulation(
        11, 5, network=NetworkProfile(drop=0.1, duplicate=0.05, delay_min_us=100,
                                      delay_max_us=40 * MS), drift=0.2,
        compact_every_entries=16,
    )
    rng = simulation.rng
    for _ in range(40):
        simulation.propose(rng.randint(1, 5))
        if rng.random() < 0.3:
            simulation.read()
        if rng.random() < 0.1:
            simulation.crash(rng.choice(simulation.ids), torn=True)
        if rng.random() < 0.2:
            for node_id in simulation.ids:
                simulation.restart(node_id)
        simulation.run_for_ms(rng.randint(10, 100))
    simulation.network = NetworkProfile()
    for node_id in simulation.ids:
        simulation.restart(node_id)
    simulation.await_convergence(CONVERGE_MS)
    assert simulation.acked and simulation.reads_done


def test_snapshot_install_after_compaction() -> None:
    simulation = Simulation(12, 3, compact_every_entries=8)
    leader = elect(simulation)
    lagging = next(n for n in simulation.ids if n != leader)
    simulation.crash(lagging)
    propose_over(simulation, 300)
    leader_core = simulation.nodes[leader].core
    assert leader_core is not None and leader_core.log.snapshot_index > 8
    simulation.restart(lagging)
    simulation.await_convergence(CONVERGE_MS)
    assert simulation.snapshots_installed[lagging] >= 1


@pytest.mark.parametrize(
    ("seed", "compact_every_entries", "log_retention_entries"),
    [(31, 0, None), (32, 0, 16), (33, 8, None), (34, 8, 16)],
)
def test_a_follower_whose_disk_was_wiped_while_down_rejoins_and_converges(
    seed: int, compact_every_entries: int, log_retention_entries: int | None
) -> None:
    """A follower restarts with nothing (no term, vote or log) while the leader still holds the
    match it acknowledged before: the leader learns from its new incarnation that it lost them and
    feeds it again, from the log or, once compacted, through a snapshot. Without incarnations the
    leader drops its rejections as stale (below the old match) and it never catches up."""
    simulation = Simulation(seed, 3, compact_every_entries=compact_every_entries,
                            log_retention_entries=log_retention_entries)
    for _ in range(3):
        leader = elect(simulation)
        propose_over(simulation, 100)
        follower = next(n for n in simulation.ids if n != leader)
        simulation.crash(follower)
        simulation.wipe(follower)
        propose_over(simulation, 100)
        simulation.restart(follower)
        simulation.await_convergence(CONVERGE_MS)
    assert len(simulation.acked) > 50
    if compact_every_entries:
        assert sum(simulation.snapshots_installed.values()) >= 1


def test_all_nodes_crash_and_restart() -> None:
    simulation = Simulation(13, 5)
    for round_number in range(4):
        elect(simulation)
        propose_over(simulation, 100)
        for node_id in simulation.ids:
            simulation.crash(node_id, torn=(node_id + round_number) % 2 == 0)
        simulation.run_for_ms(300)  # a torn crash strikes at the node's next ready
        for node_id in simulation.ids:
            simulation.restart(node_id)
    simulation.await_convergence(CONVERGE_MS)
    assert len(simulation.acked) > 50


def test_linearizable_reads_see_every_write_committed_before_them() -> None:
    simulation = Simulation(14, 3)
    elect(simulation)
    for _ in range(50):
        simulation.propose(2)
        simulation.read()
        simulation.run_for_ms(10)
    simulation.await_convergence(CONVERGE_MS)
    assert simulation.reads_done >= 40
