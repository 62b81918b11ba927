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
"""

from __future__ import annotations

import os

from sequencer.journal import JournalLogStorage
from sequencer.raft.core import RaftCore
from sequencer.raft.raft_role import FOLLOWER

__all__ = ["QUIET_PASS_S", "CompactionWatch", "QuietTicks"]

# A follower whose ticks find nothing due still makes a tick's pass this often: what only `seqd
# status`, the operator's tools and the hard state's commit hint read is at most this stale (ten
# ticks at the default `tick_ms`; `seqd status` is read by people, and by tests that wait for it).
QUIET_PASS_S = 0.1


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
