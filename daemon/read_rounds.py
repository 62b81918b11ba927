"""Linearizable queries: how a query replica gets a read index, on a cluster and on a single node.

Theory of operation
-------------------
A linearizable query must see every write acknowledged before it arrived, on any node. Replies
leave only after commit, so it is enough to answer on a state that has applied the cluster's
commit index as of some moment after the query arrived: a read index (Raft thesis 6.4).

On a cluster the replica process cannot talk Raft; the node's replicator can. They meet in the
node's counters, one writer per counter (`daemon.layout.READ_ROUND_COUNTERS`, a block per replica
slot k):

    replica k        asked[k] = round + 1                   (a query arrived; a new round)
    replicator       sees asked > answered, calls core.read_index(request id):
                     on the leader, a heartbeat round that a majority of voters answers;
                     on a follower or learner, a ReadIndexRequest to the leader and its answer
    replicator       index[k] = the read index; then answered[k] = the round
    replica k        sees answered >= its round, reads index[k], waits until it has applied it

One round serves every query that arrived before it was asked (the replicator asks for the latest
round only), so a burst of queries costs one heartbeat round. The replicator looks at the rounds
on each pass, at least once a tick (`cluster.tick_ms`). The index is written before the round, so
a replica that sees its round answered reads that round's index or a later round's, which is
also a valid read point for it (it was obtained later still). A round is asked again when no
answer came within an election timeout (a lost message, a change of leader); the replica gives
up at its query's `wait_ms` and answers `no_quorum`.

On a single node the commit index (the journal's durable index) read when the query arrives is
the read index: no other node can have acknowledged anything beyond it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Final, Protocol

from ipc.counters import Counter
from sequencer.raft.core import NotLeaderError, RaftCore
from sequencer.raft.messages import ReadState

__all__ = [
    "NO_QUORUM",
    "ClusterReadPoint",
    "CommitReadPoint",
    "ReadIndexUnavailable",
    "ReadPoint",
    "ReadRounds",
]

NO_QUORUM: Final = "no_quorum"  # the answer code of a linearizable query given no read index
# A replica looks for its round's answer this often: a read costs a heartbeat round trip (a few
# ms on a LAN); 1 ms adds little to it and costs a wake-up per waiting query per ms.
ANSWER_POLL_S: Final = 0.001


class ReadIndexUnavailable(Exception):
    """No read index: `code` (no_quorum, consistency_unavailable) and what to do."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ReadPoint(Protocol):
    async def read_index(self, timeout_s: float) -> int:
        """A read index obtained after this call began.

        Raises:
            ReadIndexUnavailable: none within `timeout_s`, or none can be had here.
        """
        ...


class CommitSource(Protocol):
    def commit_index(self) -> int: ...


class CommitReadPoint:
    """A single node: its commit index now is the read index."""

    def __init__(self, commit: CommitSource) -> None:
        self.commit = commit

    async def read_index(self, timeout_s: float) -> int:
        return self.commit.commit_index()


class ClusterReadPoint:
    """A query replica on a cluster node: a read round through the node's replicator."""

    def __init__(self, asked: Counter, index: Counter, answered: Counter) -> None:
        self._asked = asked
        self._index = index
        self._answered = answered
        # The counters outlive a replica's restart (the supervisor restarts it alone): go on
        # from the round asked last, so a new round is always above every answered one.
        self._round = max(asked.get(), answered.get())

    async def read_index(self, timeout_s: float) -> int:
        self._round += 1
        round_ = self._round
        self._asked.set(round_)
        deadline = time.monotonic() + timeout_s
        answered = self._answered
        while answered.get() < round_:
            if time.monotonic() >= deadline:
                raise ReadIndexUnavailable(
                    NO_QUORUM,
                    f"no read index within {timeout_s * 1000:.0f} ms: no leader that a majority "
                    "of voters confirms could be reached (no quorum, or an election under way; "
                    "seqd status shows the cluster). Retry, or ask for 'after' or 'local'",
                )
            await asyncio.sleep(ANSWER_POLL_S)
        return self._index.get()


class ReadRounds:
    """The replicator's side: turns the replicas' rounds into ReadIndex requests of its core and
    the core's `ReadState`s into answers (see the module docstring).

    One request in flight per replica slot: its answer serves every round asked up to when it
    was issued; rounds asked meanwhile wait for the next one (so a steady stream of queries still
    gets answers). A request unanswered for `retry_s` is replaced (its late answer is ignored).
    """

    def __init__(self, asked: Sequence[Counter], index: Sequence[Counter],
                 answered: Sequence[Counter], retry_s: float) -> None:  # fmt: skip
        assert len(asked) == len(index) == len(answered), (len(asked), len(index), len(answered))
        self._asked = tuple(asked)
        self._index = tuple(index)
        self._answered = tuple(answered)
        self._retry_s = retry_s
        slots = len(asked)
        self._answered_round = [counter.get() for counter in answered]
        self._issued_at_s = [0.0] * slots
        self._request_of_slot: list[int | None] = [None] * slots
        self._requests: dict[int, tuple[int, int]] = {}  # request id -> (slot, round)
        self._next_request_id = 1
        self.reads_asked = 0
        self.reads_answered = 0

    def due(self) -> bool:
        """Whether a replica waits for a round with no request in flight (a query only)."""
        return any(
            counter.get() > answered and request is None
            for counter, answered, request in zip(
                self._asked, self._answered_round, self._request_of_slot, strict=True
            )
        )

    def ask(self, core: RaftCore, now_s: float) -> None:
        """Give the core a ReadIndex request for each slot with an unanswered round: a new round,
        or one unanswered for `retry_s`. Call with no ready outstanding."""
        for slot, counter in enumerate(self._asked):
            round_ = counter.get()
            if round_ <= self._answered_round[slot]:
                continue
            previous = self._request_of_slot[slot]
            if previous is not None and now_s - self._issued_at_s[slot] < self._retry_s:
                continue  # its answer comes first; the rounds asked since wait for the next
            request_id = self._next_request_id
            try:
                core.read_index(request_id)
            except NotLeaderError:
                continue  # no leader known (an election): asked again on the next pass
            self._next_request_id += 1
            self.reads_asked += 1
            if previous is not None:
                self._requests.pop(previous, None)  # lost, we take it: its answer is ignored
            self._requests[request_id] = (slot, round_)
            self._request_of_slot[slot] = request_id
            self._issued_at_s[slot] = now_s

    def answer(self, reads: list[ReadState]) -> None:
        """The core confirmed read points: publish each as its slot's answer."""
        for read in reads:
            found = self._requests.pop(read.request_id, None)
            if found is None:
                continue  # replaced after `retry_s`: the newer request answers the slot
            slot, round_ = found
            self._request_of_slot[slot] = None
            if round_ > self._answered_round[slot]:
                self._index[slot].set(read.index)  # the index first: see the module docstring
                self._answered[slot].set(round_)
                self._answered_round[slot] = round_
                self.reads_answered += 1
