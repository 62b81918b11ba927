"""Linearizable reads (ReadIndex: Raft paper 8, thesis 6.4): the leader's queue of reads, and the
core's part that asks for and answers them, on the leader and from followers and learners.

A read is answered at a read point: the leader's commit index when the read arrived. The point is
safe only once (a) the leader has committed an entry of its own term, so its commit index is at
least every index committed before (until its no-op commits a new leader does not know that), and
(b) a majority of voters has confirmed, after the read arrived, that this node is still the
leader. So a read waits in up to three places, in order:

    waiting  (no commit in this term yet) -> pending (heartbeat round `sequence` out)
             -> confirmed (a majority answered round `sequence`)

Each round of reads raises `sequence`; heartbeats carry it and followers echo it back, so one
round confirms every read queued before it (after etcd-io/raft `read_only.go`). A confirmed read
of the leader's own goes out in the next `Ready`; one a follower or learner asked for (thesis 6.4:
"the follower issues a request to the leader to obtain the current readIndex") goes back to it as
a `ReadIndexResponse`, and the asker hands it out in its next `Ready` (it answers once it has
applied that index: the leader's commit index covers every write acknowledged before the read was
asked, wherever it was acknowledged). A read lost on the way (a lost message, a change of leader)
is never answered: the caller asks again after a timeout.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from sequencer.raft.config import NO_NODE, RaftConfig
from sequencer.raft.errors import NotLeaderError
from sequencer.raft.log import RaftLog
from sequencer.raft.messages import Message, ReadIndexRequest, ReadIndexResponse, ReadState
from sequencer.raft.raft_role import LEADER, RaftRole

__all__ = ["ReadIndexQueue", "Reads"]

# A read: (the node that asked, its request id).
Asker = tuple[int, int]


class ReadIndexQueue:
    """Reads between `read_index()` and their answer, in arrival order."""

    __slots__ = ("_pending", "confirmed", "ready", "sequence", "waiting")

    def __init__(self) -> None:
        # The latest round of reads; heartbeats carry it. Never reset: followers keep the highest
        # round they saw, so it must keep growing across this node's terms.
        self.sequence = 0
        self.waiting: list[Asker] = []  # reads waiting for the first commit of the term
        self._pending: deque[tuple[int, int, int, int]] = deque()  # (sequence, node, id, index)
        self.ready: list[ReadState] = []  # this node's own confirmed reads, for the next ready
        self.confirmed: list[tuple[int, ReadState]] = []  # (asker, read) to answer by message

    def wait_for_term_commit(self, asker: Asker) -> None:
        self.waiting.append(asker)

    def take_waiting(self) -> list[Asker]:
        waiting, self.waiting = self.waiting, []
        return waiting

    def answer(self, askers: list[Asker], index: int, own_id: int) -> None:
        """Answer at `index` at once: a single voter is its own majority."""
        for node, request_id in askers:
            self._confirm(node, request_id, index, own_id)

    def start_round(self, askers: list[Asker], index: int) -> None:
        """Queue reads at `index` behind a new round; the caller sends its heartbeats."""
        self.sequence += 1
        sequence = self.sequence
        for node, request_id in askers:
            self._pending.append((sequence, node, request_id, index))

    def has_pending(self) -> bool:
        return bool(self._pending)

    def confirm(self, confirmed_sequence: int, own_id: int) -> None:
        """A majority confirmed every round up to `confirmed_sequence`: those reads are answered."""
        pending = self._pending
        while pending and pending[0][0] <= confirmed_sequence:
            _, node, request_id, index = pending.popleft()
            self._confirm(node, request_id, index, own_id)

    def _confirm(self, node: int, request_id: int, index: int, own_id: int) -> None:
        if node == own_id:
            self.ready.append(ReadState(request_id, index))
        else:
            self.confirmed.append((node, ReadState(request_id, index)))

    def drop_unconfirmed(self) -> None:
        """Leadership is lost: reads not yet confirmed are lost too (the client retries)."""
        self.waiting.clear()
        self._pending.clear()

    def take_ready(self) -> list[ReadState]:
        ready, self.ready = self.ready, []
        return ready

    def take_confirmed(self) -> list[tuple[int, ReadState]]:
        confirmed, self.confirmed = self.confirmed, []
        return confirmed


class Reads:
    """The ReadIndex part of `RaftCore` (which sets every attribute named here), kept apart as
    `candidate.Elections` is: the core inherits these methods unchanged."""

    config: RaftConfig
    id: int
    cluster_id: int
    quorum: int
    log: RaftLog
    term: int
    commit_index: int
    leader_id: int
    raft_role: RaftRole
    _reads: ReadIndexQueue
    _ready_outstanding: object
    _send: Callable[[Message], None]
    _broadcast_heartbeat: Callable[[], None]

    def read_index(self, request_id: int) -> None:
        """Ask for a linearizable read point; it arrives as a `ReadState` in a later ready.

        On the leader the read waits for a heartbeat round; on a follower or learner it is sent to
        the leader (`ReadIndexRequest`), whose answer becomes the `ReadState`. The caller answers
        the read after applying up to the returned index. A read is lost if leadership changes
        before it is confirmed, or its messages are lost; the caller retries it after a timeout.

        Raises:
            NotLeaderError: no leader is known (an election is under way): retry later.
        """
        assert self._ready_outstanding is None, "advance() the outstanding ready first"
        if self.raft_role is not LEADER:
            if self.leader_id == NO_NODE:
                raise NotLeaderError(self.id, self.leader_id, self.term)
            self._send(ReadIndexRequest(self.cluster_id, self.id, self.leader_id, self.term,
                                        request_id))
            return
        self._leader_read((self.id, request_id))

    def _leader_read(self, asker: Asker) -> None:
        if self.log.term_at(self.commit_index) != self.term:
            # Until its no-op commits, a new leader does not know the commit index (thesis 6.4).
            self._reads.wait_for_term_commit(asker)
            return
        self._start_reads([asker])

    def _start_reads(self, askers: list[Asker]) -> None:
        if self.quorum == 1:
            self._reads.answer(askers, self.commit_index, self.id)
            self._send_confirmed_reads()
            return
        self._reads.start_round(askers, self.commit_index)
        self._broadcast_heartbeat()

    def _handle_read_request(self, message: ReadIndexRequest) -> None:
        """A follower's or learner's read, in this node's term: served only while leading (a
        read sent to a node that no longer leads is lost; its asker retries)."""
        if self.raft_role is LEADER:
            self._leader_read((message.source, message.request_id))

    def _handle_read_response(self, message: ReadIndexResponse) -> None:
        self._reads.ready.append(ReadState(message.request_id, message.index))

    def _send_confirmed_reads(self) -> None:
        for asker, read in self._reads.take_confirmed():
            self._send(ReadIndexResponse(self.cluster_id, self.id, asker, self.term,
                                         read.request_id, read.index))
