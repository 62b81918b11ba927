"""The leader's queue of linearizable reads (ReadIndex: Raft paper 8, thesis 6.4).

A read is answered at a read point: the leader's commit index when the read arrived. The point is
safe only once (a) the leader has committed an entry of its own term, so its commit index is at
least every index committed before (until its no-op commits a new leader does not know that), and
(b) a majority has confirmed, after the read arrived, that this node is still the leader. So a read
waits in up to three places, in order:

    waiting  (no commit in this term yet) -> pending (heartbeat round `sequence` out)
             -> ready (a majority answered round `sequence`; handed out in the next `Ready`)

Each round of reads raises `sequence`; heartbeats carry it and followers echo it back, so one
round confirms every read queued before it (after etcd-io/raft `read_only.go`). The core decides
when a round starts and is confirmed; this module keeps the queue in order.
"""

from __future__ import annotations

from collections import deque

from sequencer.raft.messages import ReadState

__all__ = ["ReadIndexQueue"]


class ReadIndexQueue:
    """Reads between `read_index()` and the ready that answers them, in arrival order."""

    __slots__ = ("_pending", "ready", "sequence", "waiting")

    def __init__(self) -> None:
        # The latest round of reads; heartbeats carry it. Never reset: followers keep the highest
        # round they saw, so it must keep growing across this node's terms.
        self.sequence = 0
        self.waiting: list[int] = []  # request ids waiting for the first commit of the term
        self._pending: deque[tuple[int, int, int]] = deque()  # (sequence, request id, index)
        self.ready: list[ReadState] = []  # confirmed, for the next ready

    def wait_for_term_commit(self, request_id: int) -> None:
        self.waiting.append(request_id)

    def take_waiting(self) -> list[int]:
        waiting, self.waiting = self.waiting, []
        return waiting

    def answer(self, request_ids: list[int], index: int) -> None:
        """Answer at `index` at once: a single voter is its own majority."""
        self.ready.extend(ReadState(request_id, index) for request_id in request_ids)

    def start_round(self, request_ids: list[int], index: int) -> None:
        """Queue reads at `index` behind a new round; the caller sends its heartbeats."""
        self.sequence += 1
        sequence = self.sequence
        for request_id in request_ids:
            self._pending.append((sequence, request_id, index))

    def has_pending(self) -> bool:
        return bool(self._pending)

    def confirm(self, confirmed_sequence: int) -> None:
        """A majority confirmed every round up to `confirmed_sequence`: those reads are ready."""
        pending = self._pending
        while pending and pending[0][0] <= confirmed_sequence:
            _, request_id, index = pending.popleft()
            self.ready.append(ReadState(request_id, index))

    def drop_unconfirmed(self) -> None:
        """Leadership is lost: reads not yet confirmed are lost too (the client retries)."""
        self.waiting.clear()
        self._pending.clear()

    def take_ready(self) -> list[ReadState]:
        ready, self.ready = self.ready, []
        return ready
