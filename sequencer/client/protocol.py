"""The client protocol: frames on a Unix stream socket, as a sans-I/O codec for both ends.

Theory of operation
-------------------

A connection carries frames. Every frame starts with the same 8-byte header:

    offset 0  u32 length            body bytes (the header is not counted)
    offset 4  u8  kind              FrameKind
    offset 5  u8  protocol_version  1
    offset 6  u16 flags             0 (reserved; a version 1 peer refuses anything else)

The hot frames (COMMAND, REPLY, EVENT) have a fixed binary body header followed by the opaque
payload, so the sequencer moves them with one `struct` call each and never decodes a payload. The
control frames (HELLO, WELCOME, ERROR, REDIRECT, PING, PONG) are rare, so their bodies are msgpack
maps of msgspec structs: a field added by a later version is ignored by an older peer, and a field
an older peer does not send takes its default.

`Connection(our_side)` holds the bytes received and the few facts needed to judge the next frame:
which side we are, whether the HELLO (server) or the WELCOME (client) has been seen, whether the
peer has closed its end, and whether an error has ended the connection. It touches no socket, file,
clock or event loop (the h11 shape: `receive_data`, `next_frame`, `send`), so the daemon's
sequencer role, the blocking client and the asyncio client all share it, and the tests drive it
with arbitrary bytes.

Validation happens at the gateway, as soon as the header is in: a declared size over
`FRAME_BYTES_MAX` is refused before a single body byte is buffered, and so are a protocol version
this codec does not speak, non-zero flags, an unknown kind, a kind the peer may not send, and (on
the server) anything but HELLO as the first frame. Once the body is in, control bodies are decoded
against their struct and hot bodies are checked for their fixed header. Every refusal raises
`ProtocolError(code, message)`; the connection then refuses further use except to send the ERROR
frame that tells the peer why (`ProtocolError.to_frame()`), after which it is closed for good.

Bounds
------

    partial frame          < FRAME_BYTES_MAX              (a longer declared frame is refused)
    receive buffer        <= RECEIVE_BUFFER_BYTES_MAX     (a partial frame + one read)
    frames per next_frames <= FRAMES_PER_CALL_MAX

The receive buffer bound holds when the shell drains `next_frames()` (or `next_frame()`) until it
returns nothing before each `receive_data`, and passes at most `READ_BYTES_MAX` bytes per call.
"""

from __future__ import annotations

import enum
import struct
from typing import Final

import msgspec

__all__ = [
    "CLOSED",
    "COMMAND_BYTES_MAX",
    "COMMAND_HEADER",
    "EVENT_HEADER",
    "FRAMES_PER_CALL_MAX",
    "FRAME_BODY_BYTES_MAX",
    "FRAME_BYTES_MAX",
    "FRAME_HEADER",
    "FRAME_HEADER_BYTES",
    "IN_FLIGHT_MAX",
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "PROTOCOL_VERSIONS_SUPPORTED",
    "READ_BYTES_MAX",
    "RECEIVE_BUFFER_BYTES_MAX",
    "REPLY_HEADER",
    "Command",
    "Connection",
    "ControlFrame",
    "Error",
    "ErrorCode",
    "Event",
    "Frame",
    "FrameKind",
    "Hello",
    "LocalProtocolError",
    "Ping",
    "Pong",
    "ProtocolError",
    "Redirect",
    "RejectionCode",
    "Reply",
    "ReplyStatus",
    "Sentinel",
    "Side",
    "Welcome",
    "decode_rejection",
    "encode_rejection",
]

PROTOCOL_VERSION: Final = 1
# The versions this codec speaks; a server names them in its `bad_version` error.
PROTOCOL_VERSIONS_SUPPORTED: Final = (1,)

FRAME_HEADER: Final = struct.Struct("<IBBH")  # length (body bytes), kind, protocol_version, flags
FRAME_HEADER_BYTES: Final = FRAME_HEADER.size
# Largest frame, header included. A command is one record in the log ring and the journal, so a
# bigger command belongs in a file the command names, not in the log. A larger declared frame gets
# an error frame and the connection is closed, before any of its body is buffered.
FRAME_BYTES_MAX: Final = 1 << 20
FRAME_BODY_BYTES_MAX: Final = FRAME_BYTES_MAX - FRAME_HEADER_BYTES
# Bytes a shell reads from the socket per call: asyncio's stream read size (262144 bytes; uvloop
# reads 256000), large enough to carry thousands of pipelined commands per system call.
READ_BYTES_MAX: Final = 256 * 1024
# The receive buffer holds at most one incomplete frame plus one read, when the shell drains the
# complete frames before each read. Anything more is a shell bug, not a peer's.
RECEIVE_BUFFER_BYTES_MAX: Final = FRAME_BYTES_MAX + READ_BYTES_MAX
# Frames returned by one `next_frames` call: a full receive buffer of the smallest hot frame
# (24-byte EVENT, 32-byte COMMAND) is about 55 k frames; the bound keeps one call's work (and the
# list it builds) to a few milliseconds so the shell's event loop stays responsive.
FRAMES_PER_CALL_MAX: Final = 4096

# Hot frame bodies. The frame header and the body header are packed in one call when sending.
COMMAND_HEADER: Final = struct.Struct("<QQH6x")  # request_id, acked_request_id, version
REPLY_HEADER: Final = struct.Struct("<QQBxH4x")  # request_id, index, status, version
EVENT_HEADER: Final = struct.Struct("<QH6x")  # index, version
_COMMAND_FRAME: Final = struct.Struct("<IBBH" + "QQH6x")
_REPLY_FRAME: Final = struct.Struct("<IBBH" + "QQBxH4x")
_EVENT_FRAME: Final = struct.Struct("<IBBH" + "QH6x")

# Identifiers are unsigned 64-bit on the wire; 0 means "none" for request ids and indexes.
_U64_LIMIT: Final = 1 << 64
# The largest command payload a frame can carry (1,048,544 bytes). A daemon may accept less
# (`socket.command_bytes_max`, sent in WELCOME); this is the default a WELCOME without the field
# means.
COMMAND_BYTES_MAX: Final = FRAME_BODY_BYTES_MAX - COMMAND_HEADER.size
# The request window: a command's request_id may be at most acked_request_id + in_flight_max.
# The daemon saves the replies above acked_request_id (per client id) so a resend gets the
# original reply; within the window they all fit, beyond it one would be forgotten and a resend
# answered DUPLICATE. Equal to the daemon's saved replies per client
# (`sequencer.processor.SAVED_REPLIES_MAX`); the default a WELCOME without the field means.
IN_FLIGHT_MAX: Final = 1024

assert FRAME_HEADER_BYTES == 8, FRAME_HEADER_BYTES
assert COMMAND_HEADER.size == 24, COMMAND_HEADER.size
assert REPLY_HEADER.size == 24, REPLY_HEADER.size
assert EVENT_HEADER.size == 16, EVENT_HEADER.size
assert RECEIVE_BUFFER_BYTES_MAX >= FRAME_BYTES_MAX + READ_BYTES_MAX
assert FRAMES_PER_CALL_MAX >= 1
assert PROTOCOL_VERSION == 1  # next_frames' hot loop compares with the literal


class FrameKind(enum.IntEnum):
    HELLO = 1
    WELCOME = 2
    COMMAND = 3
    REPLY = 4
    EVENT = 5
    ERROR = 6
    REDIRECT = 7
    PING = 8
    PONG = 9


class ReplyStatus(enum.IntEnum):
    OK = 0
    # The state machine refused the command; the payload is msgpack {"code": str, "message": str}.
    REJECTED = 1
    # The request was applied and its reply was acknowledged (acked_request_id) and forgotten: a
    # client resent a request it had already seen answered, typically after restarting with a
    # too-low first request id.
    DUPLICATE = 2


_REPLY_STATUS_MAX: Final = max(ReplyStatus)
# Plain ints for the hot paths: cheaper to look up than enum members.
_KIND_COMMAND: Final = int(FrameKind.COMMAND)
_KIND_REPLY: Final = int(FrameKind.REPLY)
_KIND_EVENT: Final = int(FrameKind.EVENT)
assert (_KIND_COMMAND, _KIND_REPLY, _KIND_EVENT) == (3, 4, 5)  # literals in next_frames


class ErrorCode(enum.StrEnum):
    """Every code the daemon sends in an ERROR frame. All are fatal: the daemon closes the
    connection after the frame. docs/client.md lists each one (tests/test_conformance_docs.py
    holds the two equal), so use these members, never a string literal, to send one."""

    # Refused by the codec, as soon as the header (or body) shows it.
    FRAME_TOO_LARGE = "frame_too_large"
    BAD_VERSION = "bad_version"
    BAD_FLAGS = "bad_flags"
    UNKNOWN_KIND = "unknown_kind"
    UNEXPECTED_KIND = "unexpected_kind"
    HELLO_REQUIRED = "hello_required"
    MALFORMED_FRAME = "malformed_frame"
    TRUNCATED_FRAME = "truncated_frame"
    # Refused by the daemon when the connection is accepted.
    PERMISSION_DENIED = "permission_denied"
    UNAVAILABLE = "unavailable"
    # Refused by the daemon at HELLO or COMMAND while the journal's disk is short of space.
    DISK_FULL = "disk_full"


class RejectionCode(enum.StrEnum):
    """Every code of a REJECTED reply that seqd itself (not the app) gives. The gateway's refusals
    carry index 0 (nothing was sequenced); the others are decided by the blp at the command's
    index, the same on every replica. docs/client.md lists each one."""

    # At the gateway (the sequencer), before the log: index 0, nothing sequenced.
    BAD_REQUEST_ID = "bad_request_id"
    COMMAND_TOO_LARGE = "command_too_large"
    UNKNOWN_VERSION = "unknown_version"
    WINDOW_EXCEEDED = "window_exceeded"
    # In the blp, at the command's log index.
    BAD_COMMAND = "bad_command"
    REPLY_TOO_LARGE = "reply_too_large"


class Side(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class Sentinel(enum.Enum):
    """What `next_frame` returns when it has no frame: wait for bytes, or the peer has gone."""

    NEED_DATA = "NEED_DATA"
    CLOSED = "CLOSED"


NEED_DATA: Final = Sentinel.NEED_DATA
CLOSED: Final = Sentinel.CLOSED


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


ControlFrame = Hello | Welcome | Error | Redirect | Ping | Pong
Frame = Hello | Welcome | Command | Reply | Event | Error | Redirect | Ping | Pong

_CONTROL_TYPES: Final[dict[int, type]] = {
    FrameKind.HELLO: Hello,
    FrameKind.WELCOME: Welcome,
    FrameKind.ERROR: Error,
    FrameKind.REDIRECT: Redirect,
    FrameKind.PING: Ping,
    FrameKind.PONG: Pong,
}
_CONTROL_DECODERS: Final[dict[int, msgspec.msgpack.Decoder]] = {  # type: ignore[type-arg]
    kind: msgspec.msgpack.Decoder(struct_type) for kind, struct_type in _CONTROL_TYPES.items()
}
_KIND_OF_TYPE: Final[dict[type, int]] = {
    Hello: FrameKind.HELLO,
    Welcome: FrameKind.WELCOME,
    Command: FrameKind.COMMAND,
    Reply: FrameKind.REPLY,
    Event: FrameKind.EVENT,
    Error: FrameKind.ERROR,
    Redirect: FrameKind.REDIRECT,
    Ping: FrameKind.PING,
    Pong: FrameKind.PONG,
}
_ENCODER: Final = msgspec.msgpack.Encoder()

# Which kinds each side may send. ERROR, PING and PONG go both ways: a client may say why it hangs
# up, and either side may probe a quiet connection.
_SENT_BY: Final[dict[Side, frozenset[int]]] = {
    Side.CLIENT: frozenset(
        {FrameKind.HELLO, FrameKind.COMMAND, FrameKind.ERROR, FrameKind.PING, FrameKind.PONG}
    ),
    Side.SERVER: frozenset(
        {
            FrameKind.WELCOME,
            FrameKind.REPLY,
            FrameKind.EVENT,
            FrameKind.ERROR,
            FrameKind.REDIRECT,
            FrameKind.PING,
            FrameKind.PONG,
        }
    ),
}
_OTHER_SIDE: Final = {Side.CLIENT: Side.SERVER, Side.SERVER: Side.CLIENT}
# Minimum body bytes per kind: the fixed body header of the hot frames.
_BODY_BYTES_MIN: Final[dict[int, int]] = {
    FrameKind.COMMAND: COMMAND_HEADER.size,
    FrameKind.REPLY: REPLY_HEADER.size,
    FrameKind.EVENT: EVENT_HEADER.size,
}
_KIND_NAMES: Final = {int(kind): kind.name for kind in FrameKind}


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


class Connection:
    """One end of one client connection: bytes in, frames out; frames in, bytes out.

    Invariants:
    - `_buffer[_start:]` holds received bytes not yet returned as frames; `_start <= len(_buffer)`.
    - once `_error` is set, every call except sending an `Error` frame raises.
    - the server side returns no frame before HELLO; the client side returns no REPLY or EVENT
      before WELCOME.
    """

    __slots__ = (
        "_buffer",
        "_error",
        "_handshake_received",
        "_handshake_sent",
        "_hot_body_bytes_min",
        "_hot_sendable",
        "_our_side",
        "_peer_closed",
        "_pending_error",
        "_receivable",
        "_sendable",
        "_start",
        "_we_closed",
    )

    def __init__(self, our_side: Side) -> None:
        self._our_side = our_side
        self._buffer = bytearray()
        self._start = 0
        self._receivable = _SENT_BY[_OTHER_SIDE[our_side]]
        self._sendable = _SENT_BY[our_side]
        # Server: HELLO received / WELCOME sent. Client: WELCOME received / HELLO sent.
        self._handshake_received = False
        self._handshake_sent = False
        # The hot kinds the peer may send now, with their minimum body bytes: none before the
        # handshake, so every frame until then takes the fully checked path.
        self._hot_body_bytes_min: dict[int, int] = {}
        # The hot kinds we may send now without the full check: none until our handshake frame
        # is sent, none again once the connection has failed or we sent a fatal ERROR.
        self._hot_sendable: frozenset[int] = frozenset()
        self._peer_closed = False
        self._we_closed = False
        self._error: ProtocolError | None = None
        # An error found after some good frames in the same `next_frames` call: those frames are
        # returned first, and the error is raised by the next call.
        self._pending_error: ProtocolError | None = None

    # -- state ----------------------------------------------------------------------------------

    @property
    def our_side(self) -> Side:
        return self._our_side

    @property
    def peer_closed(self) -> bool:
        """The peer sent EOF (`receive_data(b"")`)."""
        return self._peer_closed

    @property
    def handshake_done(self) -> bool:
        """Server: HELLO received. Client: WELCOME received."""
        return self._handshake_received

    @property
    def error(self) -> ProtocolError | None:
        """The error that ended this connection, if any."""
        return self._error

    @property
    def buffered_bytes(self) -> int:
        return len(self._buffer) - self._start

    # -- receiving ------------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes read from the socket; empty bytes mean the peer closed its end (EOF)."""
        self._check_usable()
        if self._peer_closed:
            raise LocalProtocolError(
                "receive_after_eof",
                "receive_data() was called after EOF was passed in; a closed connection gets no "
                "more bytes: make a new Connection for a new socket",
            )
        if not data:
            self._peer_closed = True
            return
        buffer = self._buffer
        if self._start:
            # Drop what was consumed; what is left is at most one partial frame.
            del buffer[: self._start]
            self._start = 0
        if len(buffer) + len(data) > RECEIVE_BUFFER_BYTES_MAX:
            raise LocalProtocolError(
                "receive_buffer_full",
                f"receive buffer would hold {len(buffer) + len(data)} bytes > "
                f"RECEIVE_BUFFER_BYTES_MAX={RECEIVE_BUFFER_BYTES_MAX}: drain next_frames() until "
                f"it returns nothing before each receive_data(), and pass at most "
                f"READ_BYTES_MAX={READ_BYTES_MAX} bytes per call",
            )
        buffer += data

    def next_frame(self) -> Frame | Sentinel:
        """The next complete frame, `NEED_DATA`, or `CLOSED` once the peer's EOF is reached.

        Raises:
            ProtocolError: the peer broke the protocol; send `error.to_frame()` and close.
        """
        frames = self.next_frames(1)
        if frames:
            return frames[0]
        if self._peer_closed:
            return CLOSED
        return NEED_DATA

    def next_frames(self, frames_max: int = FRAMES_PER_CALL_MAX) -> list[Frame]:
        """Every complete frame buffered, up to `frames_max`, in order; [] when none is complete.

        The fast path for a server reading many pipelined commands from one read: one header
        unpack and one body-header unpack per hot frame, no msgspec. When the peer broke the
        protocol after some good frames, those frames are returned and the next call raises.

        Raises:
            ProtocolError: the peer broke the protocol; send `error.to_frame()` and close.
        """
        self._check_usable()
        if self._pending_error is not None:
            self._fail(self._pending_error)
        assert frames_max >= 1, frames_max
        frames: list[Frame] = []
        buffer = self._buffer
        position = self._start
        end = len(buffer)
        # Locals: this loop runs once per frame, and a local load is cheaper than a global or an
        # attribute load (benches/client_codec.py).
        unpack_header = FRAME_HEADER.unpack_from
        unpack_command = COMMAND_HEADER.unpack_from
        unpack_reply = REPLY_HEADER.unpack_from
        append = frames.append
        command_type = Command
        reply_type = Reply
        hot_body_bytes_min = self._hot_body_bytes_min
        body_bytes_max = FRAME_BODY_BYTES_MAX
        frames_left = frames_max
        try:
            while end - position >= 8 and frames_left:
                length, kind, version, flags = unpack_header(buffer, position)
                body_bytes_min = hot_body_bytes_min.get(kind)
                if (
                    body_bytes_min is None
                    or version != 1
                    or flags
                    or not body_bytes_min <= length <= body_bytes_max
                ):
                    # Rare path: the handshake, control frames, and every refusal.
                    self._check_header(length, kind, version, flags)
                body = position + 8
                frame_end = body + length
                if frame_end > end:
                    break
                frames_left -= 1
                if kind == 3:  # COMMAND
                    request_id, acked_request_id, command_version = unpack_command(buffer, body)
                    append(
                        command_type(
                            request_id,
                            acked_request_id,
                            command_version,
                            bytes(buffer[body + 24 : frame_end]),
                        )
                    )
                elif kind == 4:  # REPLY
                    request_id, index, status, reply_version = unpack_reply(buffer, body)
                    if status > _REPLY_STATUS_MAX:
                        raise ProtocolError(
                            ErrorCode.MALFORMED_FRAME,
                            f"REPLY for request {request_id} has status={status}, not one of "
                            f"{[s.value for s in ReplyStatus]}; the server speaks a different "
                            "protocol: check that client and daemon versions match",
                        )
                    append(
                        reply_type(
                            request_id,
                            index,
                            status,
                            reply_version,
                            bytes(buffer[body + 24 : frame_end]),
                        )
                    )
                elif kind == 5:  # EVENT
                    index, event_version = EVENT_HEADER.unpack_from(buffer, body)
                    append(Event(index, event_version, bytes(buffer[body + 16 : frame_end])))
                else:
                    append(self._decode_control(kind, buffer, body, frame_end))
                    hot_body_bytes_min = self._hot_body_bytes_min
                position = frame_end
        except ProtocolError as error:
            self._start = position
            if not frames:
                self._fail(error)
            self._pending_error = error
            return frames
        self._start = position
        if position == end and position:
            buffer.clear()
            self._start = 0
        elif self._peer_closed and not frames and position < end:
            self._fail(
                ProtocolError(
                    ErrorCode.TRUNCATED_FRAME,
                    f"the peer closed the connection in the middle of a frame "
                    f"({end - position} bytes of it received); it crashed or is not a seqd peer",
                )
            )
        return frames

    def _check_header(self, length: int, kind: int, version: int, flags: int) -> None:
        """Refuse a bad header as soon as it is seen, before buffering any of the body."""
        if version not in PROTOCOL_VERSIONS_SUPPORTED:
            raise ProtocolError(
                ErrorCode.BAD_VERSION,
                f"frame has protocol_version={version}; this {self._our_side.value} speaks "
                f"versions {list(PROTOCOL_VERSIONS_SUPPORTED)}: use a seqd client library and "
                "daemon that share a protocol version",
            )
        if length > FRAME_BODY_BYTES_MAX:
            raise ProtocolError(
                ErrorCode.FRAME_TOO_LARGE,
                f"frame declares {length + FRAME_HEADER_BYTES} bytes > "
                f"FRAME_BYTES_MAX={FRAME_BYTES_MAX}: split the command, or store large data "
                "elsewhere and send a reference to it",
            )
        if flags:
            raise ProtocolError(
                ErrorCode.BAD_FLAGS,
                f"frame has flags={flags:#06x}; protocol version 1 defines no flags and requires 0: "
                "the peer is newer or not a seqd peer",
            )
        if kind not in _KIND_NAMES:
            raise ProtocolError(
                ErrorCode.UNKNOWN_KIND,
                f"frame kind {kind} is not one of {sorted(_KIND_NAMES)}; the peer is not a seqd "
                "peer, or sent garbage",
            )
        name = _KIND_NAMES[kind]
        if kind not in self._receivable:
            peer = _OTHER_SIDE[self._our_side].value
            raise ProtocolError(
                ErrorCode.UNEXPECTED_KIND,
                f"a {peer} may not send {name} frames to a {self._our_side.value}: "
                "the peer is confused about which end it is",
            )
        if self._our_side is Side.SERVER:
            if not self._handshake_received and kind != FrameKind.HELLO:
                raise ProtocolError(
                    ErrorCode.HELLO_REQUIRED,
                    f"the first frame must be HELLO, got {name}: send HELLO with your client id "
                    "before any command",
                )
            if self._handshake_received and kind == FrameKind.HELLO:
                raise ProtocolError(
                    ErrorCode.UNEXPECTED_KIND,
                    "a second HELLO on the same connection; a client says hello once per "
                    "connection: reconnect to start a new session",
                )
        else:
            if kind == FrameKind.WELCOME and self._handshake_received:
                raise ProtocolError(
                    ErrorCode.UNEXPECTED_KIND,
                    "a second WELCOME on the same connection; the server is broken: report it",
                )
            if kind in (FrameKind.REPLY, FrameKind.EVENT) and not self._handshake_received:
                raise ProtocolError(
                    ErrorCode.UNEXPECTED_KIND,
                    f"{name} before WELCOME; the server must answer HELLO first: report it",
                )
        body_bytes_min = _BODY_BYTES_MIN.get(kind, 0)
        if length < body_bytes_min:
            raise ProtocolError(
                ErrorCode.MALFORMED_FRAME,
                f"{name} frame body is {length} bytes, shorter than its {body_bytes_min}-byte "
                "fixed header: the peer is not a seqd peer, or sent garbage",
            )

    def _decode_control(self, kind: int, buffer: bytearray, body: int, frame_end: int) -> Frame:
        name = _KIND_NAMES[kind]
        try:
            frame = _CONTROL_DECODERS[kind].decode(bytes(buffer[body:frame_end]))
        except msgspec.DecodeError as error:  # ValidationError is a DecodeError
            raise ProtocolError(
                ErrorCode.MALFORMED_FRAME,
                f"{name} frame body does not decode as {name.title()} ({error}): the peer is not "
                "a seqd peer of this protocol version, or sent garbage",
            ) from None
        if kind == FrameKind.HELLO:
            assert isinstance(frame, Hello)
            if frame.protocol_version not in PROTOCOL_VERSIONS_SUPPORTED:
                raise ProtocolError(
                    ErrorCode.BAD_VERSION,
                    f"HELLO asks for protocol_version={frame.protocol_version}; this server "
                    f"speaks versions {list(PROTOCOL_VERSIONS_SUPPORTED)}: use a seqd client "
                    "library that matches the daemon",
                )
            if not 0 < frame.client_id < _U64_LIMIT:
                raise ProtocolError(
                    ErrorCode.MALFORMED_FRAME,
                    f"HELLO has client_id={frame.client_id}, outside 1..2**64-1: pick a stable "
                    "positive 64-bit client id",
                )
            self._handshake_received = True
        elif kind == FrameKind.WELCOME:
            assert isinstance(frame, Welcome)
            if frame.frame_bytes_max < FRAME_HEADER_BYTES + COMMAND_HEADER.size:
                raise ProtocolError(
                    ErrorCode.MALFORMED_FRAME,
                    f"WELCOME has frame_bytes_max={frame.frame_bytes_max}, too small for any "
                    "command: the server is misconfigured",
                )
            if frame.command_bytes_max < 1 or frame.in_flight_max < 1:
                raise ProtocolError(
                    ErrorCode.MALFORMED_FRAME,
                    f"WELCOME has command_bytes_max={frame.command_bytes_max} and in_flight_max="
                    f"{frame.in_flight_max}; both must be >= 1: the server is misconfigured",
                )
            self._handshake_received = True
        if self._handshake_received:
            self._hot_body_bytes_min = {
                kind: size for kind, size in _BODY_BYTES_MIN.items() if kind in self._receivable
            }
        return frame  # type: ignore[no-any-return]

    # -- sending --------------------------------------------------------------------------------

    def send(self, frame: Frame) -> bytes:
        """The bytes of one frame, to write to the socket.

        Raises:
            LocalProtocolError: our side may not send this frame now (a bug in the caller), or
                the connection has failed or been closed by a fatal ERROR we sent.
        """
        out = bytearray()
        self.send_into(out, frame)
        return bytes(out)

    def send_into(self, out: bytearray, frame: Frame) -> None:
        """Append the bytes of one frame to `out` (to batch many frames into one write)."""
        kind = _KIND_OF_TYPE.get(type(frame))
        if kind is None:
            raise LocalProtocolError(
                "unknown_frame", f"{type(frame).__name__} is not a frame type of this protocol"
            )
        if kind == FrameKind.ERROR:
            # The one frame allowed after a failure: it tells the peer why we hang up.
            if self._we_closed:
                raise LocalProtocolError(
                    "connection_closed", "a fatal ERROR was already sent; close the socket"
                )
        else:
            self._check_usable()
            self._check_sendable(kind)
        try:
            if kind == FrameKind.COMMAND:
                assert isinstance(frame, Command)
                self.send_command_into(
                    out, frame.request_id, frame.acked_request_id, frame.version, frame.payload
                )
            elif kind == FrameKind.REPLY:
                assert isinstance(frame, Reply)
                self.send_reply_into(
                    out, frame.request_id, frame.index, frame.status, frame.version, frame.payload
                )
            elif kind == FrameKind.EVENT:
                assert isinstance(frame, Event)
                self.send_event_into(out, frame.index, frame.version, frame.payload)
            else:
                body = _ENCODER.encode(frame)
                self._check_body_size(len(body), kind)
                out += FRAME_HEADER.pack(len(body), kind, PROTOCOL_VERSION, 0)
                out += body
        except struct.error as error:
            raise LocalProtocolError(
                "bad_field", f"{type(frame).__name__} has a field out of range ({error})"
            ) from None
        if kind == FrameKind.HELLO or kind == FrameKind.WELCOME:
            self._handshake_sent = True
            self._hot_sendable = self._sendable & _BODY_BYTES_MIN.keys()
        elif kind == FrameKind.ERROR and frame.fatal:  # type: ignore[union-attr]
            self._we_closed = True
            self._hot_sendable = frozenset()

    def send_command_into(
        self,
        out: bytearray,
        request_id: int,
        acked_request_id: int,
        version: int,
        payload: bytes | bytearray | memoryview,
    ) -> None:
        """Append one COMMAND frame to `out`: the client's fast path for pipelining and resends."""
        if _KIND_COMMAND not in self._hot_sendable:
            self._check_usable()
            self._check_sendable(FrameKind.COMMAND)
        length = COMMAND_HEADER.size + len(payload)
        if length > FRAME_BODY_BYTES_MAX:
            self._check_body_size(length, FrameKind.COMMAND)
        out += _COMMAND_FRAME.pack(
            length, FrameKind.COMMAND, PROTOCOL_VERSION, 0, request_id, acked_request_id, version
        )
        out += payload

    def send_reply_into(
        self,
        out: bytearray,
        request_id: int,
        index: int,
        status: int,
        version: int,
        payload: bytes | bytearray | memoryview,
    ) -> None:
        """Append one REPLY frame to `out`: the server encodes a batch into one transport.write."""
        if _KIND_REPLY not in self._hot_sendable:
            self._check_usable()
            self._check_sendable(FrameKind.REPLY)
        length = REPLY_HEADER.size + len(payload)
        if length > FRAME_BODY_BYTES_MAX:
            self._check_body_size(length, FrameKind.REPLY)
        out += _REPLY_FRAME.pack(
            length, FrameKind.REPLY, PROTOCOL_VERSION, 0, request_id, index, status, version
        )
        out += payload

    def send_event_into(
        self, out: bytearray, index: int, version: int, payload: bytes | bytearray | memoryview
    ) -> None:
        """Append one EVENT frame to `out`."""
        if _KIND_EVENT not in self._hot_sendable:
            self._check_usable()
            self._check_sendable(FrameKind.EVENT)
        length = EVENT_HEADER.size + len(payload)
        if length > FRAME_BODY_BYTES_MAX:
            self._check_body_size(length, FrameKind.EVENT)
        out += _EVENT_FRAME.pack(length, FrameKind.EVENT, PROTOCOL_VERSION, 0, index, version)
        out += payload

    def _check_sendable(self, kind: int) -> None:
        name = _KIND_NAMES[kind]
        if kind not in self._sendable:
            raise LocalProtocolError(
                "unexpected_kind", f"a {self._our_side.value} may not send {name} frames"
            )
        if self._our_side is Side.CLIENT:
            if kind == FrameKind.HELLO and self._handshake_sent:
                raise LocalProtocolError(
                    "unexpected_kind", "HELLO was already sent on this connection"
                )
            if kind != FrameKind.HELLO and not self._handshake_sent:
                raise LocalProtocolError(
                    "hello_required", f"send HELLO before {name} on a new connection"
                )
        else:
            if kind == FrameKind.WELCOME and self._handshake_sent:
                raise LocalProtocolError(
                    "unexpected_kind", "WELCOME was already sent on this connection"
                )
            if kind in (FrameKind.WELCOME, FrameKind.REDIRECT) and not self._handshake_received:
                raise LocalProtocolError(
                    "hello_required", f"{name} answers a HELLO, and none has been received"
                )
            if kind in (FrameKind.REPLY, FrameKind.EVENT) and not self._handshake_sent:
                raise LocalProtocolError("welcome_required", f"send WELCOME before any {name}")

    def _check_body_size(self, body_bytes: int, kind: int) -> None:
        if body_bytes > FRAME_BODY_BYTES_MAX:
            raise LocalProtocolError(
                "frame_too_large",
                f"{_KIND_NAMES[kind]} frame would be {body_bytes + FRAME_HEADER_BYTES} bytes > "
                f"FRAME_BYTES_MAX={FRAME_BYTES_MAX}: make the payload smaller",
            )

    # -- failure --------------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._error is not None:
            raise LocalProtocolError(
                "connection_failed",
                f"this connection failed earlier ({self._error}); close the socket and reconnect",
            )
        if self._we_closed:
            raise LocalProtocolError(
                "connection_closed", "a fatal ERROR was sent on this connection; close the socket"
            )

    def _fail(self, error: ProtocolError) -> None:
        self._error = error
        self._hot_sendable = frozenset()
        self._pending_error = None
        self._buffer.clear()
        self._start = 0
        raise error
