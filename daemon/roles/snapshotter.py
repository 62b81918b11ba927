"""The snapshotter (`snapshot.writer = "replica"`): writes the node's snapshot files from a copy
of the state of its own, so the blp never pauses for a snapshot (as LMAX's replicas did).

Theory of operation
-------------------

With `snapshot.writer = "fork"` the blp forks at each SNAPSHOT record and the child writes the
state; the blp pauses for the fork, which copies the page tables of its whole heap (~6 ms at 1M
accounts, growing with the state: benches/RESULTS.md). With "replica" the blp applies a SNAPSHOT
record like any other (its rolling hash and applied index move the same) and forks nothing; this
process writes the file instead. It is a follower of the committed journal
(`sequencer.follow.LogFollower`, the query replicas' code, which applies with the blp's
`Processor`): records are applied in log order up to the node's commit index, and right after a
SNAPSHOT record, before the next one, the state is the state of that index on every replica, so
the file it writes (encoded in-process, then `write_snapshot`: tmp, fsync, rename, directory
fsync) is the file the blp's fork would have written, byte for byte. It then applies retention
(`snapshot.keep`) and publishes the oldest snapshot kept, the journaller's cue to delete the
segments the kept snapshots cover. While it encodes it falls behind the commit index, and
catches up after: it is not on any path a client waits for.

Start: the newest valid snapshot, then the journal after it with snapshots written, so a
SNAPSHOT record whose file a crash lost (a kill -9 mid-write leaves only a `*.tmp`, removed
here first) is written on the restart. Only one process writes snapshot files in this mode
(the blp writes none), so removing leftovers here cannot race a writer. The journal the
snapshotter needs is never deleted: compaction keeps every record after the oldest valid
snapshot in the directory, and the snapshotter starts from the newest.

The supervisor runs it like a query replica (`daemon.replicas`): started once the pipeline
runs, restarted alone after a backoff if it dies, stopped with the incarnation; never waited for.

Scheduling: it is background work, so it runs at `SCHED_IDLE` (`run_at_idle_priority`, set by
the process itself before anything else: no privilege needed on Linux; where it is refused,
nice 19 with a warning). A CPU that has a pipeline role (or anything else at normal priority) to
run runs that first, and a task woken on a CPU that is running only idle-policy work takes it at
once, so the snapshotter's second apply and its encode, write and fsync of the whole state never
delay a role that wakes (the sequencer, the journaller, a parked blp). What SCHED_IDLE cannot
stop: a busy role that stays runnable is never woken, and the scheduler still gives an idle-policy
task on its CPU a tiny share (weight 3 against 1024), a stretch at a time that lasts up to the
next tick (4 ms at HZ=250): a gap in the blp's loop (benches/RESULTS.md, "the snapshotter at
SCHED_IDLE"). So when the blp is pinned (`roles.blp.cpu`) the snapshotter keeps off that CPU
(`keep_off_the_blps_cpu`): a pinned blp never shares its CPU with it. The price: when the
machine has no idle CPU time it gets only a sliver of a CPU (SCHED_IDLE's weight is 3 against
1024 for a nice-0 task), so under a sustained load that keeps every core busy its lag
(`seqd status`: applied index against the commit index) grows without bound until the load
drops, and the snapshots, and with them the journaller's deletion of covered segments, come
late: the journal on disk grows, recovery after a crash replays a longer tail; nothing is wrong
and its memory does not grow (it reads the journal from the files, its state is one copy). Its
I/O keeps the default priority: with the disk's mq-deadline scheduler only the idle class would
differ, and an idle-class write of the snapshot can hold the journaller's fdatasync behind it
through the filesystem's journal (ext4 ordered mode commits the data it covers).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any, Final

from daemon.config import Config
from daemon.fault_hooks import snapshot_hold
from daemon.layout import (
    SNAPSHOTTER,
    SNAPSHOTTER_COUNTERS,
    CounterView,
    Role,
    attach_counters,
    commit_index_counter,
)
from daemon.parent_death import EXIT_ORPHANED, die_with_parent
from daemon.roles.common import EPOCH_ENV, SUPERVISOR_PID_ENV
from ipc.counters import Counter
from ipc.segment import SegmentError
from sequencer import snapshot as snapshots
from sequencer.follow import LogFollower, start_follower
from sequencer.processor import Processor
from sequencer.state_machine import load_app

__all__ = ["RECORDS_PER_TURN_MAX", "Snapshotter", "keep_off_the_blps_cpu", "main", "run_at_idle_priority"]

log = logging.getLogger("seqd.snapshotter")

# Records applied between two looks at the stop flag and the heartbeat: ~10 ms of a ledger.
RECORDS_PER_TURN_MAX: Final = 4096
HEARTBEAT_INTERVAL_S: Final = 0.1
# Where SCHED_IDLE is refused: the lowest priority a process may give itself.
NICE_FALLBACK: Final = 19


def keep_off_the_blps_cpu(blp_cpu: int) -> list[int]:
    """Restricts this process to every CPU it may use but `blp_cpu`, the blp's (-1: not pinned),
    when another CPU is left; returns the CPUs it now runs on (unchanged otherwise)."""
    from ipc.affinity import available_cpus, pin

    allowed = available_cpus()
    others = [cpu for cpu in allowed if cpu != blp_cpu]
    if blp_cpu >= 0 and others and others != allowed:
        pin(others)
        return others
    return allowed


def run_at_idle_priority() -> str:
    """Puts the calling process (all of it: it must not have started threads) at SCHED_IDLE, or,
    where that is refused or missing, at nice NICE_FALLBACK with a warning. Returns what it did."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        return "SCHED_IDLE"
    except (AttributeError, OSError) as error:  # not Linux, or a sandbox's seccomp policy
        os.nice(NICE_FALLBACK - os.nice(0))
        log.warning("SCHED_IDLE refused (%s): running at nice %d instead, so the snapshotter's encode and "
                    "write may still take CPU time from the pipeline's roles", error, NICE_FALLBACK)  # fmt: skip
        return f"nice {NICE_FALLBACK}"


class Snapshotter:
    """A follower of the committed journal that writes a snapshot at each SNAPSHOT record.

    Invariant: `follower.applied_index <= commit.get()`, and every SNAPSHOT record at or below
    it after the start's snapshot has its file written (or its failure counted).
    """

    def __init__(
        self,
        follower: LogFollower,
        config: Config,
        commit: Counter,
        view: CounterView,
        hold: Callable[[int], None] | None = None,
    ) -> None:
        self.follower = follower
        self.snapshot_dir = config.snapshot_dir
        self.keep = config.snapshot.keep
        self.poll_s = config.replicas.poll_ms / 1000
        self.commit = commit
        self.hold = hold  # the SEQD_FAULT_SNAPSHOT_HOLD hook (tests): None in use
        block = SNAPSHOTTER_COUNTERS
        self.stop = view[block.stop]
        self.heartbeat = view[block.heartbeat]
        self.applied_index = view[block.applied_index]
        self.snapshot_index = view[block.snapshot_index]
        self.oldest_index = view[block.oldest_index]
        self.writes = view[block.writes]
        self.errors = view[block.errors]

    def write(self, processor: Processor[Any]) -> None:
        """The state right after a SNAPSHOT record, to its file; then retention. A failed write
        is counted and reported: the next SNAPSHOT record tries again with a new file."""
        index = processor.applied_index
        started_s = time.monotonic()
        try:
            header, body = processor.snapshot_file_contents()
            snapshots.write_snapshot(self.snapshot_dir, header, body, self.hold)
            self.oldest_index.set(snapshots.retain_oldest(self.snapshot_dir, self.keep))
        except OSError as error:
            self.errors.add(1)
            log.error("snapshot at index %d not written (%s); the next SNAPSHOT record tries again. "
                      "Check the snapshot directory %s (space, permissions)", index, error, self.snapshot_dir)  # fmt: skip
            return
        except Exception:  # the app's snapshot() failed: as a forked writer's failure, not a crash loop
            self.errors.add(1)
            log.exception("snapshot at index %d not written: encoding the state failed (a bug in the "
                          "app's snapshot()?); the next SNAPSHOT record tries again", index)  # fmt: skip
            return
        self.snapshot_index.set(index)
        self.writes.add(1)
        log.info("snapshot at index %d written (%d bytes, %.3f s)", index, len(body), time.monotonic() - started_s)

    def run(self) -> None:
        """Follow the commit index until the supervisor sets the stop counter."""
        follower = self.follower
        self.applied_index.set(follower.applied_index)
        self.oldest_index.set(snapshots.oldest_valid_index(self.snapshot_dir))
        next_beat = 0.0
        while not self.stop.get():
            now = time.monotonic()
            if now >= next_beat:
                self.heartbeat.add(1)
                next_beat = now + HEARTBEAT_INTERVAL_S
            applied = follower.advance(self.commit.get(), RECORDS_PER_TURN_MAX, self.write)
            self.applied_index.set(follower.applied_index)
            if not applied:
                time.sleep(self.poll_s)


def start(config: Config) -> LogFollower:
    """The newest valid snapshot (none: an empty state, the journal from record 1), nothing
    replayed: the records after it are applied with their snapshots written."""
    snapshots.remove_partial(config.snapshot_dir)
    found = snapshots.newest_valid_snapshot(config.snapshot_dir)
    index = found.header.index if found is not None else 0
    follower = start_follower(load_app(config.node.app), config.journal_dir, config.snapshot_dir, index + 1,
                              client_expiry_ns=config.client_expiry_ns)  # fmt: skip
    log.info("starting at index %d (%s)", follower.applied_index,
             f"snapshot {found.path}" if found is not None else "no snapshot: the journal from record 1")  # fmt: skip
    return follower


def main() -> int:
    """Started by the supervisor (`daemon.replicas`) when `snapshot.writer = "replica"`."""
    logging.basicConfig(
        level=os.environ.get("SEQD_LOG_LEVEL", "INFO"),
        format="%(asctime)s seqd[snapshotter:%(process)d] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    if SUPERVISOR_PID_ENV not in os.environ:
        raise SystemExit('daemon.roles.snapshotter is started by `seqd run` (snapshot.writer = "replica")')
    supervisor_pid, epoch = int(os.environ[SUPERVISOR_PID_ENV]), int(os.environ[EPOCH_ENV])
    if not die_with_parent(supervisor_pid):
        return EXIT_ORPHANED
    log.info("running at %s: background work, never ahead of the pipeline's roles", run_at_idle_priority())
    config = Config.from_json(os.environ["SEQD_CONFIG_JSON"])
    blp_cpu = config.role(Role.BLP).cpu
    log.info("running on CPUs %s (the blp's: %d; -1 not pinned)", keep_off_the_blps_cpu(blp_cpu), blp_cpu)
    try:
        view = CounterView(attach_counters(config.node.name, epoch=epoch), SNAPSHOTTER)
    except SegmentError as error:
        log.error("not starting the snapshotter: %s", error)
        return EXIT_ORPHANED
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # stopped by its stop counter, like the roles
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        follower = start(config)
        try:
            commit = view[commit_index_counter(config.cluster is not None)]
            Snapshotter(follower, config, commit, view, snapshot_hold()).run()
        finally:
            follower.close()
    finally:
        view.close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
