"""The replicator's clock: which ticks make a pass of its loop, and the journal's compaction look.

The replicator ticks its Raft core every `cluster.tick_ms` (10 ms by default): the election
timeout is counted in ticks, so that is its resolution, and it stays so. A tick used to make a
whole pass of the loop (`Replicator._process`) on every node, ~80-100 us of Python each, 100 a
second: on an idle follower ~15 ms of CPU a second, and under the cluster benchmark's load (~13k
commands/s) ~0.6-1 us of a follower replicator's ~4 us per command, for passes that found nothing
the passes for peer messages and fdatasyncs had not already done (benches/RESULTS.md, follpass).

So a follower's tick ticks its core and looks, and makes a pass only when something is due:

- the core has a ready after the tick (its election timeout passed: a PreVote to send) or its
  standing changed without one (a learner that lost its leader);
- a read round of a query replica to ask (`ReadRounds.ask`, which a replica's round waits on: at
  least once a tick, as before) made the core a ready;
- work outside (entries made durable, proposals to take: `Replicator._has_work_outside`, which is
  also the doorbell's safety look, every tick as before);
- anything held in this process: entries waiting for room in the log ring, records pending
  (their resend clock and a new forward stream are looked at in a pass); not the outbox of
  records to send (`QuietTicks.quiet` says why none waits there);
- a pass scheduled and not yet run (the tick's pass replaces it: a peer message can leave work
  no other look sees, such as a lost election's `raft.role`, published only by a pass);
- or `QUIET_PASS_S` since the last tick's pass: the status counters, the journal's compaction
  look, the operator's transfer request (answered NOT_LEADER on a follower) and the hard state's
  save deadline are all at least this fresh.

A leader's and a candidate's ticks still make a pass each (heartbeats, votes, transfers, the
commit notice bound): the leader's path is not this module's.

When a tick happens (`TickTimer`): under load a pass runs every few milliseconds (a proposal
batch, an fdatasync, an answer), and a tick's own timer woke the loop besides, 100 times a second
on every node, each wake a switch into the process and, on a leader, a whole pass of its own. So
the first pass at or after a tick's deadline takes the tick (`Replicator._process`), and the timer
is only the backstop of a loop no pass wakes: it fires `TICK_SLACK` of a tick after the deadline.
Deadlines keep to a grid a tick apart, so the core's clock keeps its rate whichever takes them
(an idle node's ticks are all the timer's, a tick apart as before, only later in phase), and
never bunch: the next deadline is at least a tick less the slack after the tick taken, so a loop
held up past a deadline takes one tick late, not the ticks it missed at once (as before: the
timer was armed a tick after the last one fired). Two ticks are never taken in one pass, and
none is taken before its deadline.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Callable

from sequencer.journal import JournalLogStorage
from sequencer.raft.core import RaftCore
from sequencer.raft.raft_role import FOLLOWER

__all__ = ["QUIET_PASS_S", "TICK_SLACK", "CompactionWatch", "QuietTicks", "TickTimer"]

# A follower whose ticks find nothing due still makes a tick's pass this often: what only `seqd
# status`, the operator's tools and the hard state's commit hint read is at most this stale (ten
# ticks at the default `tick_ms`; `seqd status` is read by people, and by tests that wait for it).
QUIET_PASS_S = 0.1


# How late, in ticks, the tick timer fires after a deadline no pass took (`TickTimer`). Under the
# benchmark's load a pass runs every 2-3 ms, well within half a tick at the default `tick_ms`;
# each tick is taken within this of its deadline, so the heartbeat (5 ticks) and the election
# timeout (30 ticks and more) move by at most half a tick.
TICK_SLACK = 0.5


class TickTimer:
    """When the replicator's next tick is due, and the timer that takes it if no pass does (module
    docstring). Invariants: `deadline_s` is the due time of the next tick (infinite before
    `start`: a replicator driven by a test ticks only when told); the timer is armed for
    `deadline_s + slack_s` exactly when `deadline_s` is finite."""

    __slots__ = ("_callback", "_handle", "_loop", "deadline_s", "slack_s", "tick_s")

    def __init__(self, loop: asyncio.AbstractEventLoop, tick_s: float, callback: Callable[[], None]) -> None:
        assert tick_s > 0, tick_s
        self._loop = loop
        self._callback = callback  # the replicator's tick (a pass that takes it)
        self._handle: asyncio.TimerHandle | None = None
        self.tick_s = tick_s
        self.slack_s = tick_s * TICK_SLACK
        self.deadline_s = math.inf

    def start(self, now_s: float) -> None:
        """The first tick, a tick from `now_s`."""
        self.deadline_s = now_s + self.tick_s
        self._arm(now_s)

    def took(self, now_s: float) -> None:
        """A tick was taken at `now_s` (at or after `deadline_s`, or forced by a test): the next
        one's deadline, on the grid unless the loop was held up past it (then a tick less the
        slack from now: the timer fires a tick from now, as it was armed before)."""
        self.deadline_s = max(self.deadline_s + self.tick_s, now_s + self.tick_s - self.slack_s)
        if self.deadline_s != math.inf:
            self._arm(now_s)

    def fired(self, now_s: float) -> bool:
        """The timer fired: whether the tick is due; if not (the loop arms its timers from a clock it
        reads once an iteration, and in whole milliseconds: one may fire that much early), it is
        armed again."""
        self._handle = None
        if now_s >= self.deadline_s:
            return True
        self._arm(now_s)
        return False

    def _arm(self, now_s: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = self._loop.call_later(self.deadline_s + self.slack_s - now_s, self._callback)


class QuietTicks:
    """Whether a follower's tick makes a pass (module docstring). Invariant: `quiet_ticks` ticks
    in a row made no pass, and `quiet_ticks < quiet_ticks_max`."""

    __slots__ = ("quiet_ticks", "quiet_ticks_max")

    def __init__(self, tick_ms: int) -> None:
        assert tick_ms > 0, tick_ms
        self.quiet_ticks_max = max(1, round(QUIET_PASS_S * 1000 / tick_ms))
        self.quiet_ticks = 0

    def quiet(self, core: RaftCore, standing: tuple[int, int], waiting: bool) -> bool:
        """After `core.tick()` (and the tick's read rounds asked): whether this tick can skip its
        pass. `standing` is (term, leader) as the last pass saw it; `waiting`: work outside or held
        in the process (module docstring). A False resets the count: the caller makes a pass.

        The replicator's outbox (records to send or propose at its next chance) is no reason for a
        pass. A follower's pass that knows a leader empties it: `_take_proposals`
        takes the outbox whenever the node may forward (`may_propose`: a follower that knows a
        leader), after the pass's `_check_standing`, and the pass changes no standing after it
        (ready and advance move no term or leader); only a pass fills it (or the tick that starts
        one, with an overdue resend). So a
        follower's outbox holds records at a tick only while it knows no leader (then a pass
        leaves the outbox as it is: nowhere to send it) or when its standing changed since its
        last pass (a pass follows anyway: below; its `_check_standing` resends every pending
        record). Besides, the outbox only holds records pending when put there (`resend`, a
        refused proposal's), which leave the pending set only when committed: with none pending,
        a pass would send only duplicates of committed records. The tests check this before every
        tick they drive (tests/replicator_driven.py, `DrivenReplicator.tick`); the product does not
        assert it: a broken proof costs at most a tick's delay, a failed assertion a pipeline
        restart."""
        if (
            waiting
            or core.raft_role is not FOLLOWER
            or core.has_ready()
            or core.term != standing[0]
            or core.leader_id != standing[1]
            or self.quiet_ticks + 1 >= self.quiet_ticks_max
        ):
            self.quiet_ticks = 0
            return False
        self.quiet_ticks += 1
        return True


class CompactionWatch:
    """Tells the core where the journal now starts once retention deleted segments: a stat of the
    journal directory per tick's pass, not per pass (under load a pass runs for every proposal
    batch and every ack, and the stat was a tenth of the leader's CPU); the directory changes only
    when a segment is created or deleted, and retention never deletes what the leader holds for a
    follower."""

    __slots__ = ("journal_dir", "mtime_ns", "storage")

    def __init__(self, journal_dir: str, storage: JournalLogStorage) -> None:
        self.journal_dir = journal_dir  # a str: no Path to build at each look
        self.storage = storage
        self.mtime_ns = -1  # the journal directory's, when the core last heard of it

    @property
    def looked(self) -> bool:
        return self.mtime_ns >= 0

    def look(self, core: RaftCore) -> None:
        mtime_ns = os.stat(self.journal_dir).st_mtime_ns
        if mtime_ns == self.mtime_ns:
            return
        compacted = self.storage.first_index() - 1
        if compacted > core.applied_index:
            return  # not yet applied here (the core compacts only applied entries): next pass
        self.mtime_ns = mtime_ns
        if compacted > core.log.snapshot_index:
            core.compact(compacted, b"")
