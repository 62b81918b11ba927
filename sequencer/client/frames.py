"""The client protocol's frames: the structs that cross the socket, and the errors about them.

The control frames (HELLO, WELCOME, ERROR, REDIRECT, PING, PONG) are msgpack maps of msgspec
structs, so a field added by a later version is ignored by an older peer, and a field an older
peer does not send takes its default. The hot frames (COMMAND, REPLY, EVENT) are plain records
that the codec (`sequencer.client.connection`) packs and unpacks with one `struct` call each.
A REJECTED reply's payload is encoded and decoded here too. The numbers are in
`sequencer.client.wire`; `sequencer.client.protocol` re-exports all of it.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from .wire import COMMAND_BYTES_MAX, IN_FLIGHT_MAX, PROTOCOL_VERSION, ErrorCode, FrameKind

__all__ = [
    "CONTROL_DECODERS",
    "KIND_OF_TYPE",
    "Answer",
    "Command",
    "ControlFrame",
    "Error",
    "Event",
    "Frame",
    "Hello",
    "Item",
    "LocalProtocolError",
    "Ping",
    "Pong",
    "ProtocolError",
    "Query",
    "Redirect",
    "Reply",
    "Subscribe",
    "decode_rejection",
    "encode_rejection",
]

# Control frames: msgpack maps, so a later version may add fields with defaults.


class Hello(msgspec.Struct, kw_only=True):
    """The first frame a client sends: who it is, so the daemon can find its dedup state."""

    client_id: int
    protocol_version: int = PROTOCOL_VERSION
    subscribe_events: bool = False
    client_name: str = ""


class Welcome(msgspec.Struct, kw_only=True):
    """The server's answer to HELLO: the session is open and commands may flow."""

    session_id: int
    node: str
    frame_bytes_max: int
    leader: str | None = None
    # The limits a client must respect, so it need not guess them (defaults: what a version 1
    # daemon that omits them enforces). A command payload larger than command_bytes_max is
    # REJECTED `command_too_large`; a request_id above acked_request_id + in_flight_max is
    # REJECTED `window_exceeded`; saved_replies_max is how many unacknowledged replies the daemon
    # keeps per client id for resends (in_flight_max never exceeds it).
    command_bytes_max: int = COMMAND_BYTES_MAX
    in_flight_max: int = IN_FLIGHT_MAX
    saved_replies_max: int = IN_FLIGHT_MAX
    # The sockets of this node's query replicas (`[replicas]`), where a client subscribes and
    # queries; empty when it runs none. A query replica's own WELCOME names its node here.
    replicas: list[str] = msgspec.field(default_factory=list)
    applied_index: int = 0  # a query replica's WELCOME: what it had applied when it answered


class Error(msgspec.Struct, kw_only=True):
    """Why the sender is unhappy. A fatal error is followed by the sender closing the connection."""

    code: str
    message: str
    fatal: bool = True


class Redirect(msgspec.Struct, kw_only=True):
    """This node cannot serve the session; connect to `socket_path` (when given) instead."""

    leader: str
    socket_path: str = ""


class Ping(msgspec.Struct, kw_only=True):
    nonce: int


class Pong(msgspec.Struct, kw_only=True):
    nonce: int


# A query replica's control frames (docs/client.md, "Catch-up subscriptions and queries").


class Subscribe(msgspec.Struct, kw_only=True):
    """Start this connection's subscription: every item from `from_index` (0 and 1 both mean
    the first record), then live. Events always; every record too when `records`."""

    from_index: int
    records: bool = False


class Query(msgspec.Struct, kw_only=True):
    """Ask a query replica to run the app's query `name` with keyword arguments `args`.

    `consistency` is "local" (what the replica has applied), "after" (wait until it has applied
    `after_index`, at most `wait_ms`) or "linearizable" (wait, at most `wait_ms`, for a read
    index: a cluster's ReadIndex, a single node's commit index). `query_id` is the client's,
    echoed in the ANSWER.
    """

    query_id: int
    name: str
    args: dict[str, Any] = msgspec.field(default_factory=dict)
    consistency: str = "local"
    after_index: int = 0
    wait_ms: int = 10_000


class Answer(msgspec.Struct, kw_only=True):
    """A query replica's answer to QUERY `query_id`: the result (msgpack of the handler's return
    value) as of log `index`, or, when `code` is not empty, why there is none."""

    query_id: int
    index: int
    result: msgspec.Raw = msgspec.Raw(b"\xc0")  # msgpack nil
    code: str = ""
    message: str = ""


# Hot frames: msgspec structs are used here only as slotted records (no msgspec decoding); they
# construct about three times faster than a class with `__slots__` and an `__init__`, and give
# `__eq__` and `__repr__` for free. gc=False is safe: they hold only ints and bytes, so they can
# never be part of a reference cycle.


class Command(msgspec.Struct, gc=False):
    """A client's request. `acked_request_id`: every reply up to it has reached the client."""

    request_id: int
    acked_request_id: int
    version: int
    payload: bytes


class Reply(msgspec.Struct, gc=False):
    """The outcome of a command, once committed. `index` is the command's log index."""

    request_id: int
    index: int
    status: int
    version: int
    payload: bytes


class Event(msgspec.Struct, gc=False):
    """An event the state machine published at log `index`, sent to subscribed sessions."""

    index: int
    version: int
    payload: bytes


class Item(msgspec.Struct, gc=False):
    """One item of a catch-up subscription (`ItemKind`): a record, whole, or an event published
    while applying the record at `index` (stamped `timestamp_ns`)."""

    index: int
    timestamp_ns: int
    kind: int
    record_type: int
    version: int
    payload: bytes


ControlFrame = Hello | Welcome | Error | Redirect | Ping | Pong | Subscribe | Query | Answer
Frame = (
    Hello | Welcome | Command | Reply | Event | Error | Redirect | Ping | Pong
    | Subscribe | Item | Query | Answer
)


# Each frame type's kind, and the decoder of each control kind's body.
_CONTROL_TYPES: Final[dict[int, type]] = {
    FrameKind.HELLO: Hello,
    FrameKind.WELCOME: Welcome,
    FrameKind.ERROR: Error,
    FrameKind.REDIRECT: Redirect,
    FrameKind.PING: Ping,
    FrameKind.PONG: Pong,
    FrameKind.SUBSCRIBE: Subscribe,
    FrameKind.QUERY: Query,
    FrameKind.ANSWER: Answer,
}
CONTROL_DECODERS: Final[dict[int, msgspec.msgpack.Decoder]] = {  # type: ignore[type-arg]
    kind: msgspec.msgpack.Decoder(struct_type) for kind, struct_type in _CONTROL_TYPES.items()
}
KIND_OF_TYPE: Final[dict[type, int]] = {
    Hello: FrameKind.HELLO,
    Welcome: FrameKind.WELCOME,
    Command: FrameKind.COMMAND,
    Reply: FrameKind.REPLY,
    Event: FrameKind.EVENT,
    Error: FrameKind.ERROR,
    Redirect: FrameKind.REDIRECT,
    Ping: FrameKind.PING,
    Pong: FrameKind.PONG,
    Subscribe: FrameKind.SUBSCRIBE,
    Item: FrameKind.ITEM,
    Query: FrameKind.QUERY,
    Answer: FrameKind.ANSWER,
}


class ProtocolError(Exception):
    """The peer broke the protocol. Send `to_frame()` to it, then close the connection.

    `code` is a short stable token: an `ErrorCode` for what the peer did (the codes that cross
    the wire), a plain string for a `LocalProtocolError` (never sent); `message` says what was
    wrong and what to do.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    def to_frame(self) -> Error:
        return Error(code=str(self.code), message=self.message, fatal=True)


class LocalProtocolError(ProtocolError):
    """Our own side tried something the protocol forbids: a bug in the caller, not the peer."""


_ENCODER: Final = msgspec.msgpack.Encoder()


def encode_rejection(code: str, message: str) -> bytes:
    """The payload of a REJECTED reply: msgpack {"code": code, "message": message}."""
    return _ENCODER.encode({"code": str(code), "message": message})


_REJECTION_DECODER: Final = msgspec.msgpack.Decoder(dict[str, str])


def decode_rejection(payload: bytes) -> tuple[str, str]:
    """(code, message) of a REJECTED reply's payload; a malformed one raises ProtocolError."""
    try:
        fields = _REJECTION_DECODER.decode(payload)
        return fields["code"], fields["message"]
    except (msgspec.DecodeError, KeyError) as error:
        raise ProtocolError(
            ErrorCode.MALFORMED_FRAME,
            f"a REJECTED reply's payload is not msgpack {{'code': str, 'message': str}} ({error}); "
            "the server is broken or not seqd: report it",
        ) from None
