"""Records as they cross the replicator: a ring frame (type, payload view) is a record whose first
8 bytes were the frame header (`sequencer/record.py`), so a record is rebuilt by putting the
header back, and written back into a ring as (frame type, bytes after the header)."""

from __future__ import annotations

import struct

from sequencer.record import FRAME_HEADER

__all__ = ["record_from_frame", "record_index", "record_term", "record_timestamp_ns", "records_from_frames",
           "stamped", "stamped_frames", "stamped_run"]

_INDEX_TERM_TIMESTAMP = struct.Struct("<QQq")  # at offset 8 of a record
_STAMPED_HEADER = struct.Struct("<IIQQq")  # the frame header, then the stamp: a record's first 32 bytes
_PADS = tuple(bytes(-length & 7) for length in range(8))  # the zero pad after `length` bytes


_pack_frame_header = FRAME_HEADER.pack
_pack_stamp = _INDEX_TERM_TIMESTAMP.pack
_unpack_stamp = _INDEX_TERM_TIMESTAMP.unpack_from
_pack_stamped_header = _STAMPED_HEADER.pack
_FRAME_HEADER_BYTES = FRAME_HEADER.size


def record_from_frame(frame_type: int, view: bytes | memoryview) -> bytes:
    """The whole record (header, payload, zero padding to 8 bytes) of a ring frame: one copy.
    Once per proposal on the leader: the struct's methods are bound once, and the length is
    asserted where the record is held (`record_key`: at least `RECORD_HEADER_BYTES`)."""
    length = len(view) + _FRAME_HEADER_BYTES
    return _pack_frame_header(length, frame_type) + view + _PADS[length & 7]


def records_from_frames(frames: list[tuple[int, memoryview]]) -> list[bytes]:
    """`record_from_frame` of each of a poll's frames, in one comprehension (no call per record:
    the leader takes its proposals in batches)."""
    pack, pads, header_bytes = _pack_frame_header, _PADS, _FRAME_HEADER_BYTES
    return [pack(len(view) + header_bytes, frame_type) + view + pads[(len(view) + header_bytes) & 7]
            for frame_type, view in frames]  # fmt: skip


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


def stamped_run(records: list[bytes], first_index: int, term: int, last_timestamp_ns: int) -> tuple[list[bytes], int]:
    """`stamped` copies of `records` at `first_index`, ... of `term`, each timestamp made at least
    the one before (from `last_timestamp_ns`), in one loop; and the last timestamp."""
    out: list[bytes] = []
    append = out.append
    unpack, pack = _unpack_stamp, _pack_stamp
    index = first_index
    for record in records:
        timestamp_ns = unpack(record, 8)[2]
        if timestamp_ns < last_timestamp_ns:
            timestamp_ns = last_timestamp_ns
        last_timestamp_ns = timestamp_ns
        append(record[:8] + pack(index, term, timestamp_ns) + record[32:])
        index += 1
    return out, last_timestamp_ns


def stamped_frames(
    frames: list[tuple[int, memoryview]], first_index: int, term: int, last_timestamp_ns: int
) -> tuple[list[bytes], int]:
    """`stamped_run` of `records_from_frames(frames)` without the unstamped records in between:
    each ring frame becomes its stamped record in one pack and one copy (the leader's proposals,
    which it holds by index, not by record: `PendingForwards.proposed`). 0.67 against 0.74-0.90
    us a record for `records_from_frames` and `stamped_run` in a loop of 64-record batches here."""
    out: list[bytes] = []
    append = out.append
    unpack, pack, pads, header_bytes = _unpack_stamp, _pack_stamped_header, _PADS, _FRAME_HEADER_BYTES
    index = first_index
    for frame_type, view in frames:
        timestamp_ns = unpack(view, 0)[2]  # the view starts at the record's offset 8
        if timestamp_ns < last_timestamp_ns:
            timestamp_ns = last_timestamp_ns
        last_timestamp_ns = timestamp_ns
        length = len(view) + header_bytes
        append(pack(length, frame_type, index, term, timestamp_ns) + view[24:] + pads[length & 7])
        index += 1
    return out, last_timestamp_ns
