"""The business-logic processor role: apply committed records to the state machine.

Start-up is recovery: the newest valid snapshot, then the journal after it up to the index the
supervisor found at start (`recovery.last.index`); outputs of the replay are not sent (their
sessions belong to a previous incarnation; clients resend and get the saved replies), except the
pending timers, which are re-armed through egress. Then one duty cycle (`BlpAgent`, driven by
`daemon.agent.AgentRunner`): read the log ring up to the commit position, apply, write the
outputs to the egress ring, publish the applied position. Events are written to egress only while
the sequencer counts a session on this node that subscribed (`gateway.event_subscribers`); they
are hashed either way.

The blp never does I/O on the hot path, never reads the clock and never decides anything the
record does not say. A SNAPSHOT record makes it fork (`snapshot.writer = "fork"`): the child
encodes and writes the state as of that record while the parent goes on (the pause is the fork).
With `snapshot.writer = "replica"` it applies the record and forks nothing: the snapshotter
(daemon/roles/snapshotter.py), a follower of the journal with its own state, writes the file.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from daemon.agent import Agent
from daemon.config import SNAPSHOT_WRITER_FORK
from daemon.exits import ExitCode, FatalError, exit_fatal
from daemon.layout import (
    APP_VERSION_ACTIVE,
    APP_VERSION_RAISES_REFUSED,
    BLP_APPLIED_INDEX,
    BLP_APPLIED_POSITION,
    BLP_ROLLING_HASH,
    CLIENTS_EXPIRED,
    COMMIT_INDEX,
    COMMIT_POSITION,
    EGRESS_PUBLISHED_POSITION,
    ERRORS_SNAPSHOT,
    GATEWAY_EVENT_SUBSCRIBERS,
    OUTPUTS_TOO_LARGE,
    RAFT_COMMIT_INDEX,
    RAFT_COMMIT_POSITION,
    RECOVERY_COMMIT_INDEX,
    RECOVERY_RECORDS,
    ROLE_COUNTERS,
    RULES_VERSION_ACTIVE,
    RULES_VERSION_DUE,
    SNAPSHOT_LAST_INDEX,
    SNAPSHOT_OLDEST_INDEX,
    SNAPSHOT_WRITES,
    CounterView,
    Role,
    RoleState,
    egress_name,
    log_name,
)
from daemon.roles.common import RoleContext, run_agent, run_role
from daemon.snapshot_writer import WRITER_EXIT_OK, fork_and_write_snapshot, reap_snapshot_writer
from ipc.counters import words
from ipc.ring import Ring
from sequencer import recovery
from sequencer import snapshot as snapshots
from sequencer.app_versions import AppVersionError
from sequencer.processor import Processor
from sequencer.rules_versions import RulesVersionError
from sequencer.state_machine import StateMachine, load_app

log = logging.getLogger("seqd.blp")

# Records applied per duty cycle. A cycle's fixed work (poll, the outputs' write and publish,
# the counters, the sequencer's doorbell) is ~30k instructions, about one transfer's, so the
# bound is what amortises it; against that, a batch delays its first reply by its apply time
# (64 transfers ~0.2 ms) and holds at most its outputs when egress is full. 64 takes a cluster's
# Raft commit (~47 records) in one cycle and one node's fdatasync (~80) in two
# (benches.hot_paths --only blp_cycle: 16 -> 64 is -1.2k instructions a transfer on one node,
# -0.9k on a follower; live pairs in benches/RESULTS.md, "The blp's duty cycle"). Earlier, on
# another machine and before the FIFO doorbell, the closed loop's rate chose 16 (62-74k
# transfers/s against 52-63k for 64).
FRAMES_PER_POLL_MAX = 64
RECOVERY_PROGRESS_RECORDS = 4096  # publish replay progress (and a heartbeat) this often


def recover(context: RoleContext, app_class: type[StateMachine]) -> Processor[Any]:
    """Newest valid snapshot, then the journal after it up to the index known committed at start
    (a single node: the journal's last; a cluster: see `recovery.commit.index`)."""
    config = context.config
    counters = context.counters
    context.set_state(RoleState.RECOVERING)
    snapshots.remove_partial(config.snapshot_dir)

    def report(info: snapshots.SnapshotInfo) -> None:
        counters[ERRORS_SNAPSHOT].add(1)
        context.errors.add(1)
        log.error("snapshot %s is invalid, using an older one: %s", info.path, info.error)

    last_index = counters[RECOVERY_COMMIT_INDEX].get()
    progress = counters[RECOVERY_RECORDS]

    def replayed(count: int) -> None:
        if count - progress.get() > RECOVERY_PROGRESS_RECORDS:
            progress.set(count)
            context.heartbeat.add(1)

    found = snapshots.newest_valid_snapshot(config.snapshot_dir, report)
    recovered = recovery.recover(
        app_class, config.journal_dir, found, last_index, node=config.node.name,
        debug=config.node.debug_determinism, client_expiry_ns=config.client_expiry_ns,
        progress=replayed,
    )  # fmt: skip
    processor = recovered.processor
    # Replies go out only for this node's sessions (by the node number in their ids); in a
    # cluster the sequencer of every node also learns of each timer fired (any node may lead).
    processor.emit_for(config.node.number, cluster=config.cluster is not None)
    if found is not None:
        log.info("restored snapshot at index %d from %s", found.header.index, found.path)
    progress.set(recovered.replayed)
    assert processor.applied_index == last_index, (processor.applied_index, last_index)
    log.info("recovered to index %d (%d records replayed in %.3f s, restore %.3f s)",
             processor.applied_index, recovered.replayed, recovered.replay_s,
             recovered.restore_s)  # fmt: skip
    return processor


class BlpAgent(Agent):
    """The blp's duty cycle: apply what the log ring holds up to the commit position, write the
    outputs to egress, publish the applied position.

    One cycle applies at most FRAMES_PER_POLL_MAX records. The reader's limit is the commit
    position, so nothing past it is applied, and outputs (replies) leave only for what is durable.
    The records come as one region of the log ring (`poll_region`, taken to the commit position
    without a walk: it is a frame boundary, a cursor or a record's end) and are walked by offset,
    each handed to the processor as (frame type, region, start, end): no tuple or view per record
    (benches/RESULTS.md, "blpregion"). A frame that runs past the region's end (a limit inside it,
    which no writer of the limit makes) is not applied: the cycle stops before it.
    A cycle never waits for the egress ring: outputs it has no room for are kept (`unwritten`)
    and written first by the next cycles, and no record is applied until they are, so the
    outputs held are at most one batch's.

    Invariants (between cycles): the applied position is published only once every output of the
    records below it is in the egress ring; `unwritten` is empty or the tail of one batch.
    """

    def __init__(
        self,
        processor: Processor[Any],
        log_ring: Ring,
        egress_ring: Ring,
        counters: CounterView,
        *,
        snapshot_dir: Path,
        snapshot_keep: int,
        delete_journal: bool,
        clustered: bool = False,
        fork_snapshots: bool = True,
    ) -> None:
        self.processor = processor
        # False (snapshot.writer = "replica"): the snapshotter writes the files; a SNAPSHOT
        # record changes nothing here but the applied index and the rolling hash, as any record.
        self.fork_snapshots = fork_snapshots
        # A single node applies what its journal made durable; a cluster what Raft committed (a
        # majority durable), which the replicator cuts to what this node holds durably.
        commit_position, commit_index = (
            (RAFT_COMMIT_POSITION, RAFT_COMMIT_INDEX) if clustered else (COMMIT_POSITION, COMMIT_INDEX)
        )
        self.reader = log_ring.reader(Role.BLP, limit=counters[commit_position])
        self.doorbell = self.reader.doorbell
        self.region_bytes_max = log_ring.capacity  # no bound in bytes: FRAMES_PER_POLL_MAX is the bound
        self.writer = egress_ring.writer()
        self.snapshot_dir = snapshot_dir
        self.snapshot_keep = snapshot_keep
        self.delete_journal = delete_journal
        self.counters = counters
        self.applied_index = counters[BLP_APPLIED_INDEX]
        self.oldest_snapshot = counters[SNAPSHOT_OLDEST_INDEX]
        self.snapshot_writers: dict[int, int] = {}  # pid -> index
        self.unwritten: list[tuple[int, bytes]] = []
        self.applied_position_seen = -1
        self.app_version_active = counters[APP_VERSION_ACTIVE]
        self.raises_refused = counters[APP_VERSION_RAISES_REFUSED]
        # The table's versions object is never rebound (restore fills it in place).
        self.versions = processor.app_versions
        self.rules = processor.rules_versions  # never rebound either
        self.rules_active = counters[RULES_VERSION_ACTIVE]
        self.rules_due = counters[RULES_VERSION_DUE]
        # (active, raises_refused, the rules' active and due) last stored
        self.versions_seen = (-1, -1, -1, -1)
        # The counters of every cycle as words of the one counters view: a store is a subscript
        # rather than a method call, ~0.3 us less each (benches/RESULTS.md, "The blp's duty cycle").
        self.values, (
            self.applied_position_word, self.applied_index_word, self.rolling_hash_word,
            self.clients_expired_word, self.outputs_too_large_word, self.egress_published_word,
            self.event_subscribers_word, self.commit_index_word,
        ) = words(*(
            counters[spec] for spec in (
                BLP_APPLIED_POSITION, BLP_APPLIED_INDEX, BLP_ROLLING_HASH, CLIENTS_EXPIRED, OUTPUTS_TOO_LARGE,
                EGRESS_PUBLISHED_POSITION, GATEWAY_EVENT_SUBSCRIBERS, commit_index,  # the last two: loads only
            )
        ))  # fmt: skip

    def on_start(self) -> None:
        processor = self.processor
        self.applied_index.set(processor.applied_index)
        self._publish_versions()
        if self.delete_journal:  # only the journaller's compaction reads it
            self.oldest_snapshot.set(snapshots.oldest_valid_index(self.snapshot_dir))
        # Written by the first cycles, after the runner reports RUNNING: the supervisor starts the
        # sequencer, egress's only reader, only then, and the re-armed timers may be more than the
        # egress ring holds.
        self.unwritten = processor.pending_timers()

    def do_work(self, now_ns: int) -> int:
        """Returns the records applied, or the outputs written while the egress ring was full.
        `now_ns` is unused: the blp never reads the clock (a record's time is its timestamp)."""
        if self.unwritten:
            return self._write_outputs(self.reader.position)
        reader = self.reader
        start, region = reader.poll_region(self.region_bytes_max, limit_on_frames=True, max_frames=FRAMES_PER_POLL_MAX)
        position = start
        applied = 0
        if region:
            processor = self.processor
            values = self.values
            # Read after the records (docs/contracts.md, "Events reach the sessions that
            # subscribed"): a session that subscribed before any of them was sequenced is counted.
            processor.emit_events = values[self.event_subscribers_word] > 0
            apply_frame = processor.apply_frame
            first_index = processor.applied_index
            words = region.cast("Q")  # a region of whole frames is whole 8-byte words
            end = len(region)
            offset = 0
            for _ in range(FRAMES_PER_POLL_MAX):
                if offset >= end:
                    break
                word = words[offset >> 3]  # a frame's header: type << 32 | length
                length = word & 0xFFFF_FFFF
                following = offset + ((length + 7) & -8)
                if following > end:  # cut by a limit inside it (never so, unless a bug): wait
                    break
                apply_frame(word >> 32, region, offset + 8, offset + length)
                offset = following
                if processor.snapshot_requested:
                    if self.fork_snapshots:
                        self._fork_snapshot_writer()
                    else:
                        processor.snapshot_requested = False
            position = start + offset
            reader.release_to(position)
            applied = processor.applied_index - first_index
            # The commit index is stored before the commit position (the reader's limit).
            assert processor.applied_index <= values[self.commit_index_word], processor.applied_index
            versions, rules = self.versions, self.rules
            if (versions.active, versions.raises_refused, rules.active, rules.due) != self.versions_seen:
                self._publish_versions()
        # Published even when only padding was passed (poll_region moved past it), so a drain
        # sees the blp caught up.
        if position != self.applied_position_seen:
            self.unwritten = self.processor.drain_outputs()
            self._write_outputs(position)
        if self.snapshot_writers:
            self._reap_snapshot_writers(block=False)
        return applied

    def _publish_versions(self) -> None:
        """The active app version (the sequencer's gateway limit in a cluster) and refused raises,
        each refusal logged once with its reason (sequencer/app_versions.py); the active session
        rules version, logged when it changes, and the one due (sequencer/rules_versions.py)."""
        versions, rules_active, rules_due = self.versions, self.rules.active, self.rules.due
        if rules_active != self.versions_seen[2]:
            log.info("session rules version %d active (applied up to index %d)", rules_active,
                     self.processor.applied_index)  # fmt: skip
        self.rules_active.set(rules_active)
        self.rules_due.set(rules_due)  # the sequencer asks for it
        self.versions_seen = (versions.active, versions.raises_refused, rules_active, rules_due)
        self.app_version_active.set(versions.active)
        if versions.raises_refused != self.raises_refused.get():
            self.raises_refused.set(versions.raises_refused)
            log.warning("%s", versions.last_refusal)

    def _write_outputs(self, position: int) -> int:
        """Write what is unwritten to egress (a full ring keeps the rest for the next cycle; never
        drops); once all is written, publish the applied `position` (the reader's cursor). Returns
        the outputs written."""
        outputs = self.unwritten
        written = 0
        values = self.values
        if outputs:
            writer = self.writer
            written = writer.try_write_frames(outputs)
            if written:  # the writer's publish rang the sequencer's doorbell
                values[self.egress_published_word] = writer.published_position
            if written < len(outputs):
                self.unwritten = outputs[written:]
                return written
            self.unwritten = []
        processor = self.processor
        self.applied_position_seen = position
        values[self.applied_position_word] = position
        values[self.applied_index_word] = processor.applied_index
        values[self.rolling_hash_word] = processor.rolling_hash & 0x7FFF_FFFF_FFFF_FFFF
        values[self.clients_expired_word] = processor.clients_expired
        values[self.outputs_too_large_word] = processor.replies_too_large + processor.events_too_large
        return written

    def _fork_snapshot_writer(self) -> None:
        processor = self.processor
        processor.snapshot_requested = False
        pid = fork_and_write_snapshot(self.snapshot_dir, processor.snapshot_file_contents, self._retain)
        self.snapshot_writers[pid] = processor.applied_index

    def _retain(self) -> None:
        """In the snapshot writer (a child): keep the newest snapshots, and tell the journaller
        which is the oldest kept, so neither the blp nor the journaller reads snapshot files."""
        oldest = snapshots.retain_oldest(self.snapshot_dir, self.snapshot_keep)
        if oldest:
            self.oldest_snapshot.set(oldest)

    def _reap_snapshot_writers(self, block: bool) -> None:
        """Collect finished snapshot writers; count and report failures (the writer applied retention)."""
        counters = self.counters
        writers = self.snapshot_writers
        for pid, index in list(writers.items()):
            if block:
                _, status = os.waitpid(pid, 0)
                code: int | None = os.waitstatus_to_exitcode(status)
            else:
                code = reap_snapshot_writer(pid)
            if code is None:
                continue
            del writers[pid]
            if code == WRITER_EXIT_OK:
                counters[SNAPSHOT_LAST_INDEX].set(index)
                counters[SNAPSHOT_WRITES].add(1)
                log.info("snapshot at index %d written", index)
            else:
                counters[ERRORS_SNAPSHOT].add(1)
                counters[ROLE_COUNTERS[Role.BLP].errors].add(1)
                log.error("snapshot writer for index %d failed with exit code %d", index, code)

    def on_close(self) -> None:
        self._reap_snapshot_writers(block=True)  # a writer finishes its file; it never runs on


def run(context: RoleContext) -> int:
    config = context.config
    app_class = load_app(config.node.app)
    log_ring = Ring.attach(log_name(config.node.name), epoch=context.epoch)
    egress_ring = Ring.attach(egress_name(config.node.name), epoch=context.epoch)
    try:
        processor = recover(context, app_class)
        agent = BlpAgent(
            processor, log_ring, egress_ring, context.counters,
            snapshot_dir=config.snapshot_dir, snapshot_keep=config.snapshot.keep,
            delete_journal=config.snapshot.delete_journal, clustered=config.cluster is not None,
            fork_snapshots=config.snapshot.writer == SNAPSHOT_WRITER_FORK,
        )  # fmt: skip
        try:
            run_agent(context, agent)
        except (AppVersionError, RulesVersionError) as error:  # not a crash to restart from: it would meet it again
            exit_fatal(FatalError(ExitCode.DATAERR, str(error)), log)
    finally:
        log_ring.close()
        egress_ring.close()
    log.info("stopped at index %d, rolling hash %016x", processor.applied_index, processor.rolling_hash)
    return 0


if __name__ == "__main__":
    sys.exit(run_role(Role.BLP, run))
