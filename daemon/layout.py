"""The shared-memory layout of one node: its roles, segment names, ring readers and counters.

`Role` (daemon/node_roles.py, with the ring readers and segment names; re-exported here) names
the node's processes other than the supervisor, with their start phase, drain rank and whether a
single node runs them; every list of roles (config sections, status rows, metrics
labels, the supervisor's start and drain) derives from it. `COUNTERS` declares every counter of
`/seqd.<node>.counters` in segment order: id, name, owner (the one process that writes it: a role
or the supervisor), kind (counter, gauge, enum) and help; status, metrics and the supervisor take
everything from it. A process attaches the counters through a `CounterView` bound to its owner,
which hands out every other owner's counters read-only, so one writer per counter is enforced
(`Counter.add` is a load then a store: two writers lose increments). Who owns what, and why the
segment is fresh per incarnation: docs/architecture.md, "The node's layout".

Changing the table changes the segment's layout: bump `COUNTERS_LAYOUT_VERSION`, which the
segment header carries, so a `seqd status` of another release refuses the segment with a message
instead of misreading it (tests/test_layout.py records the table's fingerprint per version).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Final, Literal

from daemon.counter_states import DiskState, IdleCode, NodeState, RoleState, TransferOutcome
from daemon.node_roles import (
    EGRESS_POLLABLE,
    EGRESS_READERS,
    LOG_READERS,
    PROPOSAL_POLLABLE,
    PROPOSAL_READERS,
    Role,
    counters_name,
    drain_order,
    egress_name,
    log_name,
    node_roles,
    proposal_name,
)
from sequencer.raft.core import RaftRole

__all__ = [
    "COUNTERS", "COUNTERS_LAYOUT_VERSION", "COUNTER_NAMES", "EGRESS_POLLABLE", "EGRESS_READERS", "ERRORS_TOTAL_NAME",
    "ERROR_KIND_COUNTERS", "INCARNATION_BITS", "LOG_READERS", "OPERATOR", "PROPOSAL_POLLABLE", "PROPOSAL_READERS",
    "RAFT_PEER_SLOTS", "READ_ROUND_COUNTERS", "REPLICAS_MAX", "REPLICA_COUNTERS", "ROLE_COUNTERS",
    "SNAPSHOTTER", "SNAPSHOTTER_COUNTERS",
    "SUPERVISOR", "CounterSpec", "CounterView", "DiskState", "IdleCode", "Kind", "NodeState",
    "Owner", "ReadRoundCounters", "ReplicaCounters", "Role", "RoleCounters", "RoleState", "SnapshotterCounters",
    "TransferOutcome", "attach_counters", "commit_index_counter", "committed_index", "counter_spec",
    "counters_name", "create_counters", "drain_order", "egress_name", "errors_total",
    "incarnation_id", "log_name", "node_roles", "proposal_name", "replica_owner",
]


# ---- the counter table -----------------------------------------------------------------------

SUPERVISOR: Final = "supervisor"
# The operator's commands (`seqd cluster transfer-leader`): a request counter written by the tool,
# never by the daemon, so the request and its answer (the replicator's) each have one writer.
OPERATOR: Final = "operator"
# A query replica's counters are written by that replica process: owner "replica<k>".
Owner = Role | Literal["supervisor"] | str


class Kind(StrEnum):
    COUNTER = "counter"  # only grows while the node runs: totals, errors, heartbeats
    GAUGE = "gauge"  # a level: positions, indexes, sizes, pids
    ENUM = "enum"  # a gauge whose value is a member of the counter's `values`


@dataclass(frozen=True)
class CounterSpec:
    """One counter of the node's counters segment."""

    id: int  # its slot in the segment
    name: str
    owner: Owner  # the one process that writes it
    kind: Kind
    help: str
    values: type[IntEnum] | None = None  # Kind.ENUM: what each value means
    # Its one writer in cluster mode, where that is another process (the log ring's writer is the
    # replicator there, not the sequencer); None: `owner` in both modes.
    cluster_owner: Owner | None = None

    def writer(self, clustered: bool) -> Owner:
        """The one process that writes this counter on a node of that mode."""
        return self.cluster_owner if clustered and self.cluster_owner is not None else self.owner

    def value_name(self, value: int) -> str:
        """The name of an ENUM counter's value ('serving' for node.state 2; 'pre-candidate')."""
        assert self.values is not None, self.name
        try:
            return self.values(value).name.lower().replace("_", "-")
        except ValueError:
            return f"unknown({value})"


_table: list[CounterSpec] = []


def _declare(
    name: str, owner: Owner, kind: Kind, help_text: str, values: type[IntEnum] | None = None,
    cluster_owner: Owner | None = None,
) -> CounterSpec:
    """Append the next counter to the table. An ENUM's help lists its values where it says
    `{values}`, else after a colon."""
    assert (kind is Kind.ENUM) == (values is not None), name
    if values is not None:
        listing = ", ".join(
            f"{member.value} {member.name.lower().replace('_', '-')}" for member in values
        )
        help_text = (
            help_text.format(values=listing)
            if "{values}" in help_text
            else f"{help_text}: {listing}"
        )
    spec = CounterSpec(len(_table), name, owner, kind, help_text + ".", values, cluster_owner)
    _table.append(spec)
    return spec


# Session ids are node number (8 bits) | incarnation id | session counter (32 bits): see
# daemon/roles/sequencer.py. The supervisor writes `node.incarnation` already within these bits.
INCARNATION_BITS = 24


def incarnation_id(now_s: float, incarnation: int) -> int:
    """The id of one incarnation of the node's pipeline from the clock: the start time in ms plus
    the incarnation count, cut to `INCARNATION_BITS`. Only the first start of a data directory
    takes it; every later one takes the one before + 1, kept in the data directory
    (daemon/incarnation.py), because two clock ids can repeat: starts 2^24 ms (4.7 hours) apart
    to the millisecond, or a clock stepped back, and the blp takes a node_start naming one of a
    node's last starts for a second copy (sequencer/dedup.py).

    Consecutive incarnations of one `seqd run` never share an id: both terms grow from one start
    to the next (an id taken as the second xor the count did repeat, e.g. second 2 count 4 and
    second 3 count 5)."""
    return (int(now_s * 1000) + incarnation) & ((1 << INCARNATION_BITS) - 1)


# The supervisor's.
SUPERVISOR_PID = _declare("supervisor.pid", SUPERVISOR, Kind.GAUGE, "Process id of the supervisor")
SUPERVISOR_HEARTBEAT = _declare(
    "supervisor.heartbeat",
    SUPERVISOR,
    Kind.COUNTER,
    "Turns of the supervisor's loop; stops advancing when it hangs",
)
SUPERVISOR_RESTARTS = _declare(
    "supervisor.restarts", SUPERVISOR, Kind.COUNTER, "Pipeline restarts since seqd run began"
)
NODE_STATE = _declare("node.state", SUPERVISOR, Kind.ENUM, "Node state", NodeState)
NODE_NUMBER = _declare(
    "node.number", SUPERVISOR, Kind.GAUGE, "Node number (node.number in the config)"
)
NODE_INCARNATION = _declare(
    "node.incarnation",
    SUPERVISOR,
    Kind.GAUGE,
    f"Id of this incarnation of the pipeline ({INCARNATION_BITS} bits), part of every session id",
)
RECOVERY_LAST_INDEX = _declare(
    "recovery.last.index",
    SUPERVISOR,
    Kind.GAUGE,
    "Index of the last record in the journal at start",
)
RECOVERY_LAST_TERM = _declare(
    "recovery.last.term", SUPERVISOR, Kind.GAUGE, "Term of the last record in the journal at start"
)
RECOVERY_LAST_TIMESTAMP_NS = _declare(
    "recovery.last.timestamp_ns",
    SUPERVISOR,
    Kind.GAUGE,
    "Timestamp of the last record in the journal at start (ns since the epoch)",
)


@dataclass(frozen=True)
class RoleCounters:
    """One role's block of counters: the supervisor's launch counters, then the role's own."""

    role: Role
    pid: CounterSpec  # supervisor: set with start_time_ms, right after it starts the role
    start_time_ms: CounterSpec  # supervisor: the process's start time, to tell a reused pid
    cpu: CounterSpec  # supervisor, before the start
    idle: CounterSpec  # supervisor, before the start
    stop: CounterSpec  # supervisor: set to 1 to stop the role (roles ignore signals)
    heartbeat: CounterSpec  # role
    state: CounterSpec  # role
    errors: CounterSpec  # role


def _role_block(role: Role) -> RoleCounters:
    return RoleCounters(
        role=role,
        pid=_declare(f"{role}.pid", SUPERVISOR, Kind.GAUGE, "Process id of the role"),
        start_time_ms=_declare(
            f"{role}.start_time_ms",
            SUPERVISOR,
            Kind.GAUGE,
            "Start time of the role's process (ms since the epoch)",
        ),
        cpu=_declare(
            f"{role}.cpu", SUPERVISOR, Kind.GAUGE, "CPU the role is pinned to, -1 when unpinned"
        ),
        idle=_declare(f"{role}.idle", SUPERVISOR, Kind.ENUM, "Idle strategy of the role", IdleCode),
        stop=_declare(
            f"{role}.stop",
            SUPERVISOR,
            Kind.GAUGE,
            "1 once the supervisor has asked the role to stop",
        ),
        heartbeat=_declare(
            f"{role}.heartbeat",
            role,
            Kind.COUNTER,
            "Duty cycles of the role; stops advancing when the role hangs",
        ),
        state=_declare(f"{role}.state", role, Kind.ENUM, "Lifecycle state of the role", RoleState),
        errors=_declare(
            f"{role}.errors",
            role,
            Kind.COUNTER,
            "Errors of every kind the role counted since start",
        ),
    )


ROLE_COUNTERS: Mapping[Role, RoleCounters] = {role: _role_block(role) for role in Role}

# The sequencer's (the log ring's writer's: the replicator's in cluster mode).
LOG_PUBLISHED_POSITION = _declare("log.published.position", Role.SEQUENCER, Kind.GAUGE, "Bytes published to the log ring by its writer", cluster_owner=Role.REPLICATOR)  # fmt: skip
LOG_PUBLISHED_INDEX = _declare("log.published.index", Role.SEQUENCER, Kind.GAUGE, "Index of the last record published to the log ring", cluster_owner=Role.REPLICATOR)  # fmt: skip
SESSIONS_OPEN = _declare(
    "sessions.open", Role.SEQUENCER, Kind.GAUGE, "Client sessions open on this node"
)
SESSIONS_TOTAL = _declare(
    "sessions.total", Role.SEQUENCER, Kind.COUNTER, "Client sessions opened since start"
)
COMMANDS_TOTAL = _declare(
    "commands.total", Role.SEQUENCER, Kind.COUNTER, "Client commands sequenced since start"
)
ERRORS_PROTOCOL = _declare(
    "errors.protocol",
    Role.SEQUENCER,
    Kind.COUNTER,
    "Frames refused as malformed or out of the protocol",
)
ERRORS_SECURITY = _declare(
    "errors.security",
    Role.SEQUENCER,
    Kind.COUNTER,
    "Connections refused by the peer credentials check",
)
ERRORS_SLOW_CLIENT = _declare(
    "errors.slow_client",
    Role.SEQUENCER,
    Kind.COUNTER,
    "Clients disconnected for not reading their replies",
)
ERRORS_DISK_FULL = _declare(
    "errors.disk_full",
    Role.SEQUENCER,
    Kind.COUNTER,
    "Sessions and commands refused with disk_full while the journal's disk was short",
)
TIMERS_PENDING = _declare(
    "timers.pending", Role.SEQUENCER, Kind.GAUGE, "Timers scheduled and not yet fired"
)
EGRESS_CONSUMED_POSITION = _declare(
    "egress.consumed.position", Role.SEQUENCER, Kind.GAUGE, "Egress position read by the sequencer"
)

# The journaller's.
JOURNAL_DURABLE_POSITION = _declare(
    "journal.durable.position",
    Role.JOURNALLER,
    Kind.GAUGE,
    "Log position made durable by the journaller (fdatasync)",
)
JOURNAL_DURABLE_INDEX = _declare(
    "journal.durable.index", Role.JOURNALLER, Kind.GAUGE, "Index of the last durable record"
)
JOURNAL_SYNCS = _declare(
    "journal.syncs", Role.JOURNALLER, Kind.COUNTER, "Group commits (one fdatasync each)"
)
ERRORS_JOURNAL = _declare(
    "errors.journal",
    Role.JOURNALLER,
    Kind.COUNTER,
    "Journal failures (each one stops the node: fail-stop)",
)
JOURNAL_DISK_FULL = _declare(
    "journal.disk_full",
    Role.JOURNALLER,
    Kind.ENUM,
    "Journal disk: {values} (short: new commands refused with disk_full; full: records wait in the ring)",
    DiskState,
)
JOURNAL_FREE_BYTES = _declare(
    "journal.free_bytes", Role.JOURNALLER, Kind.GAUGE, "Free bytes on the journal's file system"
)
# On a single node the journal's durable position is the commit position; in a cluster the
# commit is the replicator's (`raft.commit.*`) and these stay 0.
COMMIT_POSITION = _declare(
    "commit.position",
    Role.JOURNALLER,
    Kind.GAUGE,
    "Log position safe to apply (durable here, or on a majority)",
)
COMMIT_INDEX = _declare(
    "commit.index", Role.JOURNALLER, Kind.GAUGE, "Index of the last committed record"
)

# The blp's.
RECOVERY_RECORDS = _declare(
    "recovery.records",
    Role.BLP,
    Kind.COUNTER,
    "Records replayed from the journal during the last recovery",
)
BLP_APPLIED_POSITION = _declare(
    "blp.applied.position",
    Role.BLP,
    Kind.GAUGE,
    "Log position applied by the business-logic process",
)
BLP_APPLIED_INDEX = _declare(
    "blp.applied.index",
    Role.BLP,
    Kind.GAUGE,
    "Index of the last record applied by the business-logic process",
)
BLP_ROLLING_HASH = _declare(
    "blp.rolling_hash",
    Role.BLP,
    Kind.GAUGE,
    "Rolling hash of the state machine's outputs (replicas agree on it)",
)
CLIENTS_EXPIRED = _declare(
    "clients.expired", Role.BLP, Kind.GAUGE, "Client ids forgotten by the dedup table"
)
OUTPUTS_TOO_LARGE = _declare(
    "outputs.too_large",
    Role.BLP,
    Kind.GAUGE,
    "Replies and events no client frame can carry, replaced (replay included)",
)
EGRESS_PUBLISHED_POSITION = _declare(
    "egress.published.position",
    Role.BLP,
    Kind.GAUGE,
    "Bytes of replies and events published to the egress ring",
)
SNAPSHOT_LAST_INDEX = _declare(
    "snapshot.last.index", Role.BLP, Kind.GAUGE, "Log index of the newest snapshot"
)
# Written by the blp's snapshot writer (a fork of the blp); the journal may go before it.
SNAPSHOT_OLDEST_INDEX = _declare(
    "snapshot.oldest.index", Role.BLP, Kind.GAUGE, "Log index of the oldest valid snapshot kept"
)
SNAPSHOT_WRITES = _declare(
    "snapshot.writes", Role.BLP, Kind.COUNTER, "Snapshots written since start"
)
ERRORS_SNAPSHOT = _declare(
    "errors.snapshot",
    Role.BLP,
    Kind.COUNTER,
    "Snapshots that failed to write or were found invalid",
)

# The replicator's (cluster mode only: a single node leaves them 0).
RAFT_ROLE = _declare(
    "raft.role", Role.REPLICATOR, Kind.ENUM, "Raft standing of this node", RaftRole
)
RAFT_TERM = _declare("raft.term", Role.REPLICATOR, Kind.GAUGE, "Current Raft term")
RAFT_LEADER = _declare(
    "raft.leader", Role.REPLICATOR, Kind.GAUGE, "Node number of the current leader, 0 when unknown"
)
# What recovery replays in cluster mode: the journal may end with entries that are not known to
# be committed (a conflict may still truncate them), so the blp replays only up to here and the
# replicator hands it the rest through the log ring once committed. A single node: the journal's
# last index (everything durable is committed).
RECOVERY_COMMIT_INDEX = _declare(
    "recovery.commit.index",
    SUPERVISOR,
    Kind.GAUGE,
    "Index the blp replays the journal up to at start (known committed)",
)
# In a cluster the commit is the replicator's: the index a majority holds durably (of the
# leader's term), cut to what this node holds durably and has written to its log ring. The
# blp's ring reader is limited by the position (the index is stored first).
RAFT_COMMIT_INDEX = _declare(
    "raft.commit.index",
    Role.REPLICATOR,
    Kind.GAUGE,
    "Index of the last record committed by Raft and held durably here",
)
RAFT_COMMIT_POSITION = _declare(
    "raft.commit.position",
    Role.REPLICATOR,
    Kind.GAUGE,
    "Log ring position of the end of the record at raft.commit.index (the blp's limit)",
)
RAFT_LAST_INDEX = _declare(
    "raft.last_index",
    Role.REPLICATOR,
    Kind.GAUGE,
    "Last index of this node's Raft log (a follower's lag is this minus its match index)",
)
RAFT_PENDING_FORWARDS = _declare(
    "raft.pending_forwards",
    Role.REPLICATOR,
    Kind.GAUGE,
    "Records this node sequenced that are not yet committed (resent on a change of leader)",
)
# Per follower, on the leader (0 elsewhere): the slot k = 1.. is the k-th other member in the
# config's order (`raft.peer<k>.node` names it); 4 slots hold the followers of a 5-node cluster.
RAFT_PEER_SLOTS = 4
RAFT_PEER_NODE = tuple(
    _declare(f"raft.peer{k}.node", Role.REPLICATOR, Kind.GAUGE, f"Node number of peer slot {k}")
    for k in range(1, RAFT_PEER_SLOTS + 1)
)
RAFT_PEER_MATCH_INDEX = tuple(
    _declare(
        f"raft.peer{k}.match_index",
        Role.REPLICATOR,
        Kind.GAUGE,
        f"On the leader: last index peer slot {k} holds durably in agreement with it",
    )
    for k in range(1, RAFT_PEER_SLOTS + 1)
)


# The query replicas' (`[replicas] count`, daemon/roles/replica.py): a fixed block per slot, so
# the table does not depend on the config. A replica owns its block but the launch counters.
# Four: each replica is a process holding its own copy of the state; on a machine with few cores
# more than that would take CPU from the pipeline they follow.
REPLICAS_MAX: Final = 4


def replica_owner(number: int) -> str:
    """The owner name of replica `number`'s counters (and its row in `seqd status`)."""
    return f"replica{number}"


@dataclass(frozen=True)
class ReplicaCounters:
    """One query replica's block: the supervisor's launch counters, then the replica's own."""

    number: int
    owner: str
    pid: CounterSpec  # supervisor
    start_time_ms: CounterSpec  # supervisor
    stop: CounterSpec  # supervisor: 1 to stop it
    restarts: CounterSpec  # supervisor: how often it died and was started again
    heartbeat: CounterSpec  # replica
    applied_index: CounterSpec  # replica
    subscribers: CounterSpec  # replica
    queries: CounterSpec  # replica
    items_sent: CounterSpec  # replica
    errors: CounterSpec  # replica


def _replica_block(number: int) -> ReplicaCounters:
    owner = replica_owner(number)
    return ReplicaCounters(
        number=number,
        owner=owner,
        pid=_declare(f"{owner}.pid", SUPERVISOR, Kind.GAUGE, "Process id of the query replica"),
        start_time_ms=_declare(
            f"{owner}.start_time_ms",
            SUPERVISOR,
            Kind.GAUGE,
            "Start time of the query replica's process (ms since the epoch)",
        ),
        stop=_declare(
            f"{owner}.stop", SUPERVISOR, Kind.GAUGE, "1 once the supervisor has asked it to stop"
        ),
        restarts=_declare(
            f"{owner}.restarts",
            SUPERVISOR,
            Kind.COUNTER,
            "Times the query replica died and was started again (the pipeline never waits for it)",
        ),
        heartbeat=_declare(
            f"{owner}.heartbeat", owner, Kind.COUNTER, "Turns of the query replica's loop"
        ),
        applied_index=_declare(
            f"{owner}.applied.index", owner, Kind.GAUGE, "Index of the last committed record the query replica applied"
        ),
        subscribers=_declare(f"{owner}.subscribers", owner, Kind.GAUGE, "Catch-up subscriptions open on it"),
        queries=_declare(f"{owner}.queries", owner, Kind.COUNTER, "Queries answered"),
        items_sent=_declare(f"{owner}.items_sent", owner, Kind.COUNTER, "Subscription items sent (events, records)"),
        errors=_declare(
            f"{owner}.errors",
            owner,
            Kind.COUNTER,
            "Errors the query replica counted (subscribers dropped, failed queries, refusals)",
        ),
    )


REPLICA_COUNTERS: tuple[ReplicaCounters, ...] = tuple(
    _replica_block(number) for number in range(REPLICAS_MAX)
)
RAFT_RETAIN_INDEX = _declare(
    "raft.retain.index",
    Role.REPLICATOR,
    Kind.GAUGE,
    "On the leader: the journaller keeps records from here (a follower catching up after a "
    "snapshot needs them); 0: no hold",
)

# Linearizable queries on a cluster (daemon/read_rounds.py): replica k raises its `asked` round;
# the replicator gets a read index for it (ReadIndex through the leader), sets `index`, then
# `answered` to the round. One writer each.
@dataclass(frozen=True)
class ReadRoundCounters:
    asked: CounterSpec  # replica k
    index: CounterSpec  # replicator: the read index of round `answered` (or a later one)
    answered: CounterSpec  # replicator


READ_ROUND_COUNTERS: tuple[ReadRoundCounters, ...] = tuple(
    ReadRoundCounters(
        _declare(f"replica{k}.read.asked", f"replica{k}", Kind.GAUGE, "Latest read round asked"),
        _declare(f"raft.read{k}.index", Role.REPLICATOR, Kind.GAUGE, "Read index of that round"),
        _declare(f"raft.read{k}.answered", Role.REPLICATOR, Kind.GAUGE, "Latest round answered"),
    )
    for k in range(REPLICAS_MAX)
)
RAFT_LEARNER = _declare("raft.learner", Role.REPLICATOR, Kind.GAUGE, "1 on a learner, else 0")


# Operating a cluster (docs/cluster.md, "Operating a cluster"). A leadership transfer is asked for
# by writing `raft.transfer.request` (request number << 8 | target node, 0: the best follower); the
# replicator sets the outcome, then copies the value it acted on to `raft.transfer.handled`.
RAFT_TRANSFER_TARGET_BITS = 8
RAFT_TRANSFER_REQUEST = _declare("raft.transfer.request", OPERATOR, Kind.GAUGE, "Leadership transfer asked for by seqd cluster transfer-leader: number << 8 | target (0: best follower)")
RAFT_TRANSFER_HANDLED = _declare("raft.transfer.handled", Role.REPLICATOR, Kind.GAUGE, "The raft.transfer.request value the replicator last acted on")
RAFT_TRANSFER_OUTCOME = _declare("raft.transfer.outcome", Role.REPLICATOR, Kind.ENUM, "What became of the last leadership transfer", TransferOutcome)
RAFT_ELECTIONS = _declare("raft.elections", Role.REPLICATOR, Kind.COUNTER, "Elections this node stood in (as candidate)")
RAFT_STEP_DOWNS = _declare("raft.step_downs", Role.REPLICATOR, Kind.COUNTER, "Times this node stopped leading")
ERRORS_PEER_REFUSED = _declare("errors.peer_refused", Role.REPLICATOR, Kind.COUNTER, "Peer connections and frames refused (bad proof or HMAC, another cluster, malformed)")
RAFT_PEER_LAST_CONTACT_MS = tuple(
    _declare(f"raft.peer{k}.last_contact_ms", Role.REPLICATOR, Kind.GAUGE, f"When a message from peer slot {k} last arrived (ms since the epoch, 0: never)")
    for k in range(1, RAFT_PEER_SLOTS + 1)
)  # fmt: skip
# The gapless forward stream (sequencer/cluster/forwards.py, docs/cluster.md "Forwards"): the
# transport's figures and the replicator's resends, copied at a tick's pass (every tick on a
# leader, at least every 0.1 s on a follower: daemon/roles/replicator_ticks.py), so an operator
# can see and alert on forwards that are dropped and restarted, or a leader that refuses them.
RAFT_FORWARDS_DROPPED = _declare("raft.forwards_dropped", Role.REPLICATOR, Kind.COUNTER, "Forwarded records dropped: not sent on a broken forward stream (a follower), or not taken (the leader); each goes again with a restart or resend")
RAFT_FORWARD_STREAMS_BROKEN = _declare("raft.forward_streams_broken", Role.REPLICATOR, Kind.COUNTER, "This node's forward streams to the leader ended by a dropped record (each restarts with an ordered resend)")
RAFT_FORWARD_STREAMS_REFUSED = _declare("raft.forward_streams_refused", Role.REPLICATOR, Kind.COUNTER, "Connections from followers this node closed: a forwarded batch not taken (not leading, inbox full)")
RAFT_FORWARDS_RESENT = _declare("raft.forwards_resent", Role.REPLICATOR, Kind.COUNTER, "Pending records sent (or proposed) again: at a change of leader, or not committed within the resend age")
# Flow control by bytes (docs/cluster.md, "Catch-up"): the window's high-water mark per follower.
RAFT_PEER_INFLIGHT_BYTES_PEAK = tuple(
    _declare(f"raft.peer{k}.inflight_bytes_peak", Role.REPLICATOR, Kind.GAUGE, f"On the leader: the most payload bytes of AppendEntries peer slot {k} had unanswered at once, in this term (bounded by cluster.inflight_bytes_max plus one message)")
    for k in range(1, RAFT_PEER_SLOTS + 1)
)  # fmt: skip

# Rolling upgrades (sequencer/app_versions.py): `seqd cluster raise-version` asks (number << 16 | version).
APP_VERSION_RAISE_REQUEST = _declare("app.version.raise_request", OPERATOR, Kind.GAUGE, "App version raise asked for by seqd cluster raise-version: number << 16 | version")
APP_VERSION_RAISE_HANDLED = _declare("app.version.raise_handled", Role.SEQUENCER, Kind.GAUGE, "The app.version.raise_request value the sequencer last sequenced")
APP_VERSION_ACTIVE = _declare("app.version.active", Role.BLP, Kind.GAUGE, "App schema version active at the applied index (0: none reported yet)")
APP_VERSION_RAISES_REFUSED = _declare("app.version.raises_refused", Role.BLP, Kind.COUNTER, "Raises of the app version refused (a member's code does not know it)")


# The snapshotter (`snapshot.writer = "replica"`, daemon/roles/snapshotter.py) writes the snapshot
# files instead of a fork of the blp; `daemon.replicas` runs it as it runs a query replica.
SNAPSHOTTER: Final = "snapshotter"


@dataclass(frozen=True)
class SnapshotterCounters:
    """The supervisor's launch counters (pid, start_time_ms, stop, restarts), then the
    snapshotter's own; `oldest_index` is the journaller's cue, as `snapshot.oldest.index`."""

    owner: str
    pid: CounterSpec
    start_time_ms: CounterSpec
    stop: CounterSpec
    restarts: CounterSpec
    heartbeat: CounterSpec
    applied_index: CounterSpec
    snapshot_index: CounterSpec
    oldest_index: CounterSpec
    writes: CounterSpec
    errors: CounterSpec


SNAPSHOTTER_COUNTERS = SnapshotterCounters(
    owner=SNAPSHOTTER,
    pid=_declare("snapshotter.pid", SUPERVISOR, Kind.GAUGE, "Process id of the snapshotter (snapshot.writer = replica)"),
    start_time_ms=_declare("snapshotter.start_time_ms", SUPERVISOR, Kind.GAUGE, "Start time of the snapshotter's process (ms since the epoch)"),
    stop=_declare("snapshotter.stop", SUPERVISOR, Kind.GAUGE, "1 once the supervisor has asked it to stop"),
    restarts=_declare("snapshotter.restarts", SUPERVISOR, Kind.COUNTER, "Times the snapshotter died and was started again (the pipeline never waits for it)"),
    heartbeat=_declare("snapshotter.heartbeat", SNAPSHOTTER, Kind.COUNTER, "Turns of the snapshotter's loop"),
    applied_index=_declare("snapshotter.applied.index", SNAPSHOTTER, Kind.GAUGE, "Index of the last committed record the snapshotter applied"),
    snapshot_index=_declare("snapshotter.snapshot.index", SNAPSHOTTER, Kind.GAUGE, "Log index of the newest snapshot the snapshotter wrote"),
    oldest_index=_declare("snapshotter.oldest.index", SNAPSHOTTER, Kind.GAUGE, "Log index of the oldest valid snapshot kept, after the snapshotter's retention"),
    writes=_declare("snapshotter.writes", SNAPSHOTTER, Kind.COUNTER, "Snapshots the snapshotter wrote since start"),
    errors=_declare("snapshotter.errors", SNAPSHOTTER, Kind.COUNTER, "Snapshots the snapshotter failed to write"),
)  # fmt: skip

# Events are written to egress only while a session attached to this node subscribed to them
# (docs/contracts.md, "Events reach the sessions that subscribed"): the sequencer raises this
# before it sequences or forwards anything of a subscribing session; the blp reads it after the
# records it applies.
GATEWAY_EVENT_SUBSCRIBERS = _declare("gateway.event_subscribers", Role.SEQUENCER, Kind.GAUGE, "Sessions attached to this node that subscribed to events (0: the blp writes no events to egress)")  # fmt: skip
# What replication costs in messages (sequencer/raft/config.py, `defer_commit_notices`), copied
# at a tick's pass (at least every 0.1 s on an idle follower): per command, they are what a
# change to the leader's sending is judged by.
RAFT_APPENDS_SENT = _declare("raft.appends_sent", Role.REPLICATOR, Kind.COUNTER, "AppendEntries this node sent as leader (with entries, probes and commit notices)")  # fmt: skip
RAFT_EMPTY_APPENDS_SENT = _declare("raft.empty_appends_sent", Role.REPLICATOR, Kind.COUNTER, "AppendEntries this node sent as leader with no entries: probes and commits alone")  # fmt: skip
RAFT_COMMIT_NOTICES_SENT = _declare("raft.commit_notices_sent", Role.REPLICATOR, Kind.COUNTER, "AppendEntries this node sent as leader for a commit index alone (held back until no entries carried it)")  # fmt: skip
RAFT_APPEND_ANSWERS_SENT = _declare("raft.append_answers_sent", Role.REPLICATOR, Kind.COUNTER, "AppendEntriesResponses this node sent as follower")  # fmt: skip
RAFT_NOTICES_UNANSWERED = _declare("raft.notices_unanswered", Role.REPLICATOR, Kind.COUNTER, "Commit notices this node, following, left unanswered: it had acknowledged that far already")  # fmt: skip
RAFT_STORED_ENTRIES_SENT = _declare("raft.stored_entries_sent", Role.REPLICATOR, Kind.COUNTER, "Entries in AppendEntries this node sent as leader that it read back from its journal, resends included (a probe resumed re-reads and re-sends): a follower behind what it kept in memory (cluster.follower_log_retention_entries while it followed, 65,536 applied entries while it leads)")  # fmt: skip

# seqd's own session rules (sequencer/rules_versions.py): the blp publishes the active version and
# the one every member reported (`due`); the sequencer asks the log to make `due` active.
RULES_VERSION_ACTIVE = _declare("rules.version.active", Role.BLP, Kind.GAUGE, "seqd's session rules version active at the applied index (1: the rules before versions)")  # fmt: skip
RULES_VERSION_DUE = _declare("rules.version.due", Role.BLP, Kind.GAUGE, "A session rules version every member reported, above the active one, that this node's sequencer asks the log to make active (0: none)")  # fmt: skip
# A leader that refuses a follower's forwarded records says why (sequencer/raft/transport.py, the
# REFUSED frame): counted on the follower, whose replicator's log gives the reason.
RAFT_FORWARD_REFUSALS_RECEIVED = _declare("raft.forward_refusals_received", Role.REPLICATOR, Kind.COUNTER, "Refusals of this node's forwarded records the leader sent back with its reason (in the replicator's log): each closes that connection, and the records go again on the next")  # fmt: skip
# The replicator's passes through its Raft core (daemon/roles/replicator.py, `_process`), copied
# once a tick's pass: a follower's quiet ticks make none (daemon/roles/replicator_ticks.py).
RAFT_PASSES = _declare("raft.passes", Role.REPLICATOR, Kind.COUNTER, "Passes of the replicator's loop through the Raft core (per peer message batch, fdatasync and proposal batch; a follower's tick makes one only when something is due)")  # fmt: skip
# Where this start serves from (a single node's sequencer; 0 in a cluster, whose leader stamps the
# record): the supervisor's "serving ... from index N" reports it, as the sequencer's log says it.
SEQUENCER_SERVING_INDEX = _declare("sequencer.serving.index", Role.SEQUENCER, Kind.GAUGE, "Index of this start's node_start record: clients' commands come after it (0: not serving yet, a cluster's node, or a blue-green standby standing by)")  # fmt: skip


def commit_index_counter(clustered: bool) -> CounterSpec:
    """The node's commit index: the journaller's `commit.index` on a single node, the
    replicator's `raft.commit.index` in a cluster (the other one stays 0)."""
    return RAFT_COMMIT_INDEX if clustered else COMMIT_INDEX


def committed_index(values: Mapping[str, int]) -> int | None:
    """The commit index from a reading of the counters, whichever role owns it on this node;
    None when neither was read."""
    found = [values[spec.name] for spec in (COMMIT_INDEX, RAFT_COMMIT_INDEX) if spec.name in values]
    return max(found) if found else None


COUNTERS: tuple[CounterSpec, ...] = tuple(_table)
COUNTER_NAMES: tuple[str, ...] = tuple(spec.name for spec in COUNTERS)
_BY_NAME: Mapping[str, CounterSpec] = {spec.name: spec for spec in COUNTERS}
assert len(_BY_NAME) == len(COUNTERS), "counter names must be unique"
assert all(spec.id == slot for slot, spec in enumerate(COUNTERS))
# The error counters by kind, which `seqd status` lists; the node's error total is not one of
# them but the sum of every process's `.errors` (`errors_total`), shown under this name.
ERROR_KIND_COUNTERS: tuple[CounterSpec, ...] = tuple(
    spec for spec in COUNTERS if spec.name.startswith("errors.")
)
ERRORS_TOTAL_NAME = "errors.total"
assert ERRORS_TOTAL_NAME not in _BY_NAME
# The version of this table, carried by the segment header (see the module docstring).
COUNTERS_LAYOUT_VERSION = 11


def counter_spec(name: str) -> CounterSpec | None:
    """The declaration of counter `name`, or None for a name this release does not have."""
    return _BY_NAME.get(name)


# Every process's own error counter: the pipeline's roles', the snapshotter's and each query
# replica's. A process outside the pipeline that fails (a snapshot it could not write) is an error
# of the node as much as a role's is.
ERROR_COUNTER_NAMES: tuple[str, ...] = (
    *(block.errors.name for block in ROLE_COUNTERS.values()),
    SNAPSHOTTER_COUNTERS.errors.name,
    *(replica.errors.name for replica in REPLICA_COUNTERS),
)


def errors_total(values: Mapping[str, int]) -> int | None:
    """The node's error total: the sum of the `ERROR_COUNTER_NAMES` in `values` (None if none is)."""
    found = [values[name] for name in ERROR_COUNTER_NAMES if name in values]
    return sum(found) if found else None


# ---- attaching: daemon/counter_view.py (re-exported here; it reads the table above) ----------

from daemon.counter_view import CounterView, attach_counters, create_counters  # noqa: E402
