"""Node configuration: a TOML file plus command-line overrides, validated before anything starts.

Every field has a default that works on a small shared machine (2 cores, backoff idle strategies,
nothing pinned). The latency profile (busy-spin, pinned roles) is opt-in per role. Validation
errors name the field, the value and what to do, and are raised before any process, shared-memory
segment or socket exists.
"""

from __future__ import annotations

import ipaddress
import os
import stat
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import msgspec

from daemon.config_catchup import (  # noqa: F401 (re-exported: the bounds' old home)
    INFLIGHT_BYTES_FLOOR,
    INFLIGHT_BYTES_LIMIT,
    STORAGE_READ_BYTES_PER_PASS_FLOOR,
    STORAGE_READ_BYTES_PER_PASS_LIMIT,
    catch_up_errors,
)
from daemon.layout import RAFT_PEER_SLOTS, REPLICAS_MAX, Role, node_roles
from ipc.ring import frame_bytes
from sequencer.egress import EGRESS_PAYLOAD_BYTES_MAX
from sequencer.raft.config import (
    FOLLOWER_LOG_RETENTION_ENTRIES_DEFAULT,
    INFLIGHT_BYTES_MAX_DEFAULT,
    STORAGE_READ_BYTES_PER_PASS_MAX_DEFAULT,
)
from sequencer.raft.peer_protocol import CLUSTER_ID_MAX, SECRET_BYTES_MIN

__all__ = [
    "SNAPSHOT_WRITERS", "SNAPSHOT_WRITER_FORK", "SNAPSHOT_WRITER_REPLICA", "ClusterConfig", "Config",
    "ConfigError", "JournalConfig", "MemberConfig", "MetricsConfig", "NodeConfig", "ReplicasConfig", "RingConfig",
    "RoleConfig", "RolesConfig", "SnapshotConfig", "SocketConfig", "StandbyConfig", "load_config",
]  # fmt: skip

IdleName = Literal["spin", "yield", "backoff", "blocking"]

RING_CAPACITY_BYTES_MIN = 1 << 16  # must hold at least a few maximum-size frames
RING_CAPACITY_BYTES_MAX = 1 << 30  # shared memory is locked-in RAM for practical purposes
JOURNAL_SEGMENT_BYTES_MIN = 1 << 20  # a segment must hold a full ring's worth of batches
NODE_NUMBER_MAX = 255  # session ids carry the node number in their top 8 bits
SOCKET_PATH_BYTES_MAX = 107  # sun_path is 108 bytes including the terminating NUL
# A COMMAND frame is 8 header + 24 command-header bytes + payload, at most FRAME_BYTES_MAX (1 MiB).
COMMAND_BYTES_MAX = (1 << 20) - 32
# What a command costs in the log beyond its payload: the 48-byte record header, the 8-byte acked
# request id, up to 7 bytes of padding, and a possible padding frame before it at the wrap.
RECORD_OVERHEAD_BYTES_MAX = 48 + 8 + 7
# The egress ring must hold the largest output the blp writes, a reply with the largest payload a
# client REPLY frame carries (sequencer.egress), or the blp could never write it: the power of
# two above that one frame of 1 MiB + 8 bytes. Whatever the config, every replica makes the same
# replies (the blp's limit is the protocol's), so only this ring has to be large enough.
EGRESS_CAPACITY_BYTES_MIN = 2 << 20
assert frame_bytes(EGRESS_PAYLOAD_BYTES_MAX) <= EGRESS_CAPACITY_BYTES_MIN, EGRESS_PAYLOAD_BYTES_MAX
assert EGRESS_CAPACITY_BYTES_MIN <= RING_CAPACITY_BYTES_MAX
# Raft's static membership (docs/cluster.md): 3 tolerates one node down, 5 two; 1 is no
# cluster (leave `[cluster]` out) and an even count adds a node without adding tolerance.
CLUSTER_MEMBERS_ALLOWED = (3, 5)  # voters; learners come on top
# Voters and learners together: a node shows each other member in a slot of its counters.
CLUSTER_MEMBERS_MAX = 1 + RAFT_PEER_SLOTS
# The replicator's clock granularity bounds: a tick below 1 ms is below what an asyncio timer
# keeps on a loaded machine; above 100 ms a LAN failover could not stay within a second.
TICK_MS_MIN = 1
TICK_MS_MAX = 100
# The catch-up bounds (`inflight_bytes_max`, the pass budget, the follower's memory window):
# daemon/config_catchup.py.


class ConfigError(Exception):
    """The configuration is invalid; the message names the field and says what to do."""


class NodeConfig(msgspec.Struct, forbid_unknown_fields=True):
    name: str = "n1"
    number: int = 1
    data_dir: str = "/var/lib/seqd"
    app: str = "sequencer.apps.ledger:Ledger"
    # Development aid: time.time, random and friends raise inside the app's apply/on_timer, so
    # a nondeterministic state machine fails loudly at the first offending record. Slower.
    debug_determinism: bool = False
    # A client id with no session for this long is forgotten by the dedup table (which would
    # otherwise grow with every client id ever seen). Must exceed any client's reconnect timeout
    # by far, and be the same on every replica: it decides what is deduplicated.
    client_expiry_s: float = 86400.0


class SocketConfig(msgspec.Struct, forbid_unknown_fields=True):
    path: str = "/run/seqd/seqd.sock"
    # Peers allowed by SO_PEERCRED. The daemon's own uid is always allowed; root is allowed
    # only when listed. An empty list allows nobody else.
    allowed_uids: list[int] = msgspec.field(default_factory=list)
    allowed_gids: list[int] = msgspec.field(default_factory=list)
    sessions_max: int = 1024
    client_write_buffer_bytes_max: int = 4 << 20
    # The largest command payload a client may send; larger ones get a REJECTED reply and are
    # never sequenced. Every ring and journal batch must hold at least one command this large.
    command_bytes_max: int = COMMAND_BYTES_MAX


class RingConfig(msgspec.Struct, forbid_unknown_fields=True):
    log_capacity_bytes: int = 16 << 20
    egress_capacity_bytes: int = 16 << 20


class JournalConfig(msgspec.Struct, forbid_unknown_fields=True):
    segment_bytes: int = 64 << 20
    preallocate: bool = True
    batch_bytes_max: int = 4 << 20


class RoleConfig(msgspec.Struct, forbid_unknown_fields=True):
    idle: IdleName = "blocking"
    cpu: int = -1  # -1: not pinned


# `[roles.<role>]`: one section per role, in `Role` order (the replicator's is read only in a cluster), made from
# daemon.layout.Role (a struct, not a dict, so an error names the section: `$.roles.blp.idle`).
_NODE_ROLES = node_roles(clustered=True)
if TYPE_CHECKING:

    class RolesConfig(msgspec.Struct, forbid_unknown_fields=True):
        """Has one `RoleConfig` field per role of `_NODE_ROLES`; use `Config.role(role)`."""

else:
    RolesConfig = msgspec.defstruct(
        "RolesConfig",
        [(role.value, RoleConfig, msgspec.field(default_factory=RoleConfig)) for role in _NODE_ROLES],
        forbid_unknown_fields=True,
        module=__name__,
    )


# `snapshot.writer`: the blp's fork writes the file, or the snapshotter (daemon/roles/snapshotter.py).
SNAPSHOT_WRITER_FORK: Final = "fork"
SNAPSHOT_WRITER_REPLICA: Final = "replica"
SNAPSHOT_WRITERS: Final = (SNAPSHOT_WRITER_FORK, SNAPSHOT_WRITER_REPLICA)


class SnapshotConfig(msgspec.Struct, forbid_unknown_fields=True):
    every_records: int = 0  # 0: only on `seqd snapshot` (and every_bytes)
    every_bytes: int = 0  # command payload bytes between automatic snapshots; 0: off
    keep: int = 3
    delete_journal: bool = False  # delete journal segments wholly before the oldest kept snapshot
    # Who writes the file of a SNAPSHOT record: "fork", the blp forks a child that writes it (the
    # blp pauses for the fork, which copies its page tables: ~6 ms at 1M accounts, growing with
    # the state); "replica", a snapshotter process that follows the committed journal with its own
    # copy of the state writes it, and the blp never pauses (docs/architecture.md, "Snapshots").
    writer: str = "fork"


class ReplicasConfig(msgspec.Struct, forbid_unknown_fields=True):
    """`[replicas]`: query replicas (docs/query-side.md), processes that follow the committed
    journal, answer queries and serve catch-up subscriptions; the pipeline never waits for them."""

    count: int = 0  # 0..REPLICAS_MAX
    # Replica k listens on `<socket_dir>/<socket stem>.replica<k>.sock`; "": beside socket.path.
    socket_dir: str = ""
    cpu: int = -1  # -1: not pinned (a replica never busy-spins)
    # Committed items (records and their events) kept in memory for live subscribers; one further
    # behind is fed from the journal instead (it re-applies from a snapshot).
    recent_bytes_max: int = 8 << 20
    subscribers_max: int = 256  # subscriptions and query connections per replica
    # The commit counter is read this often while nothing is new (the journal is in the page
    # cache; a poll costs microseconds): the delay a live subscriber sees at most, beyond commit.
    poll_ms: float = 2.0
    # A subscriber fed from the journal (by a follower of its own) that reads nothing for this
    # long is dropped with `subscriber_too_slow`, so its follower goes to another; it resumes.
    catchup_stall_s: float = 10.0


class StandbyConfig(msgspec.Struct, forbid_unknown_fields=True):
    """`[standby]`: this node is the green of a blue-green switch-over (docs/evolution.md): it
    follows the running node of `blue_config` (blue) by transforming blue's committed records
    into its own journal, and takes over blue's socket when `seqd bluegreen switch` asks."""

    blue_config: str = ""  # the config file blue runs with (its journal, counters and socket)
    transform: str = ""  # "package.module:Name", as `seqd log migrate --transform`
    # Blue's commit counter is read this often while nothing is new: the delay green adds to
    # following, and to noticing a switch request (a stat of one file).
    poll_ms: float = 1.0


class MetricsConfig(msgspec.Struct, forbid_unknown_fields=True):
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 9464
    allow_remote: bool = False  # serve on a non-loopback address (the counters are not secret, but say so)


class MemberConfig(msgspec.Struct, forbid_unknown_fields=True):
    """One node of the cluster: `[[cluster.members]]`."""

    id: int  # its node.number
    peer_address: str  # "host:port" the other nodes dial ("[::1]:7101" for IPv6)
    # The member's client socket, for tools on a machine that runs several members (tests, a
    # demo); "" when each member runs on its own machine at socket.path.
    socket_path: str = ""
    # Its node.name, which WELCOME's `leader` shows while it leads; "": its id is shown instead.
    name: str = ""
    # A learner: a non-voting member that receives the log and applies it, but never votes,
    # never leads and never counts toward a majority (docs/cluster.md, "Learners").
    learner: bool = False


class ClusterConfig(msgspec.Struct, forbid_unknown_fields=True):
    """`[cluster]`: present only in cluster mode; a node without it runs alone, as before.

    Times are in ms. The replicator ticks its Raft core every `tick_ms`; a leader sends a
    heartbeat every `heartbeat_ms`; a follower that hears nothing for a random time in
    [election_timeout_ms, 2 x election_timeout_ms) starts an election (Raft 5.2; the core's rule).
    """

    cluster_id: int = 1
    members: list[MemberConfig] = msgspec.field(default_factory=list)
    # A file holding the cluster secret (at least SECRET_BYTES_MIN bytes, mode 0600), the same
    # on every node; its path, never the secret, is in the config.
    secret_file: str = "/etc/seqd/cluster.secret"
    # "host:port" to accept peers on; "": this node's peer_address.
    peer_listen: str = ""
    allow_non_loopback: bool = False  # accept peers on a non-loopback address (the real cluster)
    tick_ms: int = 10
    heartbeat_ms: int = 50
    election_timeout_ms: int = 300
    # Flow control: payload bytes a leader has in unanswered AppendEntries to one follower before
    # it waits for an answer (sequencer/raft/config.py, `RaftConfig.inflight_bytes_max`).
    inflight_bytes_max: int = INFLIGHT_BYTES_MAX_DEFAULT
    # What a leader reads from its journal for all its lagging followers together between two
    # ticks or answers: a bound on how long catch-ups hold its loop (sequencer/raft/config.py,
    # `RaftConfig.storage_read_bytes_per_pass_max`).
    storage_read_bytes_per_pass_max: int = STORAGE_READ_BYTES_PER_PASS_MAX_DEFAULT
    # Applied entries kept in memory while this node does not lead; a node that comes to lead
    # reads older ones a follower lacks back from its journal (`RaftConfig.follower_log_retention_entries`).
    follower_log_retention_entries: int = FOLLOWER_LOG_RETENTION_ENTRIES_DEFAULT

    @property
    def voters(self) -> tuple[int, ...]:
        return tuple(m.id for m in self.members if not m.learner)

    @property
    def learners(self) -> tuple[int, ...]:
        return tuple(m.id for m in self.members if m.learner)

    def member(self, node_id: int) -> MemberConfig:
        """The member with `node_id` (validated to exist for this node's number)."""
        return next(m for m in self.members if m.id == node_id)

    def read_secret(self) -> bytes:
        """The secret's bytes (the file's content without a trailing newline)."""
        return Path(self.secret_file).read_bytes().rstrip(b"\r\n")

    @property
    def heartbeat_ticks(self) -> int:
        return self.heartbeat_ms // self.tick_ms

    @property
    def election_ticks(self) -> int:
        return self.election_timeout_ms // self.tick_ms


class Config(msgspec.Struct, forbid_unknown_fields=True):
    node: NodeConfig = msgspec.field(default_factory=NodeConfig)
    socket: SocketConfig = msgspec.field(default_factory=SocketConfig)
    ring: RingConfig = msgspec.field(default_factory=RingConfig)
    journal: JournalConfig = msgspec.field(default_factory=JournalConfig)
    roles: RolesConfig = msgspec.field(default_factory=RolesConfig)
    snapshot: SnapshotConfig = msgspec.field(default_factory=SnapshotConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    replicas: ReplicasConfig = msgspec.field(default_factory=ReplicasConfig)
    cluster: ClusterConfig | None = None  # None: a single node, no replicator
    standby: StandbyConfig | None = None  # None: not the green of a blue-green switch-over
    restarts_max: int = 5  # pipeline restarts within restart_window_s before the supervisor gives up
    restart_window_s: float = 60.0

    def role(self, role: Role) -> RoleConfig:
        """The settings of `role`, a role this node runs."""
        value = getattr(self.roles, role.value)
        assert isinstance(value, RoleConfig), role
        return value

    @property
    def client_expiry_ns(self) -> int:
        return int(self.node.client_expiry_s * 1_000_000_000)

    @property
    def journal_dir(self) -> Path:
        return Path(self.node.data_dir) / "journal"

    @property
    def snapshot_dir(self) -> Path:
        return Path(self.node.data_dir) / "snapshots"

    def replica_socket_path(self, number: int) -> str:
        """Where query replica `number` listens (`[replicas] socket_dir`, or beside socket.path)."""
        socket_path = Path(self.socket.path)
        directory = Path(self.replicas.socket_dir) if self.replicas.socket_dir else socket_path.parent
        return str(directory / f"{socket_path.stem}.replica{number}.sock")

    def replica_socket_paths(self) -> list[str]:
        return [self.replica_socket_path(number) for number in range(self.replicas.count)]

    def to_json(self) -> bytes:
        return msgspec.json.encode(self)

    @classmethod
    def from_json(cls, data: bytes | str) -> Config:
        return msgspec.json.decode(data, type=cls)


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def _validate(config: Config) -> Config:
    errors: list[str] = []
    node = config.node
    if not node.name or not all(c.isalnum() or c in "-_" for c in node.name):
        errors.append(
            f"node.name={node.name!r}: use letters, digits, '-' and '_' only "
            "(it is part of shared-memory names /seqd.<name>.*)"
        )
    if not 1 <= node.number <= NODE_NUMBER_MAX:
        errors.append(f"node.number={node.number}: must be 1..{NODE_NUMBER_MAX}")
    if ":" not in node.app:
        errors.append(f"node.app={node.app!r}: expected 'module:Class', e.g. 'sequencer.apps.ledger:Ledger'")
    socket_bytes = len(os.fsencode(config.socket.path))
    if socket_bytes > SOCKET_PATH_BYTES_MAX:
        errors.append(
            f"socket.path is {socket_bytes} bytes > {SOCKET_PATH_BYTES_MAX} (the limit of a Unix "
            "socket address): choose a shorter path"
        )
    for field in ("log_capacity_bytes", "egress_capacity_bytes"):
        value = getattr(config.ring, field)
        if not _is_power_of_two(value) or not RING_CAPACITY_BYTES_MIN <= value <= RING_CAPACITY_BYTES_MAX:
            errors.append(
                f"ring.{field}={value}: must be a power of two between "
                f"{RING_CAPACITY_BYTES_MIN} and {RING_CAPACITY_BYTES_MAX}"
            )
    if config.ring.egress_capacity_bytes < EGRESS_CAPACITY_BYTES_MIN:
        errors.append(
            f"ring.egress_capacity_bytes={config.ring.egress_capacity_bytes} cannot hold one reply of "
            f"the largest size a client frame carries ({frame_bytes(EGRESS_PAYLOAD_BYTES_MAX)} bytes "
            f"in the ring): use at least {EGRESS_CAPACITY_BYTES_MIN}"
        )
    command_bytes_max = config.socket.command_bytes_max
    record_bytes_max = command_bytes_max + RECORD_OVERHEAD_BYTES_MAX
    if not 1 <= command_bytes_max <= COMMAND_BYTES_MAX:
        errors.append(f"socket.command_bytes_max={command_bytes_max}: must be 1..{COMMAND_BYTES_MAX} (the frame limit)")
    if config.ring.log_capacity_bytes < 2 * record_bytes_max:
        errors.append(
            f"ring.log_capacity_bytes={config.ring.log_capacity_bytes} cannot hold two records of "
            f"socket.command_bytes_max={command_bytes_max} (+{RECORD_OVERHEAD_BYTES_MAX} bytes each): "
            "raise the ring or lower command_bytes_max"
        )
    if config.journal.batch_bytes_max < record_bytes_max:
        errors.append(
            f"journal.batch_bytes_max={config.journal.batch_bytes_max} < one record of "
            f"socket.command_bytes_max={command_bytes_max} (+{RECORD_OVERHEAD_BYTES_MAX}): the journaller "
            "could never take it from the ring"
        )
    if config.journal.segment_bytes < JOURNAL_SEGMENT_BYTES_MIN:
        errors.append(f"journal.segment_bytes={config.journal.segment_bytes} < {JOURNAL_SEGMENT_BYTES_MIN}")
    if config.journal.batch_bytes_max * 2 > config.journal.segment_bytes:
        errors.append(
            f"journal.batch_bytes_max={config.journal.batch_bytes_max} must be at most half of "
            f"journal.segment_bytes={config.journal.segment_bytes}"
        )
    cpus = os.cpu_count() or 1
    for role in _NODE_ROLES:
        cpu = config.role(role).cpu
        if not -1 <= cpu < cpus:
            errors.append(f"roles.{role}.cpu={cpu}: this machine has CPUs 0..{cpus - 1} (-1: not pinned)")
    if config.node.client_expiry_s < 60:
        errors.append(
            f"node.client_expiry_s={config.node.client_expiry_s}: at least 60 s (clients must be able to "
            "reconnect and resend before their dedup state is forgotten)"
        )
    if config.snapshot.keep < 1:
        errors.append(f"snapshot.keep={config.snapshot.keep}: keep at least one snapshot")
    if config.snapshot.every_records < 0:
        errors.append(f"snapshot.every_records={config.snapshot.every_records}: must be >= 0")
    if config.snapshot.every_bytes < 0:
        errors.append(f"snapshot.every_bytes={config.snapshot.every_bytes}: must be >= 0")
    if config.snapshot.writer not in SNAPSHOT_WRITERS:
        errors.append(f"snapshot.writer={config.snapshot.writer!r}: must be one of {', '.join(SNAPSHOT_WRITERS)} "
                      "(fork: the blp forks a writer; replica: a snapshotter process writes it)")
    if not 0 < config.metrics.port < 65536:
        errors.append(f"metrics.port={config.metrics.port}: must be 1..65535")
    if config.socket.sessions_max < 1:
        errors.append("socket.sessions_max must be >= 1")
    errors.extend(_replicas_errors(config, cpus))
    if config.cluster is not None:
        errors.extend(_cluster_errors(config.cluster, node.number, node.name))
    if config.standby is not None:
        errors.extend(_standby_errors(config))
    if errors:
        raise ConfigError("invalid configuration: " + "; ".join(errors))  # one line: journald, systemctl status
    return config


def _replicas_errors(config: Config, cpus: int) -> list[str]:
    replicas = config.replicas
    errors: list[str] = []
    if not 0 <= replicas.count <= REPLICAS_MAX:
        errors.append(
            f"replicas.count={replicas.count}: must be 0..{REPLICAS_MAX} (each replica is a process "
            "with its own copy of the state)"
        )
        return errors
    if replicas.count:
        last = config.replica_socket_path(replicas.count - 1)
        if len(os.fsencode(last)) > SOCKET_PATH_BYTES_MAX:
            errors.append(
                f"the replica socket {last!r} is over {SOCKET_PATH_BYTES_MAX} bytes (the limit of a "
                "Unix socket address): set a shorter replicas.socket_dir or socket.path"
            )
    if not -1 <= replicas.cpu < cpus:
        errors.append(f"replicas.cpu={replicas.cpu}: this machine has CPUs 0..{cpus - 1} (-1: not pinned)")
    if replicas.recent_bytes_max < 4096:
        errors.append(f"replicas.recent_bytes_max={replicas.recent_bytes_max}: at least 4096")
    if replicas.subscribers_max < 1:
        errors.append(f"replicas.subscribers_max={replicas.subscribers_max}: must be >= 1")
    if not 0.1 <= replicas.catchup_stall_s <= 3600:
        errors.append(f"replicas.catchup_stall_s={replicas.catchup_stall_s}: must be 0.1..3600")
    if not 0.1 <= replicas.poll_ms <= 1000:
        errors.append(f"replicas.poll_ms={replicas.poll_ms}: must be 0.1..1000")
    return errors


def _standby_errors(config: Config) -> list[str]:
    """What `[standby]` needs that can be checked without blue's config (the sequencer checks
    blue's when it starts: `daemon.standby`)."""
    standby = config.standby
    assert standby is not None
    errors = []
    if not standby.blue_config:
        errors.append("standby.blue_config is empty: name the config file of the node to follow (blue)")
    if ":" not in standby.transform:
        errors.append(f"standby.transform={standby.transform!r}: expected 'package.module:Name', "
                      "e.g. 'sequencer.apps.ledger_v2:FromLedgerV1'")  # fmt: skip
    if config.cluster is not None:
        errors.append("[standby] and [cluster] together: a blue-green switch-over is for a single node; "
                      "upgrade a cluster node by node")  # fmt: skip
    if not 0 < standby.poll_ms <= 1000:
        errors.append(f"standby.poll_ms={standby.poll_ms}: must be in (0, 1000]")
    return errors


def parse_address(text: str) -> tuple[str, int]:
    """("host", port) from "host:port" or "[v6]:port".

    Raises:
        ValueError: no port, or a port outside 1..65535.
    """
    host, colon, port_text = text.rpartition(":")
    if not colon or not host or not port_text.isdigit():
        raise ValueError("expected host:port, e.g. 127.0.0.1:7101 or [::1]:7101")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is outside 1..65535")
    return host, port


def _cluster_errors(cluster: ClusterConfig, node_number: int, node_name: str) -> list[str]:
    errors: list[str] = []
    if not 0 <= cluster.cluster_id <= CLUSTER_ID_MAX:
        errors.append(f"cluster.cluster_id={cluster.cluster_id}: must be 0..2**64-1")
    ids = [member.id for member in cluster.members]
    voters, learners = cluster.voters, cluster.learners
    if len(voters) not in CLUSTER_MEMBERS_ALLOWED:
        listed = f"{len(ids)} node(s)" + (f", {len(learners)} of them learners" if learners else "")
        errors.append(
            f"cluster.members lists {listed}: a cluster has 3 or 5 voters (3 survives one "
            "node down, 5 two); for a single node leave [cluster] out"
        )
    if len(ids) > CLUSTER_MEMBERS_MAX:
        errors.append(
            f"cluster.members lists {len(voters)} voters and {len(learners)} learners: at most "
            f"{CLUSTER_MEMBERS_MAX} members in all (a node has {RAFT_PEER_SLOTS} slots of counters "
            "for the others): 3 voters and up to 2 learners, or 5 voters"
        )
    bad_ids = sorted(i for i in ids if not 1 <= i <= NODE_NUMBER_MAX)
    if bad_ids:
        errors.append(f"cluster.members ids {bad_ids}: must be 1..{NODE_NUMBER_MAX} (each node's node.number)")
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        errors.append(f"cluster.members ids {duplicates} appear more than once: give each node its own id")
    if node_number not in ids:
        errors.append(
            f"node.number={node_number} is not among cluster.members ids {ids}: set node.number "
            "to this node's id in the membership (every node has the same [cluster] table)"
        )
    for member in cluster.members:
        if member.id == node_number and member.name and member.name != node_name:
            errors.append(
                f"cluster.members id {member.id} name={member.name!r} but this node's "
                f"node.name={node_name!r}: give the member this node's name, or leave name out"
            )
    addresses: list[tuple[str, int]] = []
    for member in cluster.members:
        try:
            addresses.append(parse_address(member.peer_address))
        except ValueError as error:
            errors.append(f"cluster.members id {member.id} peer_address={member.peer_address!r}: {error}")
        socket_bytes = len(os.fsencode(member.socket_path))
        if socket_bytes > SOCKET_PATH_BYTES_MAX:
            errors.append(
                f"cluster.members id {member.id} socket_path is {socket_bytes} bytes > "
                f"{SOCKET_PATH_BYTES_MAX} (the limit of a Unix socket address): choose a shorter path"
            )
    repeated = sorted({f"{h}:{p}" for h, p in addresses if addresses.count((h, p)) > 1})
    if repeated:
        errors.append(f"cluster.members peer_address {repeated} given to more than one member: each node needs its own")
    errors.extend(_listen_errors(cluster, node_number))
    errors.extend(_secret_errors(cluster.secret_file))
    timeout_errors = _timeout_errors(cluster)
    errors.extend(timeout_errors)
    errors.extend(catch_up_errors(cluster, timeouts_valid=not timeout_errors))
    return errors


def _listen_errors(cluster: ClusterConfig, node_number: int) -> list[str]:
    listen = cluster.peer_listen
    field = "cluster.peer_listen"
    if not listen:
        own = [m for m in cluster.members if m.id == node_number]
        if not own:
            return []  # reported as node.number not among the members
        listen = own[0].peer_address
        field = f"cluster.members id {node_number} peer_address (this node listens there)"
    try:
        host, _port = parse_address(listen)
    except ValueError as error:
        return [f"{field}={listen!r}: {error}"] if field == "cluster.peer_listen" else []
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return [
            f"{field}={listen!r}: the host must be an IP address (127.0.0.1 on one machine), so "
            "what is exposed is never a DNS guess; or set cluster.peer_listen"
        ]
    if not address.is_loopback and not cluster.allow_non_loopback:
        return [
            f"{field}={listen!r} is not a loopback address: the peer port would be reachable "
            "from the network. For nodes on several machines set cluster.allow_non_loopback = "
            "true (and keep the peer network private)"
        ]
    return []


def _secret_errors(secret_file: str) -> list[str]:
    field = f"cluster.secret_file={secret_file!r}"
    create = (
        "create it with: python3 -c 'import secrets; print(secrets.token_hex(32))' > FILE; "
        "chmod 600 FILE; the same file on every node"
    )
    try:
        status = os.stat(secret_file)
    except FileNotFoundError:
        return [f"{field} does not exist: {create}"]
    except OSError as error:
        return [f"{field} cannot be read ({error.strerror}): run seqd as the user that owns it"]
    if not stat.S_ISREG(status.st_mode):
        return [f"{field} is not a regular file: {create}"]
    if status.st_mode & 0o077:
        return [
            f"{field} has mode {stat.S_IMODE(status.st_mode):04o}: other users could read the "
            "secret and impersonate any node; chmod 600 it (0600 or stricter)"
        ]
    try:
        size = len(Path(secret_file).read_bytes().rstrip(b"\r\n"))
    except OSError as error:
        return [f"{field} cannot be read ({error.strerror}): run seqd as the user that owns it"]
    if size < SECRET_BYTES_MIN:
        return [
            f"{field} holds {size} bytes < {SECRET_BYTES_MIN}: anyone who dials a node sees a proof "
            f"made from the secret, so a short one could be guessed offline; {create}"
        ]
    return []


def _timeout_errors(cluster: ClusterConfig) -> list[str]:
    errors: list[str] = []
    if not TICK_MS_MIN <= cluster.tick_ms <= TICK_MS_MAX:
        errors.append(f"cluster.tick_ms={cluster.tick_ms}: must be {TICK_MS_MIN}..{TICK_MS_MAX}")
        return errors
    for name in ("heartbeat_ms", "election_timeout_ms"):
        value = getattr(cluster, name)
        if value < cluster.tick_ms or value % cluster.tick_ms:
            errors.append(
                f"cluster.{name}={value}: must be a positive multiple of cluster.tick_ms="
                f"{cluster.tick_ms} (the replicator counts time in ticks)"
            )
    if cluster.election_timeout_ms <= 2 * cluster.heartbeat_ms:
        errors.append(
            f"cluster.election_timeout_ms={cluster.election_timeout_ms} must exceed 2 x "
            f"cluster.heartbeat_ms={cluster.heartbeat_ms}, or followers start elections between "
            "heartbeats (on a LAN: heartbeat tens of ms, election timeout a few hundred)"
        )
    return errors


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def override(path: str, value: Any) -> dict[str, Any]:
    """Turn `roles.blp.idle=spin` style overrides into a nested dict."""
    result: dict[str, Any] = {}
    cursor = result
    parts = path.split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return result


def load_config(path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None) -> Config:
    """Load and validate a configuration.

    Args:
        path: a TOML file, or None for the defaults.
        overrides: `section.key=value` strings (values parsed as TOML, bare words as strings).

    Raises:
        ConfigError: the file is missing or unreadable, or a value is invalid.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist: create it or omit --config") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"config file {path} is not valid TOML: {error}") from None
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value, e.g. roles.blp.idle=spin")
        key, text = item.split("=", 1)
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        raw = _merge(raw, override(key.strip(), value))
    try:
        config = msgspec.convert(raw, type=Config)
    except msgspec.ValidationError as error:
        where = f" in {path}" if path else ""
        raise ConfigError(f"invalid configuration{where}: {error}") from None
    return _validate(config)
