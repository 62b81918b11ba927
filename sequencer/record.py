"""The record: the one unit of the log in the ring, the journal and replication.

A record is a fixed 48-byte little-endian header, the payload, then zero padding to a multiple of
8 bytes (docs/contracts.md):

    offset 0  u32 length        header + payload bytes (unaligned); the frame length in the ring
    offset 4  u16 type          RecordType
    offset 6  u16 version       payload schema version (the app's command version for COMMAND)
    offset 8  u64 index         1-based, gapless
    offset 16 u64 term
    offset 24 i64 timestamp_ns  leader time, never goes backwards
    offset 32 u64 session_id
    offset 40 u64 request_id
    offset 48 payload           then zero padding to a multiple of 8

The first 8 bytes are exactly a ring frame header (`[length u32][type u32]`, with the ring's
32-bit type = record type | version << 16), so a region of the ring is a run of whole records and
the journal and the replicator move those bytes verbatim: no stage re-encodes a record. The
sequencer never decodes a COMMAND's app payload; only the blp does.

The payload helpers at the end encode the payloads the daemon itself defines (sessions, admin
operations; the TIMER_FIRED payload lives with the rest of the timers in `sequencer.timers`); an
app's command bytes stay opaque here.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator
from typing import Any, Literal, NamedTuple, overload

import msgspec

__all__ = [
    "ADMIN_NODE_START",
    "ADMIN_RAISE_VERSION",
    "ADMIN_RULES_VERSION",
    "COMMAND_PREFIX",
    "DAEMON_RECORD_VERSION",
    "FRAME_HEADER",
    "FRAME_HEADER_BYTES",
    "RECORD_ALIGNMENT",
    "RECORD_BYTES_MAX",
    "RECORD_HEADER",
    "RECORD_HEADER_BYTES",
    "RECORD_KEY",
    "RECORD_TAIL",
    "SESSION_ID_COUNTER_BITS",
    "SESSION_ID_INCARNATION_BITS",
    "SESSION_ID_NODE_BITS",
    "SESSION_ID_NODE_SHIFT",
    "RecordError",
    "RecordHeader",
    "RecordType",
    "SessionOpen",
    "aligned",
    "decode_admin",
    "decode_command",
    "decode_header",
    "decode_session_open",
    "encode_admin",
    "encode_command",
    "encode_record",
    "encode_session_open",
    "frame_type",
    "incarnation_behind",
    "iter_records",
    "pack_record_into",
    "pack_tail_into",
    "session_incarnation",
    "session_node_number",
    "split_frame_type",
    "walk_records",
]


class RecordType(enum.IntEnum):
    COMMAND = 1
    SESSION_OPEN = 2
    SESSION_CLOSE = 3
    TIMER_FIRED = 4
    SNAPSHOT = 5
    TERM_START = 6  # the Raft no-op a new leader appends at the start of its term
    ADMIN = 7
    # One of the commands a client request became in a copy-and-transform of the journal
    # (sequencer.migrate); never sequenced by a live node. See the Processor for its rules.
    COMMAND_PART = 8
    PADDING = 0xFFFF  # with version 0xFFFF this is the ring's PADDING_TYPE 0xFFFF_FFFF


RECORD_HEADER = struct.Struct("<IHHQQqQQ")
RECORD_HEADER_BYTES = 48
RECORD_TAIL = struct.Struct("<QQqQQ")  # the 40 bytes after the ring frame header (index onwards)
FRAME_HEADER_BYTES = 8  # the ring's `[length u32][type u32]`, the first 8 bytes of a record
# Partial views of the header for walks that need less than all of it (`walk_records`): each
# starts with the length, and unpacking fewer fields is measurably cheaper per record.
FRAME_HEADER = struct.Struct("<II")  # length, frame type (record type | version << 16)
RECORD_KEY = struct.Struct("<IH2xQQ")  # length, type, index, term: what a log check needs
RECORD_ALIGNMENT = 8  # every record starts on an 8-byte boundary: aligned u64 loads and stores
# The length field is a u32; a record may never reach 4 GiB. In practice the ring capacity and the
# client frame limit (1 MiB) bound records far below this.
RECORD_BYTES_MAX = (1 << 32) - RECORD_ALIGNMENT
VERSION_MAX = 0xFFFF  # u16

assert RECORD_HEADER.size == RECORD_HEADER_BYTES
assert RECORD_TAIL.size + FRAME_HEADER_BYTES == RECORD_HEADER_BYTES
assert RECORD_HEADER_BYTES % RECORD_ALIGNMENT == 0
assert (int(RecordType.PADDING) | VERSION_MAX << 16) == 0xFFFF_FFFF
assert FRAME_HEADER.size == FRAME_HEADER_BYTES
assert RECORD_KEY.unpack(RECORD_HEADER.pack(1, 2, 3, 4, 5, 6, 7, 8)[: RECORD_KEY.size]) == (1, 2, 4, 5)


class RecordError(ValueError):
    """A run of bytes is not a run of whole, well-formed records."""


class RecordHeader(NamedTuple):
    length: int  # header + payload bytes, unaligned
    type: int  # RecordType value (kept an int: an unknown type must still decode for `log dump`)
    version: int
    index: int  # type: ignore[assignment]  # shadows tuple.index: the log word wins
    term: int
    timestamp_ns: int
    session_id: int
    request_id: int


def aligned(length: int) -> int:
    """`length` rounded up to the record alignment (8 bytes)."""
    return (length + RECORD_ALIGNMENT - 1) & -RECORD_ALIGNMENT


def frame_type(record_type: int, version: int) -> int:
    """The ring's 32-bit frame type for a record: record type in the low half, version above."""
    assert 0 <= record_type <= 0xFFFF, record_type
    assert 0 <= version <= VERSION_MAX, version
    return record_type | version << 16


def split_frame_type(value: int) -> tuple[int, int]:
    """The inverse of `frame_type`: (record_type, version)."""
    assert 0 <= value <= 0xFFFF_FFFF, value
    return value & 0xFFFF, value >> 16


def encode_record(
    record_type: int,
    version: int,
    index: int,
    term: int,
    timestamp_ns: int,
    session_id: int,
    request_id: int,
    payload: bytes | bytearray | memoryview = b"",
) -> bytes:
    """One whole record, zero padded to 8 bytes."""
    buffer = bytearray(aligned(RECORD_HEADER_BYTES + len(payload)))
    pack_record_into(
        buffer, 0, record_type, version, index, term, timestamp_ns, session_id, request_id, payload
    )
    return bytes(buffer)


def pack_record_into(
    buffer: bytearray | memoryview,
    offset: int,
    record_type: int,
    version: int,
    index: int,
    term: int,
    timestamp_ns: int,
    session_id: int,
    request_id: int,
    payload: bytes | bytearray | memoryview = b"",
) -> int:
    """Write one record, padding included, at `offset`; returns the aligned bytes written.

    Raises:
        RecordError: the record is larger than `RECORD_BYTES_MAX` or does not fit the buffer.
    """
    length = RECORD_HEADER_BYTES + len(payload)
    if length > RECORD_BYTES_MAX:
        raise RecordError(f"record of {length} bytes > RECORD_BYTES_MAX={RECORD_BYTES_MAX}")
    end = offset + length
    total = aligned(length)
    if offset + total > len(buffer):
        raise RecordError(
            f"record of {total} bytes (aligned) at offset {offset} does not fit a buffer of "
            f"{len(buffer)} bytes"
        )
    RECORD_HEADER.pack_into(
        buffer,
        offset,
        length,
        record_type,
        version,
        index,
        term,
        timestamp_ns,
        session_id,
        request_id,
    )
    buffer[offset + RECORD_HEADER_BYTES : end] = payload
    # The buffer may be reused (a ring wraps): the padding must be zeros, not old bytes, because
    # the journal's CRC and a replica's copy cover it.
    buffer[end : offset + total] = bytes(offset + total - end)
    return total


def pack_tail_into(
    buffer: bytearray | memoryview,
    offset: int,
    index: int,
    term: int,
    timestamp_ns: int,
    session_id: int,
    request_id: int,
) -> None:
    """Write the 40 header bytes after the ring frame header (the ring writes length and type).

    For the sequencer: `view = writer.try_claim(RECORD_TAIL.size + len(payload),
    frame_type(t, v))`, then `pack_tail_into(view, 0, ...)` and the payload at `RECORD_TAIL.size`.
    """
    RECORD_TAIL.pack_into(buffer, offset, index, term, timestamp_ns, session_id, request_id)


def decode_header(buffer: bytes | bytearray | memoryview, offset: int = 0) -> RecordHeader:
    """The header of the record at `offset` (not validated: see `iter_records`)."""
    return RecordHeader._make(RECORD_HEADER.unpack_from(buffer, offset))


@overload
def walk_records(
    run: bytes | bytearray | memoryview,
    layout: struct.Struct = ...,
    *,
    views: Literal[False] = False,
) -> Iterator[tuple[tuple[Any, ...], int, int]]: ...
@overload
def walk_records(
    run: bytes | bytearray | memoryview, layout: struct.Struct = ..., *, views: Literal[True]
) -> Iterator[tuple[Any, ...]]: ...
def walk_records(
    run: bytes | bytearray | memoryview, layout: struct.Struct = RECORD_HEADER, *, views: bool = False
) -> Iterator[Any]:
    """Each record of a run of whole records: (its first fields, its offset, the offset after it).

    The walk over a run (ring regions, journal batches, replay; the journal's append check inlines
    its own loop and explains a refused run with this one): the fields are
    `layout` unpacked at the record's offset, a layout that starts with the u32 length
    (`RECORD_HEADER`, `RECORD_KEY` or `FRAME_HEADER`); the offset after it includes the padding.
    The payload is `run[offset + RECORD_HEADER_BYTES : offset + length]`, the ring frame's body
    `run[offset + FRAME_HEADER_BYTES : offset + length]`. With `views`, each item is instead the
    fields followed by the payload and the whole record (padding included) as views of `run`:
    the journal's `Record`, built here because a tuple per record more costs ~8% of a journal
    read (`benches.journal`).

    Every record is checked to lie inside the run (two comparisons, so bad bytes can never make
    the walk loop or read past the run); what the fields say beyond the length is the caller's.

    Raises:
        RecordError: a length below the header size, a record that runs past the end, or bytes
            at the end too few for a header; the message names the offset.
    """
    unpack_from = layout.unpack_from
    header_bytes = RECORD_HEADER_BYTES  # locals: a global lookup per record is measurable
    mask = -RECORD_ALIGNMENT
    carry = RECORD_ALIGNMENT - 1
    position = 0
    end = len(run)
    while position < end:
        try:
            fields = unpack_from(run, position)
        except struct.error:
            raise RecordError(_walk_error(run, position)) from None
        length = fields[0]
        after = position + ((length + carry) & mask)
        if length < header_bytes or after > end:
            raise RecordError(_walk_error(run, position))
        if views:
            # Tuple concatenation: measured ~25% faster here than `(*fields, ...)` (RUF005).
            yield fields + (run[position + header_bytes : position + length], run[position:after])  # noqa: RUF005
        else:
            yield fields, position, after
        position = after


def _walk_error(run: bytes | bytearray | memoryview, position: int) -> str:
    """Why the walk stops at `position` (off the hot path: the walk found something wrong)."""
    end = len(run)
    if position + RECORD_HEADER_BYTES > end:
        return (
            f"{end - position} bytes at offset {position} are too few for a record header "
            f"({RECORD_HEADER_BYTES} bytes): the run does not end on a record boundary"
        )
    (length,) = struct.unpack_from("<I", run, position)
    if length < RECORD_HEADER_BYTES:
        return (
            f"record at offset {position} has length {length} < {RECORD_HEADER_BYTES} "
            "(the header size): not a record boundary, or damaged bytes"
        )
    return (
        f"record at offset {position} of length {length} ({aligned(length)} aligned) runs past "
        f"the end of the {end}-byte run"
    )


def iter_records(
    buffer: bytes | bytearray | memoryview,
) -> Iterator[tuple[RecordHeader, memoryview, int]]:
    """Each record of a run of whole records: (header, payload view, offset of the record).

    The payload is a view into `buffer`, not a copy; it is valid as long as the buffer's bytes are.

    Raises:
        RecordError: as `walk_records`.
    """
    view = memoryview(buffer).cast("B")
    make = RecordHeader._make
    for fields, offset, _after in walk_records(view):
        yield make(fields), view[offset + RECORD_HEADER_BYTES : offset + fields[0]], offset


# -- payloads the daemon defines ---------------------------------------------------------------

COMMAND_PREFIX = struct.Struct("<Q")  # acked_request_id: replies up to it reached the client
# A COMMAND's tail and prefix, contiguous: the blp reads both with one unpack (benches/RESULTS.md,
# "blpcycle, second session": a call less, ~0.5k instructions a command).
COMMAND_HEAD = struct.Struct("<" + RECORD_TAIL.format[1:] + COMMAND_PREFIX.format[1:])
assert COMMAND_HEAD.size == RECORD_TAIL.size + COMMAND_PREFIX.size
# The payload version of every record the daemon itself defines (SESSION_OPEN, SESSION_CLOSE,
# TIMER_FIRED, SNAPSHOT, TERM_START, ADMIN); a COMMAND's version is the app's schema version. A
# change to one of those payloads bumps this, and readers decide by it.
DAEMON_RECORD_VERSION = 1
# {"op": "node_start", "node": str, "number": int, "incarnation": int, "previous": int}: a node's
# sequencer started; close that node's sessions of its earlier starts, and end the start before
# it, `previous` (absent when not known) (sequencer/dedup.py). A record of an older seqd
# has only "node" (and maybe "number"): it closes every session opened on that node name.
ADMIN_NODE_START = "node_start"
# {"op": "raise_version", "version": int, "members": [int, ...]}: make app schema `version` the
# active one from this index on, if every member's last node_start reported code that knows it
# (sequencer/app_versions.py). A node_start also carries "app_version" (what its code knows) and
# "members" (the node numbers of its cluster, itself alone on a single node), and "rules_version"
# (the session rules its seqd applies; absent: 1).
ADMIN_RAISE_VERSION = "raise_version"
# {"op": "rules_version", "version": int}: seqd's session rules `version` are active from this
# index on (a no-op if that or a newer one is); a node's sequencer asks for it once every member's
# last node_start reported code that applies it (sequencer/rules_versions.py).
ADMIN_RULES_VERSION = "rules_version"

# Session ids (the record header's session_id): [node number: 8 bits][incarnation: 24 bits]
# [counter: 32 bits]. The gateway makes them (`sequencer.gateway.session_id_base`); the blp reads
# the node number to emit only its own node's replies, and the incarnation to tell which start
# of a node a session belongs to.
SESSION_ID_NODE_BITS = 8
SESSION_ID_INCARNATION_BITS = 24
SESSION_ID_COUNTER_BITS = 32
assert SESSION_ID_NODE_BITS + SESSION_ID_INCARNATION_BITS + SESSION_ID_COUNTER_BITS == 64
SESSION_ID_NODE_SHIFT = SESSION_ID_INCARNATION_BITS + SESSION_ID_COUNTER_BITS
_SESSION_INCARNATION_MASK = (1 << SESSION_ID_INCARNATION_BITS) - 1


def session_node_number(session_id: int) -> int:
    """The number of the node that opened session `session_id`."""
    return session_id >> SESSION_ID_NODE_SHIFT


def session_incarnation(session_id: int) -> int:
    """The incarnation bits of session `session_id`: which start of its node opened it."""
    return (session_id >> SESSION_ID_COUNTER_BITS) & _SESSION_INCARNATION_MASK


def incarnation_behind(incarnation: int, later: int, starts: int) -> bool:
    """Whether `incarnation` is a start of a node up to `starts` starts before its start `later`
    (ids go up by one a start and wrap in the incarnation bits: daemon/incarnation.py)."""
    return 0 < (later - incarnation) & _SESSION_INCARNATION_MASK <= starts


class SessionOpen(msgspec.Struct, frozen=True):
    """SESSION_OPEN payload; encoded as a msgpack map `{"client_id": int, "node": str}`."""

    client_id: int
    node: str


_session_open_decoder = msgspec.msgpack.Decoder(SessionOpen)
_encoder = msgspec.msgpack.Encoder()
_admin_decoder = msgspec.msgpack.Decoder(dict[str, Any])


def encode_command(acked_request_id: int, command: bytes | bytearray | memoryview) -> bytes:
    """COMMAND payload: `<Q acked_request_id>` then the app's command bytes."""
    return COMMAND_PREFIX.pack(acked_request_id) + bytes(command)


def decode_command(payload: bytes | bytearray | memoryview) -> tuple[int, memoryview]:
    """(acked_request_id, view of the app's command bytes) of a COMMAND payload.

    Raises:
        RecordError: the payload is shorter than its 8-byte prefix.
    """
    view = memoryview(payload)
    if len(view) < COMMAND_PREFIX.size:
        raise RecordError(
            f"COMMAND payload of {len(view)} bytes is shorter than its "
            f"{COMMAND_PREFIX.size}-byte acked_request_id prefix"
        )
    (acked_request_id,) = COMMAND_PREFIX.unpack_from(view, 0)
    return acked_request_id, view[COMMAND_PREFIX.size :]


def encode_session_open(client_id: int, node: str) -> bytes:
    return _encoder.encode(SessionOpen(client_id, node))


def decode_session_open(payload: bytes | bytearray | memoryview) -> SessionOpen:
    """Raises msgspec.DecodeError / ValidationError on a malformed payload."""
    return _session_open_decoder.decode(payload)


def encode_admin(op: str, **fields: Any) -> bytes:
    """ADMIN payload: msgpack `{"op": op, **fields}`, e.g. `encode_admin(ADMIN_NODE_START,
    node="n1")`."""
    assert "op" not in fields, fields
    return _encoder.encode({"op": op, **fields})


def decode_admin(payload: bytes | bytearray | memoryview) -> dict[str, Any]:
    """The ADMIN map; raises RecordError when it has no string "op"."""
    value = _admin_decoder.decode(payload)
    if not isinstance(value.get("op"), str):
        raise RecordError(f"ADMIN payload has no string 'op': {value!r}")
    return value
