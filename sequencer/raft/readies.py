"""The core's output: what `RaftCore.ready()` hands the caller, and what `advance`, `durable`
and `durable_through` are told back (the contract in `sequencer.raft.core`'s docstring and on
`Ready`).

`Readies` is a part of `RaftCore`, kept apart so each module has one job: the core inherits these
methods unchanged. The core's inputs (`step`, `tick`, `propose_batch`) only change state and queue
messages; here that state becomes one `Ready`: the messages (the leader's AppendEntries are built
only now, so every proposal since the last ready joins one batch), the entries to write, the hard
state to persist, the committed entries to apply (durable ones only), the reads to answer. And the
reports back move `stable_index`, from which a leader commits and a follower acknowledges.
"""

from __future__ import annotations

from collections.abc import Callable

from sequencer.raft.config import RaftConfig
from sequencer.raft.durability import DurableWrites
from sequencer.raft.follower import Follower
from sequencer.raft.leader import Leader
from sequencer.raft.log import RaftLog
from sequencer.raft.messages import Entries, HardState, Message, Ready, Snapshot, TermStart
from sequencer.raft.raft_role import LEADER, RaftRole
from sequencer.raft.read_index import ReadIndexQueue

__all__ = ["Readies"]


class Readies:
    """The ready/advance side of `RaftCore` (which sets every attribute named here)."""

    config: RaftConfig
    log: RaftLog
    term: int
    vote: int
    raft_role: RaftRole
    commit_index: int
    applied_index: int
    snapshot: Snapshot | None
    _durable: DurableWrites
    _term_start: TermStart | None
    _unstable_from: int
    _persisted_hard_state: HardState
    _pending_snapshot: Snapshot | None
    _ready_outstanding: Ready | None
    _messages: list[Message]
    _leader: Leader | None
    _reads: ReadIndexQueue
    _follower: Follower
    _maybe_commit: Callable[[], None]

    @property
    def stable_index(self) -> int:
        """The durable log agrees with `log` up to here: a leader counts itself toward a majority
        only up to here, a follower acknowledges only up to here, and only entries up to here are
        applied. Invariant: stable_index <= log.last_index."""
        return self._durable.stable_index

    def has_ready(self) -> bool:
        """Whether `ready()` would return any work. A query: it changes nothing.

        The leader's AppendEntries are built by `ready()` (so every proposal until then joins
        one batch); here the leader is only asked whether any follower is due one.
        """
        if self._messages:
            return True
        commit_index = self.commit_index
        # The highest committed index this node holds durably: what it may apply and persist. (Not
        # `min` nor the `stable_index` property: this runs several times a message, and on CPython
        # 3.11 each of those calls costs ~0.9-1.4k instructions, benches/RESULTS.md "follrec2".)
        stable_index = self._durable.stable_index
        durable_commit_index = commit_index if commit_index < stable_index else stable_index
        persisted = self._persisted_hard_state
        return bool(
            self._reads.ready
            or self._pending_snapshot is not None
            or self._term_start is not None
            or self.log.last_index >= self._unstable_from
            or durable_commit_index > self.applied_index
            or persisted.commit_index != durable_commit_index
            or persisted.term != self.term
            or persisted.vote != self.vote
            or (self._leader is not None and self._leader.appends_due(commit_index))
        )

    def ready(self) -> Ready:
        """Collect the work queued since the last ready; see `Ready` for what to do with it."""
        assert self._ready_outstanding is None, "advance() the outstanding ready first"
        if self._leader is not None:
            self._leader.flush_appends(self.commit_index, self.snapshot)
        log = self.log
        ready = Ready(self._messages)
        self._messages = []
        snapshot = self._pending_snapshot
        if snapshot is not None:
            ready.snapshot = snapshot
            ready.sync_before_send = True
            self._pending_snapshot = None
        last_index = log.last_index
        if last_index >= self._unstable_from:
            # Fresh lists (`slice` copies): the replicator's `RingFeed` and `RingPositions` keep this
            # one, uncopied, until the commit passes it; the log's own truncation must not reach it.
            terms, payloads = log.slice(self._unstable_from, last_index + 1)
            ready.entries = Entries(self._unstable_from, terms, payloads)
            self._unstable_from = last_index + 1
        commit_index = self.commit_index
        stable_index = self._durable.stable_index
        durable_commit_index = commit_index if commit_index < stable_index else stable_index
        persisted = self._persisted_hard_state
        if (
            persisted.commit_index != durable_commit_index
            or persisted.term != self.term
            or persisted.vote != self.vote
        ):
            # The commit index on disk never passes the durable log that agrees with this one:
            # the hard state may land before entry writes still in progress, and a node that
            # restarted with a commit index over stale entries (a deposed leader's, which a lost
            # write was replacing) would apply them (simulator seed 198).
            ready.hard_state = HardState(self.term, self.vote, durable_commit_index)
            if persisted.term != self.term or persisted.vote != self.vote:
                # Every message carries the term, and a granted vote is a promise (Figure 2:
                # "updated on stable storage before responding to RPCs"). The commit index alone
                # is a hint and needs no sync.
                ready.sync_before_send = True
        applied = self.applied_index if snapshot is None else max(self.applied_index, snapshot.index)
        # Only durable entries are applied: a leader may commit by its followers' disks before
        # its own write lands, but what this node applies (and may snapshot) it holds.
        if durable_commit_index > applied:
            if applied >= log.offset_index:
                terms, payloads = log.slice(applied + 1, durable_commit_index + 1)
            else:
                # Entries left in storage (after a bounded restart) come in bounded reads: the
                # rest follows in the next ready.
                terms, payloads = log.read(applied + 1, durable_commit_index + 1,
                                           self.config.storage_read_bytes_max)
            ready.committed = Entries(applied + 1, terms, payloads)
        if self._reads.ready:
            ready.reads = self._reads.take_ready()
        if self._term_start is not None:
            ready.term_start = self._term_start
            self._term_start = None
        self._ready_outstanding = ready
        return ready

    def advance(self, ready: Ready, *, entries_durable: bool = True) -> None:
        """Acknowledge that the caller has done everything `ready` asked.

        Args:
            ready: the ready returned last.
            entries_durable: whether its entries are durable already (a synchronous caller). An
                asynchronous caller passes False and reports them later with `durable()`.
        """
        assert ready is self._ready_outstanding, "advance() takes the ready returned last"
        self._ready_outstanding = None
        if ready.snapshot is not None:
            self.applied_index = max(self.applied_index, ready.snapshot.index)
            self._durable.snapshot_durable(ready.snapshot.index)
        if ready.hard_state is not None:
            self._persisted_hard_state = ready.hard_state
        if ready.committed is not None:
            self.applied_index = ready.committed.last_index
        entries = ready.entries
        if entries is not None:
            if entries_durable:
                self._durable.written(entries.first_index, entries.last_index)
                self._stable_advanced()
            else:
                self._durable.started(entries.first_index, entries.last_index, entries.terms[-1])
        elif ready.snapshot is not None:
            self._stable_advanced()
        assert self.applied_index <= self.commit_index, (self.applied_index, self.commit_index)
        assert self._durable.stable_index <= self.log.last_index, (self._durable.stable_index, self.log.last_index)
        assert (self._leader is not None) == (self.raft_role is LEADER), self.raft_role
        if ready.committed is not None and self.log.storage is not None:
            self._release_memory()

    def durable(self, index: int, term: int) -> bool:
        """The entry write that ended at (`index`, `term`) is durable, and so is every write
        handed out before it (writes complete in order; a caller may report only the last of
        several).

        A leader then counts itself toward a majority up to what the write left agreeing with its
        log; a follower sends the acknowledgements that waited for it.

        Returns:
            Whether an outstanding write ended there. False for a report the core no longer
            waits for (a snapshot replaced the log since): the caller may ignore it.
        """
        assert self._ready_outstanding is None, "advance() the outstanding ready first"
        durable = self._durable
        stable_index = durable.stable_index
        if not durable.landed(index, term):
            return False
        if durable.stable_index > stable_index:
            self._stable_advanced()
        return True

    def durable_through(self, index: int) -> None:
        """The oldest entry write in progress is durable up to `index`, short of its end (a
        caller that writes a ready's entries in parts, as room allows, and learns of them in
        parts). Every write before it must have been reported with `durable` first.

        Without this a follower whose write cannot land whole until the entries it holds are
        committed (a bounded ring that the applier drains only up to the commit) would wait for
        itself: nothing acknowledged, nothing committed.
        """
        assert self._ready_outstanding is None, "advance() the outstanding ready first"
        durable = self._durable
        stable_index = durable.stable_index
        durable.landed_through(index)
        if durable.stable_index > stable_index:
            self._stable_advanced()

    def _stable_advanced(self) -> None:
        if self._leader is not None:
            self._maybe_commit()
        else:
            self._follower.stable_advanced(self.term)

    def _release_memory(self) -> None:
        """Drop from memory what is applied, durable and past the retention window (a smaller one
        while this node does not lead: `RaftConfig.follower_log_retention_entries`)."""
        config = self.config
        retained = config.log_retention_entries
        if self._leader is None:
            retained = min(retained, config.follower_log_retention_entries)
        floor = min(self.applied_index, self.stable_index) - retained
        if floor - self.log.offset_index >= max(retained, 1):
            self.log.drop_to(floor)
