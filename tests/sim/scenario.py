"""Randomized scenarios: one seed picks a cluster, a network, a fault schedule and a client load.

A scenario has two phases. In the fault phase everything the simulator can do goes wrong at random
times: partitions of every shape, swizzle-clog, crashes (some tearing the write in progress),
whole-cluster crashes, pauses, lossy and duplicating links, drifting clocks; clients keep
proposing and reading. Then the faults stop: links heal, crashed nodes restart, paused nodes
resume, the network turns reliable. Within `CONVERGENCE_MS_MAX` of simulated time a leader must be
elected and every node must hold, commit and apply the same log (liveness), and every
acknowledged proposal must be applied exactly once on every node.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from tests.sim.simulator import MS, DiskProfile, NetworkProfile, Simulation

__all__ = ["CONVERGENCE_MS_MAX", "SeedResult", "run_seed"]

# Liveness bound after the last fault. Elections take 100-200 ms with the default timeouts; a
# split vote costs another timeout; a follower far behind needs a snapshot and some pipelined
# round trips. 5 s is 25 election timeouts: generous, yet a livelock cannot hide in it.
CONVERGENCE_MS_MAX = 5000

FAULTS = (
    "partition",
    "isolate-leader",
    "one-way",
    "bridge",
    "swizzle",
    "heal",
    "crash",
    "crash-torn",
    "crash-unsynced",
    "crash-all",
    "pause",
    "network",
    "transfer",
)


@dataclass
class SeedResult:
    seed: int
    trace_hash: str
    node_count: int
    simulated_ms: int
    acked: int
    reads: int
    messages: int
    faults: list[str] = field(default_factory=list)


def _network(rng: random.Random) -> NetworkProfile:
    return NetworkProfile(
        drop=rng.choice((0.0, 0.0, 0.01, 0.05, 0.2)),
        duplicate=rng.choice((0.0, 0.01, 0.05)),
        delay_min_us=rng.choice((50, 200, 1000)),
        delay_max_us=rng.choice((1 * MS, 5 * MS, 20 * MS, 60 * MS)),
    )


# Each node's disk: synchronous (the shell persists entries before sending), or an fsync stream
# whose latency ranges from an NVMe flush (~20-200 us) to a loaded spinning disk (~1-20 ms), so
# the leader's own write lands before, with or well after its followers' acknowledgements.
DISK_PROFILES = (
    None,
    DiskProfile(20, 200),
    DiskProfile(100, 2 * MS),
    DiskProfile(1 * MS, 20 * MS),
)
# A stalled disk (a full device queue, a journal commit in the file system): every fsync takes
# 20-200 ms, far longer than a LAN round trip, until the node restarts.
DISK_STALL = DiskProfile(20 * MS, 200 * MS)


# Each seed's commit notices (`build`): None sends them at once; a delay holds them for the
# leader's timer (the replicator's is a few milliseconds); 0 for the heartbeats alone.
COMMIT_NOTICE_DELAYS_US = (None, 500, 3 * MS, 0)
FOLLOWER_RETENTIONS = (None, 0, 3)


def build(seed: int, learners: bool = False) -> tuple[Simulation, random.Random, int]:
    """The cluster, the scenario's random stream and the fault phase length for `seed`."""
    rng = random.Random(seed)
    node_count = rng.choice((3, 3, 3, 5, 5, 1))
    # Drawn only for a run with learners, so every other seed keeps its scenario.
    learner_count = rng.randint(1, 2) if learners else 0
    simulation = Simulation(
        seed,
        node_count,
        network=_network(rng),
        drift=rng.choice((0.0, 0.05, 0.2)),
        compact_every_entries=rng.choice((0, 8, 32, 128)),
        # Small messages and windows make acknowledgements land mid-batch, where the commit
        # rules (5.4.2) and flow control are tested hardest.
        entries_per_message_max=rng.choice((1, 2, 5, 64, 1024)),
        inflight_messages_max=rng.choice((1, 2, 8, 64)),
        # The default byte window, one of ~3 payloads or of ~20; from the seed, not drawn, so every
        # seed keeps the scenario it had before the byte window existed.
        inflight_bytes_max=(4 << 20, 32, 256)[seed % 3],
        disk_profiles=[rng.choice(DISK_PROFILES) for _ in range(node_count + learner_count)],
        # None keeps every entry in memory; 0 drops all that is applied and durable, so lagging
        # followers are fed from storage (the journal, in the daemon).
        log_retention_entries=rng.choice((None, 0, 8, 64)),
        term_start_from_shell=rng.random() < 0.5,
        rng=rng,
        learner_count=learner_count,
        # Commit notices sent at once, or held (`RaftConfig.defer_commit_notices`) for the
        # leader's timer (0.5 ms, 3 ms) or for the heartbeats alone (0): from the seed, not
        # drawn, like the byte window.
        commit_notice_delay_us=COMMIT_NOTICE_DELAYS_US[seed % len(COMMIT_NOTICE_DELAYS_US)],
        # A node that does not lead keeps fewer entries in memory than a leader (the daemon: 4,096
        # against 65,536), and a new leader reads what it dropped back from storage: the leader's
        # window, none, or 3 entries; from the seed, like the byte window.
        follower_log_retention_entries=FOLLOWER_RETENTIONS[seed // 4 % len(FOLLOWER_RETENTIONS)],
    )
    fault_ms = rng.randint(1000, 4000)
    return simulation, rng, fault_ms


def run_seed(
    seed: int, *, trace: bool = False, faults: tuple[str, ...] = FAULTS, learners: bool = False
) -> tuple[Simulation, SeedResult]:
    """Run the randomized scenario of `seed`; raises on any violated check.

    `faults` narrows the mix of faults (a test aiming at one of them); the default is all.
    `learners`: the cluster also has one or two learners, and reads are asked of any node
    (followers and learners ask their leader), another scenario for the same seed.
    """
    unknown = set(faults) - set(FAULTS)
    assert not unknown, f"unknown faults {sorted(unknown)}; choose from {FAULTS}"
    simulation, rng, fault_ms = build(seed, learners)
    simulation.trace_all = trace
    fault_end_us = fault_ms * MS
    ids = simulation.ids
    fault_kinds = faults
    faults_seen: list[str] = []

    def note(text: str) -> None:
        faults_seen.append(f"{simulation.now_us // MS}ms {text}")
        simulation._record(f"fault {text}")

    def client() -> None:
        if simulation.now_us >= fault_end_us:
            return
        simulation.propose(rng.randint(1, 8))
        if rng.random() < 0.2:
            if learners:
                simulation.read_anywhere()
            else:
                simulation.read()
        simulation.at_ms(rng.randint(2, 30), client)

    def restart_later(node_id: int) -> None:
        simulation.at_ms(rng.randint(20, 800), lambda: simulation.restart(node_id))

    def restart_when_down(node_id: int) -> None:
        """Restart a node armed to crash once it has crashed; until then keep it armed."""

        def check() -> None:
            node = simulation.nodes[node_id]
            if node.core is None:
                simulation.restart(node_id)
            elif node.crash_after_send and simulation.now_us < fault_end_us:
                simulation.at_ms(rng.randint(20, 200), check)

        simulation.at_ms(rng.randint(20, 200), check)

    def swizzle(order: list[int]) -> None:
        clogged: list[int] = []

        def block() -> None:
            simulation.blocked = {
                (s, t) for s in ids for t in ids if s != t and (s in clogged or t in clogged)
            }

        def clog(node_id: int) -> None:
            if simulation.now_us >= fault_end_us:
                return  # the faults have stopped
            clogged.append(node_id)
            block()

        def unclog(node_id: int) -> None:
            if simulation.now_us >= fault_end_us:
                return
            if node_id in clogged:
                clogged.remove(node_id)
            block()

        at = 0
        for node_id in order:
            at += rng.randint(10, 200)
            simulation.at_ms(at, lambda n=node_id: clog(n))
        restore = list(order)
        rng.shuffle(restore)
        for node_id in restore:
            at += rng.randint(10, 300)
            simulation.at_ms(at, lambda n=node_id: unclog(n))

    def fault() -> None:
        if simulation.now_us >= fault_end_us:
            return
        kind = rng.choice(fault_kinds)
        if kind == "partition" and len(ids) > 1:
            shuffled = list(ids)
            rng.shuffle(shuffled)
            cut = rng.randint(1, len(ids) - 1)
            simulation.heal()
            simulation.partition(tuple(shuffled[:cut]), tuple(shuffled[cut:]))
            note(f"partition {shuffled[:cut]} | {shuffled[cut:]}")
        elif kind == "isolate-leader":
            leader = simulation.leader()
            if leader is not None:
                simulation.isolate(leader)
                note(f"isolate leader n{leader}")
        elif kind == "one-way" and len(ids) > 1:
            for _ in range(rng.randint(1, 3)):
                source, target = rng.sample(ids, 2)
                simulation.cut(source, target)
                note(f"cut n{source}->n{target}")
        elif kind == "bridge" and len(ids) >= 3:
            shuffled = list(ids)
            rng.shuffle(shuffled)
            bridge, rest = shuffled[0], shuffled[1:]
            half = len(rest) // 2
            simulation.heal()
            for a in rest[:half]:
                for b in rest[half:]:
                    simulation.cut(a, b)
                    simulation.cut(b, a)
            note(f"bridge n{bridge} between {rest[:half]} and {rest[half:]}")
        elif kind == "swizzle" and len(ids) > 1:
            order = rng.sample(ids, rng.randint(1, len(ids)))
            swizzle(order)
            note(f"swizzle-clog {order}")
        elif kind == "heal":
            simulation.heal()
            note("heal")
        elif kind in ("crash", "crash-torn"):
            live = simulation.live()
            if live:
                node_id = rng.choice(live)
                simulation.crash(node_id, torn=kind == "crash-torn")
                note(f"{kind} n{node_id}")
                restart_later(node_id)
        elif kind == "crash-unsynced" and len(ids) > 1:
            # The leader's disk stalls and it loses its link to all but a bare majority (itself
            # included); it sends its next entries and dies once it has committed past its own
            # durable log. Only a minority then holds what it committed, so a leader that counted
            # its unsynced entries would lose committed entries (thesis 10.2.1).
            leader = simulation.leader()
            if leader is not None:
                voters = simulation.voters
                followers = [n for n in voters if n != leader]
                quorum = len(voters) // 2 + 1
                cut = rng.sample(followers, len(followers) - (quorum - 1))
                cut += simulation.learners  # they hold entries but never count
                for target in cut:
                    simulation.cut(leader, target)
                simulation.nodes[leader].disk_profile = DISK_STALL
                simulation.crash(leader, after_send=True)
                note(f"crash-unsynced n{leader} (disk stalls, cut from {cut})")
                restart_when_down(leader)
        elif kind == "crash-all":
            for node_id in simulation.live():
                simulation.crash(node_id, torn=rng.random() < 0.5)
                restart_later(node_id)
            note("crash all")
        elif kind == "pause":
            node_id = rng.choice(ids)
            duration_ms = rng.randint(10, 600)
            simulation.pause(node_id, duration_ms)
            note(f"pause n{node_id} {duration_ms}ms")
        elif kind == "network":
            simulation.network = _network(rng)
            note(f"network {simulation.network}")
        elif kind == "transfer" and len(ids) > 1:
            target = rng.choice(simulation.voters)  # a learner cannot lead
            if simulation.transfer(target):
                note(f"transfer leadership to n{target}")
        simulation.at_ms(rng.randint(50, 600), fault)

    try:
        simulation.at_ms(rng.randint(0, 300), client)
        simulation.at_ms(rng.randint(100, 600), fault)
        simulation.run_until_us(fault_end_us)

        # Faults stop.
        simulation.heal()
        simulation.network = NetworkProfile()
        for node_id in ids:
            node = simulation.nodes[node_id]
            node.paused_until_us = 0
            simulation.restart(node_id)
        note("faults stop")
        simulation.await_convergence(CONVERGENCE_MS_MAX)
    except Exception as error:
        # The minimal trace: the scenario's faults, then the last events before the failure.
        error.add_note(f"seed {seed}: {len(ids)} nodes, faults: " + "; ".join(faults_seen))
        error.add_note("last events:\n  " + "\n  ".join(simulation.trace))
        raise
    result = SeedResult(
        seed=seed,
        trace_hash=simulation.trace_hash,
        node_count=len(ids),
        simulated_ms=simulation.now_us // MS,
        acked=len(simulation.acked),
        reads=simulation.reads_done,
        messages=simulation.messages_sent,
        faults=faults_seen,
    )
    return simulation, result
