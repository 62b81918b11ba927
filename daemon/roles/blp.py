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

from daemon.layout import RoleState, egress_name, log_name
from daemon.roles.common import RoleContext, run_role
from daemon.snapshot_writer import fork_and_write_snapshot, reap_snapshot_writer
from ipc.idle import IdleStrategy, idle_strategy
from ipc.ring import Ring, RingWriter
from sequencer import recovery
from sequencer import snapshot as snapshots
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
        counters["errors.snapshot"].add(1)
        counters["errors.total"].add(1)
        log.error("snapshot %s is invalid, using an older one: %s", info.path, info.error)

    last_index = counters["recovery.last.index"].get()
    progress = counters["recovery.records"]

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
    if found is not None:
        log.info("restored snapshot at index %d from %s", found.header.index, found.path)
    progress.set(recovered.replayed)
    assert processor.applied_index == last_index, (processor.applied_index, last_index)
    log.info("recovered to index %d (%d records replayed in %.3f s, restore %.3f s)",
             processor.applied_index, recovered.replayed, recovered.replay_s,
             recovered.restore_s)  # fmt: skip
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
            counters["snapshot.last.index"].set(index)
            counters["snapshot.writes"].add(1)
            log.info("snapshot at index %d written", index)
        else:
            counters["errors.snapshot"].add(1)
            counters["errors.total"].add(1)
            log.error("snapshot writer for index %d failed with exit code %d", index, code)


def run(context: RoleContext) -> int:
    config = context.config
    counters = context.counters
    app_class = load_app(config.node.app)
    log_ring = Ring.attach(log_name(config.node.name), epoch=context.epoch)
    egress_ring = Ring.attach(egress_name(config.node.name), epoch=context.epoch)
    processor = recover(context, app_class)
    reader = log_ring.reader("blp", limit=counters["commit.position"])
    writer = egress_ring.writer()
    sequencer_doorbell = egress_ring.doorbell("sequencer")
    idle = idle_strategy(config.roles.blp.idle, reader.doorbell)
    applied_position = counters["blp.applied.position"]
    applied_index = counters["blp.applied.index"]
    rolling_hash = counters["blp.rolling_hash"]
    clients_expired = counters["clients.expired"]
    outputs_too_large = counters["outputs.too_large"]
    egress_published = counters["egress.published.position"]
    heartbeat = context.heartbeat
    snapshot_writers: dict[int, int] = {}  # pid -> index
    oldest_snapshot = counters["snapshot.oldest.index"]

    def retention() -> None:
        """In the snapshot writer (a child): keep the newest snapshots, and tell the journaller
        which is the oldest kept, so neither the blp nor the journaller reads snapshot files."""
        snapshots.retain(config.snapshot_dir, config.snapshot.keep)
        oldest = snapshots.oldest_valid_index(config.snapshot_dir)
        if oldest:
            oldest_snapshot.set(oldest)
    applied_position_seen = -1

    applied_index.set(processor.applied_index)
    # RUNNING first: the supervisor starts the sequencer, egress's only reader, only now, and the
    # re-armed timers may be more than the egress ring holds.
    if config.snapshot.delete_journal:  # only the journaller's compaction reads it
        oldest_snapshot.set(snapshots.oldest_valid_index(config.snapshot_dir))
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
    sys.exit(run_role("blp", run))
