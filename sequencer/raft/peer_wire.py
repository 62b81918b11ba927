"""The peer protocol's frame kinds, layouts and bounds, its refusals, and what its frames carry.

Everything here is the wire contract between nodes: a change to any of it is a protocol change
(every node must run the same seqd version). The handshake is in `sequencer.raft.peer_handshake`,
the codec in `sequencer.raft.peer_protocol`, which re-exports every public name of both and gives
the frame layout.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Annotated, Final, Union

import msgspec

from sequencer.raft.messages import (
    MESSAGE_TYPES,
    TRANSFER_MESSAGE_TYPES,
    Message,
)

__all__ = [
    "CLOSED",
    "DATA_HEADER",
    "FRAME_HEADER",
    "FRAME_HEADER_BYTES",
    "ITEMS_PER_FRAME_MAX",
    "MAC_BYTES",
    "MESSAGES_DECODER",
    "NEED_DATA",
    "PEER_FRAME_BYTES_MAX",
    "PROTOCOL_VERSION",
    "READ_BYTES_MAX",
    "RECEIVE_BUFFER_BYTES_MAX",
    "RECORDS_DECODER",
    "REFUSAL_CODES",
    "REFUSED_DECODER",
    "REFUSED_REASON_CHARS_MAX",
    "Authenticated",
    "ForwardedRecord",
    "ForwardsRefused",
    "FrameKind",
    "LocalPeerProtocolError",
    "MessageBatch",
    "PeerEvent",
    "PeerProtocolError",
    "RecordBatch",
    "RecordsRefused",
    "Sentinel",
    "Side",
]

# 2: a follower's answers carry its incarnation and last index; snapshot chunks (issue 11). A node
# refuses frames of another version (`bad_version`): a cluster runs one seqd version.
PROTOCOL_VERSION: Final = 2

FRAME_HEADER: Final = struct.Struct("<IBBH")  # body length, kind, version, flags
FRAME_HEADER_BYTES: Final = FRAME_HEADER.size
# Data frame body header: the direction's frame sequence number, then the MAC.
DATA_HEADER: Final = struct.Struct("<Q32s")
MAC_BYTES: Final = 32  # HMAC-SHA256, untruncated

# Largest frame, header included. One AppendEntries must carry at least one largest record (a
# client command is at most the client protocol's FRAME_BYTES_MAX = 1 MiB, plus its 48-byte record
# header and msgpack framing), with room to batch: 4 MiB holds four of them, and thousands of
# ordinary records (asserted in `sequencer.raft.transport`, so this module need not import the
# client package). Larger would stall the loop: the whole frame is MACed before any of it is
# used, at ~1.4 GB/s for SHA-256 here (2.9 ms for 4 MiB), which stays below a 10 ms heartbeat.
# Memory: a receiver holds at most one partial frame + one read per inbound peer (4 peers of a
# 5-node cluster: ~17 MiB). The replicator must keep AppendEntries and snapshot chunks under it.
PEER_FRAME_BYTES_MAX: Final = 4 << 20
# Bytes a shell passes to receive_data per call: asyncio's stream read size (uvloop reads 256000).
READ_BYTES_MAX: Final = 256 * 1024
# At most one incomplete frame plus one read, when the shell drains next_event() until NEED_DATA
# before each receive_data(). Anything more is a shell bug, not a peer's.
RECEIVE_BUFFER_BYTES_MAX: Final = PEER_FRAME_BYTES_MAX + READ_BYTES_MAX
# Messages or forwarded records in one frame. msgspec decodes ~1-2 M small structs/s, so 4096 keeps one
# frame's decode and the callback's list to a few milliseconds; the core sends far fewer per loop
# pass (one AppendEntries per follower carries up to 1024 entries as two lists, one message).
ITEMS_PER_FRAME_MAX: Final = 4096
# The reason a leader gives for refusing a follower's forwarded records (REFUSED), in characters:
# a log line's worth. The sender cuts a longer one; a receiver refuses a frame that carries more.
REFUSED_REASON_CHARS_MAX: Final = 1024

assert FRAME_HEADER_BYTES == 8, FRAME_HEADER_BYTES
assert DATA_HEADER.size == 8 + MAC_BYTES, DATA_HEADER.size
assert RECEIVE_BUFFER_BYTES_MAX >= PEER_FRAME_BYTES_MAX + READ_BYTES_MAX
assert ITEMS_PER_FRAME_MAX >= 1


class FrameKind(enum.IntEnum):
    HELLO = 1
    CHALLENGE = 2
    AUTH = 3
    MESSAGES = 4
    RECORDS = 5
    # The acceptor's last frame on a connection whose forwarded records it did not take: why
    # (`ForwardsRefused`), before it closes the connection. Only an acceptor sends it (a peer
    # that dials sends MESSAGES and RECORDS only), and only a dialler receives it.
    REFUSED = 6


class Side(enum.Enum):
    DIALLER = "dialler"
    ACCEPTOR = "acceptor"


class Sentinel(enum.Enum):
    """What `next_event` returns when it has no event: wait for bytes, or the peer has gone."""

    NEED_DATA = "NEED_DATA"
    CLOSED = "CLOSED"


NEED_DATA: Final = Sentinel.NEED_DATA
CLOSED: Final = Sentinel.CLOSED

# Every code PeerProtocolError carries, so a counter set can be laid out before any is seen.
REFUSAL_CODES: Final = (
    "bad_version",  # the peer speaks another protocol version
    "bad_flags",  # non-zero reserved flags
    "unknown_kind",  # not a FrameKind: garbage, or not a seqd peer
    "unexpected_kind",  # a frame this side may not receive now (data before the handshake, ...)
    "frame_too_large",  # a declared length over the bound, refused before buffering the body
    "malformed_frame",  # wrong handshake size, undecodable payload, a message not for this link
    "truncated_frame",  # EOF in the middle of a frame
    "wrong_cluster",  # the peer belongs to another cluster id
    "unknown_node",  # the peer's node id is not in the membership, or not the one dialled
    "bad_proof",  # the handshake proof does not verify: another secret, or a replayed handshake
    "bad_mac",  # a data frame's MAC does not verify: tampered, or from another connection
    "replayed_frame",  # a genuine frame of this connection, out of sequence: replayed or reordered
)


class PeerProtocolError(Exception):
    """The peer broke the protocol or failed authentication: count `code`, close the socket.

    `code` is one of `REFUSAL_CODES`; `message` says what was wrong and what to do.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class LocalPeerProtocolError(PeerProtocolError):
    """Our own side tried something the protocol forbids: a bug in the caller, not the peer."""


# -- what the frames carry, and what the codec yields --------------------------------------------

# A forwarded record is at least a record header (48 bytes), whole records are 8-byte aligned.
_RECORD_BYTES_MIN = 48
_RecordBytes = Annotated[bytes, msgspec.Meta(min_length=_RECORD_BYTES_MIN)]


class ForwardedRecord(msgspec.Struct, array_like=True, gc=False, frozen=True):
    """A record a follower's sequencer wrote, forwarded to the leader to be stamped and proposed.

    `record` is the whole record (48-byte header, payload, zero padding to 8 bytes) as the
    sequencer wrote it to its proposal ring, unstamped (index 0, term 0; the leader's replicator
    sets index, term and timestamp). The transport carries it opaquely; the replicator checks it
    is a whole record before proposing it. gc=False is safe: bytes only.
    """

    record: _RecordBytes


class ForwardsRefused(msgspec.Struct, array_like=True, frozen=True):
    """Why the leader did not take a batch of the records this connection forwarded (it does not
    lead, its inbox is full, a record is malformed, it discarded what it had taken): a sentence
    for the follower's log. The connection closes after it; the follower resends on a new one."""

    reason: Annotated[str, msgspec.Meta(max_length=REFUSED_REASON_CHARS_MAX)]


# The union of the core's messages and the replication roles' own (snapshot chunks), as a list:
# one decode call per frame. Built from `MESSAGE_TYPES`, so a message type added to the core
# cannot be forgotten here.
_WIRE_MESSAGE_TYPES: Final = (*MESSAGE_TYPES, *TRANSFER_MESSAGE_TYPES)
MESSAGES_DECODER: Final = msgspec.msgpack.Decoder(list[Union[_WIRE_MESSAGE_TYPES]])  # type: ignore[valid-type]  # noqa: UP007
RECORDS_DECODER: Final = msgspec.msgpack.Decoder(list[ForwardedRecord])
REFUSED_DECODER: Final = msgspec.msgpack.Decoder(list[ForwardsRefused])


@dataclass(frozen=True, slots=True)
class Authenticated:
    """The handshake is done: `peer_id` proved it holds the cluster secret; data may flow."""

    peer_id: int


class MessageBatch(msgspec.Struct, frozen=True, gc=False):
    """Raft messages from the peer, in the order sent; each is addressed from it, to us.

    A Struct, not a dataclass like the other events: one is made per frame received, and a
    frozen dataclass's `__init__` (Python) cost ~1.9k instructions a frame, a Struct's (C) none of
    note. gc=False is safe: the messages are acyclic (gc=False Structs in a list)."""

    messages: list[Message]


@dataclass(frozen=True, slots=True)
class RecordBatch:
    """Forwarded records from the peer, in the order sent."""

    records: list[ForwardedRecord]


@dataclass(frozen=True, slots=True)
class RecordsRefused:
    """The peer (the leader this node dialled) did not take records this connection forwarded,
    and says why; it closes the connection next."""

    reason: str


PeerEvent = Authenticated | MessageBatch | RecordBatch | RecordsRefused
