"""The leader's view of its followers: replication progress and flow control per follower.

After etcd-io/raft `tracker/` (`progress.go`, `state.go`, `tracker.go`). The leader keeps one
`Progress` per follower, created when it wins an election and dropped when it steps down.
`sequencer.raft.leader` builds and sends the messages; this module decides how much each follower
may be sent and what its answers mean for the next send.

A follower's progress is in one of three states:

    PROBE ---- success ----> REPLICATE      any rejection ---------------> PROBE
    PROBE/REPLICATE -- next entry compacted --> SNAPSHOT
    SNAPSHOT -- answer covering the snapshot --> REPLICATE
    SNAPSHOT -- no answer in SNAPSHOT_TIMEOUT_ELECTIONS election timeouts --> PROBE

- PROBE: `next_index` is a guess (a new leader starts at its last index + 1; a rejection backs
  it off by term, 5.3). One AppendEntries goes out, then the leader waits (`paused`) for its
  answer or the next heartbeat answer, so a follower far behind is not flooded with entries it
  will refuse.
- REPLICATE: the follower's log matches up to `match_index`. The leader streams AppendEntries
  optimistically, advancing `next_index` as it sends, while fewer than `inflight_messages_max`
  messages and fewer than `inflight_bytes_max` payload bytes are unanswered (`inflight` holds the
  last index and the payload bytes of each, `inflight_bytes` their sum): batching and pipelining
  with a window bounded twice, so a slow or dead follower costs the leader at most that many
  bytes of reads and of send buffer (etcd-io/raft `tracker/inflights.go`, `MaxInflightBytes`).
  The byte bound is soft: a message goes out while the bytes in flight are under it, so one entry
  larger than the window still goes, alone.
- SNAPSHOT: the entries the follower needs are compacted; one InstallSnapshot is in flight and
  nothing else is sent until it is answered or times out.

Every transition empties the window (`inflight`, `inflight_bytes`): what was in flight before a
rejection, a restart of the follower or a snapshot is either answered later (an answer acknowledges
by index, whatever window it finds) or lost, and must not hold the new state's window. An answer
frees the messages it covers, a heartbeat answer to a full window (by messages or by bytes) frees
the oldest one: a lost message must not stall the follower for good.

Incarnations. A follower's durable log never shrinks below what it acknowledged to a leader of
the current term, so within one start of the follower an answer that shows less (a rejection
below the match) is stale, sent before a later answer that arrived first, and is dropped: it must
lower nothing. But a node whose data directory was wiped restarts with an empty log while the
leader still holds its old match; its rejections then look stale too, and the leader would never
feed it again. Every answer therefore carries the follower's incarnation (a number that grows with
each start, `RaftConfig.incarnation`) and its last index. The first answer of a newer
incarnation is the follower starting again: what was in flight to the last start is lost, so the
leader probes again from the follower's last index, and if that index is below the match, the
entries it acknowledged are lost too and the match drops to 0 (the commit index, a fact about a
majority's past, never moves back). An answer of an older incarnation is dropped whole: it speaks
of a log that may be gone. Within one incarnation nothing lowers the match, so reordered
rejections cannot do what they did to the rule that lowered it on any rejection (the simulator's
`test_many_elections_with_two_of_five_nodes_down_at_a_time` lost liveness). etcd-io/raft has no
equivalent: it treats a lost log as corruption (`commitTo` panics).

The tracker also answers the leader's majority questions over the voting followers plus itself
(learners are tracked for replication but never counted): the
highest index a majority has made durable (the commit candidate, 5.4.2 still applies), the highest
read round a majority has confirmed (ReadIndex), and whether a majority was heard from lately
(check-quorum, thesis 6.2).
"""

from __future__ import annotations

import enum
from collections import deque

from sequencer.raft.quorum import quorum_index

__all__ = [
    "SNAPSHOT_TIMEOUT_ELECTIONS",
    "Progress",
    "ProgressState",
    "ProgressTracker",
]


class ProgressState(enum.IntEnum):
    """Replication state of one follower, as the leader sees it."""

    PROBE = 0  # next_index is a guess: send one AppendEntries, then wait for the answer
    REPLICATE = 1  # the follower matches: stream AppendEntries up to the in-flight window
    SNAPSHOT = 2  # an InstallSnapshot is in flight: send nothing else until it is answered


# Module-level aliases: the hot paths compare with `is` against a global, no attribute lookup.
PROBE = ProgressState.PROBE
REPLICATE = ProgressState.REPLICATE
SNAPSHOT = ProgressState.SNAPSHOT

# An InstallSnapshot unanswered for this many election timeouts is taken as lost (or its answer
# is): the follower is probed again, which resends the snapshot if it still needs it. One timeout
# is too short for a large snapshot on a slow link; the cost of waiting longer is only the delay
# before a resend.
SNAPSHOT_TIMEOUT_ELECTIONS = 2


class Progress:
    """The leader's view of one follower.

    Invariant: match_index < next_index (entries before next_index are sent or matched).
    """

    __slots__ = (
        "commit_sent",
        "incarnation",
        "inflight",
        "inflight_bytes",
        "inflight_bytes_peak",
        "match_index",
        "next_index",
        "node_id",
        "paused",
        "read_sequence_acked",
        "recent_active",
        "send_probe",
        "snapshot_elapsed_ticks",
        "snapshot_index",
        "state",
    )

    def __init__(self, node_id: int, next_index: int) -> None:
        self.node_id = node_id
        self.match_index = 0
        self.next_index = next_index
        self.state = PROBE
        self.paused = False  # PROBE: an AppendEntries is out, wait for its answer
        # REPLICATE: (last index, payload bytes) of each message in flight, oldest first.
        # Invariant: inflight_bytes == sum of the bytes in `inflight`.
        self.inflight: deque[tuple[int, int]] = deque()
        self.inflight_bytes = 0
        self.inflight_bytes_peak = 0  # the most inflight_bytes ever held (operators, tests)
        self.recent_active = True  # heard from since the last check-quorum round
        self.read_sequence_acked = 0  # the highest ReadIndex round this follower confirmed
        self.commit_sent = 0  # the commit index the last AppendEntries carried
        self.send_probe = False  # send an AppendEntries even without entries (resync)
        self.snapshot_index = 0  # SNAPSHOT: the index of the snapshot in flight
        self.snapshot_elapsed_ticks = 0
        self.incarnation = 0  # the newest start of the follower heard from (module docstring)

    # ------------------------------------------------------------------------- transitions

    def become_probe(self, next_index: int) -> None:
        assert next_index > self.match_index, (next_index, self.match_index)
        self.state = PROBE
        self.next_index = next_index
        self.paused = False
        self.inflight.clear()
        self.inflight_bytes = 0

    def become_replicate(self) -> None:
        self.state = REPLICATE
        self.next_index = self.match_index + 1
        self.paused = False
        self.inflight.clear()
        self.inflight_bytes = 0

    def become_snapshot(self, snapshot_index: int) -> None:
        """An InstallSnapshot of `snapshot_index` goes out now."""
        self.state = SNAPSHOT
        self.send_probe = False
        self.snapshot_index = snapshot_index
        self.snapshot_elapsed_ticks = 0
        self.inflight.clear()
        self.inflight_bytes = 0

    # ------------------------------------------------------------------------------ sends

    def has_room(self, window: int, bytes_max: int) -> bool:
        """Whether the window (`window` messages, `bytes_max` payload bytes) takes one more."""
        return len(self.inflight) < window and self.inflight_bytes < bytes_max

    def is_due(self, last_index: int, commit_index: int, window: int, bytes_max: int,
               stored_through: int) -> bool:
        """Whether the leader would send this follower an AppendEntries now (a query only).

        It holds exactly when `Leader.flush_appends` would send this follower at least one.

        Args:
            stored_through: entries up to here need a storage read the leader will not make now
                (its pass's budget is spent; 0 when it is not): a follower whose next entry is
                among them waits.
        """
        if self.next_index <= stored_through and self.next_index <= last_index:
            return False
        state = self.state
        if state is REPLICATE:
            return self.has_room(window, bytes_max) and (
                self.next_index <= last_index or self.send_probe or self.commit_sent < commit_index
            )
        if state is PROBE:
            return not self.paused
        return False

    def sent_append(self, last_index: int, commit_index: int, payload_bytes: int) -> None:
        """An AppendEntries with the entries up to `last_index` went out.

        Args:
            last_index: the index of its last entry, or `next_index - 1` if it carries none.
            commit_index: the commit index it carries.
            payload_bytes: the payload bytes of its entries (what the byte window counts).
        """
        self.send_probe = False
        self.commit_sent = commit_index
        if self.state is REPLICATE:
            if last_index >= self.next_index:
                self.next_index = last_index + 1
                self.inflight.append((last_index, payload_bytes))
                self.inflight_bytes += payload_bytes
                if self.inflight_bytes > self.inflight_bytes_peak:
                    self.inflight_bytes_peak = self.inflight_bytes
        else:
            self.paused = True

    # ---------------------------------------------------------------------------- answers

    def heard_from(self, incarnation: int, last_index: int, leader_last_index: int) -> bool:
        """An answer came from the follower's start `incarnation`, whose log ended at
        `last_index`. Returns whether to handle it (False: it is from an earlier start).

        Args:
            leader_last_index: the leader's last index (a probe never starts past it).
        """
        if incarnation == self.incarnation:
            return True
        if incarnation < self.incarnation:
            return False
        self.incarnation = incarnation
        if last_index < self.match_index:
            # It lost entries it acknowledged (its data was lost): nothing is known to match.
            self.match_index = 0
        self.become_probe(min(last_index, leader_last_index) + 1)
        return True

    def acknowledge(self, index: int) -> bool:
        """The follower's log matches the leader's up to `index` (a successful answer).

        Returns:
            Whether `match_index` advanced (then the commit index may too).
        """
        advanced = index > self.match_index
        if advanced:
            self.match_index = index
            if self.next_index <= index:
                self.next_index = index + 1
        inflight = self.inflight
        while inflight and inflight[0][0] <= index:
            self.inflight_bytes -= inflight.popleft()[1]
        state = self.state
        if state is PROBE or (state is SNAPSHOT and self.match_index >= self.snapshot_index):
            self.become_replicate()
        return advanced

    def reject(self, rejected_index: int, hint_next_index: int) -> None:
        """The follower refused the AppendEntries after `rejected_index`: probe from the hint.

        The caller drops a stale rejection (`rejected_index <= match_index`) first: a later answer
        already showed a longer match.
        """
        assert rejected_index > self.match_index, (rejected_index, self.match_index)
        self.become_probe(max(min(hint_next_index, rejected_index), self.match_index + 1))

    def heartbeat_answered(self, last_index: int, window: int, bytes_max: int) -> None:
        """The follower answered a heartbeat: it is reachable, so unblock what waits for it."""
        state = self.state
        if state is PROBE:
            self.paused = False
        elif state is REPLICATE and not self.has_room(window, bytes_max):
            # A lost message must not stall the window for good.
            self.inflight_bytes -= self.inflight.popleft()[1]
        if self.match_index < last_index:
            # A probe (even without entries) resynchronises a follower whose messages were lost.
            self.send_probe = True

    def acknowledge_read(self, read_sequence: int) -> bool:
        """The follower confirmed ReadIndex rounds up to `read_sequence`; returns whether new."""
        if read_sequence > self.read_sequence_acked:
            self.read_sequence_acked = read_sequence
            return True
        return False


class ProgressTracker:
    """Every follower's `Progress` and the majority questions over them plus the leader.

    A follower or candidate holds an empty tracker (no peers): progress exists only while leading.
    """

    __slots__ = ("_voters", "progress", "quorum")

    def __init__(self, peers: tuple[int, ...], next_index: int, quorum: int,
                 learners: tuple[int, ...] = ()) -> None:
        self.progress = {peer: Progress(peer, next_index) for peer in peers + learners}
        # The other voters' progress: only they count toward a majority. A learner's progress is
        # in `progress` (it is replicated to, heartbeated, caught up) but never in a majority
        # question: counting one would let a minority of voters commit (thesis 4.2.1).
        self._voters = tuple(self.progress[peer] for peer in peers)
        self.quorum = quorum

    def appends_due(self, last_index: int, commit_index: int, window: int, bytes_max: int,
                    stored_through: int) -> bool:
        """Whether any follower is due an AppendEntries now (a query only; `Progress.is_due`).
        A loop, not `any` of a generator: asked at every `has_ready`, the last of a pass's always
        answered no (benches.replicator_paths `leader_pass`)."""
        for progress in self.progress.values():
            if progress.is_due(last_index, commit_index, window, bytes_max, stored_through):
                return True
        return False

    def notices_held(self, commit_index: int, window: int, bytes_max: int) -> bool:
        """Whether a follower streamed to lacks `commit_index` and has room for a commit notice
        (`RaftConfig.defer_commit_notices`; a query only)."""
        for progress in self.progress.values():  # a loop, not `any`: as `appends_due`
            if (progress.state is REPLICATE and progress.commit_sent < commit_index
                    and progress.has_room(window, bytes_max)):
                return True
        return False

    def committed_index(self, own_stable_index: int) -> int:
        """The highest index a majority (the leader counting its durable entries) has matched."""
        matches = [progress.match_index for progress in self._voters]
        matches.append(own_stable_index)
        return quorum_index(matches, self.quorum)

    def confirmed_read_sequence(self, own_read_sequence: int) -> int:
        """The highest ReadIndex round a majority (the leader's own round included) confirmed."""
        acked = [progress.read_sequence_acked for progress in self._voters]
        acked.append(own_read_sequence)
        return quorum_index(acked, self.quorum)

    def quorum_active(self) -> bool:
        """Whether a majority (the leader included) was heard from since `reset_recent_active`."""
        active = 1
        for progress in self._voters:
            if progress.recent_active:
                active += 1
        return active >= self.quorum

    def reset_recent_active(self) -> None:
        """Start a new check-quorum round: nobody has been heard from in it yet."""
        for progress in self.progress.values():
            progress.recent_active = False

    def tick_snapshots(self, elapsed_ticks: int, election_ticks: int) -> None:
        """Let `elapsed_ticks` pass for every InstallSnapshot in flight; probe again on timeout."""
        timeout_ticks = SNAPSHOT_TIMEOUT_ELECTIONS * election_ticks
        for progress in self.progress.values():
            if progress.state is SNAPSHOT:
                progress.snapshot_elapsed_ticks += elapsed_ticks
                if progress.snapshot_elapsed_ticks >= timeout_ticks:
                    # The snapshot or its answer was lost: start over from a probe.
                    progress.become_probe(progress.match_index + 1)
