"""Records as they cross the replicator: a ring frame (type, payload view) is a record whose first
8 bytes were the frame header (`sequencer/record.py`), so a record is rebuilt by putting the
header back, and written back into a ring as (frame type, bytes after the header)."""

from __future__ import annotations

import struct

from sequencer.record import FRAME_HEADER

__all__ = ["record_from_frame", "record_index", "record_term", "record_timestamp_ns", "stamped"]

_INDEX_TERM_TIMESTAMP = struct.Struct("<QQq")  # at offset 8 of a record
_PADS = tuple(bytes(-length & 7) for length in range(8))  # the zero pad after `length` bytes


_pack_frame_header = FRAME_HEADER.pack
_pack_stamp = _INDEX_TERM_TIMESTAMP.pack
_unpack_stamp = _INDEX_TERM_TIMESTAMP.unpack_from
_FRAME_HEADER_BYTES = FRAME_HEADER.size


def record_from_frame(frame_type: int, view: bytes | memoryview) -> bytes:
    """The whole record (header, payload, zero padding to 8 bytes) of a ring frame: one copy.
    Once per proposal on the leader: the struct's methods are bound once, and the length is
    asserted where the record is held (`record_key`: at least `RECORD_HEADER_BYTES`)."""
    length = len(view) + _FRAME_HEADER_BYTES
    return _pack_frame_header(length, frame_type) + view + _PADS[length & 7]


def record_index(record: bytes | bytearray | memoryview) -> int:
    index: int = _INDEX_TERM_TIMESTAMP.unpack_from(record, 8)[0]
    return index


def record_term(record: bytes | bytearray | memoryview) -> int:
    term: int = _INDEX_TERM_TIMESTAMP.unpack_from(record, 8)[1]
    return term


def record_timestamp_ns(record: bytes | bytearray | memoryview) -> int:
    timestamp_ns: int = _unpack_stamp(record, 8)[2]
    return timestamp_ns


def stamp_into(record: bytearray, index: int, term: int, timestamp_ns: int) -> None:
    _INDEX_TERM_TIMESTAMP.pack_into(record, 8, index, term, timestamp_ns)


def stamped(record: bytes | bytearray | memoryview, index: int, term: int, timestamp_ns: int) -> bytes:
    """A copy of `record` with this index, term and timestamp. Slices of bytes joined by `+`:
    for records of ~100-200 bytes cheaper than a bytearray copy stamped in place and copied back
    (0.79 against 1.11 us in a loop here) or a join of memoryview slices (1.37 us)."""
    if type(record) is not bytes:
        record = bytes(record)
    return record[:8] + _pack_stamp(index, term, timestamp_ns) + record[32:]
