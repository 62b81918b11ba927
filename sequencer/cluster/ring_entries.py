"""Records as they cross the replicator: a ring frame (type, payload view) is a record whose first
8 bytes were the frame header (`sequencer/record.py`), so a record is rebuilt by putting the
header back, and written back into a ring as (frame type, bytes after the header)."""

from __future__ import annotations

import struct

from sequencer.record import FRAME_HEADER, RECORD_HEADER_BYTES, aligned

__all__ = ["record_from_frame", "record_index", "record_term", "record_timestamp_ns"]

_INDEX_TERM_TIMESTAMP = struct.Struct("<QQq")  # at offset 8 of a record


def record_from_frame(frame_type: int, view: bytes | memoryview) -> bytes:
    """The whole record (header, payload, zero padding to 8 bytes) of a ring frame."""
    length = len(view) + FRAME_HEADER.size
    assert length >= RECORD_HEADER_BYTES, length
    return FRAME_HEADER.pack(length, frame_type) + bytes(view) + bytes(aligned(length) - length)


def record_index(record: bytes | bytearray | memoryview) -> int:
    index: int = _INDEX_TERM_TIMESTAMP.unpack_from(record, 8)[0]
    return index


def record_term(record: bytes | bytearray | memoryview) -> int:
    term: int = _INDEX_TERM_TIMESTAMP.unpack_from(record, 8)[1]
    return term


def record_timestamp_ns(record: bytes | bytearray | memoryview) -> int:
    timestamp_ns: int = _INDEX_TERM_TIMESTAMP.unpack_from(record, 8)[2]
    return timestamp_ns


def stamp_into(record: bytearray, index: int, term: int, timestamp_ns: int) -> None:
    _INDEX_TERM_TIMESTAMP.pack_into(record, 8, index, term, timestamp_ns)
