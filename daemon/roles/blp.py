"""The business-logic processor role: apply committed records to the state machine.

Start-up is recovery: the newest valid snapshot, then the journal after it up to the index the
supervisor found at start (`recovery.last.index`); outputs of the replay are not sent (their
sessions belong to a previous incarnation; clients resend and get the saved replies), except the
pending timers, which are re-armed through egress. Then one loop: read the log ring up to the
commit position, apply, write the outputs to the egress ring, publish the applied position.

The blp never does I/O on the hot path, never reads the clock and never decides anything the
record does not say. A SNAPSHOT record makes it fork: the child encodes and writes the state as
of that record while the parent goes on (the pause is the fork).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from daemon.layout import (
    BLP_APPLIED_INDEX,
    BLP_APPLIED_POSITION,
    BLP_ROLLING_HASH,
    CLIENTS_EXPIRED,
    COMMIT_POSITION,
    EGRESS_PUBLISHED_POSITION,
    ERRORS_SNAPSHOT,
    OUTPUTS_TOO_LARGE,
    RECOVERY_LAST_INDEX,
    RECOVERY_RECORDS,
    SNAPSHOT_LAST_INDEX,
    SNAPSHOT_OLDEST_INDEX,
    SNAPSHOT_WRITES,
    Role,
    RoleState,
    egress_name,
    log_name,
)
from daemon.roles.common import RoleContext, run_role
from daemon.snapshot_writer import fork_and_write_snapshot, reap_snapshot_writer
from ipc.idle import IdleStrategy, idle_strategy
from ipc.ring import Ring, RingWriter
from sequencer import snapshot as snapshots
from sequencer.journal import read_runs
from sequencer.processor import Processor
from sequencer.state_machine import StateMachine, load_app

log = logging.getLogger("seqd.blp")

# Bound a batch so the applied position and replies move steadily: a small batch lets the
# sequencer reply to the first records (on the other core) while the blp applies the rest.
# Measured on 2 cores, 4 clients x 64 in flight (closed loop, 3 runs each): 16 gave 62-74k
# transfers/s, 64 gave 52-63k, 256 gave 51-65k.
FRAMES_PER_POLL_MAX = 16
RECOVERY_PROGRESS_RECORDS = 4096  # publish replay progress (and a heartbeat) this often


def recover(context: RoleContext, app_class: type[StateMachine]) -> Processor[Any]:
    """Newest valid snapshot, then the journal after it up to the index found at start."""
    config = context.config
    counters = context.counters
    context.set_state(RoleState.RECOVERING)
    snapshots.remove_partial(config.snapshot_dir)

    def report(info: snapshots.SnapshotInfo) -> None:
        counters[ERRORS_SNAPSHOT].add(1)
        context.errors.add(1)
        log.error("snapshot %s is invalid, using an older one: %s", info.path, info.error)

    found = snapshots.newest_valid_snapshot(config.snapshot_dir, report)
    processor: Processor[Any]
    if found is not None:
        processor = Processor.restore(
            app_class, found.body, node=config.node.name, debug=config.node.debug_determinism,
            client_expiry_ns=config.client_expiry_ns,
        )
        log.info("restored snapshot at index %d from %s", processor.applied_index, found.path)
    else:
        processor = Processor(
            app_class, node=config.node.name, debug=config.node.debug_determinism,
            client_expiry_ns=config.client_expiry_ns,
        )
    last_index = counters[RECOVERY_LAST_INDEX].get()
    progress = counters[RECOVERY_RECORDS]
    replayed = 0
    if last_index > processor.applied_index:
        for run in read_runs(config.journal_dir, processor.applied_index + 1, last_index):
            replayed += processor.replay_run(run)
            if replayed - progress.get() > RECOVERY_PROGRESS_RECORDS:
                progress.set(replayed)
                context.heartbeat.add(1)
    # A SNAPSHOT record met during replay was taken before the crash, or is lost with the
    # crash; either way the next one will come: a replay writes none (replay_run clears it).
    progress.set(replayed)
    assert processor.applied_index == last_index, (processor.applied_index, last_index)
    log.info("recovered to index %d (%d records replayed)", processor.applied_index, replayed)
    return processor


def write_all(writer: RingWriter, outputs: list[tuple[int, bytes]], context: RoleContext, idle: IdleStrategy) -> None:
    """Write every output to egress; a full egress ring waits for the sequencer (never drops)."""
    start = 0
    while start < len(outputs):
        written = writer.try_write_frames(outputs[start:] if start else outputs)
        start += written
        if written == 0:
            if context.stop_requested:
                return
            idle.idle(0)


def reap_snapshot_writers(context: RoleContext, writers: dict[int, int], block: bool) -> None:
    """Collect finished snapshot writers; count and report failures (the writer applied retention)."""
    counters = context.counters
    for pid, index in list(writers.items()):
        if block:
            _, status = os.waitpid(pid, 0)
            code: int | None = os.waitstatus_to_exitcode(status)
        else:
            code = reap_snapshot_writer(pid)
        if code is None:
            continue
        del writers[pid]
        if code == 0:
            counters[SNAPSHOT_LAST_INDEX].set(index)
            counters[SNAPSHOT_WRITES].add(1)
            log.info("snapshot at index %d written", index)
        else:
            counters[ERRORS_SNAPSHOT].add(1)
            context.errors.add(1)
            log.error("snapshot writer for index %d failed with exit code %d", index, code)


def run(context: RoleContext) -> int:
    config = context.config
    counters = context.counters
    app_class = load_app(config.node.app)
    log_ring = Ring.attach(log_name(config.node.name), epoch=context.epoch)
    egress_ring = Ring.attach(egress_name(config.node.name), epoch=context.epoch)
    processor = recover(context, app_class)
    reader = log_ring.reader("blp", limit=counters[COMMIT_POSITION])
    writer = egress_ring.writer()
    sequencer_doorbell = egress_ring.doorbell("sequencer")
    idle = idle_strategy(context.role_config.idle, reader.doorbell)
    applied_position = counters[BLP_APPLIED_POSITION]
    applied_index = counters[BLP_APPLIED_INDEX]
    rolling_hash = counters[BLP_ROLLING_HASH]
    clients_expired = counters[CLIENTS_EXPIRED]
    outputs_too_large = counters[OUTPUTS_TOO_LARGE]
    egress_published = counters[EGRESS_PUBLISHED_POSITION]
    heartbeat = context.heartbeat
    snapshot_writers: dict[int, int] = {}  # pid -> index
    oldest_snapshot = counters[SNAPSHOT_OLDEST_INDEX]

    def retention() -> None:
        """In the snapshot writer (a child): keep the newest snapshots, and tell the journaller
        which is the oldest kept, so neither the blp nor the journaller reads snapshot files."""
        snapshots.retain(config.snapshot_dir, config.snapshot.keep)
        kept = [info.index for info in snapshots.list_snapshots(config.snapshot_dir) if info.valid]
        if kept:
            oldest_snapshot.set(min(kept))
    applied_position_seen = -1

    applied_index.set(processor.applied_index)
    # RUNNING first: the supervisor starts the sequencer, egress's only reader, only now, and the
    # re-armed timers may be more than the egress ring holds.
    if config.snapshot.delete_journal:  # only the journaller's compaction reads it
        initial = [info.index for info in snapshots.list_snapshots(config.snapshot_dir) if info.valid]
        oldest_snapshot.set(min(initial) if initial else 0)
    context.set_state(RoleState.RUNNING)
    write_all(writer, processor.pending_timers(), context, idle)
    egress_published.set(writer.published_position)
    beats = 0
    while not context.stop_requested:
        frames = reader.poll(FRAMES_PER_POLL_MAX)
        for kind, view in frames:
            processor.apply_frame(kind, view)
            if processor.snapshot_requested:
                processor.snapshot_requested = False
                pid = fork_and_write_snapshot(
                    config.snapshot_dir, processor.snapshot_file_contents, retention
                )
                snapshot_writers[pid] = processor.applied_index
        reader.release()  # also moves past a padding frame that poll skipped without returning
        if frames or reader.position != applied_position_seen:
            outputs = processor.drain_outputs()
            if outputs:
                write_all(writer, outputs, context, idle)
                egress_published.set(writer.published_position)
                sequencer_doorbell.ring()
            # Published even when only padding was passed, so a drain sees the blp caught up.
            applied_position_seen = reader.position
            applied_position.set(applied_position_seen)
            applied_index.set(processor.applied_index)
            rolling_hash.set(processor.rolling_hash & 0x7FFF_FFFF_FFFF_FFFF)
            clients_expired.set(processor.clients_expired)
            outputs_too_large.set(processor.replies_too_large + processor.events_too_large)
        if snapshot_writers:
            reap_snapshot_writers(context, snapshot_writers, block=False)
        beats += 1
        heartbeat.set(beats)
        idle.idle(len(frames))
    reap_snapshot_writers(context, snapshot_writers, block=True)
    context.set_state(RoleState.DRAINED)
    log.info("stopped at index %d, rolling hash %016x", processor.applied_index, processor.rolling_hash)
    log_ring.close()
    egress_ring.close()
    return 0


if __name__ == "__main__":
    sys.exit(run_role(Role.BLP, run))
