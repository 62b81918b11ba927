"""What a node does while it leads a term: replicate to each follower, heartbeat, hear answers.

One `Leader` exists per term the node leads: the core creates it on winning an election and drops
it on stepping down, so what only a leader has (each follower's progress, the heartbeat clock)
cannot outlive leadership. The core keeps what does outlive it (the log, the commit index, the
queue of reads) and every change of standing; it passes in what it owns (the commit index, the
snapshot, the read round) and is told what an answer means: a follower's match advanced (the
commit index may move, 5.4.2), a read round was confirmed (reads may be answered), or no majority
was heard from within an election timeout (step down, thesis 6.2).

Sending follows etcd-io/raft (`bcastAppend`, `maybeSendAppend`): `flush_appends` runs once per
ready and gives each follower what its `Progress` says it is due (`sequencer.raft.tracker`):
entries from `next_index` in messages of at most `entries_per_message_max`, while fewer than
`inflight_messages_max` messages and `inflight_bytes_max` payload bytes are unanswered; one probe
while the match is unknown; an empty AppendEntries to carry a new commit index or resynchronise;
an InstallSnapshot when the entries a follower needs are compacted (7). Entries the core has
dropped from memory are read back from its `LogStorage` (a follower that lags behind the retention
window), at most `storage_read_bytes_per_pass_max` bytes for all followers together between two
refills of that budget (each tick, each answer from a follower): one pass of the caller's loop,
which runs readies until none is due, cannot be held long by catch-ups, and a follower waiting
for the budget is served at the next answer or tick.

The leader's AppendEntries may carry entries its own disk does not hold yet (Raft thesis 10.2.1:
the leader writes in parallel with its followers); the core counts the leader itself toward a
majority only up to its own durable (stable) index.
"""

from __future__ import annotations

from collections.abc import Callable

from sequencer.raft.config import NO_NODE, RaftConfig
from sequencer.raft.log import RaftLog
from sequencer.raft.messages import (
    AppendEntries,
    AppendEntriesResponse,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    Message,
    Snapshot,
    TimeoutNow,
)
from sequencer.raft.tracker import PROBE, REPLICATE, Progress, ProgressTracker

__all__ = ["Leader"]


class Leader:
    """The leader of `term`: its followers' progress and the messages it sends them."""

    __slots__ = (
        "_config",
        "_heartbeat_elapsed_ticks",
        "_log",
        "_notices_through",
        "_send",
        "_sized",
        "_storage_bytes_left",
        "_timeout_now_sent",
        "_transfer_elapsed_ticks",
        "stored_entries_sent",
        "term",
        "tracker",
        "transfer_target",
    )

    def __init__(
        self,
        config: RaftConfig,
        term: int,
        log: RaftLog,
        peers: tuple[int, ...],
        quorum: int,
        send: Callable[[Message], None],
    ) -> None:
        self._config = config
        self.term = term
        self._log = log
        self._send = send
        self._heartbeat_elapsed_ticks = 0
        # With `defer_commit_notices`: a follower whose last AppendEntries carried a commit index
        # below this is sent the commit alone (the caller asked when the commit was here); one
        # that lacks only a later commit waits (`notices_through`).
        self._notices_through = 0
        # Leadership transfer (thesis 3.10): the follower being handed leadership, or NO_NODE.
        self.transfer_target = NO_NODE
        self._transfer_elapsed_ticks = 0
        self._timeout_now_sent = False
        # What this pass may still read from storage (the module docstring); refilled by `tick`s
        # and answers.
        self._storage_bytes_left = config.storage_read_bytes_per_pass_max
        # (first index, last index, payload bytes) of the last in-memory run sent: followers in
        # step are sent the same run, which is summed once (a leader's entries never change).
        self._sized = (0, 0, 0)
        # Entries in AppendEntries read back from storage (dropped from memory), resends included:
        # how much catch-up this term served from the journal (`RaftCore.stored_entries_sent`).
        self.stored_entries_sent = 0
        # A new leader guesses that each follower has its whole log and probes from there (5.3).
        # Learners are replicated to like voters, and never counted (`ProgressTracker`).
        self.tracker = ProgressTracker(peers, log.last_index + 1, quorum, config.learners)

    # ------------------------------------------------------------------------------ time

    def election_timeout(self) -> bool:
        """An election timeout has passed. Returns whether the node may keep leading.

        With check-quorum (thesis 6.2) only if a majority was heard from during it: otherwise
        another node may lead a later term already. An InstallSnapshot unanswered for too long
        is taken as lost.
        """
        config = self._config
        tracker = self.tracker
        if config.check_quorum:
            if not tracker.quorum_active():
                return False
            tracker.reset_recent_active()
        tracker.tick_snapshots(config.election_ticks, config.election_ticks)
        return True

    def transfer_tick(self) -> None:
        """One tick of a transfer in progress: abandon it after an election timeout.

        Thesis 3.10: "If the transfer does not complete within [an election timeout], the prior
        leader aborts the transfer and resumes accepting client requests."
        """
        if self.transfer_target:
            self._transfer_elapsed_ticks += 1
            if self._transfer_elapsed_ticks >= self._config.election_ticks:
                self.transfer_target = NO_NODE

    def transfer_to(self, target: int) -> None:
        """Start handing leadership to `target`: catch its log up, then send TimeoutNow."""
        self.transfer_target = target
        self._transfer_elapsed_ticks = 0
        self._timeout_now_sent = False
        progress = self.tracker.progress[target]
        if progress.match_index < self._log.last_index:
            # Catch it up now rather than at the next heartbeat answer: an AppendEntries goes
            # out in the next ready even if the window's messages were lost.
            progress.send_probe = True
            progress.paused = False
        self.maybe_send_timeout_now()

    def maybe_send_timeout_now(self) -> None:
        """Send TimeoutNow once the target's (durable) log matches the leader's whole log."""
        target = self.transfer_target
        if not target or self._timeout_now_sent:
            return
        if self.tracker.progress[target].match_index == self._log.last_index:
            config = self._config
            self._send(TimeoutNow(config.cluster_id, config.node_id, target, self.term))
            self._timeout_now_sent = True

    def heartbeat_tick(self) -> bool:
        """One tick of the heartbeat clock; returns whether heartbeats are due now."""
        self._heartbeat_elapsed_ticks += 1
        self._storage_bytes_left = self._config.storage_read_bytes_per_pass_max  # a new pass
        if self._heartbeat_elapsed_ticks >= self._config.heartbeat_ticks:
            self._heartbeat_elapsed_ticks = 0
            return True
        return False

    # ---------------------------------------------------------------------------- sending

    def broadcast_heartbeat(self, commit_index: int, read_sequence: int) -> None:
        """Heartbeats carry the commit index (never past what the follower matches) and the
        latest read round, which the follower echoes back. With `defer_commit_notices` a commit
        a heartbeat carried is held back from that follower no longer: it has been sent."""
        config = self._config
        cluster_id, node_id, term = config.cluster_id, config.node_id, self.term
        deferring = config.defer_commit_notices
        for progress in self.tracker.progress.values():
            carried = min(commit_index, progress.match_index)
            self._send(Heartbeat(cluster_id, node_id, progress.node_id, term, carried,
                                 read_sequence))
            if deferring and progress.commit_sent < carried:
                progress.commit_sent = carried

    def appends_due(self, commit_index: int) -> bool:
        """Whether `flush_appends` would send anything now (a query only)."""
        config = self._config
        return self.tracker.appends_due(self._log.last_index, self.notices_through(commit_index),
                                        config.inflight_messages_max, config.inflight_bytes_max,
                                        self._stored_through())

    def notices_through(self, commit_index: int) -> int:
        """A follower whose last AppendEntries carried a commit below this is due one now, even
        with no entries to send it: the commit index, or with `defer_commit_notices` what it was
        when the caller last asked (`send_commit_notices`)."""
        if self._config.defer_commit_notices and self._notices_through < commit_index:
            return self._notices_through
        return commit_index

    def send_commit_notices(self, commit_index: int) -> None:
        """Make `commit_index` due to every follower that lacks it (sent in the next ready)."""
        self._notices_through = commit_index

    def commit_notices_held(self, commit_index: int) -> bool:
        """Whether a follower lacks `commit_index` and is sent it alone only once the caller asks
        (`send_commit_notices`), unless entries or a heartbeat carry it first (a query only)."""
        config = self._config
        return (config.defer_commit_notices and self._notices_through < commit_index
                and self.tracker.notices_held(commit_index, config.inflight_messages_max,
                                              config.inflight_bytes_max))

    def _stored_through(self) -> int:
        """Entries up to here are not sent now: they need a storage read and this pass's budget is
        spent (0: it is not)."""
        return 0 if self._storage_bytes_left > 0 else self._log.offset_index

    def flush_appends(self, commit_index: int, snapshot: Snapshot | None) -> None:
        """Send what each follower is due: entries, a probe, or the new commit index.

        Called only when a ready is collected, so every proposal since the last ready goes out in
        one message per follower (batching), and several messages may be in flight (pipelining).
        It sends something exactly when `appends_due` holds.
        """
        log = self._log
        last_index = log.last_index
        offset_index = log.offset_index  # entries up to here need a storage read
        config = self._config
        window = config.inflight_messages_max
        bytes_max = config.inflight_bytes_max
        deferring = config.defer_commit_notices
        notices_through = self.notices_through(commit_index)
        for progress in self.tracker.progress.values():
            state = progress.state
            if state is REPLICATE:
                inflight = progress.inflight
                # Inline `Progress.is_due` (the hot path: once per follower per ready).
                while (progress.next_index <= last_index and len(inflight) < window
                       and progress.inflight_bytes < bytes_max
                       and (progress.next_index > offset_index or self._storage_bytes_left > 0)):
                    self._send_append(progress, commit_index, snapshot)
                    if progress.state is not REPLICATE:
                        break
                if progress.send_probe or progress.commit_sent < notices_through:
                    if progress.state is REPLICATE and progress.is_due(
                            last_index, notices_through, window, bytes_max, self._stored_through()):
                        # No entries (the loop above sent all it could): a probe, or a notice.
                        self._send_append(progress, commit_index, snapshot,
                                          deferring and not progress.send_probe)
            elif state is PROBE:
                if progress.is_due(last_index, notices_through, window, bytes_max, self._stored_through()):
                    self._send_append(progress, commit_index, snapshot)

    def _send_append(self, progress: Progress, commit_index: int, snapshot: Snapshot | None,
                     notice: bool = False) -> None:
        log = self._log
        config = self._config
        previous_index = progress.next_index - 1
        previous_term = log.term_at(previous_index)
        if previous_term is None:
            self._send_snapshot(progress, snapshot)
            return
        last_index = previous_index + config.entries_per_message_max
        log_last_index = log.last_index
        if last_index > log_last_index:
            last_index = log_last_index
        if previous_index >= log.offset_index:
            terms, payloads = log.slice(previous_index + 1, last_index + 1)
            sized = self._sized
            if sized[0] == previous_index and sized[1] == last_index:
                payload_bytes = sized[2]
            else:
                payload_bytes = sum(map(len, payloads))
                self._sized = (previous_index, last_index, payload_bytes)
            if payload_bytes > config.storage_read_bytes_max and len(payloads) > 1:
                # Bounded by bytes as a storage read is: a message of 1024 large entries (a
                # command may be 1 MiB) would not fit a peer frame and be dropped at every resend.
                terms, payloads, payload_bytes = _prefix_by_bytes(
                    terms, payloads, config.storage_read_bytes_max)
                last_index = previous_index + len(terms)
        else:
            # Entries dropped from memory come from storage, bounded by bytes: maybe fewer.
            terms, payloads = log.read(previous_index + 1, last_index + 1,
                                       config.storage_read_bytes_max)
            last_index = previous_index + len(terms)
            payload_bytes = sum(map(len, payloads))
            self._storage_bytes_left -= payload_bytes
            self.stored_entries_sent += len(terms)
        self._send(AppendEntries(config.cluster_id, config.node_id, progress.node_id, self.term,
                                 previous_index, previous_term, commit_index, terms, payloads,
                                 notice and not terms))
        progress.sent_append(last_index, commit_index, payload_bytes)

    def _send_snapshot(self, progress: Progress, snapshot: Snapshot | None) -> None:
        if snapshot is None:
            # The caller's storage let the entries go (retention) before the caller told the core
            # (`RaftCore.compact`): wait for the next heartbeat answer, by which it will have.
            progress.become_probe(progress.next_index)
            progress.paused = True
            return
        progress.become_snapshot(snapshot.index)
        config = self._config
        self._send(InstallSnapshot(config.cluster_id, config.node_id, progress.node_id, self.term,
                                   snapshot))

    # ---------------------------------------------------------------------------- answers

    def append_answered(self, message: AppendEntriesResponse) -> bool:
        """A follower answered an AppendEntries or InstallSnapshot of this term.

        Returns:
            Whether the follower's match advanced (then the commit index may too).
        """
        progress = self.tracker.progress[message.source]
        progress.recent_active = True
        self._storage_bytes_left = self._config.storage_read_bytes_per_pass_max  # a new pass
        if not progress.heard_from(message.incarnation, message.last_index, self._log.last_index):
            return False  # from an earlier start of the follower: about a log maybe lost
        if message.success:
            return progress.acknowledge(message.index)
        if message.index <= progress.match_index:
            return False  # a stale rejection: a later answer already showed a longer match
        # 5.3, with the follower's hint: skip the whole conflicting term at once.
        if message.hint_term:
            last_of_term = self._log.last_index_of_term(message.hint_term)
            next_index = last_of_term + 1 if last_of_term else message.hint_index
        else:
            next_index = message.hint_index
        progress.reject(message.index, next_index)
        return False

    def heartbeat_answered(self, message: HeartbeatResponse) -> bool:
        """A follower answered a heartbeat. Returns whether it confirmed a new read round."""
        progress = self.tracker.progress[message.source]
        progress.recent_active = True
        config = self._config
        self._storage_bytes_left = config.storage_read_bytes_per_pass_max  # a new pass
        if not progress.heard_from(message.incarnation, message.last_index, self._log.last_index):
            return False
        progress.heartbeat_answered(self._log.last_index, config.inflight_messages_max,
                                    config.inflight_bytes_max)
        return progress.acknowledge_read(message.read_sequence)


def _prefix_by_bytes(
    terms: list[int], payloads: list[bytes], bytes_max: int
) -> tuple[list[int], list[bytes], int]:
    """The first entries through the one whose payload reaches `bytes_max` (at least one), and
    their payload bytes: what a storage read of `bytes_max` returns (`LogStorage.entries`)."""
    total = 0
    for count, payload in enumerate(payloads, 1):
        total += len(payload)
        if total >= bytes_max:
            return terms[:count], payloads[:count], total
    return terms, payloads, total
