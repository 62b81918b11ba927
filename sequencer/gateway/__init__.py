"""The gateway: the sequencer's sans-I/O core. Client frames in; stamped records and outputs out.

Theory of operation
-------------------
The sequencer role (`daemon/roles/sequencer.py`) is a thin uvloop shell: the socket, peer
credentials, backpressure (pausing a session's reads), the egress doorbell the event loop watches and the drain.
What it decides about the log and the sessions is decided here, with no socket, clock, file or
thread, so tests drive it with bytes and a bytearray for a ring:

- sessions: a HELLO is sequenced as a SESSION_OPEN record under a fresh session id and answered
  with WELCOME; a connection that goes away is sequenced as SESSION_CLOSE.
- admission: a COMMAND the gateway can judge without the log (request id 0, over
  `command_bytes_max`, a schema version the app does not know, beyond the request window) gets a
  REJECTED reply with index 0 and never enters the log; while the journal's disk is short of
  space (the caller says so) new sessions and commands get the retryable ERROR `disk_full`.
- stamping: every record gets the next index, the term and a timestamp, in place in the ring.
  The timestamp is the clock value the caller passes in, read once per batch, but never less
  than the last one stamped: timestamps never go backwards, whatever the wall clock does.
- snapshot policy: a SNAPSHOT record after every `snapshot_every_records` commands or
  `snapshot_every_bytes` command payload bytes (and on request); in a cluster the leader counts
  the log its blp applied instead (`log_applied`).
- timers: the blp's TIMER_SCHEDULE/TIMER_CANCEL outputs fill a `TimerQueue`; each deadline the
  caller's clock passes is sequenced as TIMER_FIRED, in deadline order.
- egress fan-out: a reply goes to its session if it is attached here, an event to every
  subscribed session. Each output is framed on its own: one that cannot be framed costs only
  itself, never the rest of its batch (the egress reader moves past a batch once, so an
  exception escaping would lose every output in it).

Ports. The core reaches the world through three narrow things its owner passes in, each
replaceable by a plain Python object in tests:
- `claim(length, frame_type) -> writable view | None`: ring space (the log ring writer's
  `try_claim`). Records are stamped in the claimed view, so nothing is encoded twice. None (the
  ring is full) ends the batch: the session's remaining frames wait in `session.backlog` and
  other waiting records (closes, a snapshot) in the gateway, for the shell to `retry`. Claims are
  made visible by the owner (`publish`), once per event-loop pass.
- `report(kind, key, message, error)`: the error log and its counters (`Report`).
- the `StampingPolicy`: where index and term come from (below).
Bytes for a client are appended to its session's `out`, which the shell writes after each call;
`session.closing` asks the shell to close the connection once `out` is written.

The cluster seam. Which index and term a record gets is a `StampingPolicy`, asked once per batch
(never per record). On a single node (`SingleNodeStamping`) it is the gateway's own counter,
continuing from the journal, and the recovered term. In cluster mode (`ClusterStamping`) the
gateway writes the same records with index 0 and term 0 into the proposal ring (the `claim`
port is that ring's) and the leader's replicator stamps them and writes each term's TERM_START;
only while this node leads does the gateway sequence timer fires and automatic snapshot
requests (docs/architecture.md, "Cluster mode: the sequencer and the blp").

Hot path. `process` handles a whole list of frames per call and does admission, claim and stamp
inline, with no method call per command; rare frames (HELLO, PING, ERROR, refusals) take calls.

Modules: `core` (the `Gateway`), `sessions` (the session as the gateway sees it, session ids, the
admission rules), `stamping` (the cluster seam). Every public name is importable from here.
"""

from sequencer.gateway.core import (
    SNAPSHOT_EVERY_NEVER,
    Claim,
    Gateway,
    GatewayConfig,
    Report,
    Reporter,
)
from sequencer.gateway.sessions import (
    IN_FLIGHT_MAX,
    NODE_NUMBER_MAX,
    SESSION_ID_COUNTER_BITS,
    SESSION_ID_INCARNATION_BITS,
    SESSION_ID_NODE_BITS,
    GatewaySession,
    admission_refusal,
    next_session_id,
    session_id_base,
    session_incarnation,
    session_node_number,
)
from sequencer.gateway.stamping import ClusterStamping, SingleNodeStamping, Stamp, StampingPolicy

__all__ = [
    "IN_FLIGHT_MAX",
    "NODE_NUMBER_MAX",
    "SESSION_ID_COUNTER_BITS",
    "SESSION_ID_INCARNATION_BITS",
    "SESSION_ID_NODE_BITS",
    "SNAPSHOT_EVERY_NEVER",
    "Claim",
    "ClusterStamping",
    "Gateway",
    "GatewayConfig",
    "GatewaySession",
    "Report",
    "Reporter",
    "SingleNodeStamping",
    "Stamp",
    "StampingPolicy",
    "admission_refusal",
    "next_session_id",
    "session_id_base",
    "session_incarnation",
    "session_node_number",
]
