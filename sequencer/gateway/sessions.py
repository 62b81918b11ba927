"""Sessions as the gateway sees them, their ids, and the admission rules for a command.

Pure data and pure functions: the gateway (`sequencer.gateway.core`) applies them, the tests
check them alone.
"""

from __future__ import annotations

from collections.abc import Container
from typing import Final

from sequencer.client import protocol
from sequencer.processor import SAVED_REPLIES_MAX
from sequencer.record import (
    SESSION_ID_COUNTER_BITS,
    SESSION_ID_INCARNATION_BITS,
    SESSION_ID_NODE_BITS,
    session_incarnation,
    session_node_number,
)

__all__ = [
    "CLIENT_MESSAGE_LOGGED_CHARS_MAX",
    "IN_FLIGHT_MAX",
    "NODE_NUMBER_MAX",
    "SESSION_ID_COUNTER_BITS",
    "SESSION_ID_INCARNATION_BITS",
    "SESSION_ID_NODE_BITS",
    "GatewaySession",
    "admission_refusal",
    "next_session_id",
    "session_id_base",
    "session_incarnation",
    "session_node_number",
]

# Session ids: [node number: 8 bits][incarnation: 24 bits][counter: 32 bits] (the layout is
# `sequencer.record`'s, which the blp reads too). The node number lets each node of a cluster
# emit only the replies of its own sessions (the processor routes by it). The incarnation (the id
# the supervisor draws at each start, within 24 bits) keeps ids from repeating across restarts,
# so a record of a session of an earlier incarnation is never taken for a new session's, and
# tells a duplicated node_start from a new one. The counter allows 2^32 sessions per
# incarnation; after that it wraps, skipping ids still open.
NODE_NUMBER_MAX: Final = (1 << SESSION_ID_NODE_BITS) - 1  # node numbers are 1..255
_INCARNATION_MASK: Final = (1 << SESSION_ID_INCARNATION_BITS) - 1
_COUNTER_MASK: Final = (1 << SESSION_ID_COUNTER_BITS) - 1

# The request window advertised in WELCOME and enforced here: a command's request_id may be at
# most acked_request_id + IN_FLIGHT_MAX. Every reply inside the window fits the blp's saved
# replies per client, so a resend after a reconnect always finds its original reply.
IN_FLIGHT_MAX: Final = protocol.IN_FLIGHT_MAX
assert IN_FLIGHT_MAX <= SAVED_REPLIES_MAX, (IN_FLIGHT_MAX, SAVED_REPLIES_MAX)

# A client's ERROR frame carries the client's text: the log keeps this much of it, so a client
# cannot flood the log with one frame.
CLIENT_MESSAGE_LOGGED_CHARS_MAX: Final = 200


def session_id_base(node_number: int, incarnation: int) -> int:
    """The session id bits above the counter: node number, then the incarnation's low bits."""
    assert 1 <= node_number <= NODE_NUMBER_MAX, node_number
    incarnation_bits = incarnation & _INCARNATION_MASK  # the low bits: they change every start
    return (node_number << (SESSION_ID_INCARNATION_BITS + SESSION_ID_COUNTER_BITS)) | (
        incarnation_bits << SESSION_ID_COUNTER_BITS
    )


def next_session_id(base: int, counter: int, in_use: Container[int]) -> tuple[int, int]:
    """(session id, counter) of the next session: `base | counter`, the counter wrapping within
    its 32 bits and stepping past an id still in use (at most sessions_max are, so the loop is
    bounded). The caller stores counter + 1 once the session's SESSION_OPEN is claimed."""
    session_id = base | (counter & _COUNTER_MASK)
    while session_id in in_use:
        counter += 1
        session_id = base | (counter & _COUNTER_MASK)
    return session_id, counter


class GatewaySession:
    """One client connection as the gateway sees it; the shell's session subclasses it.

    Invariants: `session_id` is 0 until the SESSION_OPEN record is claimed, then never changes;
    `backlog` is not None only while the session waits for ring space (its reads are paused).
    """

    __slots__ = ("backlog", "client_id", "closing", "connection", "out", "session_id", "subscribed")

    def __init__(self) -> None:
        self.connection = protocol.Connection(protocol.Side.SERVER)
        self.session_id = 0
        self.client_id = 0
        self.subscribed = False
        self.backlog: list[protocol.Frame] | None = None  # frames waiting for ring space
        self.out = bytearray()  # bytes for the client; the shell writes them after each call
        self.closing = False  # the shell closes the connection once `out` is written


def admission_refusal(
    command: protocol.Command, command_bytes_max: int, command_version_max: int, app_version: int = 0
) -> tuple[protocol.RejectionCode, str] | None:
    """Why the gateway refuses `command` before the log, or None to sequence it.

    Each check depends on the command's bytes alone, so a resend of the same command gets the
    same answer (a resend carries an acked_request_id at least as high, so a command inside the
    window stays inside it). The checks run in the order docs/client.md documents; the first
    that fails names the code.
    """
    if command.request_id == 0:
        return protocol.RejectionCode.BAD_REQUEST_ID, (
            "request_id 0 is not a request id (0 means none): number requests 1, 2, 3, ... per "
            "client id"
        )
    if len(command.payload) > command_bytes_max:
        return protocol.RejectionCode.COMMAND_TOO_LARGE, (
            f"the command is {len(command.payload)} bytes; this node accepts at most "
            f"socket.command_bytes_max={command_bytes_max} (WELCOME's command_bytes_max): send "
            "smaller commands"
        )
    if command_version_max < command.version <= app_version:
        return protocol.RejectionCode.UNKNOWN_VERSION, (
            f"the command has schema version {command.version}, which this node's app knows but "
            f"its cluster has not made active yet (active: {command_version_max}): once every node "
            f"runs the new app, `seqd cluster raise-version --to {command.version}` activates it "
            "at one index on every node (docs/evolution.md); send the old version meanwhile"
        )
    if not 1 <= command.version <= command_version_max:
        return protocol.RejectionCode.UNKNOWN_VERSION, (
            f"the command has schema version {command.version}; this node's app speaks "
            f"1..{command_version_max}: versions start at 1, and a newer one needs the node "
            "upgraded first"
        )
    if command.request_id > command.acked_request_id + IN_FLIGHT_MAX:
        return protocol.RejectionCode.WINDOW_EXCEEDED, (
            f"request_id={command.request_id} > acked_request_id={command.acked_request_id} + "
            f"in_flight_max={IN_FLIGHT_MAX} (WELCOME's in_flight_max): the daemon could not keep "
            "its reply for a resend. Wait for replies (and acknowledge them) before sending "
            "more; this request was not applied"
        )
    return None
