"""Static configuration of one Raft node, validated when it is built."""

from __future__ import annotations

from dataclasses import dataclass

from sequencer.raft.quorum import VOTERS_ALLOWED

__all__ = [
    "FOLLOWER_LOG_RETENTION_ENTRIES_DEFAULT", "INFLIGHT_BYTES_MAX_DEFAULT", "LEARNERS_MAX", "LOG_RETENTION_ENTRIES_DEFAULT",
    "NO_NODE", "PASS_CPU_MS_PER_MIB", "STORAGE_READ_BYTES_MAX", "STORAGE_READ_BYTES_PER_PASS_MAX_DEFAULT", "RaftConfig",
    "pass_budget_max", "pass_cpu_ms",
]  # fmt: skip

NO_NODE = 0  # node ids are positive; 0 means "nobody" (no vote, no known leader)
# Learners (non-voting members) one cluster may have: each is one more follower the leader
# replicates to, so one more copy of every byte on the leader's link; a few cover backups, query
# replicas and a machine being added.
LEARNERS_MAX = 4
# `RaftConfig.inflight_bytes_max`'s default (the reasons are beside the field).
INFLIGHT_BYTES_MAX_DEFAULT = 4 << 20
# `RaftConfig.log_retention_entries`' and `follower_log_retention_entries`' defaults (the reasons are
# beside the fields).
LOG_RETENTION_ENTRIES_DEFAULT = 1 << 16
FOLLOWER_LOG_RETENTION_ENTRIES_DEFAULT = 1 << 12
# One read of old entries from storage, the daemon's (`RaftConfig.storage_read_bytes_max`, the
# reasons beside the field; the replicator reads the journal back at start by the same bound).
STORAGE_READ_BYTES_MAX = 1 << 20
# `RaftConfig.storage_read_bytes_per_pass_max`'s default (the reasons are beside the field).
STORAGE_READ_BYTES_PER_PASS_MAX_DEFAULT = 4 << 20
# The read that crosses the pass budget completes, so a pass reads at least one read whatever the
# budget: a default below one read would promise what a pass cannot keep.
assert STORAGE_READ_BYTES_MAX <= STORAGE_READ_BYTES_PER_PASS_MAX_DEFAULT
# CPU a leader's pass spends per MiB it reads from the journal and sends: how long a pass holds
# the leader's loop. benches/RESULTS.md, "Flow control by bytes": one whole pass toward followers
# far behind (`Leader.flush_appends`, 200 B records) read 4,300,800 bytes in 55-65 ms of CPU,
# ~14.6 ms per MiB (the journal's reads alone 8.8-9.3 ms of it), and the transport adds ~1 ms per
# MiB to encode and MAC the frames: 15.6, rounded up (a safety bound, so the whole pass's figure).
PASS_CPU_MS_PER_MIB = 16


def pass_cpu_ms(storage_read_bytes_per_pass_max: int) -> float:
    """The CPU one pass of catch-up can take with this budget: the budget, plus the read that
    crosses it, at `PASS_CPU_MS_PER_MIB`."""
    return (storage_read_bytes_per_pass_max + STORAGE_READ_BYTES_MAX) * PASS_CPU_MS_PER_MIB / (1 << 20)


def pass_budget_max(election_timeout_ms: int) -> int:
    """The largest budget whose pass takes under half this election timeout (whole bytes), the
    rule the daemon checks: (budget + one read) x cost x 2 < timeout."""
    return -(-election_timeout_ms * (1 << 20) // (2 * PASS_CPU_MS_PER_MIB)) - 1 - STORAGE_READ_BYTES_MAX


# The default budget fits the default election timeout (its pass ~80 ms, under half of 300 ms).
assert 2 * pass_cpu_ms(STORAGE_READ_BYTES_PER_PASS_MAX_DEFAULT) < 300


@dataclass(frozen=True, slots=True)
class RaftConfig:
    """Static configuration of one node. Ticks are the caller's unit of time.

    With a 10 ms tick the defaults give 100-200 ms election timeouts and 10 ms heartbeats.
    """

    node_id: int
    voters: tuple[int, ...]
    cluster_id: int = 1
    # Non-voting members (Raft thesis 4.2.1, "non-voting members"; etcd's learners): they receive
    # the log like followers but never vote, never campaign and never count toward any majority
    # (commit, election, check-quorum, ReadIndex), so adding or losing one never touches the
    # quorum. `node_id` may be one of them.
    learners: tuple[int, ...] = ()
    # A follower waits election_ticks + random(0, election_ticks) without hearing from a leader
    # before starting a PreVote; it must be well above heartbeat_ticks plus a network round trip.
    election_ticks: int = 10
    heartbeat_ticks: int = 1
    # Flow control: AppendEntries messages in flight to one follower before the leader waits for
    # an acknowledgement. 64 x 1024 entries covers ~65k entries of bandwidth-delay product
    # (1M entries/s x 50 ms), while bounding what a lost message costs to resend.
    inflight_messages_max: int = 64
    # Entries per AppendEntries: bounds a message (1024 x ~200 B records ~ 200 KiB) and the work
    # of one step on the follower.
    entries_per_message_max: int = 1024
    # Flow control by bytes (etcd-io/raft `MaxInflightBytes`): payload bytes in unanswered
    # AppendEntries to one follower before the leader waits. The message window alone allowed
    # 64 x 1 MiB from storage (64 MiB toward one follower, most of it dropped by the peer
    # transport's 8 MiB send buffer, `TransportConfig.send_buffer_bytes_max`). 4 MiB plus the one
    # message that may cross it (<= storage_read_bytes_max + one entry) stays under that buffer
    # and is a quarter of the default 16 MiB log ring the follower writes it into, while a LAN's
    # bandwidth-delay product with the follower's fdatasync (~5 ms at 1M entries/s of ~200 B:
    # ~1 MiB) fits four times over. Soft: a message goes out while fewer bytes are in flight, so
    # one entry larger than the window still goes (alone).
    inflight_bytes_max: int = INFLIGHT_BYTES_MAX_DEFAULT
    # A leader refuses proposals beyond this many uncommitted entries: when the cluster cannot
    # commit (no majority), memory must not grow without bound. ~1 s of traffic at 1M entries/s.
    uncommitted_entries_max: int = 1 << 20
    check_quorum: bool = True
    # With a LogStorage, entries committed, applied and durable are kept in memory this far below
    # the applied index, then dropped and read back from storage when a follower needs them. A
    # follower within the window (~65k entries: 65 ms at 1M entries/s) is served from memory;
    # one further behind is catching up and can afford the disk. Memory is ~2x this (entries are
    # dropped in chunks of this size) plus what is not yet committed.
    log_retention_entries: int = LOG_RETENTION_ENTRIES_DEFAULT
    # The same window while this node does not lead (the smaller of the two): a follower serves no
    # one from memory, and a node that comes to lead reads what its followers lack beyond it back
    # from storage (they normally lack only the uncommitted tail, which stays in memory). Each
    # entry held is a payload object of its own; a follower holding 64-128k of them (~16-32 MiB,
    # out of every cache) paid ~0.1 us more per entry received than one holding 4k (its decode and
    # log append write into memory freed long ago: benches.replicator_paths `follower`,
    # benches/RESULTS.md, "follrecv").
    follower_log_retention_entries: int = FOLLOWER_LOG_RETENTION_ENTRIES_DEFAULT
    # One read of old entries from storage returns about this many payload bytes at most, and an
    # AppendEntries from memory is cut at the same bound (the entry that reaches it included), so
    # a message stays under the peer frame's 4 MiB with commands of up to 1 MiB (a client frame).
    storage_read_bytes_max: int = STORAGE_READ_BYTES_MAX
    # What a leader reads from storage for all its followers together in one pass: between two
    # inputs that refill it (a tick, a follower's answer), a `ready()` sends no AppendEntries that
    # needs a storage read once this many bytes were read (soft, like the window: the read that
    # crosses it completes). At ~16 ms of CPU per MiB read and sent (`PASS_CPU_MS_PER_MIB`), a pass
    # that catches up any number of followers holds the leader's loop ~80 ms by default (4 MiB plus
    # the read that crosses it; 375 ms for two followers before, benches/RESULTS.md, "Flow control
    # by bytes"), under half the default 300 ms election timeout it must not outlast. The daemon's
    # limit, 16 MiB, is ~270 ms: it refuses a budget whose pass would take half the configured
    # election timeout or more (daemon/config.py).
    storage_read_bytes_per_pass_max: int = STORAGE_READ_BYTES_PER_PASS_MAX_DEFAULT
    # The core appends an empty no-op at the start of each term (Raft paper 8). With this set it
    # appends nothing: the caller proposes the term's first entry itself at `Ready.term_start`'s
    # index (the leader's sequencer stamps a TERM_START record there, so the journal and the Raft
    # log hold the same bytes at every index).
    term_start_from_shell: bool = False
    # This start of the node: a number that grows from one start to the next, even across a loss
    # of its data (the daemon: the wall clock in ns when its replicator starts). Every answer to
    # a leader carries it, so a leader tells a follower that restarted, maybe with its log lost,
    # from stale answers of an earlier start (`sequencer.raft.tracker`, "Incarnations"). 0 for a
    # caller whose nodes never lose their data.
    incarnation: int = 0
    # A commit index with no entries to ride on (an AppendEntries that would carry only the
    # commit: ~40% of a loaded leader's, each an encode, a MAC and a write per follower and a
    # wake-up on each) waits for the next AppendEntries with entries or the next heartbeat
    # (which carries it up to what the follower matches), or for the caller's
    # `RaftCore.send_commit_notices()` (its bound, finer than a tick), whichever is first; then
    # it goes marked as a notice (`AppendEntries.notice`). The commit index is advisory to a
    # follower (it applies sooner, nothing else), so only its clients' replies wait, by at most
    # that bound. Off: sent in the next ready, as Raft's pseudo-code does, never marked.
    # Heartbeats and probes are never deferred.
    defer_commit_notices: bool = False

    @property
    def members(self) -> tuple[int, ...]:
        """Every node of the cluster: the voters, then the learners."""
        return self.voters + self.learners

    @property
    def is_learner(self) -> bool:
        """Whether this node is a learner: it follows the log and never votes or campaigns."""
        return self.node_id in self.learners

    def __post_init__(self) -> None:
        if len(self.voters) not in VOTERS_ALLOWED:
            raise ValueError(
                f"a Raft cluster has {VOTERS_ALLOWED} voters, got {len(self.voters)}: "
                f"{self.voters}; list 1, 3 or 5 node ids"
            )
        if len(set(self.voters)) != len(self.voters) or min(self.voters) <= NO_NODE:
            raise ValueError(f"voter ids must be distinct and positive, got {self.voters}")
        if len(self.learners) > LEARNERS_MAX:
            raise ValueError(
                f"{len(self.learners)} learners {self.learners} > LEARNERS_MAX={LEARNERS_MAX}: "
                "each one is another copy of the log on the leader's link; list fewer"
            )
        if len(set(self.learners)) != len(self.learners) or (
            self.learners and min(self.learners) <= NO_NODE
        ):
            raise ValueError(f"learner ids must be distinct and positive, got {self.learners}")
        both = sorted(set(self.voters) & set(self.learners))
        if both:
            raise ValueError(
                f"nodes {both} are listed as voters and as learners: a member is one or the other"
            )
        if self.node_id not in self.voters and self.node_id not in self.learners:
            raise ValueError(
                f"node {self.node_id} is not among the voters {self.voters} nor the learners "
                f"{self.learners}"
            )
        if not self.heartbeat_ticks >= 1:
            raise ValueError(f"heartbeat_ticks={self.heartbeat_ticks} must be >= 1")
        if not self.election_ticks > 2 * self.heartbeat_ticks:
            raise ValueError(
                f"election_ticks={self.election_ticks} must exceed 2 x heartbeat_ticks="
                f"{self.heartbeat_ticks}, or followers time out between heartbeats"
            )
        if self.inflight_messages_max < 1 or self.entries_per_message_max < 1:
            raise ValueError("inflight_messages_max and entries_per_message_max must be >= 1")
        if min(self.log_retention_entries, self.follower_log_retention_entries) < 0 or self.storage_read_bytes_max < 1:
            raise ValueError(
                f"log_retention_entries={self.log_retention_entries} and follower_log_retention_entries="
                f"{self.follower_log_retention_entries} must be >= 0 and "
                f"storage_read_bytes_max={self.storage_read_bytes_max} >= 1"
            )
        for name in ("inflight_bytes_max", "storage_read_bytes_per_pass_max"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1 (bytes)")
