"""What a follower does with its leader's messages: match and merge entries, move the commit index,
and acknowledge only what is durable.

AppendEntries (Raft paper 5.3): entries up to the follower's commit index are skipped (committed,
hence identical to the leader's, and maybe compacted here); a log that does not match at the
previous index is refused with a hint for fast backtracking (the first index of the conflicting
term); otherwise the entries are merged, truncating a conflicting suffix, and the commit index
moves to min(leaderCommit, index of the last new entry) (Figure 2). InstallSnapshot (7) replaces
the log unless the follower holds the snapshot's last entry already.

A successful AppendEntriesResponse is a promise that the follower holds the entries durably
(thesis 10.2.1). It is sent at once when they are (a retransmission), else it waits: the highest
index owed to the term's leader is remembered and acknowledged when the core reports the write
durable (`stable_advanced`). A new term voids what was owed to the last term's leader. A commit
notice (`AppendEntries.notice`: no entries, sent only for its commit index) that would repeat an
answer already sent to this term's leader is not answered.

The core keeps the node's standing, its commit index and what it hands out in readies; this module
is told the commit index and the term and returns what changed.
"""

from __future__ import annotations

from collections.abc import Callable

from sequencer.raft.config import NO_NODE, RaftConfig
from sequencer.raft.durability import DurableWrites
from sequencer.raft.log import RaftLog
from sequencer.raft.messages import (
    AppendEntries,
    AppendEntriesResponse,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    Message,
)

__all__ = ["Follower"]


class Follower:
    """A node's handling of its leader's messages and its deferred acknowledgements."""

    __slots__ = ("_log", "_send", "_writes", "ack_leader", "ack_pending_index", "ack_sent_index",
                 "acked_index", "cluster_id", "id", "incarnation", "notices_unanswered")

    def __init__(self, config: RaftConfig, log: RaftLog, writes: DurableWrites,
                 send: Callable[[Message], None]) -> None:
        self.cluster_id = config.cluster_id
        self.id = config.node_id
        self.incarnation = config.incarnation
        self._log = log
        self._writes = writes
        self._send = send
        # The highest index owed to `ack_leader` in this term (0: none), and the last index a
        # deferred acknowledgement reported.
        self.ack_pending_index = 0
        self.ack_sent_index = 0
        self.ack_leader = NO_NODE
        # The highest index a successful answer reported to this term's leader, at once or
        # deferred: a commit notice that would report no more is not answered.
        self.acked_index = 0
        self.notices_unanswered = 0  # commit notices left unanswered (an operating counter)

    def new_term(self) -> None:
        """Acknowledgements owed to the last term's leader are void."""
        self.ack_pending_index = 0
        self.ack_sent_index = 0
        self.ack_leader = NO_NODE
        self.acked_index = 0

    def acknowledge(self, leader_id: int, index: int, term: int, notice: bool = False) -> None:
        """Tell the leader the log matches its own up to `index`, once that is durable; for a
        commit notice (`AppendEntries.notice`) only if no answer said so already."""
        if notice and index <= self.acked_index:
            self.notices_unanswered += 1
            return
        if index <= self._writes.stable_index:
            self.answer(leader_id, term, True, index)
        elif index > self.ack_pending_index:
            self.ack_pending_index = index
            self.ack_leader = leader_id

    def answer(self, leader_id: int, term: int, success: bool, index: int, hint_index: int = 0,
               hint_term: int = 0) -> None:
        """Send an AppendEntriesResponse, with this log's last index and this start's incarnation."""
        if success and index > self.acked_index:
            self.acked_index = index
        self._send(AppendEntriesResponse(self.cluster_id, self.id, leader_id, term, success, index,
                                         hint_index, hint_term, self._log.last_index,
                                         self.incarnation))

    def stable_advanced(self, term: int) -> None:
        """The durable index rose: send the acknowledgement that waited for it."""
        pending = self.ack_pending_index
        if pending:
            stable_index = self._writes.stable_index
            index = pending if pending < stable_index else stable_index
            if index > self.ack_sent_index:
                self.ack_sent_index = index
                self.answer(self.ack_leader, term, True, index)
            if index == pending:
                self.ack_pending_index = 0

    def append(self, message: AppendEntries, commit_index: int, term: int) -> tuple[int, int]:
        """Handle the leader's AppendEntries.

        Returns:
            The new commit index, and the first index where the log changed (0: none).
        """
        log = self._log
        previous_index = message.previous_index
        previous_term = message.previous_term
        terms = message.terms
        payloads = message.payloads
        if previous_index < commit_index:
            # Entries up to our commit index are committed, hence identical to the leader's
            # (Leader Completeness); skip them: they may be compacted here.
            skip = commit_index - previous_index
            if skip >= len(terms):
                self.acknowledge(message.source, commit_index, term, message.notice)
                return commit_index, 0
            assert terms[skip - 1] == log.term_at(commit_index), (self.id, commit_index)
            previous_index = commit_index
            previous_term = terms[skip - 1]
            terms = terms[skip:]
            payloads = payloads[skip:]
        term_there = log.term_at(previous_index)
        if term_there != previous_term:
            # 5.3: "If a follower's log does not contain an entry at prevLogIndex whose term
            # matches prevLogTerm, it rejects", with the hint for fast backtracking.
            if term_there is None:
                hint_index, hint_term = log.last_index + 1, 0
            else:
                hint_term = term_there
                hint_index = max(log.first_index_of_term(term_there), commit_index + 1)
            self.answer(message.source, term, False, message.previous_index, hint_index, hint_term)
            return commit_index, 0
        changed = log.merge(previous_index, terms, payloads)
        if changed:
            assert changed > commit_index, (self.id, changed, commit_index)
            self._writes.overwritten_from(changed)
        last_new_index = previous_index + len(terms)
        if message.commit_index > commit_index:
            # Figure 2: "commitIndex = min(leaderCommit, index of last new entry)".
            # (`max(commit_index, min(...))` without the calls: ~0.9k instructions each on 3.11)
            leader_commit = message.commit_index
            new_commit = leader_commit if leader_commit < last_new_index else last_new_index
            if new_commit > commit_index:
                commit_index = new_commit
        # A follower acknowledges only what is durable: the answer waits for `durable()` if need be.
        self.acknowledge(message.source, last_new_index, term, message.notice)
        return commit_index, changed

    def heartbeat(self, message: Heartbeat, commit_index: int, term: int) -> int:
        """Answer the leader's heartbeat; returns the new commit index."""
        # The leader sends at most the index this node acknowledged as durable and matching, but
        # a node that lost its log (a wiped data directory) acknowledged it before it lost it: the
        # commit moves only as far as this log is known to match the leader's, that is up to its
        # last entry when that entry is of the leader's term (Log Matching), else not at all.
        if message.commit_index > commit_index:
            log = self._log
            last_index = log.last_index
            if log.term_at(last_index) == term:
                commit_index = max(commit_index, min(message.commit_index, last_index))
        self._send(HeartbeatResponse(self.cluster_id, self.id, message.source, term,
                                     message.read_sequence, self._log.last_index, self.incarnation))
        return commit_index

    def install_snapshot(self, message: InstallSnapshot, commit_index: int,
                         term: int) -> bool:
        """Handle the leader's InstallSnapshot; returns whether the snapshot replaced the log.

        Either way the commit index is then at least the snapshot's index (the caller moves it).
        """
        snapshot = message.snapshot
        log = self._log
        if snapshot.index <= commit_index:
            self.acknowledge(message.source, commit_index, term)
            return False
        if log.term_at(snapshot.index) == snapshot.term:
            # Section 7: "If the follower has an entry that matches the snapshot's last included
            # index and term, it can retain the entries following it": only the commit moves.
            self.acknowledge(message.source, snapshot.index, term)
            return False
        log.restore(snapshot.index, snapshot.term)
        self._writes.superseded(snapshot.index)
        # The snapshot is durable before this leaves (`Ready.sync_before_send`).
        self.answer(message.source, term, True, snapshot.index)
        return True
