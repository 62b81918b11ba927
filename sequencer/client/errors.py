"""The errors a seqd client raises, one class per thing the caller can do something about.

    ClientError
    +-- CommandRejected    the state machine refused the command (nothing was changed)
    +-- Duplicate          the request id was applied long ago and its reply forgotten
    +-- TimedOut           no answer within the timeout; the request may still be applied
    +-- ConnectionLost     the daemon stayed unreachable for reconnect_timeout_s
    |   +-- ClientClosed   the client was closed
    +-- ProtocolViolation  the server sent garbage, or a fatal ERROR frame

A request that timed out or whose connection was lost stays in flight: it is resent on every
reconnect and the daemon's dedup table applies it at most once, so waiting on it again is safe.
"""

from __future__ import annotations

__all__ = [
    "ClientClosed",
    "ClientError",
    "CommandRejected",
    "ConnectionLost",
    "Duplicate",
    "ProtocolViolation",
    "TimedOut",
]


class ClientError(Exception):
    """Base of every error the seqd client library raises."""


class CommandRejected(ClientError):
    """The state machine refused the command with `Rejected(code, message)`; state is unchanged."""

    def __init__(self, code: str, message: str, request_id: int) -> None:
        super().__init__(
            f"request {request_id} was rejected by the state machine: {code}: {message} "
            "(nothing was applied; fix the command before sending it again)"
        )
        self.code = code
        self.message = message
        self.request_id = request_id


class Duplicate(ClientError):
    """The daemon had already applied this request id, and its reply was acknowledged and dropped.

    This happens when a client restarts with its old client id and a `first_request_id` at or
    below one it used before: pass a first request id above every id the old process used.
    """

    def __init__(self, request_id: int, index: int) -> None:
        super().__init__(
            f"request {request_id} duplicates a request this client id already had applied and "
            f"acknowledged (log index {index}); its reply is gone. Restart the client with a "
            "first_request_id above every request id used before under this client id"
        )
        self.request_id = request_id
        self.index = index


class TimedOut(ClientError):
    """No answer within the timeout. The request is still in flight and may yet be applied."""


class ConnectionLost(ClientError):
    """The daemon could not be reached for `reconnect_timeout_s`.

    Requests in flight stay in flight: the next call on the client tries to reconnect again and
    resends them; a request is never applied twice.
    """


class ClientClosed(ConnectionLost):
    """The client was closed; make a new one (same client id to keep exactly-once)."""


class ProtocolViolation(ClientError):
    """The server sent bytes that break the protocol, or a fatal ERROR frame.

    `code` is the protocol error code (`bad_version`, `malformed_frame`, ... or the server's own
    ERROR code). The connection was dropped; the next call reconnects.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
