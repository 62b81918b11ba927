"""`seqd status`: what a node is doing, read from its counters segment without talking to it.

Theory of operation. Every role publishes its pid, CPU, idle strategy, heartbeat and positions in
the node's counters segment (`/seqd.<node>.counters`), one 64-bit counter each. `seqd status`
attaches read-only in spirit (it never writes), takes samples and turns them into a
`NodeStatus`: roles, positions, lags, rates and errors.

Counters keep their last values after a node dies, and a hung node's counters look exactly like
an idle one's. So liveness is judged, never assumed, and a node that is not running is reported
as stopped or stale with the reason, never as a table of zeros:

- stopped: no counters segment (or a stale one: ipc refuses it and says why), the supervisor pid
  is gone, or the node said it stopped (node.state 4). The last values are still shown, marked.
- stale: the supervisor's pid is alive but its heartbeat has not moved for `stale_after_s` of
  observation (hung, or stopped with SIGSTOP).
- degraded: the supervisor beats but a role is dead or its heartbeat is stuck.
- live: every heartbeat that should move moves.

Apart from liveness, a node whose journal's disk is short of space says so (`journal.disk_full`,
written by the journaller): it is live and serves what is committed, but refuses new commands.

Staleness needs two samples: one sample cannot tell a frozen counter from a live one. A
`StatusTracker` keeps, per heartbeat, when it last changed; `seqd status` without --watch takes
two samples `SAMPLE_GAP_S` apart, which also gives the rates per second.

What each counter means, who writes it and its kind come from the node's layout
(daemon/layout.py). A counter is unknown until its writer has started: a name the segment lacks,
or a counter of a role the supervisor has not started (its `<role>.pid` is 0: the replicator on a
single node, the sequencer while the blp replays). Unknown values show as '-' in text and null in
JSON, never as 0. Errors are counted per role (`<role>.errors`); the node's total is their sum.
A segment of another layout version (another release's) is refused, never misread.
"""

from __future__ import annotations

import enum
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

import psutil

from daemon import layout
from daemon.layout import (
    ERROR_KIND_COUNTERS,
    ERRORS_TOTAL_NAME,
    REPLICA_COUNTERS,
    ROLE_COUNTERS,
    SUPERVISOR,
    CounterSpec,
    DiskState,
    NodeState,
    Role,
    counter_spec,
    errors_total,
)
from daemon.replica_status import (
    ReplicaStatus,
    SnapshotterStatus,
    replica_statuses,
    replicas_json,
    replicas_table,
    snapshotter_json,
    snapshotter_status,
    snapshotter_table,
)
from daemon.status_raft import RaftStatus, raft_json, raft_lines, raft_status
from daemon.text_table import cell as _cell
from daemon.text_table import table as _table

__all__ = [
    "SAMPLE_GAP_S",
    "STALE_AFTER_S",
    "Lag",
    "Liveness",
    "NodeStatus",
    "ReplicaStatus",
    "RoleStatus",
    "StatusTracker",
    "disk_full_text",
    "known_values",
    "pid_alive",
    "read_counters",
    "render_json",
    "render_text",
    "sample_status",
    "watch",
]

# Heartbeats move at least every 100 ms in a healthy node (the supervisor's loop, a role's duty
# cycle or its blocking idle's wake-up timeout); one second without a move is ten missed beats,
# not a scheduling hiccup.
STALE_AFTER_S = 1.0
# `seqd status` without --watch samples twice this far apart: long enough for staleness to show
# and for rates per second to mean something.
SAMPLE_GAP_S = 1.0
assert SAMPLE_GAP_S >= STALE_AFTER_S
# --watch redraws this often, like top's default of about a second.
WATCH_INTERVAL_S = 1.0


class Liveness(enum.StrEnum):
    LIVE = "live"
    DEGRADED = "degraded"
    STALE = "stale"
    STOPPED = "stopped"


def pid_alive(pid: int) -> bool:
    """True if `pid` is a running (not zombie) process, including one we may not signal."""
    if pid <= 0:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True


@dataclass(frozen=True)
class RoleStatus:
    name: str
    pid: int | None
    running: bool | None  # None: the role is not part of this node (no pid published)
    cpu: int | None  # -1 unpinned
    idle: str | None
    heartbeat: int | None
    heartbeats_per_s: float | None
    stuck_s: float | None  # how long the heartbeat has not moved, once that exceeds the bound
    errors: int | None  # every error the role counted (`<role>.errors`)


@dataclass(frozen=True)
class Lag:
    """How far one stage is behind the one that feeds it."""

    stage: str
    records: int | None
    bytes: int | None


@dataclass
class NodeStatus:
    node: str
    liveness: Liveness
    reason: str
    sampled_s: float  # wall clock, for --json consumers
    state: str | None = None
    supervisor_pid: int | None = None
    supervisor_heartbeat: int | None = None
    roles: list[RoleStatus] = field(default_factory=list)
    replicas: list[ReplicaStatus] = field(default_factory=list)
    snapshotter: SnapshotterStatus | None = None  # snapshot.writer = "replica"
    positions: dict[str, int | None] = field(default_factory=dict)
    indexes: dict[str, int | None] = field(default_factory=dict)
    lags: list[Lag] = field(default_factory=list)
    rates: dict[str, float | None] = field(default_factory=dict)
    sessions_open: int | None = None
    sessions_total: int | None = None
    sessions_subscribed: int | None = None  # to events (gateway.event_subscribers)
    commands_total: int | None = None
    errors: dict[str, int] = field(default_factory=dict)  # by kind, and "total" over the roles
    snapshot_last_index: int | None = None
    recovery_records: int | None = None
    restarts: int | None = None
    raft: RaftStatus = field(default_factory=RaftStatus)  # all None on a single node
    disk: str | None = None  # DiskState's name: room, short (refusing new commands), full
    disk_state: int | None = None
    disk_free_bytes: int | None = None
    disk_refused: int | None = None  # sessions and commands refused with disk_full
    values: dict[str, int] = field(default_factory=dict)  # the raw sample, every counter read

    @property
    def current(self) -> bool:
        """False when the numbers are the last ones a node that no longer runs wrote."""
        return self.liveness in (Liveness.LIVE, Liveness.DEGRADED)


# Positions (bytes) and indexes (records) along the pipeline: name -> (position, index counter).
_STAGES: dict[str, tuple[CounterSpec, CounterSpec | None]] = {
    "published": (layout.LOG_PUBLISHED_POSITION, layout.LOG_PUBLISHED_INDEX),
    "durable": (layout.JOURNAL_DURABLE_POSITION, layout.JOURNAL_DURABLE_INDEX),
    "commit": (layout.COMMIT_POSITION, layout.COMMIT_INDEX),
    "applied": (layout.BLP_APPLIED_POSITION, layout.BLP_APPLIED_INDEX),
    "egress.published": (layout.EGRESS_PUBLISHED_POSITION, None),
    "egress.consumed": (layout.EGRESS_CONSUMED_POSITION, None),
}
_CLUSTER_COMMIT = {"commit": (layout.RAFT_COMMIT_POSITION, layout.RAFT_COMMIT_INDEX)}  # Raft's, in a cluster
# Each lag: (stage name, ahead, behind), both keys of _STAGES.
_LAGS = (
    ("journal", "published", "durable"),
    ("commit", "published", "commit"),
    ("apply", "commit", "applied"),
    ("egress", "egress.published", "egress.consumed"),
)
# Rates per second: name -> counter (records/s for the indexes, bytes/s for the position).
_RATES = {
    "commands": layout.COMMANDS_TOTAL.name,
    "records": layout.LOG_PUBLISHED_INDEX.name,
    "bytes": layout.LOG_PUBLISHED_POSITION.name,
    "durable": layout.JOURNAL_DURABLE_INDEX.name,
    "applied": layout.BLP_APPLIED_INDEX.name,
    "errors": ERRORS_TOTAL_NAME,
}
_HEARTBEATS = (layout.SUPERVISOR_HEARTBEAT, *(ROLE_COUNTERS[role].heartbeat for role in Role))


def known_values(values: Mapping[str, int]) -> dict[str, int]:
    """The counters of `values` whose writer has started, plus the node's error total.

    A role's counters are dropped while its `<role>.pid` is 0 or absent (the supervisor has not
    started it: they hold zeros, not values); the supervisor's and names this release does not
    know are kept. The error total (`errors.total`) is the sum of every process's `.errors`.
    """
    started: set[str] = {role for role in Role if values.get(ROLE_COUNTERS[role].pid.name, 0) > 0}
    started |= {block.owner for block in REPLICA_COUNTERS if values.get(block.pid.name, 0) > 0}
    if values.get(layout.SNAPSHOTTER_COUNTERS.pid.name, 0) > 0:
        started.add(layout.SNAPSHOTTER)
    clustered = _clustered(values)
    known: dict[str, int] = {}
    for name, value in values.items():
        spec = counter_spec(name)
        if spec is None or spec.owner == SUPERVISOR or spec.writer(clustered) in started:
            known[name] = value
    total = errors_total(known)
    if total is not None:
        known[ERRORS_TOTAL_NAME] = total
    return known


Spec = CounterSpec | None


def _get(values: Mapping[str, int], spec: Spec) -> int | None:
    return None if spec is None else values.get(spec.name)


def _name(spec: CounterSpec, values: Mapping[str, int]) -> str | None:
    value = values.get(spec.name)
    return None if value is None else spec.value_name(value)


def _difference(values: Mapping[str, int], ahead: Spec, behind: Spec) -> int | None:
    ahead_value, behind_value = _get(values, ahead), _get(values, behind)
    return None if ahead_value is None or behind_value is None else ahead_value - behind_value


def _clustered(values: Mapping[str, int]) -> bool:
    """Whether the node runs a replicator: a single node shows no Raft standing."""
    return values.get(ROLE_COUNTERS[Role.REPLICATOR].pid.name, 0) > 0


def _errors(values: Mapping[str, int]) -> dict[str, int]:
    """Error counts by kind (`errors.protocol` as "protocol"), then the node's "total"."""
    kinds = sorted(spec.name for spec in ERROR_KIND_COUNTERS if spec.name in values)
    errors = {name.removeprefix("errors."): values[name] for name in kinds}
    if ERRORS_TOTAL_NAME in values:
        errors["total"] = values[ERRORS_TOTAL_NAME]
    return errors


def _counters_status(
    node: str, sampled_s: float, raw: dict[str, int], known: Mapping[str, int]
) -> NodeStatus:
    """What one sample says by itself, before liveness, rates and roles are judged."""
    status = NodeStatus(
        node=node,
        liveness=Liveness.LIVE,
        reason="",
        sampled_s=sampled_s,
        state=_name(layout.NODE_STATE, known),
        supervisor_pid=_get(known, layout.SUPERVISOR_PID),
        supervisor_heartbeat=_get(known, layout.SUPERVISOR_HEARTBEAT),
        sessions_open=_get(known, layout.SESSIONS_OPEN),
        sessions_total=_get(known, layout.SESSIONS_TOTAL),
        sessions_subscribed=_get(known, layout.GATEWAY_EVENT_SUBSCRIBERS),
        commands_total=_get(known, layout.COMMANDS_TOTAL),
        # The newest snapshot written here, by whichever writer the node runs (the other's is 0).
        snapshot_last_index=None if layout.SNAPSHOT_LAST_INDEX.name not in known else max(
            known[layout.SNAPSHOT_LAST_INDEX.name], known.get(layout.SNAPSHOTTER_COUNTERS.snapshot_index.name, 0)),
        recovery_records=_get(known, layout.RECOVERY_RECORDS),
        restarts=_get(known, layout.SUPERVISOR_RESTARTS),
        raft=raft_status(known, _clustered(known), int(sampled_s * 1000)),
        disk=_name(layout.JOURNAL_DISK_FULL, known),
        disk_state=_get(known, layout.JOURNAL_DISK_FULL),
        disk_free_bytes=_get(known, layout.JOURNAL_FREE_BYTES),
        disk_refused=_get(known, layout.ERRORS_DISK_FULL),
        errors=_errors(known),
        values=raw,
    )
    stages = _STAGES | _CLUSTER_COMMIT if _clustered(known) else _STAGES
    for stage, (position, index) in stages.items():
        status.positions[stage] = _get(known, position)
        status.indexes[stage] = _get(known, index)
    for stage, ahead, behind in _LAGS:
        ahead_position, ahead_index = stages[ahead]
        behind_position, behind_index = stages[behind]
        records = _difference(known, ahead_index, behind_index)
        size = _difference(known, ahead_position, behind_position)
        status.lags.append(Lag(stage=stage, records=records, bytes=size))
    return status


class StatusTracker:
    """Turns successive counter samples of one node into `NodeStatus`es, remembering when each
    heartbeat last moved and the previous sample for rates."""

    def __init__(
        self,
        node: str,
        stale_after_s: float = STALE_AFTER_S,
        pid_alive: Callable[[int], bool] = pid_alive,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        assert stale_after_s > 0, stale_after_s
        self.node = node
        self.stale_after_s = stale_after_s
        self._pid_alive = pid_alive
        self._wall_clock = wall_clock
        self._previous: Mapping[str, int] | None = None  # the last sample's known values
        self._previous_s = 0.0  # when `_previous` was sampled (monotonic)
        # heartbeat counter name -> (value, monotonic time it was first seen at that value)
        self._heartbeat_since: dict[str, tuple[int, float]] = {}

    def _forget(self) -> None:
        """Another incarnation, or none: neither rates nor heartbeat ages carry over."""
        self._previous = None
        self._heartbeat_since.clear()

    def observe(
        self, values: Mapping[str, int] | None, now_s: float, missing_reason: str | None = None
    ) -> NodeStatus:
        """The node's status from one sample.

        Args:
            values: counter name -> value (`Counters.snapshot()`), or None when the segment
                could not be read.
            now_s: monotonic time of the sample.
            missing_reason: why `values` is None (ipc's message), shown to the operator.
        """
        sampled_s = self._wall_clock()
        if values is None:
            self._forget()
            return NodeStatus(
                node=self.node,
                liveness=Liveness.STOPPED,
                reason=missing_reason or f"no counters segment for node {self.node}: not running",
                sampled_s=sampled_s,
            )
        known = known_values(values)
        status = _counters_status(self.node, sampled_s, dict(values), known)
        previous = self._previous
        if previous is not None and _get(previous, layout.SUPERVISOR_PID) != status.supervisor_pid:
            self._forget()
        elapsed_s = None if self._previous is None else now_s - self._previous_s
        ages = self._heartbeat_ages(known, now_s)
        status.rates = {rate: self._rate(known, name, elapsed_s) for rate, name in _RATES.items()}
        pid = status.supervisor_pid
        supervisor_alive = pid is not None and self._pid_alive(pid)
        roles = [self._role_status(role, known, ages, elapsed_s, supervisor_alive) for role in Role]
        status.roles = roles
        status.replicas = replica_statuses(known, supervisor_alive, self._pid_alive)
        status.snapshotter = snapshotter_status(known, supervisor_alive, self._pid_alive)
        status.liveness, status.reason = self._judge(status, ages, supervisor_alive)
        if not status.current:
            status.rates = dict.fromkeys(status.rates)
        self._previous = known
        self._previous_s = now_s
        return status

    def _heartbeat_ages(self, values: Mapping[str, int], now_s: float) -> dict[str, float]:
        """Seconds each heartbeat has kept its value, as far as the samples seen can tell."""
        ages: dict[str, float] = {}
        for spec in _HEARTBEATS:
            value = values.get(spec.name)
            if value is None:
                continue
            seen = self._heartbeat_since.get(spec.name)
            if seen is None or seen[0] != value:
                self._heartbeat_since[spec.name] = (value, now_s)
                ages[spec.name] = 0.0
            else:
                ages[spec.name] = now_s - seen[1]
        return ages

    def _rate(self, values: Mapping[str, int], name: str, elapsed_s: float | None) -> float | None:
        if elapsed_s is None or elapsed_s <= 0 or self._previous is None:
            return None
        if name not in values or name not in self._previous:
            return None
        return (values[name] - self._previous[name]) / elapsed_s

    def _role_status(
        self,
        role: Role,
        values: Mapping[str, int],
        ages: Mapping[str, float],
        elapsed_s: float | None,
        supervisor_alive: bool,
    ) -> RoleStatus:
        block = ROLE_COUNTERS[role]
        pid = _get(values, block.pid)
        running: bool | None
        if pid is None or pid <= 0:
            running = None  # this node does not run the role (e.g. no replicator on one node)
        else:
            running = supervisor_alive and self._pid_alive(pid)
        age = ages.get(block.heartbeat.name)
        return RoleStatus(
            name=role.value,
            pid=pid if pid else None,
            running=running,
            cpu=_get(values, block.cpu) if running is not None else None,
            idle=_name(block.idle, values) if running is not None else None,
            heartbeat=_get(values, block.heartbeat),
            heartbeats_per_s=self._rate(values, block.heartbeat.name, elapsed_s),
            stuck_s=age if age is not None and age >= self.stale_after_s else None,
            errors=_get(values, block.errors),
        )

    def _judge(
        self, status: NodeStatus, ages: Mapping[str, float], supervisor_alive: bool
    ) -> tuple[Liveness, str]:
        pid = status.supervisor_pid
        if not pid:
            return Liveness.STOPPED, "no supervisor pid in the counters: the node never started"
        if not supervisor_alive:
            return (
                Liveness.STOPPED,
                f"supervisor pid {pid} is not running: the values below are the last it wrote",
            )
        if status.state == layout.NODE_STATE.value_name(NodeState.STOPPED):
            return Liveness.STOPPED, "the node reports it has stopped"
        supervisor_age = ages.get(layout.SUPERVISOR_HEARTBEAT.name)
        if supervisor_age is not None and supervisor_age >= self.stale_after_s:
            return (
                Liveness.STALE,
                f"supervisor pid {pid} is alive but its heartbeat has not moved for "
                f"{supervisor_age:.1f} s (hung or stopped with SIGSTOP?)",
            )
        problems = []
        for role in status.roles:
            if role.running is False:
                problems.append(f"{role.name} pid {role.pid} is not running")
            elif role.running and role.stuck_s is not None:
                problems.append(f"{role.name} heartbeat has not moved for {role.stuck_s:.1f} s")
        if problems:
            return Liveness.DEGRADED, "; ".join(problems)
        return Liveness.LIVE, ""


def disk_full_text(state: int | None, free_bytes: int | None) -> str | None:
    """One line about the journal's disk while it is short of space, else None (`seqd status`
    and the supervisor's STATUS= say the same)."""
    if not state:
        return None
    free = "?" if free_bytes is None else f"{free_bytes} bytes"
    if state == DiskState.SHORT:
        held = "committed work is still served"
    else:
        held = "records that did not fit wait in the log ring, unacknowledged"
    return (
        f"DISK FULL: {free} free for the journal; new commands and sessions are refused with "
        f"disk_full until space is freed ({held}); the node resumes by itself"
    )


# --- rendering --------------------------------------------------------------------------------


def _header(status: NodeStatus) -> list[str]:
    """The first line (liveness, state, supervisor, Raft) and the warnings under it."""
    state = (status.state or "unknown").upper()
    header = f"seqd node {status.node}: {status.liveness.value.upper()}"
    if status.current:
        header += f", {state}"
    else:
        header += f" (last state written: {state.lower()})"
    if status.disk not in (None, "room"):
        header += ", DISK FULL"
    header += f"  supervisor pid {_cell(status.supervisor_pid)}"
    if status.restarts:
        header += f"  restarts {status.restarts}"
    raft_header, raft_below = raft_lines(status.raft, _cell)
    lines = [header + raft_header, *raft_below]
    if status.reason:
        lines.append(f"  ! {status.reason}")
    disk = disk_full_text(status.disk_state, status.disk_free_bytes)
    if disk is not None:
        lines.append(f"  ! {disk}")
    if status.state == "recovering" and status.current:
        lines.append(f"  recovering: {_cell(status.recovery_records)} records replayed")
    return lines


def _roles_table(status: NodeStatus) -> list[str]:
    rows = [["role", "pid", "cpu", "idle", "running", "heartbeat", "beats/s", "errors", ""]]
    for role in status.roles:
        if role.running is None and role.heartbeat in (None, 0):
            rows.append([role.name, "-", "-", "-", "off", "-", "-", "-", ""])
            continue
        cpu = "any" if role.cpu == -1 else _cell(role.cpu)
        note = f"STUCK {role.stuck_s:.1f}s" if role.stuck_s is not None else ""
        rows.append(
            [
                role.name,
                _cell(role.pid),
                cpu,
                _cell(role.idle),
                _cell(role.running),
                _cell(role.heartbeat),
                _cell(role.heartbeats_per_s),
                _cell(role.errors),
                note,
            ]
        )
    return _table(rows)


def _pipeline_tables(status: NodeStatus) -> list[str]:
    """Positions and indexes per stage, then the lags between stages."""
    stages = list(_STAGES)
    rows = [["", *stages]]
    rows.append(["position", *(_cell(status.positions.get(s)) for s in stages)])
    rows.append(["index", *(_cell(status.indexes.get(s)) for s in stages)])
    lines = _table(rows)
    lines.append("")
    rows = [["lag", *(lag.stage for lag in status.lags)]]
    rows.append(["records", *(_cell(lag.records) for lag in status.lags)])
    rows.append(["bytes", *(_cell(lag.bytes) for lag in status.lags)])
    lines.extend(_table(rows))
    return lines


def _totals(status: NodeStatus) -> list[str]:
    """Rates, sessions, errors and snapshots, one line each."""
    if status.current:
        rates = "  ".join(f"{name} {_cell(value)}" for name, value in status.rates.items())
        rates_line = f"rates/s   {rates}"
    else:
        rates_line = "rates/s   - (node not running)"
    if status.errors:
        errors = "  ".join(f"{name} {value}" for name, value in status.errors.items())
    else:
        errors = "-"
    return [
        rates_line,
        f"sessions  open {_cell(status.sessions_open)}  total {_cell(status.sessions_total)}"
        f"  subscribed {_cell(status.sessions_subscribed)}  commands {_cell(status.commands_total)}",
        f"errors    {errors}",
        f"snapshot  last index {_cell(status.snapshot_last_index)}"
        f"  recovery replayed {_cell(status.recovery_records)} records",
    ]


def render_text(status: NodeStatus) -> str:
    """A compact, top-like view of one node."""
    if status.liveness == Liveness.STOPPED and not status.values:
        return f"seqd node {status.node}: STOPPED - {status.reason}\n"
    sections = (_header(status), _roles_table(status), replicas_table(status.replicas),
                snapshotter_table(status.snapshotter), _pipeline_tables(status), _totals(status))  # fmt: skip
    return "\n\n".join("\n".join(lines) for lines in sections if lines) + "\n"


def render_json(status: NodeStatus) -> dict[str, Any]:
    """The status as plain JSON types; unknown values are None, never 0. The shape is documented
    in docs/operations.md ("seqd status") and checked against it by the tests."""
    return {
        "node": status.node,
        "liveness": status.liveness.value,
        "current": status.current,
        "reason": status.reason,
        "sampled_at": status.sampled_s,
        "state": status.state,
        "supervisor": {
            "pid": status.supervisor_pid,
            "heartbeat": status.supervisor_heartbeat,
            "restarts": status.restarts,
        },
        "roles": {
            role.name: {
                "pid": role.pid,
                "running": role.running,
                "cpu": role.cpu,
                "idle": role.idle,
                "heartbeat": role.heartbeat,
                "heartbeats_per_s": role.heartbeats_per_s,
                "stuck_s": role.stuck_s,
                "errors": role.errors,
            }
            for role in status.roles
        },
        "replicas": replicas_json(status.replicas),
        "positions": dict(status.positions),
        "indexes": dict(status.indexes),
        "lags": {lag.stage: {"records": lag.records, "bytes": lag.bytes} for lag in status.lags},
        "rates_per_s": dict(status.rates),
        "sessions": {"open": status.sessions_open, "total": status.sessions_total, "subscribed": status.sessions_subscribed},
        "commands_total": status.commands_total,
        "errors": dict(status.errors),
        "snapshot": {"last_index": status.snapshot_last_index, "snapshotter": snapshotter_json(status.snapshotter)},
        "recovery": {"records": status.recovery_records},
        "raft": raft_json(status.raft),
        "disk": {
            "state": status.disk,
            "full": None if status.disk is None else status.disk != "room",
            "free_bytes": status.disk_free_bytes,
            "refused": status.disk_refused,
        },
        "counters": dict(status.values),
    }


# --- reading a node ---------------------------------------------------------------------------


def read_counters(node: str) -> tuple[dict[str, int] | None, str | None]:
    """One sample of node `node`'s counters: (values, None), or (None, why not).

    A missing or stale segment is not an error here: it is how a stopped node looks, and ipc's
    message says what to do about it.

    Raises:
        SegmentVersionError: the segment has another layout (this seqd is another release than
            the node's): its numbers would be misread, so none are shown.
    """
    from daemon.layout import attach_counters, counters_name
    from ipc.segment import SegmentError, SegmentVersionError

    try:
        counters = attach_counters(node)
    except SegmentVersionError:
        raise
    except SegmentError as error:
        return None, f"node {node} is not running: {error}"
    except PermissionError:
        return None, (
            f"cannot read /dev/shm{counters_name(node)}: permission denied. Run seqd status as the "
            "node's user (sudo -u seqd seqd status) or as root"
        )
    try:
        return counters.snapshot(), None
    finally:
        counters.close()


def sample_status(
    node: str,
    read: Callable[[str], tuple[dict[str, int] | None, str | None]] = read_counters,
    gap_s: float = SAMPLE_GAP_S,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    tracker: StatusTracker | None = None,
) -> NodeStatus:
    """`seqd status` without --watch: two samples `gap_s` apart, so staleness and rates show.
    A node that is not there is reported at once, without waiting."""
    tracker = tracker or StatusTracker(node)
    values, reason = read(node)
    first = tracker.observe(values, clock(), reason)
    if values is None or first.liveness == Liveness.STOPPED:
        return first
    sleep(gap_s)
    values, reason = read(node)
    return tracker.observe(values, clock(), reason)


def watch(
    node: str,
    read: Callable[[str], tuple[dict[str, int] | None, str | None]] = read_counters,
    interval_s: float = WATCH_INTERVAL_S,
    iterations: int | None = None,
    out: TextIO = sys.stdout,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """`seqd status --watch`: redraw the text view every `interval_s` until interrupted (or
    `iterations` times). Clears the screen like top when `out` is a terminal."""
    tracker = StatusTracker(node)
    clear = out.isatty()
    drawn = 0
    while iterations is None or drawn < iterations:
        values, reason = read(node)
        text = render_text(tracker.observe(values, clock(), reason))
        if clear:
            rows = shutil.get_terminal_size().lines
            text = "\n".join(text.splitlines()[: max(rows - 1, 1)]) + "\n"
            out.write("\x1b[H\x1b[2J")
        elif drawn:
            out.write("\n")
        out.write(text)
        out.flush()
        drawn += 1
        if iterations is None or drawn < iterations:
            sleep(interval_s)
