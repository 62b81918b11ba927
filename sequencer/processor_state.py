"""The processor's snapshot body: its layout, its encoding and the checks before a restore
(sans-I/O).

The body (`ProcessorState`, compact msgpack arrays) holds the processor's position (applied
index, term and time, rolling hash), the client table (`sequencer.dedup`: sessions, dedup
entries), the pending timers and the app's own snapshot, encoded by the app's schema at its
version. The file around it (header, checksum) is `sequencer.snapshot_format`'s.
"""

from __future__ import annotations

from collections import OrderedDict

import msgspec

from sequencer.dedup import ClientTable
from sequencer.state_machine import StateMachine

__all__ = [
    "PROCESSOR_STATE_VERSION",
    "ClientState",
    "ProcessorError",
    "ProcessorState",
    "SavedReply",
    "SessionState",
    "decode_state",
    "encode_state",
    "restore_table",
]

# The layout of the processor's part of the snapshot body (ProcessorState); the app's part is
# versioned by the app's schema version.
PROCESSOR_STATE_VERSION = 1


class ProcessorError(Exception):
    """A snapshot body cannot be restored by this processor."""


class SessionState(msgspec.Struct, array_like=True, gc=False):
    session_id: int
    client_id: int
    node: str


class SavedReply(msgspec.Struct, array_like=True, gc=False):
    request_id: int
    index: int
    status: int
    version: int
    payload: bytes


class ClientState(msgspec.Struct, array_like=True, gc=False):
    client_id: int
    last_request_id: int
    acked_request_id: int
    replies: list[SavedReply]
    idle_since_ns: int = 0  # added later: older snapshots decode with 0 (idle since the snapshot)


class ProcessorState(msgspec.Struct, array_like=True):
    """The snapshot body: the processor's bookkeeping and the app's encoded state."""

    state_version: int
    app_name: str
    app_version: int
    applied_index: int
    applied_term: int
    last_timestamp_ns: int
    rolling_hash: int
    sessions: list[SessionState]
    clients: list[ClientState]
    timers: list[tuple[int, int]]  # (timer_id, deadline_ns) in scheduling order
    app: msgspec.Raw  # the app's snapshot, encoded at app_version
    # Added later (cluster mode), at the end so older bodies decode with none: per node number,
    # the incarnations whose node_start was applied, each with the highest session counter it
    # opened (`ClientTable.node_starts`), oldest first. Written only when there is one
    # (`encode_state`), so the body of a log without them is byte for byte what an older seqd
    # wrote (its snapshots still verify), and an older seqd ignores the field.
    node_starts: list[tuple[int, list[tuple[int, int]]]] = []
    # Added with rolling upgrades (sequencer/app_versions.py), the same way: the active app
    # version (0: none reported yet) and each node's last reported version.
    app_version_active: int = 0
    app_versions_known: list[tuple[int, int]] = []
    # Added with the early opens' tracking, the same way: per node number, the incarnations whose
    # sessions opened before their node_start was applied, each with the highest counter opened
    # (`ClientTable.opened_early`). An older seqd ignores it (it then takes a copy of such an
    # open for a new session, as it always did).
    opened_early: list[tuple[int, list[tuple[int, int]]]] = []
    # Added with session rules versions (sequencer/rules_versions.py), the same way: the active
    # rules version (1 is written as nothing). A body without it was taken under rules 1, which
    # every seqd before it applied (development builds between the new rules and their version
    # applied rules 2 unmarked). An older seqd ignores it.
    rules_version_active: int = 1


_state_encoder = msgspec.msgpack.Encoder()
_FIELDS_BEFORE_ADDITIONS = 11  # state_version .. app: what the first seqd wrote
_FIELD_DEFAULTS = tuple(  # a list's default is a factory
    field.default_factory() if field.default_factory is not msgspec.NODEFAULT else field.default
    for field in msgspec.structs.fields(ProcessorState)
)
_state_decoder = msgspec.msgpack.Decoder(ProcessorState)


def encode_state(
    *,
    app_name: str,
    app_version: int,
    applied_index: int,
    applied_term: int,
    last_timestamp_ns: int,
    rolling_hash: int,
    table: ClientTable,
    timers: list[tuple[int, int]],
    app_snapshot: bytes,
) -> bytes:
    """The snapshot body of a processor at this position, with this table, timers and app."""
    state = ProcessorState(
        state_version=PROCESSOR_STATE_VERSION,
        app_name=app_name,
        app_version=app_version,
        applied_index=applied_index,
        applied_term=applied_term,
        last_timestamp_ns=last_timestamp_ns,
        rolling_hash=rolling_hash,
        sessions=[
            SessionState(session_id, session.client_id, session.node)
            for session_id, session in table.sessions.items()
        ],
        clients=[
            ClientState(
                client_id,
                client.last_request_id,
                client.acked_request_id,
                [SavedReply(rid, *saved) for rid, saved in client.replies.items()],
                client.idle_since_ns,
            )
            for client_id, client in table.clients.items()
        ],
        timers=timers,
        app=msgspec.Raw(app_snapshot),
        node_starts=[(number, list(started.items())) for number, started in table.node_starts.items()],
        app_version_active=table.versions.active,
        app_versions_known=sorted(table.versions.known.items()),
        opened_early=[(number, list(early.items())) for number, early in table.opened_early.items() if early],
        rules_version_active=table.rules.active,
    )
    # Without the trailing fields still at their defaults: the layout an older seqd wrote (an
    # array-like struct encodes as the array of its fields, so the bytes are the same).
    fields = msgspec.structs.astuple(state)
    kept = len(fields)
    while kept > _FIELDS_BEFORE_ADDITIONS and fields[kept - 1] == _FIELD_DEFAULTS[kept - 1]:
        kept -= 1
    return _state_encoder.encode(fields[:kept])


def decode_state(body: bytes, app_class: type[StateMachine]) -> ProcessorState:
    """The state in a snapshot body, checked to be restorable as `app_class`.

    Raises:
        ProcessorError: the body belongs to another app or a newer processor layout.
    """
    state = _state_decoder.decode(body)
    schema = app_class.schema
    if state.state_version > PROCESSOR_STATE_VERSION:
        raise ProcessorError(
            f"snapshot at index {state.applied_index} has processor state version "
            f"{state.state_version} but this seqd reads up to {PROCESSOR_STATE_VERSION}: "
            "upgrade seqd"
        )
    if state.app_name != schema.name:
        raise ProcessorError(
            f"snapshot at index {state.applied_index} holds the state of app "
            f"{state.app_name!r}, but the configured app is {schema.name!r} "
            f"({app_class.__module__}:{app_class.__qualname__})"
        )
    return state


def restore_table(table: ClientTable, state: ProcessorState) -> None:
    """Fills an empty `table` with the clients and sessions saved in `state`, in their order.

    Raises:
        RulesVersionError: `state` was taken under session rules the table's code does not know.
        ProcessorError: `state` holds early opens but no rules version: a development build's
            (between the early opens' tracking and the rules versions) that applied rules 2
            unmarked; restored as rules 1 it would go on to other bytes than a replay of the log.
    """
    assert not table.clients and not table.sessions, "restore into an empty table"
    if state.rules_version_active < 2 and state.opened_early:
        raise ProcessorError(
            f"the snapshot at index {state.applied_index} holds early session opens but no session rules "
            "version: a development build of seqd wrote it applying session rules 2 unmarked, and restored "
            "under rules 1 it would diverge from the other replicas. Delete that snapshot file (its name "
            "ends in the index) from the node's snapshot directory, then start the node again: it rebuilds "
            "its state from the journal (or from an earlier snapshot)"
        )
    for saved_client in state.clients:
        client = table.client(saved_client.client_id)
        client.last_request_id = saved_client.last_request_id
        client.acked_request_id = saved_client.acked_request_id
        client.replies = OrderedDict(
            (r.request_id, (r.index, r.status, r.version, r.payload)) for r in saved_client.replies
        )  # an OrderedDict: `ClientEntry.replies`
        client.idle_since_ns = saved_client.idle_since_ns
    for saved_session in state.sessions:
        table.attach(saved_session.session_id, saved_session.client_id, saved_session.node)
    table.node_starts.update((number, dict(started)) for number, started in state.node_starts)
    table.opened_early.update((number, dict(early)) for number, early in state.opened_early)
    table.versions.restore(state.app_version_active, state.app_versions_known)
    table.rules.restore(state.rules_version_active, state.applied_index)
    table.rebuild_idle(state.last_timestamp_ns)
