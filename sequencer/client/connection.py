"""The client protocol's codec: one end of one connection, bytes in and frames out, and back.

`Connection(our_side)` is sans-I/O (h11's shape); its theory of operation (what it holds, how and
when it refuses a frame, its bounds) is in `sequencer.client.protocol`'s docstring.
"""

from __future__ import annotations

import struct
from typing import Final

import msgspec

from . import wire
from .frames import (
    CONTROL_DECODERS,
    KIND_OF_TYPE,
    Command,
    Event,
    Frame,
    Hello,
    Item,
    LocalProtocolError,
    ProtocolError,
    Reply,
    Welcome,
)
from .wire import (
    CLOSED,
    COMMAND_HEADER,
    FRAME_BODY_BYTES_MAX,
    FRAME_BYTES_MAX,
    FRAME_HEADER_BYTES,
    FRAMES_PER_CALL_MAX,
    NEED_DATA,
    PROTOCOL_VERSION,
    PROTOCOL_VERSIONS_SUPPORTED,
    READ_BYTES_MAX,
    RECEIVE_BUFFER_BYTES_MAX,
    REPLY_HEADER,
    ErrorCode,
    FrameKind,
    ReplyStatus,
    Sentinel,
    Service,
    Side,
)

__all__ = ["Connection"]

# Assigned, not imported, on purpose: CPython 3.11 compiles `NAME.method()` on an imported NAME
# without LOAD_METHOD (~0.2 us slower per call), and these are called once per frame.
EVENT_HEADER: Final = wire.EVENT_HEADER
FRAME_HEADER: Final = wire.FRAME_HEADER
_CONTROL_DECODERS: Final = CONTROL_DECODERS
_KIND_OF_TYPE: Final = KIND_OF_TYPE

# The frame header and a hot frame's body header, packed in one call when sending.
_COMMAND_FRAME: Final = struct.Struct("<IBBH" + "QQH6x")
_REPLY_FRAME: Final = struct.Struct("<IBBH" + "QQBxH4x")
_EVENT_FRAME: Final = struct.Struct("<IBBH" + "QH6x")
_REPLY_FRAME_HEADER: Final = wire.FRAME_HEADER.pack
_ITEM_FRAME: Final = struct.Struct("<IBBH" + "QqBBH4x")
ITEM_HEADER: Final = wire.ITEM_HEADER

# Identifiers are unsigned 64-bit on the wire; 0 means "none" for request ids and indexes.
_U64_LIMIT: Final = 1 << 64

assert PROTOCOL_VERSION == 1  # next_frames' hot loop compares with the literal

_REPLY_STATUS_MAX: Final = max(ReplyStatus)
# Plain ints for the hot paths: cheaper to look up than enum members.
_KIND_COMMAND: Final = int(FrameKind.COMMAND)
_KIND_REPLY: Final = int(FrameKind.REPLY)
_KIND_EVENT: Final = int(FrameKind.EVENT)
_KIND_ITEM: Final = int(FrameKind.ITEM)
assert (_KIND_COMMAND, _KIND_REPLY, _KIND_EVENT) == (3, 4, 5)  # literals in next_frames
assert int(FrameKind.ITEM) == 11  # a literal in next_frames

_ENCODER: Final = msgspec.msgpack.Encoder()

# Which kinds each side may send, per service. ERROR, PING and PONG go both ways: a client may
# say why it hangs up, and either side may probe a quiet connection. A query replica takes
# SUBSCRIBE and QUERY instead of COMMAND, and sends ITEM and ANSWER instead of REPLY and EVENT.
_BOTH_WAYS: Final = frozenset({FrameKind.ERROR, FrameKind.PING, FrameKind.PONG})
_SENT_BY_SERVICE: Final[dict[Service, dict[Side, frozenset[int]]]] = {
    Service.NODE: {
        Side.CLIENT: _BOTH_WAYS | {FrameKind.HELLO, FrameKind.COMMAND},
        Side.SERVER: _BOTH_WAYS
        | {FrameKind.WELCOME, FrameKind.REPLY, FrameKind.EVENT, FrameKind.REDIRECT},
    },
    Service.REPLICA: {
        Side.CLIENT: _BOTH_WAYS | {FrameKind.HELLO, FrameKind.SUBSCRIBE, FrameKind.QUERY},
        Side.SERVER: _BOTH_WAYS | {FrameKind.WELCOME, FrameKind.ITEM, FrameKind.ANSWER},
    },
}
_OTHER_SIDE: Final = {Side.CLIENT: Side.SERVER, Side.SERVER: Side.CLIENT}
# Minimum body bytes per kind: the fixed body header of the hot frames.
_BODY_BYTES_MIN: Final[dict[int, int]] = {
    FrameKind.COMMAND: COMMAND_HEADER.size,
    FrameKind.REPLY: REPLY_HEADER.size,
    FrameKind.EVENT: EVENT_HEADER.size,
    FrameKind.ITEM: ITEM_HEADER.size,
}
_KIND_NAMES: Final = {int(kind): kind.name for kind in FrameKind}
# What a server sends only once the session is open (after WELCOME).
_AFTER_WELCOME: Final = frozenset(
    {FrameKind.REPLY, FrameKind.EVENT, FrameKind.ITEM, FrameKind.ANSWER}
)


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
        "_service",
        "_start",
        "_we_closed",
    )

    def __init__(self, our_side: Side, service: Service = Service.NODE) -> None:
        self._our_side = our_side
        self._service = service
        self._buffer = bytearray()
        self._start = 0
        sent_by = _SENT_BY_SERVICE[service]
        self._receivable = sent_by[_OTHER_SIDE[our_side]]
        self._sendable = sent_by[our_side]
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
        # The payloads are sliced from one bytes copy of what is buffered, made at the first hot
        # frame: slicing bytes makes the payload in one step, where `bytes(buffer[a:b])` copies
        # twice (~85 ns against ~290 ns a frame, benches/RESULTS.md issue 13). Not for a single
        # frame (`next_frame`), which would copy the whole buffer for each frame.
        data = b""
        base = -1 if frames_max > 1 else position
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
                if base < 0:
                    base = position
                    data = bytes(memoryview(buffer)[position:end])
                if kind == 3:  # COMMAND
                    request_id, acked_request_id, command_version = unpack_command(buffer, body)
                    append(
                        command_type(
                            request_id,
                            acked_request_id,
                            command_version,
                            data[body + 24 - base : frame_end - base]
                            if data
                            else bytes(buffer[body + 24 : frame_end]),
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
                            data[body + 24 - base : frame_end - base]
                            if data
                            else bytes(buffer[body + 24 : frame_end]),
                        )
                    )
                elif kind == 5:  # EVENT
                    index, event_version = EVENT_HEADER.unpack_from(buffer, body)
                    append(
                        Event(
                            index,
                            event_version,
                            data[body + 16 - base : frame_end - base]
                            if data
                            else bytes(buffer[body + 16 : frame_end]),
                        )
                    )
                elif kind == 11:  # ITEM
                    index, timestamp_ns, item_kind, record_type, item_version = (
                        ITEM_HEADER.unpack_from(buffer, body)
                    )
                    payload = (
                        data[body + 24 - base : frame_end - base]
                        if data
                        else bytes(buffer[body + 24 : frame_end])
                    )
                    append(Item(index, timestamp_ns, item_kind, record_type, item_version, payload))
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
            other_service = Service.REPLICA if self._service is Service.NODE else Service.NODE
            if kind in _SENT_BY_SERVICE[other_service][_OTHER_SIDE[self._our_side]]:
                where = (
                    "a query replica's socket" if other_service is Service.REPLICA
                    else "the node's socket"
                )
                raise ProtocolError(
                    ErrorCode.UNEXPECTED_KIND,
                    f"{name} frames go to {where}, not to a {self._service.value} "
                    f"{self._our_side.value}: connect there instead",
                )
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
            if kind in _AFTER_WELCOME and not self._handshake_received:
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
            elif kind == FrameKind.ITEM:
                assert isinstance(frame, Item)
                self.send_item_into(
                    out, frame.index, frame.timestamp_ns, frame.kind, frame.record_type,
                    frame.version, frame.payload,
                )  # fmt: skip
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
            # Not `self._sendable & keys()`: that makes a set, though typed frozenset (mypyc checks).
            self._hot_sendable = frozenset(sent for sent in self._sendable if sent in _BODY_BYTES_MIN)
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

    def send_reply_body_into(self, out: bytearray, body: bytes | bytearray | memoryview) -> None:
        """Append one REPLY frame whose body (the REPLY_HEADER fields, then the payload) is
        already encoded: the server's path for the blp's replies, whose egress frames carry the
        body as it goes on the wire after the session id (`sequencer.egress.REPLY_HEADER`), so
        nothing is unpacked and packed again."""
        if _KIND_REPLY not in self._hot_sendable:
            self._check_usable()
            self._check_sendable(FrameKind.REPLY)
        length = len(body)
        if length > FRAME_BODY_BYTES_MAX:
            self._check_body_size(length, FrameKind.REPLY)
        out += _REPLY_FRAME_HEADER(length, 4, 1, 0)  # REPLY, PROTOCOL_VERSION, no flags
        out += body

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

    def send_item_into(
        self,
        out: bytearray,
        index: int,
        timestamp_ns: int,
        kind: int,
        record_type: int,
        version: int,
        payload: bytes | bytearray | memoryview,
    ) -> None:
        """Append one ITEM frame to `out` (a query replica's subscription)."""
        if _KIND_ITEM not in self._hot_sendable:
            self._check_usable()
            self._check_sendable(FrameKind.ITEM)
        length = ITEM_HEADER.size + len(payload)
        if length > FRAME_BODY_BYTES_MAX:
            self._check_body_size(length, FrameKind.ITEM)
        out += _ITEM_FRAME.pack(
            length, FrameKind.ITEM, PROTOCOL_VERSION, 0, index, timestamp_ns, kind, record_type,
            version,
        )  # fmt: skip
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
            if kind in _AFTER_WELCOME and not self._handshake_sent:
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
