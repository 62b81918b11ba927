"""The `[cluster]` settings of catch-up, and their checks: how a leader feeds a follower that is
behind (docs/cluster.md, "Catch-up").

Three bounds decide what a catch-up costs the leader, each beside its reason below: its byte
window toward one follower (`inflight_bytes_max`), what one pass of its replicator reads from the
journal for all followers (`storage_read_bytes_per_pass_max`, held to the election timeout), and
how many applied entries a node keeps in memory while it does not lead
(`follower_log_retention_entries`): a node that comes to lead reads what a follower lacks beyond
them back from its journal. Split out of daemon/config.py (its size bound); `daemon.config`
re-exports the bounds and calls `catch_up_errors` from its `[cluster]` checks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sequencer.raft.config import (
    FOLLOWER_LOG_RETENTION_ENTRIES_DEFAULT,
    INFLIGHT_BYTES_MAX_DEFAULT,
    LOG_RETENTION_ENTRIES_DEFAULT,
    PASS_CPU_MS_PER_MIB,
    STORAGE_READ_BYTES_MAX,
    STORAGE_READ_BYTES_PER_PASS_MAX_DEFAULT,
    pass_budget_max,
    pass_cpu_ms,
)
from sequencer.raft.peer_protocol import PEER_FRAME_BYTES_MAX

if TYPE_CHECKING:
    from daemon.config import ClusterConfig

__all__ = [
    "FOLLOWER_LOG_RETENTION_LIMIT", "INFLIGHT_BYTES_FLOOR", "INFLIGHT_BYTES_LIMIT", "STORAGE_READ_BYTES_PER_PASS_FLOOR",
    "STORAGE_READ_BYTES_PER_PASS_LIMIT", "catch_up_errors",
]  # fmt: skip

# A leader's payload bytes in flight to one follower (`cluster.inflight_bytes_max`). The peer
# transport's send buffer toward each peer is this plus one frame (the message that may cross the
# window: daemon/roles/replicator_setup.py), so above it a follower that does not drain could hold
# more than two frames (8 MiB) of the leader's memory; below the floor a catch-up waits a round
# trip per few records.
INFLIGHT_BYTES_LIMIT = PEER_FRAME_BYTES_MAX  # a send buffer of two frames, less one frame
INFLIGHT_BYTES_FLOOR = 64 << 10
assert INFLIGHT_BYTES_FLOOR <= INFLIGHT_BYTES_MAX_DEFAULT <= INFLIGHT_BYTES_LIMIT
# What a leader reads from its journal for all its followers together in one pass of its loop
# (`cluster.storage_read_bytes_per_pass_max`). The floor is one storage read (`STORAGE_READ_BYTES_MAX`,
# 1 MiB): the read that crosses the budget completes, so a pass reads that much whatever the
# budget, and a smaller one would promise what it cannot keep. A pass holds the leader's loop, its
# heartbeats and commits with it, `PASS_CPU_MS_PER_MIB` (~16 ms of CPU) per MiB read and sent: the
# budget plus the read that crosses it must take under half the configured election timeout
# (`pass_cpu_ms`), or a catch-up could hold the heartbeats until a follower starts an election.
# Whatever the timeout, the limit (~270 ms a pass) bounds how long a catch-up delays every commit.
STORAGE_READ_BYTES_PER_PASS_FLOOR = STORAGE_READ_BYTES_MAX
STORAGE_READ_BYTES_PER_PASS_LIMIT = 16 << 20
assert STORAGE_READ_BYTES_PER_PASS_FLOOR <= STORAGE_READ_BYTES_PER_PASS_MAX_DEFAULT <= STORAGE_READ_BYTES_PER_PASS_LIMIT
# Applied entries a node keeps in memory while it does not lead (`cluster.follower_log_retention_entries`,
# `RaftConfig.follower_log_retention_entries`). The core keeps the smaller of it and the leader's
# window (`LOG_RETENTION_ENTRIES_DEFAULT`, 65,536), so a larger value would change nothing; 0 keeps
# none (a new leader reads all a follower lacks of what it applied back from its journal).
FOLLOWER_LOG_RETENTION_LIMIT = LOG_RETENTION_ENTRIES_DEFAULT
assert 0 <= FOLLOWER_LOG_RETENTION_ENTRIES_DEFAULT <= FOLLOWER_LOG_RETENTION_LIMIT


def catch_up_errors(cluster: ClusterConfig, timeouts_valid: bool) -> list[str]:
    """What is wrong with `cluster`'s catch-up settings (`timeouts_valid`: its tick, heartbeat and
    election timeout passed their checks, so the pass budget can be held to the timeout)."""
    errors: list[str] = []
    if not INFLIGHT_BYTES_FLOOR <= cluster.inflight_bytes_max <= INFLIGHT_BYTES_LIMIT:
        errors.append(
            f"cluster.inflight_bytes_max={cluster.inflight_bytes_max}: must be "
            f"{INFLIGHT_BYTES_FLOOR}..{INFLIGHT_BYTES_LIMIT} bytes (above, a follower that does not "
            "drain could hold more than 8 MiB of this node's memory, the send buffer being the window plus one frame; below, "
            f"a catch-up waits a round trip every few records); the default is {INFLIGHT_BYTES_MAX_DEFAULT}"
        )
    budget = cluster.storage_read_bytes_per_pass_max
    if not STORAGE_READ_BYTES_PER_PASS_FLOOR <= budget <= STORAGE_READ_BYTES_PER_PASS_LIMIT:
        errors.append(
            f"cluster.storage_read_bytes_per_pass_max={budget}: must be {STORAGE_READ_BYTES_PER_PASS_FLOOR}.."
            f"{STORAGE_READ_BYTES_PER_PASS_LIMIT} bytes (above, one pass of catch-up reads, ~{PASS_CPU_MS_PER_MIB} ms "
            "of CPU a MiB, would delay every commit by more than a quarter second; below, a pass still reads "
            f"one whole read of {STORAGE_READ_BYTES_PER_PASS_FLOOR} bytes); the default is "
            f"{STORAGE_READ_BYTES_PER_PASS_MAX_DEFAULT}"
        )
    elif timeouts_valid and 2 * pass_cpu_ms(budget) >= cluster.election_timeout_ms:
        fits = pass_budget_max(cluster.election_timeout_ms)
        errors.append(
            f"cluster.storage_read_bytes_per_pass_max={budget}: a pass of catch-up (the budget plus one read, "
            f"~{PASS_CPU_MS_PER_MIB} ms of CPU a MiB) takes ~{pass_cpu_ms(budget):.0f} ms, not under half "
            f"cluster.election_timeout_ms={cluster.election_timeout_ms}, and could hold the leader's heartbeats until "
            "a follower starts an election: " + (f"lower storage_read_bytes_per_pass_max to at most {fits}"
            if fits >= STORAGE_READ_BYTES_PER_PASS_FLOOR else "raise election_timeout_ms")
        )
    retention = cluster.follower_log_retention_entries
    if not 0 <= retention <= FOLLOWER_LOG_RETENTION_LIMIT:
        errors.append(
            f"cluster.follower_log_retention_entries={retention}: must be 0..{FOLLOWER_LOG_RETENTION_LIMIT} "
            f"entries (a node keeps the smaller of it and the leader's window, {LOG_RETENTION_ENTRIES_DEFAULT}, "
            f"in memory while it does not lead, so more changes nothing); the default is "
            f"{FOLLOWER_LOG_RETENTION_ENTRIES_DEFAULT}"
        )
    return errors
