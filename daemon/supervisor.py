"""The supervisor (`seqd run`): recover, create the node's shared memory, run the roles, watch them.

One incarnation of the pipeline:

1. Journal recovery (a torn tail is repaired once, a corrupt journal refuses to start) tells the
   last index, term and timestamp; they go into the counters for the sequencer and the blp.
2. Shared memory is created fresh: the counters, the log ring (readers journaller and blp) and
   the egress ring (reader sequencer), all with one new random epoch that each role gets with its
   start (see daemon/roles/common.py). A leftover of a dead incarnation is removed and reported;
   one whose creator still runs is refused (another seqd serves this node). Before that, roles
   that a killed supervisor left running are killed (`kill_leftover_roles`): the new node must
   not start while a process of an older incarnation of it is alive.
3. The journaller and the blp start; the blp restores the newest snapshot and replays the journal.
   Then the sequencer opens the socket. READY=1 goes to systemd only now, after recovery.
4. The supervisor polls its children. If any role dies, the others are killed, the shared memory
   is removed and the pipeline restarts from snapshot + journal (step 1); clients reconnect and
   resend, and the blp's dedup table makes that exactly-once. Too many restarts within
   `restart_window_s` and the supervisor exits non-zero so systemd takes over.
5. An operating error (daemon/exits.py) is not restarted: a corrupt journal, a full disk, a
   directory or socket the node may not create, shared memory another process holds, or a role
   that reports such an error at its start through its fatal pipe all end `seqd run` with one
   line and a named exit code.

SIGTERM drains: the sequencer stops accepting, waits until everything it sequenced is applied and
replied, and exits; then the journaller takes the last records, fsyncs and exits; then the blp.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import posix_ipc
import psutil

from daemon.config import Config
from daemon.exits import (
    FATAL_FD_ENV,
    ROLE_FATAL_CODES,
    ExitCode,
    FatalError,
    classify,
    read_fatal,
    report,
)
from daemon.fault_hooks import wall_clock_ns
from daemon.handover import hand_over_leadership
from daemon.incarnation import next_incarnation_id
from daemon.layout import (
    EGRESS_POLLABLE,
    EGRESS_READERS,
    JOURNAL_DISK_FULL,
    JOURNAL_DURABLE_INDEX,
    JOURNAL_FREE_BYTES,
    LOG_PUBLISHED_INDEX,
    LOG_READERS,
    NODE_INCARNATION,
    NODE_NUMBER,
    NODE_STATE,
    PROPOSAL_POLLABLE,
    PROPOSAL_READERS,
    RECOVERY_COMMIT_INDEX,
    RECOVERY_LAST_INDEX,
    RECOVERY_LAST_TERM,
    RECOVERY_LAST_TIMESTAMP_NS,
    RECOVERY_RECORDS,
    REPLICA_COUNTERS,
    ROLE_COUNTERS,
    SEQUENCER_SERVING_INDEX,
    SNAPSHOTTER_COUNTERS,
    SUPERVISOR,
    SUPERVISOR_HEARTBEAT,
    SUPERVISOR_PID,
    SUPERVISOR_RESTARTS,
    CounterView,
    IdleCode,
    NodeState,
    Role,
    RoleState,
    counters_name,
    create_counters,
    drain_order,
    egress_name,
    log_name,
    node_roles,
    proposal_name,
)
from daemon.metrics import MetricsServer
from daemon.notify import Notifier, WatchdogGate, watchdog_interval_s
from daemon.raft_truncate import read_truncate_request, remove_truncate_request
from daemon.replicas import ReplicaSet
from daemon.roles.common import (
    EPOCH_ENV,
    ROLE_EXIT_FAIL_STOP,
    ROLE_EXIT_RAFT_TRUNCATE,
    SUPERVISOR_PID_ENV,
)
from daemon.snapshot_install import finish_install_request
from daemon.status import disk_full_text
from ipc.counters import Counters
from ipc.platform import check_memory_ordering
from ipc.ring import Ring
from ipc.segment import EPOCH_MAX, SegmentError, creator_status, remove_stale
from sequencer import snapshot as snapshots
from sequencer.hard_state import HardStateFile
from sequencer.journal import Journal, read_records

log = logging.getLogger("seqd.supervisor")

POLL_INTERVAL_S = 0.05
ROLE_START_TIMEOUT_S = 120.0  # a role's start may stall this long without progress before it counts as dead
RECOVERY_REPORT_INTERVAL_S = 1.0  # STATUS= and EXTEND_TIMEOUT_USEC= while the blp replays
RECOVERY_EXTEND_S = 30.0  # each report gives systemd this much more time (TimeoutStartSec=5min covers the rest)
ROLE_STOP_TIMEOUT_S = 15.0
RESTART_BACKOFF_S = 0.5
BLP_HASH_SEED = "0"  # the blp runs with a fixed PYTHONHASHSEED: set iteration order is part of the state
# A role's fail-stop (restart from the journal) must not read as a fatal operating error.
assert ROLE_EXIT_FAIL_STOP not in ROLE_FATAL_CODES, ROLE_EXIT_FAIL_STOP
assert ROLE_EXIT_RAFT_TRUNCATE not in ROLE_FATAL_CODES, ROLE_EXIT_RAFT_TRUNCATE
# A leftover killed with SIGKILL is gone within milliseconds unless it is in uninterruptible sleep
# (a hung disk or NFS): then waiting longer does not help, and the operator must look.
LEFTOVER_KILL_TIMEOUT_S = 10.0


class RoleDied(Exception):
    def __init__(self, role: str, returncode: int | None) -> None:
        super().__init__(f"role {role} exited with {returncode}")
        self.role = role
        self.returncode = returncode


class LeftoverProcessError(FatalError):
    """A process of an older incarnation of the node runs and could not be killed."""

    def __init__(self, message: str) -> None:
        super().__init__(ExitCode.CANTCREAT, message)


def kill_leftover_roles(node: str) -> list[str]:
    """Kill the roles that a killed supervisor of node `node` left running; return what was killed.

    A role normally dies with its supervisor (parent-death signal) or exits by itself at start if
    its supervisor is already gone (daemon/roles/common.py), but a role stopped or delayed at the
    wrong moment, or started by an older seqd, could still be running. The dead supervisor's
    counters segment names every role it started, with the process's start time: a pid now
    carried by another process (its start time differs) is left alone. Nothing is done while the
    segment's creator (the old supervisor) still runs: then `remove_stale` refuses to start.

    Raises:
        LeftoverProcessError: a leftover survived SIGKILL or belongs to another user; the message
            names it and says what to do.
    """
    name = counters_name(node)
    try:
        leftover = Counters.attach(name, stale_ok=True)
    except SegmentError:
        return []  # none, or not a readable seqd segment: remove_stale reports what is wrong
    try:
        segment = leftover.segment
        if creator_status(segment.creator_pid, segment.creator_start_time_s) is None:
            return []  # the old supervisor runs: remove_stale refuses to start, naming it
        supervisor_pid = segment.creator_pid
        values = leftover.snapshot()
    finally:
        leftover.close()
    found: list[tuple[str, int, float]] = []
    # Every role a node can have, whether or not it ran: a leftover of any of them must be found.
    # Read by name, whatever the old segment's layout version: its name table says where.
    launches = [(str(role), ROLE_COUNTERS[role].pid, ROLE_COUNTERS[role].start_time_ms) for role in Role]
    launches += [(replica.owner, replica.pid, replica.start_time_ms) for replica in REPLICA_COUNTERS]
    launches.append((SNAPSHOTTER_COUNTERS.owner, SNAPSHOTTER_COUNTERS.pid, SNAPSHOTTER_COUNTERS.start_time_ms))
    for role, pid_spec, start_time_spec in launches:
        pid = values.get(pid_spec.name, 0)
        start_time_s = values.get(start_time_spec.name, 0) / 1000
        # Without a recorded start time a pid cannot be told from a reused one: leave it (a role
        # started by this release records both, and checks its own parent anyway).
        if pid > 0 and start_time_s > 0 and creator_status(pid, start_time_s) is None:
            found.append((role, pid, start_time_s))
    if not found:
        return []
    described = [f"{role} pid {pid}" for role, pid, _ in found]
    log.warning(
        "node %s: the previous supervisor (pid %d) died and left %s running; killing %s",
        node, supervisor_pid, ", ".join(described), "it" if len(found) == 1 else "them",
    )
    denied: set[int] = set()
    for _role, pid, start_time_s in found:
        try:
            process = psutil.Process(pid)
            if creator_status(pid, start_time_s) is None:  # still the same process
                process.kill()
        except psutil.NoSuchProcess:
            pass
        except psutil.AccessDenied:
            denied.add(pid)
    deadline = time.monotonic() + LEFTOVER_KILL_TIMEOUT_S
    alive = [entry for entry in found if entry[1] not in denied]
    while alive and time.monotonic() < deadline:
        alive = [entry for entry in alive if creator_status(entry[1], entry[2]) is None]
        if alive:
            time.sleep(POLL_INTERVAL_S)
    problems = [f"{role} pid {pid} (not ours to signal: owned by another user)" for role, pid, _ in found if pid in denied]
    problems += [f"{role} pid {pid} (alive {LEFTOVER_KILL_TIMEOUT_S:.0f} s after SIGKILL)" for role, pid, _ in alive]
    if problems:
        pids = " ".join(str(pid) for pid in sorted(denied | {pid for _, pid, _ in alive}))
        raise LeftoverProcessError(
            f"node {node}: processes of the previous seqd (supervisor pid {supervisor_pid}, now dead) "
            f"are still running: {', '.join(problems)}. They may still use the node's shared "
            f"memory or socket, so this seqd does not start. Stop them (kill -9 {pids}, as root if "
            "another user owns them; a process that survives SIGKILL is stuck in the kernel, "
            "usually on a hung device) and start again."
        )
    return described


class Supervisor:
    def __init__(self, config: Config, notifier: Notifier | None = None) -> None:
        self.config = config
        # Read the watchdog interval before the notifier removes the variables from the
        # environment (the roles must not inherit NOTIFY_SOCKET: only the main pid may notify).
        self.watchdog_interval_s = watchdog_interval_s()
        self.notifier = notifier or Notifier.from_environment(unset_environment=True)
        self.stop_requested = False
        self.clustered = config.cluster is not None
        self.roles = node_roles(self.clustered)
        self.processes: dict[Role, subprocess.Popen[bytes]] = {}
        self.fatal_pipes: dict[Role, int] = {}  # role -> read end of the pipe it reports a fatal error on
        self.last_failure = ""  # why the pipeline last restarted, for the message when giving up
        self.counters: CounterView | None = None  # the supervisor's view: its own counters writable
        self.rings: list[Ring] = []
        self.replicas: ReplicaSet | None = None  # the query replicas of the running incarnation
        self.ready_sent = False
        self.incarnation = 0
        self.epoch = 0  # the epoch of this incarnation's segments, handed to each role
        self.restarts = 0  # pipeline restarts since `seqd run` began; the counters are recreated each time
        # After a failed fdatasync, the last index known durable: the next recovery drops what
        # follows (fsyncgate: the page cache may show records the disk never got).
        self.durable_index_after_fail_stop: int | None = None

    # ---- signals ---------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop_requested = True

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    # ---- shared memory ---------------------------------------------------------------------

    def _remove_leftovers(self) -> None:
        node = self.config.node.name
        kill_leftover_roles(node)  # first: it reads the roles' pids from the old counters
        for name in (counters_name(node), log_name(node), egress_name(node), proposal_name(node)):
            try:
                removed = remove_stale(name)
            except (OSError, posix_ipc.Error) as error:  # a segment of another user
                raise FatalError(
                    ExitCode.NOPERM,
                    f"cannot check or remove {name} (/dev/shm{name}), left by an earlier seqd for node "
                    f"{node}: {error}. Run seqd as the user that owns it, or remove it as that user.",
                ) from error
            if removed:
                log.warning("removed %s left by a previous seqd for node %s that is no longer running", name, node)

    @contextmanager
    def shared_memory(self) -> Iterator[CounterView]:
        config = self.config
        node = config.node.name
        self._remove_leftovers()
        # One epoch for the incarnation's segments: a role started for it attaches only these.
        epoch = secrets.randbelow(EPOCH_MAX + 1)
        self.epoch = epoch
        counters = CounterView(create_counters(node, epoch=epoch), SUPERVISOR)
        rings: list[Ring] = []
        try:
            rings.append(Ring.create(log_name(node), config.ring.log_capacity_bytes, readers=LOG_READERS, epoch=epoch))
            rings.append(
                Ring.create(egress_name(node), config.ring.egress_capacity_bytes, readers=EGRESS_READERS, epoch=epoch,
                            pollable=EGRESS_POLLABLE)
            )
            if self.clustered:
                # The sequencer's records, unstamped, for the replicator to propose or forward:
                # as large as the log ring, which they all end up in.
                rings.append(
                    Ring.create(
                        proposal_name(node), config.ring.log_capacity_bytes, readers=PROPOSAL_READERS, epoch=epoch,
                        pollable=PROPOSAL_POLLABLE,
                    )
                )
            self.counters = counters
            self.rings = rings
            yield counters
        finally:
            for ring in rings:
                ring.close()
                ring.unlink()
            counters.close()
            counters.counters.unlink()
            self.counters = None
            self.rings = []

    # ---- roles -----------------------------------------------------------------------------

    def _spawn(self, role: Role) -> subprocess.Popen[bytes]:
        counters = self.counters
        assert counters is not None
        block = ROLE_COUNTERS[role]
        environment = dict(os.environ)
        environment["SEQD_CONFIG_JSON"] = self.config.to_json().decode()
        environment[SUPERVISOR_PID_ENV] = str(os.getpid())
        environment[EPOCH_ENV] = str(self.epoch)
        if role is Role.BLP:
            environment["PYTHONHASHSEED"] = BLP_HASH_SEED
        # The launch block is the supervisor's; `<role>.state` is the role's, STARTING (0) in the
        # fresh segment until the role writes it.
        role_config = self.config.role(role)
        counters[block.cpu].set(role_config.cpu)
        counters[block.idle].set(IdleCode[role_config.idle.upper()])
        fatal_read, fatal_write = os.pipe()
        environment[FATAL_FD_ENV] = str(fatal_write)
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", f"daemon.roles.{role}"], env=environment, pass_fds=(fatal_write,)
            )
        except BaseException:
            os.close(fatal_read)
            raise
        finally:
            os.close(fatal_write)
        self.fatal_pipes[role] = fatal_read
        # The start time first: a pid in the counters always comes with it (kill_leftover_roles).
        # The child cannot have been reaped yet (only this process waits for it).
        start_time_s = psutil.Process(process.pid).create_time()
        counters[block.start_time_ms].set(round(start_time_s * 1000))
        counters[block.pid].set(process.pid)
        self.processes[role] = process
        log.info("started %s as pid %d", role, process.pid)
        return process

    def _check_children(self) -> None:
        for role, process in self.processes.items():
            code = process.poll()
            if code is None:
                continue
            if code in ROLE_FATAL_CODES:
                # The role met an operating error at its start; a restart would meet it again.
                message = read_fatal(self.fatal_pipes[role]) or (
                    f"{role} exited with {code} ({ExitCode(code).name}) at its start without saying "
                    "why; see its log lines above"
                )
                raise FatalError(ExitCode(code), message)
            raise RoleDied(role, code)

    def _wait_running(self, roles: tuple[Role, ...]) -> None:
        """Wait for the roles to run; while the blp replays, tell systemd how far it got.

        Recovery has no fixed length, so instead of one start timeout the supervisor extends
        systemd's timeout each time the replay advances (EXTEND_TIMEOUT_USEC): a stuck recovery
        still times out, a long one does not.
        """
        counters = self.counters
        assert counters is not None
        deadline = time.monotonic() + ROLE_START_TIMEOUT_S
        progress = counters[RECOVERY_RECORDS]
        last_index = counters[RECOVERY_LAST_INDEX].get()
        reported = -1
        next_report = time.monotonic()
        while True:
            self._check_children()
            if all(counters[ROLE_COUNTERS[role].state].get() == RoleState.RUNNING for role in roles):
                return
            if self.stop_requested:
                return
            now = time.monotonic()
            if now >= next_report:
                replayed = progress.get()
                if replayed != reported:
                    reported = replayed
                    deadline = now + ROLE_START_TIMEOUT_S
                    self.notifier.status(f"recovering: replayed {replayed} records of the journal (up to index {last_index})")
                    if self.ready_sent:
                        # A restart after READY: systemd's watchdog is armed; progress keeps it fed.
                        self.notifier.watchdog()
                    else:
                        self.notifier.extend_timeout(int(RECOVERY_EXTEND_S * 1_000_000))
                next_report = now + RECOVERY_REPORT_INTERVAL_S
            if now > deadline:
                raise RoleDied(",".join(roles), None)
            self._beat()
            time.sleep(POLL_INTERVAL_S / 5)

    def _beat(self) -> None:
        if self.counters is not None:
            self.counters[SUPERVISOR_HEARTBEAT].add(1)

    def _kill_all(self) -> None:
        if self.replicas is not None:
            self.replicas.kill()
            self.replicas = None
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
        for process in self.processes.values():
            try:
                process.wait(timeout=ROLE_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.error("pid %d did not die after SIGKILL", process.pid)
        self.processes.clear()
        for descriptor in self.fatal_pipes.values():
            os.close(descriptor)
        self.fatal_pipes.clear()

    def _stop_role(self, role: Role) -> int | None:
        process = self.processes.get(role)
        if process is None:
            return None
        assert self.counters is not None
        self.counters[ROLE_COUNTERS[role].stop].set(1)  # roles ignore signals: this is how they are stopped
        try:
            code = process.wait(timeout=ROLE_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.error("%s did not stop within %.0f s; killing it", role, ROLE_STOP_TIMEOUT_S)
            process.kill()
            code = process.wait()
        del self.processes[role]
        os.close(self.fatal_pipes.pop(role))
        return code

    def drain(self) -> bool:
        """Stop in dependency order; True if every role exited cleanly."""
        assert self.counters is not None
        self.counters[NODE_STATE].set(int(NodeState.DRAINING))
        self.notifier.stopping("draining: finishing committed commands")
        if self.replicas is not None:  # not part of the pipeline: their clients resume elsewhere
            self.replicas.stop()
            self.replicas = None
        if self.clustered and Role.REPLICATOR in self.processes:  # a leader hands over first, bounded
            self.counters[NODE_STATE].set(int(NodeState.HANDING_OVER))
            hand_over_leadership(self.counters, self.config)
            self.counters[NODE_STATE].set(int(NodeState.DRAINING))
        clean = True
        for role in drain_order(self.roles):
            code = self._stop_role(role)
            if code not in (0, None):
                log.error("%s exited with %s while draining", role, code)
                clean = False
        return clean

    # ---- recovery --------------------------------------------------------------------------

    def recover_journal(self, counters: CounterView) -> None:
        """Open (and repair) the journal and publish what it ends with in `recovery.last.*`; each
        role starts its own counters from there."""
        config = self.config
        for directory in (config.journal_dir, config.snapshot_dir):
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise FatalError.from_os_error(error, f"create {directory}", "node.data_dir") from error
        journal = Journal.open(
            config.journal_dir, segment_bytes=config.journal.segment_bytes, preallocate=config.journal.preallocate
        )
        try:
            report = journal.recovery
            if report is not None and getattr(report, "torn_tail", None):
                log.warning("journal: %s", report)
            if self.clustered:
                self._truncate_on_request(journal)
                installed = finish_install_request(config.node.data_dir, config.snapshot_dir, journal)
                if installed is not None:
                    log.warning("installed the leader's snapshot at index %d; the journal now starts "
                                "after it", installed)
            durable = self.durable_index_after_fail_stop
            if durable is not None and journal.last_index > durable:
                log.warning(
                    "journal: dropping records %d..%d written before the failed fdatasync: they were "
                    "never durable nor acknowledged, and the page cache may show bytes the disk lost",
                    durable + 1, journal.last_index,
                )
                journal.truncate_after(durable)
            self.durable_index_after_fail_stop = None
            last_index, last_term = journal.last_index, journal.last_term
            first_index = journal.first_index
        finally:
            journal.close()
        last_timestamp_ns = 0
        if last_index >= first_index:  # else a restarted journal, empty after a snapshot
            for record in read_records(config.journal_dir, last_index, last_index):
                last_timestamp_ns = record.timestamp_ns
        commit_index = self._recovered_commit_index(last_index) if self.clustered else last_index
        counters[RECOVERY_LAST_INDEX].set(last_index)
        counters[RECOVERY_LAST_TERM].set(last_term)
        counters[RECOVERY_LAST_TIMESTAMP_NS].set(last_timestamp_ns)
        counters[RECOVERY_COMMIT_INDEX].set(commit_index)
        if commit_index == last_index:
            log.info("journal recovered: last index %d, term %d", last_index, last_term)
        else:
            log.info(
                "journal recovered: last index %d, term %d; known committed up to %d (the rest is "
                "applied once the cluster commits it)", last_index, last_term, commit_index,
            )

    def _truncate_on_request(self, journal: Journal) -> None:
        """Cluster mode: cut the journal where the replicator asked (`raft.truncate`), before
        anything reads it; then forget the request."""
        data_dir = self.config.node.data_dir
        index = read_truncate_request(data_dir)
        if index is None:
            return
        if index < journal.last_index:
            log.warning(
                "journal: dropping records %d..%d: they conflict with the Raft leader's log (never "
                "committed, never applied)", index + 1, journal.last_index,
            )
            journal.truncate_after(index)
        remove_truncate_request(data_dir)

    def _recovered_commit_index(self, last_index: int) -> int:
        """Cluster mode: how far the journal is known committed, which the blp replays at start.

        The journal may end with entries a conflict may still cut (not committed), so replay
        stops at the commit index the hard state holds, or at the newest snapshot if that is later
        (a snapshot is taken only of applied, so committed, records). The replicator writes the
        rest to the log ring, and the blp applies it once the cluster commits it.
        """
        config = self.config
        commit_index = HardStateFile.open(config.node.data_dir).hard_state.commit_index
        newest_snapshot = snapshots.newest_snapshot_index(config.snapshot_dir)
        return min(last_index, max(commit_index, newest_snapshot))

    # ---- main loop -------------------------------------------------------------------------

    def _start_roles(self) -> None:
        """Start the roles phase by phase (`Role.start_phase`), each phase once the one before
        runs: the log ring's readers first (the blp recovers), then the sequencer."""
        started: list[Role] = []
        for phase in sorted({role.start_phase for role in self.roles}):
            for role in self.roles:
                if role.start_phase == phase:
                    self._spawn(role)
                    started.append(role)
            self._wait_running(tuple(started))

    def run_incarnation(self) -> bool:
        """One pipeline from recovery to stop. True: stopped on request; False: a role died."""
        config = self.config
        self.incarnation += 1
        with self.shared_memory() as counters:
            counters[SUPERVISOR_PID].set(os.getpid())
            counters[SUPERVISOR_RESTARTS].set(self.restarts)
            counters[NODE_NUMBER].set(config.node.number)
            counters[NODE_STATE].set(int(NodeState.RECOVERING))
            self.notifier.status("recovering: reading the journal")
            try:
                self.recover_journal(counters)  # the data directory exists from here on
                # The wall clock the nemesis can step back (SEQD_FAULT_CLOCK_OFFSET): a start id
                # must not depend on it while <data_dir>/incarnation is there.
                now_s = wall_clock_ns() / 1e9
                counters[NODE_INCARNATION].set(next_incarnation_id(Path(config.node.data_dir), now_s, self.incarnation))
                self.notifier.status(f"recovering: replaying up to index {counters[RECOVERY_LAST_INDEX].get()}")
                self._start_roles()
                if self.stop_requested:
                    return self.drain()
                # After the pipeline runs (the commit index is published); never waited for.
                self.replicas = ReplicaSet(config, counters, self.epoch)
                self.replicas.start()
                counters[NODE_STATE].set(int(NodeState.SERVING))
                serving_index = counters[SEQUENCER_SERVING_INDEX].get()  # 0: a cluster's node, a standby
                status = (f"serving {config.socket.path} from index {serving_index}" if serving_index else
                          f"serving {config.socket.path}, its log at index {counters[LOG_PUBLISHED_INDEX].get()}")
                if not self.ready_sent:
                    self.notifier.ready(status)
                    self.ready_sent = True
                else:
                    self.notifier.status(status)
                log.info("node %s %s", config.node.name, status)
                self.monitor(counters)
                ok = self.drain()
                counters[NODE_STATE].set(int(NodeState.STOPPED))
                return ok
            except RoleDied as died:
                self.restarts += 1
                self.last_failure = str(died)
                if died.role == Role.JOURNALLER and died.returncode == ROLE_EXIT_FAIL_STOP:
                    self.durable_index_after_fail_stop = counters[JOURNAL_DURABLE_INDEX].get()
                if died.role == Role.REPLICATOR and died.returncode == ROLE_EXIT_RAFT_TRUNCATE:
                    log.warning("the replicator asked for a journal cut (a Raft log conflict) or a "
                                "snapshot install; restarting the pipeline from the journal")
                else:
                    log.error("%s; restarting the pipeline from the journal", died)
                self.notifier.status(f"restarting: {died}")
                return False
            finally:
                self._kill_all()

    def monitor(self, counters: CounterView) -> None:
        interval_s = self.watchdog_interval_s
        heartbeats = {role: counters[ROLE_COUNTERS[role].heartbeat] for role in self.roles}
        gate = WatchdogGate(
            lambda: {role.value: heartbeat.get() for role, heartbeat in heartbeats.items()}, self.notifier.watchdog
        )
        next_ping = time.monotonic() + (interval_s or 0)
        disk_full, disk_seen = counters[JOURNAL_DISK_FULL], 0
        while not self.stop_requested:
            self._check_children()
            if self.replicas is not None:
                self.replicas.check(time.monotonic())
            self._beat()
            if disk_full.get() != disk_seen:  # STATUS= says so while the disk is full
                disk_seen = disk_full.get()
                text = disk_full_text(disk_seen, counters[JOURNAL_FREE_BYTES].get())
                self.notifier.status(text or f"serving {self.config.socket.path}: disk space is back")
            if interval_s is not None and time.monotonic() >= next_ping:
                gate.tick()
                next_ping = time.monotonic() + interval_s
            time.sleep(POLL_INTERVAL_S)

    def _start_metrics(self) -> MetricsServer | None:
        metrics = self.config.metrics
        if not metrics.enabled:
            return None

        def snapshot() -> dict[str, int]:
            counters = self.counters
            return counters.snapshot() if counters is not None else {}

        server = MetricsServer(
            snapshot, host=metrics.host, port=metrics.port, allow_remote=metrics.allow_remote,
            labels={"node": self.config.node.name},
        )
        try:
            server.start()
        except OSError as error:
            raise FatalError.from_os_error(
                error, f"serve metrics on {metrics.host}:{metrics.port}", "metrics.port"
            ) from error
        log.info("metrics at %s", server.url)
        return server

    def run(self) -> int:
        """Run the node until it is stopped or fails; returns the exit code of `seqd run`.

        Every way it ends is an ExitCode; an operating error is logged as one line (its
        traceback only at debug level) and sent to systemd as STATUS=.
        """
        try:
            check_memory_ordering()
            self.install_signal_handlers()
            metrics = self._start_metrics()
            try:
                return self._run()
            finally:
                if metrics is not None:
                    metrics.stop()
        except Exception as error:
            code = report(log, error)
            fatal = classify(error)
            reason = fatal.message if fatal is not None else f"unexpected {type(error).__name__}: {error}"
            self.notifier.status(f"failed (exit {int(code)} {code.name}): {reason}")
            return code

    def _run(self) -> int:
        restarts: deque[float] = deque()
        while True:
            stopped_cleanly = self.run_incarnation()
            if self.stop_requested:
                log.info("stopped")
                return ExitCode.OK if stopped_cleanly else ExitCode.FAILED
            if self.ready_sent:
                self.notifier.watchdog()  # restarting is progress; the roles' heartbeats resume shortly
            now = time.monotonic()
            restarts.append(now)
            while restarts and restarts[0] < now - self.config.restart_window_s:
                restarts.popleft()
            if len(restarts) > self.config.restarts_max:
                log.critical(
                    "%d restarts within %.0f s, the last because %s: giving up (see the errors above; "
                    "restarts_max and restart_window_s set the budget) (exit %d %s)",
                    len(restarts),
                    self.config.restart_window_s,
                    self.last_failure,
                    ExitCode.FAILED,
                    ExitCode.FAILED.name,
                )
                return ExitCode.FAILED
            time.sleep(RESTART_BACKOFF_S)
