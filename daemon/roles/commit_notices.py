"""The leader's bound on a held commit notice (`RaftConfig.defer_commit_notices`).

A leader's core holds back a commit index that has no entries to ride on: the next AppendEntries
with entries carries it, for nothing. Under load that is most of them; when none comes (an idle
cluster, the last batch of a burst) the replicator asks the core for the notices once
`COMMIT_NOTICE_DELAY_S` has passed since a pass first left one held. Otherwise only the next
heartbeat (every `heartbeat_ms`) would carry it, and a client attached to a follower waits for its
reply until that follower's blp learns the commit: the bound is what such a client may lose when
nothing else carries the commit. So a commit that covers a record some follower forwarded (its client's
command: the leader proposes forwarded records after its own in each batch) is sent at once,
at the end of the pass's loop iteration: only commits of the leader's own clients' records wait.

Under load most commits are carried within the bound, so the timer is for nothing: a pass that
finds no commit held cancels it (it would wake the loop to find nothing), and a timer that fires
while proposals wait in the ring lets the pass take them first, their entries carrying the commit
(the notices go in a second pass only if it is still held: a refused proposal, a full window).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from sequencer.raft.core import RaftCore
from sequencer.raft.raft_role import LEADER

__all__ = ["COMMIT_NOTICE_DELAY_S", "CommitNoticeTimer"]

# How long a commit may wait for entries to ride on before it goes alone. A follower's client
# waits this much longer at most, about a tenth of its loaded reply time (~8 ms: 256 commands in
# flight at ~30k/s) and a fraction of an idle one's (a follower's fdatasync and two peer hops,
# ~1-2 ms here); a loaded leader proposes every ~2-10 ms (benches/RESULTS.md, "Cluster CPU per
# command, round 3": 442 batches per 40k commands at ~10k/s), so a longer bound would catch more
# batches for the notices to ride on, at the cost of those clients. Far under the heartbeat, the
# only other carrier of a held commit when no entries come.
COMMIT_NOTICE_DELAY_S = 0.002


class CommitNoticeTimer:
    """Armed after a pass that left a commit held; fires once, then the next pass may arm it.
    Once the replicator has finished it does nothing (its loop closes with it: no cancel)."""

    __slots__ = ("_batch_waiting", "_core", "_delay_s", "_finished", "_forwarded", "_handle", "_loop", "_process",
                 "_urgent")  # fmt: skip

    def __init__(self, loop: asyncio.AbstractEventLoop, core: RaftCore, finished: asyncio.Future[int],
                 process: Callable[[], None], batch_waiting: Callable[[], bool],
                 delay_s: float = COMMIT_NOTICE_DELAY_S) -> None:  # fmt: skip
        self._loop = loop
        self._batch_waiting = batch_waiting  # proposals the next pass takes (entries to ride on)
        self._delay_s = delay_s
        self._core = core
        self._finished = finished  # the replicator's end: no pass after it
        self._process = process  # the replicator's pass
        self._handle: asyncio.TimerHandle | asyncio.Handle | None = None
        self._urgent = False  # the handle is the pass's iteration's end, not the bound
        # (first, last) index of each run of forwarded records proposed whose commit may not have
        # reached its follower yet, oldest first: one per proposal batch, until committed.
        self._forwarded: deque[tuple[int, int]] = deque()

    def forwarded(self, first_index: int, count: int) -> None:
        """The leader proposed `count` records followers forwarded, from `first_index` on."""
        if count:
            self._forwarded.append((first_index, first_index + count - 1))

    def arm(self) -> None:
        """After a pass: if the core holds a commit back, send it within the bound, or at once
        if it commits a forwarded record."""
        core = self._core
        forwarded = self._forwarded
        if not core.commit_notices_held():
            if self._handle is not None and not self._urgent:
                self._handle.cancel()  # carried: a timer left armed would wake the loop for nothing
                self._handle = None
            if core.raft_role is not LEADER:
                forwarded.clear()
            while forwarded and forwarded[0][1] <= core.commit_index:
                forwarded.popleft()  # every follower has that commit
            return
        if forwarded and forwarded[0][0] <= core.commit_index:
            if not self._urgent:
                if self._handle is not None:
                    self._handle.cancel()
                self._handle, self._urgent = self._loop.call_soon(self._fire), True
        elif self._handle is None:
            self._handle = self._loop.call_later(self._delay_s, self._fire)

    def _fire(self) -> None:
        self._handle, self._urgent = None, False
        if not self._finished.done():  # (a truncation may leave a ready outstanding)
            core = self._core
            forwarded = self._forwarded
            while forwarded and forwarded[0][1] <= core.commit_index:
                forwarded.popleft()
            if not core.commit_notices_held():
                return  # entries or a heartbeat carried it meanwhile: no pass for nothing
            if self._batch_waiting():  # (its pass may arm the timer again: the next one cancels it)
                self._process()  # the batch's entries carry the commit to whom they go
                if self._finished.done() or not core.commit_notices_held():
                    return
            core.send_commit_notices()
            self._process()
