"""The nemesis's fault schedule: a pure function of the seed (no clock, no cluster).

    faults = make_schedule(seed=7, duration_s=30, nodes=3)
    for fault in faults: print(fault.describe())

The same seed, duration, size and flags give the same list of faults: the same kinds in the same
order, on the same node numbers, with the same parameters and planned times. What the seed cannot
fix is the real processes' timing: a node restarts, an election ends and a client's request lands
when the machine lets them, so two runs of one seed apply the same faults to clusters in
different states (and a fault aimed at "the leader" hits whichever node leads at that moment).

Faults run one at a time: each is applied at `start_s` (or as soon as the previous one is
healed, if that is later), held `duration_s`, then healed; the next begins after a gap.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any, Final

__all__ = ["FAULT_KINDS", "PROPOSAL_FAULTS", "ROLES", "Fault", "make_schedule"]

# What each kind does (tests/nemesis/run.py applies it; docs/cluster.md, "The nemesis"):
FAULT_KINDS: Final = (
    "kill_node",       # kill -9 of a node's whole process group; restarted at the heal
    "kill_role",       # kill -9 of one role; the node's supervisor restarts its pipeline
    "pause",           # SIGSTOP of a node's group; SIGCONT at the heal
    "partition",       # a majority and a minority, every link between them blackholed
    "isolate_leader",  # the current leader's links blackholed both ways
    "bridge",          # two halves that cannot talk, one node talking to both
    "one_way",         # one node's outgoing links cut: it hears the others, they never hear it
    "delay",           # every link of one node delayed `amount` ms
    "loss",            # one node's links reset again and again (loss as TCP shows it)
    "slow_disk",       # one node's fdatasync delayed `amount` ms (SEQD_FAULT_FSYNC_DELAY)
    "disk_full",       # a follower's journal disk full (SEQD_FAULT_DISK_BYTES)
    "clock_back",      # the leader's wall clock `amount` ms behind (SEQD_FAULT_CLOCK_OFFSET)
    "power_cut",       # every node killed at once while fdatasync is `amount` ms slow, each
                       # losing what it had not fdatasynced (SEQD_FAULT_SYNCED_INDEX)
    "wipe",            # a node killed, its data directory removed, restarted (off by default)
    "kill_leader",     # kill -9 of the current leader's whole node (the followers' clients' forwarded
                       # commands go again to the next leader); restarted at the heal
    "restart_clock_back",  # a node's wall clock `amount` ms behind, then the node killed and restarted:
                       # its start ids must still go up (daemon/incarnation.py), its stamps never back
    "restart_burst",   # a node killed and restarted `amount` times in quick succession, not waiting for
                       # it to serve: node_starts, opens and resends of several starts interleave
    "proposal_fault",  # the `amount`-th command hit on its way to the log (a hook armed, the target's
                       # replicator restarted to read it): malformed on any node (fail-stop), or a
                       # follower's forward dropped (the forward stream's resend)
)  # fmt: skip
ROLES: Final = ("sequencer", "journaller", "replicator", "blp")
# proposal_fault's variants, `Fault.pick` choosing: on any node, on a follower.
PROPOSAL_FAULTS: Final = ("malform_command_proposal", "drop_command_forward")
# The weights of the kinds drawn (a power cut takes the whole cluster down: rarer).
_WEIGHTS: Final = {kind: 1.0 for kind in FAULT_KINDS} | {"power_cut": 0.5}
# Each fault is held this long (s): long enough for an election (300 ms timeout) and for the
# clients to run into it, short enough that a 30 s seed sees several.
DURATION_S_MIN: Final = 0.5
DURATION_S_MAX: Final = 3.0
# A burst's restarts, and how long after a start serves it is killed (s): around its node_start's
# commit, its clients' reconnection and opens, and the resends of what they had in flight.
BURST_RESTARTS_MIN: Final = 2
BURST_RESTARTS_MAX: Final = 5
BURST_GAP_S: Final = (0.0, 1.0)
# Between a heal and the next fault: time for the cluster to recover and the clients to progress.
GAP_S_MIN: Final = 0.5
GAP_S_MAX: Final = 1.5
WARM_UP_S: Final = 1.0  # the first fault's planned time, counted from when every client has traffic


@dataclass(frozen=True)
class Fault:
    """One fault of a schedule.

    `node` is a node number for the kinds aimed at a node; "leader"/"follower" kinds are aimed
    when applied (`pick` chooses among the followers). `groups` are a partition's sides.
    """

    number: int  # its place in the schedule, from 1
    start_s: float  # planned, from the start of the run
    kind: str
    duration_s: float
    node: int = 0  # 0: none, or aimed at run time (leader, follower)
    role: str = ""
    amount: int = 0  # ms: delay, fsync delay, clock offset; a burst's restarts; which command
    groups: tuple[tuple[int, ...], ...] = ()
    pick: int = 0  # a seeded choice made at run time (which follower, which links)

    def describe(self) -> str:
        parts = [f"#{self.number} at {self.start_s:.1f} s: {self.kind} for {self.duration_s:.1f} s"]
        if self.node:
            parts.append(f"node {self.node}")
        if self.role:
            parts.append(f"role {self.role}")
        if self.amount:
            if self.kind == "proposal_fault":
                parts.append(f"{PROPOSAL_FAULTS[self.pick % len(PROPOSAL_FAULTS)]} of command {self.amount}")
            else:
                parts.append(f"{self.amount} {'restarts' if self.kind == 'restart_burst' else 'ms'}")
        if self.groups:
            parts.append(" | ".join(",".join(map(str, group)) for group in self.groups))
        return " ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def make_schedule(seed: int, duration_s: float, nodes: int, *, wipe: bool = False,
                  kinds: tuple[str, ...] | None = None) -> list[Fault]:  # fmt: skip
    """The faults of one run: as many as fit in `duration_s`.

    Args:
        wipe: include "wipe" (off by default: a wipe is safe only while the other nodes hold
            every committed entry on a majority, which overlapping faults may break; docs/cluster.md).
        kinds: draw only these kinds (default every kind, "wipe" only with `wipe`).

    Raises:
        ValueError: an unknown kind, or no kind left to draw.
    """
    chosen = tuple(kinds) if kinds is not None else tuple(k for k in FAULT_KINDS if wipe or k != "wipe")
    unknown = [kind for kind in chosen if kind not in FAULT_KINDS]
    if unknown or not chosen:
        raise ValueError(f"fault kinds {unknown or chosen!r}: choose among {', '.join(FAULT_KINDS)}")
    rng = random.Random(seed)
    numbers = list(range(1, nodes + 1))
    faults = []
    at_s = WARM_UP_S
    while True:
        kind = rng.choices(chosen, weights=[_WEIGHTS[k] for k in chosen])[0]
        duration = round(rng.uniform(DURATION_S_MIN, DURATION_S_MAX), 2)
        if at_s + duration > duration_s:
            break
        node = rng.choice(numbers)
        fault = Fault(len(faults) + 1, round(at_s, 2), kind, duration, pick=rng.randrange(1 << 16))
        if kind in ("kill_node", "pause", "one_way", "delay", "loss", "slow_disk", "wipe", "restart_clock_back",
                    "restart_burst"):
            fault = _with(fault, node=node)
        if kind == "kill_role":
            fault = _with(fault, node=node, role=rng.choice(ROLES))
        elif kind == "delay":
            fault = _with(fault, amount=rng.randrange(20, 200))
        elif kind in ("slow_disk", "power_cut"):
            fault = _with(fault, amount=rng.randrange(20, 300))
        elif kind == "clock_back":
            fault = _with(fault, amount=rng.randrange(1_000, 3_600_000))
        elif kind == "restart_clock_back":  # farther back than a restart takes: the clock is behind
            fault = _with(fault, amount=rng.randrange(60_000, 3_600_000))  # the start ids recorded
        elif kind == "proposal_fault":
            on_any_node = PROPOSAL_FAULTS[fault.pick % len(PROPOSAL_FAULTS)] == "malform_command_proposal"
            fault = _with(fault, node=node if on_any_node else 0, amount=rng.randint(1, 20))  # else a follower
        elif kind == "restart_burst":
            fault = _with(fault, amount=rng.randint(BURST_RESTARTS_MIN, BURST_RESTARTS_MAX))
        elif kind in ("partition", "bridge"):
            shuffled = rng.sample(numbers, len(numbers))
            if kind == "partition":
                minority = len(numbers) // 2
                fault = _with(fault, groups=(tuple(sorted(shuffled[minority:])), tuple(sorted(shuffled[:minority]))))
            else:  # two halves and the bridge between them: (a, b, bridge)
                half = (len(numbers) - 1) // 2
                fault = _with(fault, groups=(tuple(sorted(shuffled[:half])), tuple(sorted(shuffled[half:-1])),
                                             (shuffled[-1],)))  # fmt: skip
        faults.append(fault)
        at_s += duration + rng.uniform(GAP_S_MIN, GAP_S_MAX)
    return faults


def _with(fault: Fault, **changes: Any) -> Fault:
    return Fault(**{**asdict(fault), **changes})
