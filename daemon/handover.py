"""SIGTERM of a cluster's leader: hand leadership over before the drain (docs/cluster.md,
"Stopping a node, rolling restarts").

A leader that simply stopped would leave the cluster leaderless for an election timeout and an
election (300..600 ms and a round, by default), and every client of every node would wait that
long. So the supervisor's drain first marks the node HANDING_OVER, which the replicator reads: while
it leads, it hands leadership to its most caught-up follower (daemon/roles/replicator_ops.py).
The supervisor waits here until the node no longer leads, bounded, then drains as always (the
sequencer stops accepting and answers what its clients sent; the journaller, the replicator and
the blp follow). Nothing is lost when the wait runs out (both followers down, a transfer that
keeps failing): the node then drains as a leader, and the others elect one after it stops.

The supervisor only reads the replicator's counters here: the replicator decides and acts.
"""

from __future__ import annotations

import logging
import time

from daemon.config import Config
from daemon.layout import RAFT_LEADER, RAFT_ROLE, RAFT_TERM, CounterView
from sequencer.raft.raft_role import RaftRole

__all__ = ["HANDOVER_ELECTION_TIMEOUTS", "HANDOVER_POLL_S", "hand_over_leadership", "handover_wait_s"]

log = logging.getLogger("seqd.supervisor")

# How long a draining leader waits for leadership to move, in election timeouts. A transfer
# normally takes a round trip to catch the target up, then its election round: well under one
# election timeout. The core gives a transfer up after one, and the replicator starts another at
# once: four covers a few failed attempts without holding a stop for long (1.2 s by default).
HANDOVER_ELECTION_TIMEOUTS = 4
HANDOVER_POLL_S = 0.01  # short next to an election round; the supervisor does nothing else then


def handover_wait_s(config: Config) -> float:
    assert config.cluster is not None
    return HANDOVER_ELECTION_TIMEOUTS * config.cluster.election_timeout_ms / 1000


def hand_over_leadership(counters: CounterView, config: Config) -> bool:
    """Wait (bounded) until this node, draining, no longer leads; True if it did not lead or
    leadership moved, False when the wait ran out. `node.state` must be HANDING_OVER already."""
    role, term, leader = counters[RAFT_ROLE], counters[RAFT_TERM], counters[RAFT_LEADER]
    if role.get() != RaftRole.LEADER:
        return True
    wait_s = handover_wait_s(config)
    log.info("draining the leader (term %d): handing leadership to another node first", term.get())
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if role.get() != RaftRole.LEADER:
            log.info("leadership handed over: node %s leads term %d", leader.get() or "(electing)", term.get())
            return True
        time.sleep(HANDOVER_POLL_S)
    log.warning("this node still leads after %.1f s (no follower caught up and won); draining as the leader: "
                "the others elect one once it stops", wait_s)
    return False
