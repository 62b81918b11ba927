"""The journaller role: copy log records from the ring into the journal, fsync in groups.

One duty cycle (`JournallerAgent`, an Agrona-style agent driven by `daemon.agent.AgentRunner`):
take every whole record the ring holds (bounded by `journal.batch_bytes_max`), append them to the
journal as they are, make them durable with one fdatasync, and then publish the new durable
position and index. On a single node the durable position is the commit position, so the blp may
apply up to it and replies may leave.

Group commit falls out of the cycle: while one fdatasync runs, the sequencer keeps publishing, and
the next cycle takes everything that arrived. At ~150 us per fdatasync and 500k records/s a pass
covers ~75 records; under light load each record gets its own fsync and the lowest latency.

Cluster mode (docs/cluster.md): the replicator writes the log ring, and the commit is its
(`raft.commit.*`), so the journaller publishes only `journal.durable.*` and rings the replicator's
doorbell after each fdatasync (the replicator reports durable entries to Raft). At start the
replicator writes the journal's own uncommitted tail into the ring again (the blp replays the
journal only up to the commit); those records are already here, so the journaller skips records
at or below its last index (`_skip_journaled`).

A failed fdatasync is never retried (fsyncgate): the role exits with ROLE_EXIT_FAIL_STOP and the
supervisor restarts the node from the journal.

A full disk is a state, not a failure (`DiskWatch`). After each append the journal reserves room
for the next segment ahead of need; when it cannot, the journaller publishes
`journal.disk_full` = SHORT and the sequencer refuses new commands and sessions (`disk_full`)
while half a segment of room is left for what the ring already holds. If a batch does not fit
even so (FULL), nothing of it is written: the region stays in the ring, unreleased and
unacknowledged, and is appended again every DISK_RETRY_S. Both states end by themselves once
space is freed; the role never exits for them.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import time
from pathlib import Path

from daemon.agent import Agent
from daemon.config import SNAPSHOT_WRITER_REPLICA
from daemon.fault_hooks import SyncedIndexFile, install_fsync_delay
from daemon.layout import (
    COMMIT_INDEX,
    COMMIT_POSITION,
    ERRORS_JOURNAL,
    JOURNAL_DISK_FULL,
    JOURNAL_DURABLE_INDEX,
    JOURNAL_DURABLE_POSITION,
    JOURNAL_FREE_BYTES,
    JOURNAL_SYNCS,
    LOG_PUBLISHED_POSITION,
    RAFT_RETAIN_INDEX,
    SNAPSHOT_OLDEST_INDEX,
    SNAPSHOTTER_COUNTERS,
    CounterView,
    DiskState,
    Role,
    log_name,
    proposal_name,
)
from daemon.roles.common import ROLE_EXIT_FAIL_STOP, RoleContext, run_agent, run_role
from ipc.counters import Counter, words
from ipc.doorbell import Doorbell
from ipc.ring import Ring
from sequencer import snapshot as snapshots
from sequencer.journal import Journal, JournalError, JournalFullError
from sequencer.record import RECORD_KEY, aligned

log = logging.getLogger("seqd.journaller")

REGIONS_PER_SYNC_MAX = 2  # a batch may straddle the ring's wrap: at most two regions
FAULT_FDATASYNC_ENV = "SEQD_FAULT_FDATASYNC"
SYNC_SLOW_S = 0.05  # an fdatasync slower than this is logged: replies wait for it
# While the disk is short, how often room is sought again (and a batch that did not fit is
# appended again): the node resumes at most this long after space is freed. A failed attempt
# costs a statvfs, so ten a second are nothing.
DISK_RETRY_S = 0.1
FREE_BYTES_REPORT_S = 1.0  # journal.free_bytes is refreshed this often
# How often an idle journaller looks whether the oldest kept snapshot or the replicator's hold
# moved (segments to delete); a cycle that synced looks every time. Deleting segments is never
# urgent, and two counter loads a cycle are ~0.5 us of a step's ~15 us of Python.
COMPACTION_LOOK_S = 0.1


class DiskWatch:
    """Publishes whether the journal has room ahead (`journal.disk_full`, a DiskState) and logs
    each change of it once. The journaller is the only writer of both counters."""

    def __init__(self, journal: Journal, state: Counter, free_bytes: Counter) -> None:
        self.journal = journal
        self.state_counter = state
        self.free_counter = free_bytes
        self.state = DiskState.ROOM
        self.retry_at_s = 0.0
        self.report_at_s = 0.0

    def due(self, now_s: float) -> bool:
        """True when short of space and it is time to look again."""
        return self.state != DiskState.ROOM and now_s >= self.retry_at_s

    def check(self, now_s: float) -> None:
        """Reserve room ahead (after appends, or when due) and publish the outcome."""
        shortage = self.journal.reserve_space()
        if shortage is None:
            if self.state != DiskState.ROOM:  # the usual outcome, after every append: no call
                self._set(now_s, DiskState.ROOM, "")
            return
        self._set(now_s, DiskState.SHORT, str(shortage))

    def full(self, now_s: float, error: JournalFullError) -> None:
        """A batch did not fit: it waits in the ring until the next attempt."""
        self._set(now_s, DiskState.FULL, str(error))

    def report(self, now_s: float) -> None:
        if now_s >= self.report_at_s:
            self.free_counter.set(self.journal.free_bytes())
            self.report_at_s = now_s + FREE_BYTES_REPORT_S

    def _set(self, now_s: float, state: DiskState, reason: str) -> None:
        if state != DiskState.ROOM:
            self.retry_at_s = now_s + DISK_RETRY_S
        if state == self.state:
            return
        self.report_at_s = 0.0
        self.report(now_s)
        if state == DiskState.ROOM:
            log.warning("disk space is back (%d bytes free): the node takes new commands again",
                        self.free_counter.get())
        elif state == DiskState.SHORT:
            log.error("disk short of space: %s The node refuses new commands and sessions "
                      "(disk_full) and keeps serving what is committed.", reason)
        else:
            log.error("disk full: a batch does not fit, so it waits in the log ring, never "
                      "acknowledged, and is written once there is room: %s", reason)
        self.state = state
        self.state_counter.set(int(state))


def compact(journal: Journal, snapshot_dir: Path) -> list[Path]:
    """Delete the journal segments wholly covered by the oldest retained valid snapshot
    (`snapshot.oldest_valid_index` says why the oldest)."""
    oldest = snapshots.oldest_valid_index(snapshot_dir)
    if not oldest:
        return []
    return journal.delete_segments_before(oldest + 1)


def _inject_fdatasync_failure() -> None:
    """Fault injection for tests: `SEQD_FAULT_FDATASYNC=N:PATH` makes the N+1-th fdatasync of
    this process fail with EIO, as a dying disk's would, once: only while PATH exists, which the
    failure removes (so the restarted journaller runs clean)."""
    setting = os.environ.get(FAULT_FDATASYNC_ENV)
    if not setting:
        return
    count, _, flag = setting.partition(":")
    remaining = int(count)
    real = os.fdatasync

    def failing(fd: int) -> None:
        nonlocal remaining
        if remaining == 0 and os.path.exists(flag):
            os.unlink(flag)
            raise OSError(errno.EIO, "injected fdatasync failure")
        remaining -= 1
        real(fd)

    os.fdatasync = failing  # type: ignore[assignment]


class JournallerAgent(Agent):
    """The journaller's duty cycle: append what the log ring holds, fdatasync, publish durable.

    One cycle takes at most `batch_bytes_max` bytes in at most REGIONS_PER_SYNC_MAX regions, so
    the durable position moves at least once per that many bytes however fast the sequencer
    publishes. Everything it owes the node is published only after the fdatasync that covers it.

    Invariant (between cycles): durable position <= the reader's position <= published position;
    `waiting` is a region the disk had no room for, still held in the ring (unreleased).
    """

    def __init__(
        self,
        ring: Ring,
        journal: Journal,
        counters: CounterView,
        *,
        batch_bytes_max: int,
        delete_journal: bool,
        replicator_doorbell: Doorbell | None = None,
        snapshotter: bool = False,
    ) -> None:
        self.journal = journal
        self.ring = ring
        # Cluster mode: the replicator writes the ring, and waits on this for durable entries.
        self.clustered = replicator_doorbell is not None
        self.replicator_doorbell = replicator_doorbell
        self.reader = ring.reader(Role.JOURNALLER)
        self.doorbell = self.reader.doorbell
        self.blp_doorbell = ring.doorbell(Role.BLP)
        self.batch_bytes_max = batch_bytes_max
        self.delete_journal = delete_journal
        self.durable_position = counters[JOURNAL_DURABLE_POSITION]
        self.durable_index = counters[JOURNAL_DURABLE_INDEX]
        # The counters every sync stores, as words of the one counters view: a subscript rather
        # than a method call each (as the blp's, `BlpAgent.values`).
        self.values, (self.durable_position_word, self.durable_index_word, self.syncs_word) = words(
            self.durable_position, self.durable_index, counters[JOURNAL_SYNCS])  # fmt: skip
        self.commit_position = counters[COMMIT_POSITION]
        self.commit_index = counters[COMMIT_INDEX]
        self.synced_index_file = SyncedIndexFile.from_environment()  # a fault hook: None in use
        self.published_position = counters[LOG_PUBLISHED_POSITION]
        # The oldest snapshot kept, from whichever process writes them (snapshot.writer): the
        # blp's fork, or the snapshotter.
        self.oldest_snapshot = counters[SNAPSHOTTER_COUNTERS.oldest_index if snapshotter else SNAPSHOT_OLDEST_INDEX]
        self.oldest_snapshot_seen = 0
        # Cluster mode: the leader's replicator holds the records a follower catching up after a
        # snapshot still needs (0: no hold; always 0 on a single node).
        self.retain_index = counters[RAFT_RETAIN_INDEX]
        self.retain_seen = 0
        self.compaction_look_at_s = 0.0
        self.disk = DiskWatch(journal, counters[JOURNAL_DISK_FULL], counters[JOURNAL_FREE_BYTES])
        # A region the disk had no room for. poll_region would release it (the ring could then reuse
        # its bytes), so it is kept, unreleased, and appended again before anything else.
        self.waiting: memoryview | None = None
        self.appended = 0  # bytes appended by the last cycle

    def on_start(self) -> None:
        journal = self.journal
        self.durable_index.set(journal.last_index)
        if not self.clustered:
            self.commit_index.set(journal.last_index)
        self.disk.check(time.monotonic())  # a node restarted on a full disk refuses new work from the start
        log.info("journal open at index %d in %s", journal.last_index, journal.directory)

    def do_work(self, now_ns: int) -> int:
        """Returns the bytes appended and made durable (0: nothing, or the disk is full)."""
        now_s = now_ns / 1e9
        disk = self.disk
        due = disk.due(now_s)
        appended = self._append(now_s) if self.waiting is None or due else 0
        if self.waiting is None and (appended or due):
            disk.check(now_s)
        if now_s >= disk.report_at_s:
            disk.report(now_s)
        if appended:
            self._sync(appended)
        if self.delete_journal and (appended or now_s >= self.compaction_look_at_s):
            self.compaction_look_at_s = now_s + COMPACTION_LOOK_S
            if (
                self.oldest_snapshot.get() != self.oldest_snapshot_seen
                or self.retain_index.get() != self.retain_seen
            ):
                self._delete_covered_segments()
        self.appended = appended
        return appended

    def _append(self, now_s: float) -> int:
        """Append whole ring regions (the waiting one first), at most `batch_bytes_max` bytes."""
        journal = self.journal
        reader = self.reader
        appended = 0
        for _ in range(REGIONS_PER_SYNC_MAX):
            region = self.waiting
            if region is None:
                # The second poll finds what lies past the wrap, and what was published while
                # the first region was appended: it joins this fdatasync. Stopping after one
                # region unless it ended at the wrap saved ~3 us of a poll a sync but cost 7%
                # more fdatasyncs on one node (benches/RESULTS.md, "wakes (loaded)"). A poll
                # that finds nothing returns after the cursor loads (`poll_region`).
                _start, region = reader.poll_region(self.batch_bytes_max - appended)
                if not region:
                    break
                if self.clustered:
                    region = self._skip_journaled(region)
                    if not region:
                        reader.release()
                        continue
            last_index = journal.last_index
            try:
                journal.append(region)
            except JournalFullError as error:
                # batch_bytes_max <= segment_bytes / 2 (config): never cut, nothing written.
                assert journal.last_index == last_index, (journal.last_index, last_index)
                self.waiting = region
                self.disk.full(now_s, error)
                break
            self.waiting = None
            appended += len(region)
            reader.release()
        return appended

    def _sync(self, appended: int) -> None:
        """One fdatasync for everything appended, then publish it as durable (and committed)."""
        sync_started = time.monotonic()
        last_index = self.journal.sync()
        sync_s = time.monotonic() - sync_started
        if sync_s > SYNC_SLOW_S:
            log.warning("fdatasync took %.0f ms (%d bytes appended): the disk is slow; every "
                        "reply waits for it", sync_s * 1000, appended)
        if self.synced_index_file is not None:
            self._note_synced()
        position = self.reader.position
        values = self.values
        values[self.durable_position_word] = position
        values[self.durable_index_word] = last_index
        values[self.syncs_word] += 1
        if self.replicator_doorbell is not None:
            self.replicator_doorbell.ring()  # the replicator tells Raft, which decides the commit
            return
        # Single node: durable is committed. The index is stored before the position so a reader
        # that sees the position also sees an index at least as new.
        self.commit_index.set(last_index)
        self.commit_position.set(position)
        self.blp_doorbell.ring()

    def _note_synced(self) -> None:
        # A fault hook (SEQD_FAULT_SYNCED_INDEX): what the fdatasyncs have covered, written
        # before it is published, so a simulated power cut never drops what a peer relied on.
        assert self.synced_index_file is not None
        self.synced_index_file.write(self.journal.durable_index)

    def _skip_journaled(self, region: memoryview) -> memoryview:
        """Cluster mode: the region without its leading records at or below the journal's last
        index (the uncommitted tail the replicator wrote into the ring again at start)."""
        last_index = self.journal.last_index
        offset = 0
        size = len(region)
        while offset < size:
            length, _type, index, _term = RECORD_KEY.unpack_from(region, offset)
            if index > last_index:
                break
            offset += aligned(length)
        return region[offset:] if offset else region

    def _delete_covered_segments(self) -> None:
        # The snapshot writer publishes the oldest kept snapshot; no file reads here.
        self.oldest_snapshot_seen = self.oldest_snapshot.get()
        self.retain_seen = self.retain_index.get()
        before = self.oldest_snapshot_seen + 1
        if self.retain_seen:
            before = min(before, self.retain_seen)
        for path in self.journal.delete_segments_before(before):
            log.info("deleted %s: wholly before the oldest retained snapshot", path.name)

    def drained(self) -> bool:
        """The supervisor stops the journaller only after the sequencer has exited, so what is
        published now is everything there will be: stop once it is all durable, or once the disk
        has no room for it (it was never acknowledged)."""
        if self.appended:
            return False
        # In a cluster the replicator writes the ring; it stops before the journaller does.
        published = self.ring.published_position if self.clustered else self.published_position.get()
        if self.reader.position >= published:
            return True
        if self.waiting is not None:
            log.warning("stopping with records after index %d not journaled: the disk is full "
                        "(they were never acknowledged; clients resend them)", self.journal.last_index)
            return True
        return False


def run(context: RoleContext) -> int:
    config = context.config
    _inject_fdatasync_failure()
    install_fsync_delay()
    counters = context.counters
    ring = Ring.attach(log_name(config.node.name), epoch=context.epoch)
    journal = Journal.open(
        config.journal_dir, segment_bytes=config.journal.segment_bytes, preallocate=config.journal.preallocate
    )
    proposal_ring = None
    if config.cluster is not None:
        proposal_ring = Ring.attach(proposal_name(config.node.name), epoch=context.epoch)
    try:
        agent = JournallerAgent(
            ring, journal, counters,
            batch_bytes_max=config.journal.batch_bytes_max,
            delete_journal=config.snapshot.delete_journal,
            replicator_doorbell=None if proposal_ring is None else proposal_ring.doorbell(Role.REPLICATOR),
            snapshotter=config.snapshot.writer == SNAPSHOT_WRITER_REPLICA,
        )  # fmt: skip
        run_agent(context, agent)
    except JournalError as error:
        counters[ERRORS_JOURNAL].add(1)
        context.errors.add(1)
        log.critical("journal failed, stopping the node (fail-stop, never retried): %s", error)
        return ROLE_EXIT_FAIL_STOP
    finally:
        journal.close()
        ring.close()
        if proposal_ring is not None:
            proposal_ring.close()
    log.info("drained at index %d", counters[JOURNAL_DURABLE_INDEX].get())
    return 0


if __name__ == "__main__":
    sys.exit(run_role(Role.JOURNALLER, run))
