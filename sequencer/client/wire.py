"""The client protocol's numbers: frame header, hot body headers, bounds, kinds and codes.

Everything here crosses the wire as a number or a short string, so a change to any of it is a
protocol change. The frame types are in `sequencer.client.frames`, the codec in
`sequencer.client.connection`; `sequencer.client.protocol` re-exports all three and gives the
theory of operation, the bounds included.
"""

from __future__ import annotations

import enum
import struct
from typing import Final

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
    "ErrorCode",
    "FrameKind",
    "ItemKind",
    "RejectionCode",
    "ReplyStatus",
    "Sentinel",
    "Service",
    "Side",
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
# A catch-up subscription's item (replica sockets only): index, timestamp_ns, ItemKind, the
# record's type (RECORD items; 0 otherwise), version (the event's, or the record's).
ITEM_HEADER: Final = struct.Struct("<QqBBH4x")

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
assert ITEM_HEADER.size == 24, ITEM_HEADER.size
assert RECEIVE_BUFFER_BYTES_MAX >= FRAME_BYTES_MAX + READ_BYTES_MAX
assert FRAMES_PER_CALL_MAX >= 1


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
    # A query replica's socket only (docs/client.md, "Catch-up subscriptions and queries"): a
    # node's sequencer refuses them as `unexpected_kind`.
    SUBSCRIBE = 10
    ITEM = 11
    QUERY = 12
    ANSWER = 13


class ItemKind(enum.IntEnum):
    """What an ITEM frame carries."""

    RECORD = 1  # a committed record, whole as in the journal (48-byte header, then the payload)
    EVENT = 2  # an event the state machine published while applying the record at `index`
    # An event too large for a frame was published here and left out (payload: msgpack
    # {"code": "event_too_large", "message": ...}), so a subscriber sees where it was.
    EVENT_OMITTED = 3


class ReplyStatus(enum.IntEnum):
    OK = 0
    # The state machine refused the command; the payload is msgpack {"code": str, "message": str}.
    REJECTED = 1
    # The request was applied and its reply was acknowledged (acked_request_id) and forgotten: a
    # client resent a request it had already seen answered, typically after restarting with a
    # too-low first request id.
    DUPLICATE = 2


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
    # Sent by a query replica to a subscriber (docs/client.md, "Catch-up subscriptions").
    INDEX_BELOW_RETENTION = "index_below_retention"
    SUBSCRIBER_TOO_SLOW = "subscriber_too_slow"
    REPLICA_STOPPING = "replica_stopping"


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


class Service(enum.Enum):
    """What the server end of a connection is: a node's sequencer (commands, replies, live
    events) or a query replica (catch-up subscriptions and queries). Each takes its own kinds."""

    NODE = "node"
    REPLICA = "replica"


class Sentinel(enum.Enum):
    """What `next_frame` returns when it has no frame: wait for bytes, or the peer has gone."""

    NEED_DATA = "NEED_DATA"
    CLOSED = "CLOSED"


NEED_DATA: Final = Sentinel.NEED_DATA
CLOSED: Final = Sentinel.CLOSED
