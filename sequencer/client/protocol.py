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

Where it lives
--------------

    sequencer/client/wire.py        the numbers: header layouts, bounds, FrameKind, ReplyStatus,
                                    ErrorCode, RejectionCode, Side
    sequencer/client/frames.py      the frame structs, ProtocolError, the REJECTED payload
    sequencer/client/connection.py  `Connection`, the codec

This module re-exports their public names, so `sequencer.client.protocol` stays the one import.
"""

from __future__ import annotations

from .connection import Connection
from .frames import (
    Answer,
    Command,
    ControlFrame,
    Error,
    Event,
    Frame,
    Hello,
    Item,
    LocalProtocolError,
    Ping,
    Pong,
    ProtocolError,
    Query,
    Redirect,
    Reply,
    Subscribe,
    Welcome,
    decode_rejection,
    encode_rejection,
)
from .wire import (
    CLOSED,
    COMMAND_BYTES_MAX,
    COMMAND_HEADER,
    EVENT_HEADER,
    FRAME_BODY_BYTES_MAX,
    FRAME_BYTES_MAX,
    FRAME_HEADER,
    FRAME_HEADER_BYTES,
    FRAMES_PER_CALL_MAX,
    IN_FLIGHT_MAX,
    ITEM_HEADER,
    NEED_DATA,
    PROTOCOL_VERSION,
    PROTOCOL_VERSIONS_SUPPORTED,
    READ_BYTES_MAX,
    RECEIVE_BUFFER_BYTES_MAX,
    REPLY_HEADER,
    ErrorCode,
    FrameKind,
    ItemKind,
    RejectionCode,
    ReplyStatus,
    Sentinel,
    Service,
    Side,
)

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
    "ITEM_HEADER",
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "PROTOCOL_VERSIONS_SUPPORTED",
    "READ_BYTES_MAX",
    "RECEIVE_BUFFER_BYTES_MAX",
    "REPLY_HEADER",
    "Answer",
    "Command",
    "Connection",
    "ControlFrame",
    "Error",
    "ErrorCode",
    "Event",
    "Frame",
    "FrameKind",
    "Hello",
    "Item",
    "ItemKind",
    "LocalProtocolError",
    "Ping",
    "Pong",
    "ProtocolError",
    "Query",
    "Redirect",
    "RejectionCode",
    "Reply",
    "ReplyStatus",
    "Sentinel",
    "Service",
    "Side",
    "Subscribe",
    "Welcome",
    "decode_rejection",
    "encode_rejection",
]
