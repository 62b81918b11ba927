"""Records as they cross the replicator: a ring frame (type, payload view) is a record whose first
8 bytes were the frame header (`sequencer/record.py`), so a record is rebuilt by putting the
header back, and written back into a ring as (frame type, bytes after the header). A run of whole
frames of a ring (`RingReader.poll_region`) is therefore a run of whole records, each padded with
zeros to 8 bytes (the ring's writer zeroes every frame's pad: `RingWriter._claim`)."""

from __future__ import annotations

import struct
from typing import Any

from sequencer.record import FRAME_HEADER, RECORD_HEADER_BYTES, RecordType

__all__ = ["LEADER_ONLY_TYPES", "MalformedFrame", "record_from_frame", "record_index", "record_term",
           "record_timestamp_ns", "records_from_frames", "stamped", "stamped_region", "stamped_run"]

# Record types only a leader (the term's no-op) or the ring (the wrap) writes: never a proposal.
LEADER_ONLY_TYPES = frozenset((int(RecordType.TERM_START), int(RecordType.PADDING)))

_INDEX_TERM_TIMESTAMP = struct.Struct("<QQq")  # at offset 8 of a record
_STAMPED_HEADER = struct.Struct("<IIQQq")  # the frame header, then the stamp: a record's first 32 bytes
_LENGTH_TYPE_TIMESTAMP = struct.Struct("<II16xq")  # of those 32 bytes, what a proposal's stamp reads
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


class MalformedFrame(ValueError):
    """A frame of a proposal region that is no record a follower may forward (`stamped_region`)."""

    def __init__(self, frame_type: int, view: memoryview) -> None:
        super().__init__(f"a ring frame of type {frame_type:#x} and {len(view) + _FRAME_HEADER_BYTES} bytes")
        self.frame_type = frame_type
        self.view = view  # the frame's bytes after its header, as `RingReader.poll` gives them


# The largest frame the stamped walk slices from its copy of the region (a slice is a copy, cheaper
# than a view's set-up while the frame is small); a larger one is copied once, from a view.
_SLICED_BYTES_MAX = 1024
_LENGTH = struct.Struct("<I")  # a frame's length, its header's first field


def stamped_region(
    region: bytes | memoryview, first_index: int, term: int, last_timestamp_ns: int
) -> tuple[list[bytes], int]:
    """`stamped_run` of the records of `region`, a run of whole frames of the proposal ring
    (`RingReader.poll_region`), each checked on the way: the leader's proposals in one walk, no
    frame list, no view per frame in between (5.1k against 8.8k instructions a record for
    `poll`, the frames' check and a stamped copy of each frame, benches/RESULTS.md "leadring").

    A record is the frame's bytes with the stamp packed over its header's first 32 bytes: its
    zero pad comes with it from the ring.

    The walk reads a copy of the region (one copy, the ring's memory read once, in order: the
    sequencer wrote it from another core) and checks each frame's length and type only; that the
    frames end exactly at the region's end, each with room for its header, is checked once, after
    it. A region that fails any check is walked again by `_stamped_region_checked`, which checks
    each frame's room as it goes and raises on the first bad one: the same records, the same
    error, ~8% fewer instructions a record of ~100 bytes (benches/RESULTS.md, "leadstamp").
    A region whose frames all take the first one's padded size (one command type of one size)
    is read by a struct of that stride instead (`_stamped_uniform`): the same records, or, at the
    first frame of another size or a leader's type, the walk below.
    Large frames pay for the region's copy instead: a region whose first frame is over
    `_SLICED_BYTES_MAX` goes to the checked walk at once, and a large frame later in a region
    is copied from a view of the copy, not sliced from it (a slice of bytes is a second copy).

    Raises:
        MalformedFrame: a frame shorter than a record header, or of a type only a leader or the
            ring writes (`LEADER_ONLY_TYPES`): a bug or memory corruption on this node (the
            replicator stops on it, `check_proposals`).
    """
    first_length = _LENGTH.unpack_from(region)[0] if len(region) >= 4 else 0
    if first_length > _SLICED_BYTES_MAX:
        # Large frames: the checked walk copies each once, where a copy of the region first
        # would copy it twice (an 8 KiB record's walk ~1.5 times as costly, 60 KiB ~1.7).
        return _stamped_region_checked(region, first_index, term, last_timestamp_ns)
    data = bytes(region)
    stride = (first_length + 7) & -8
    if first_length >= RECORD_HEADER_BYTES and len(data) % stride == 0:
        uniform = _stamped_uniform(data, stride, first_index, term, last_timestamp_ns)
        if uniform is not None:
            return uniform
    view = memoryview(data)
    out: list[bytes] = []
    append = out.append
    unpack, pack, leader_only = _LENGTH_TYPE_TIMESTAMP.unpack_from, _pack_stamped_header, LEADER_ONLY_TYPES
    header_bytes = RECORD_HEADER_BYTES
    index = first_index
    offset = 0
    end = len(data)
    last = last_timestamp_ns
    try:
        while offset < end:
            length, frame_type, timestamp_ns = unpack(data, offset)
            if length < header_bytes or frame_type & 0xFFFF in leader_only:
                break
            if timestamp_ns < last:
                timestamp_ns = last
            last = timestamp_ns
            following = offset + ((length + 7) & -8)
            if length <= _SLICED_BYTES_MAX:  # a slice of bytes: a copy, cheap while small
                append(pack(length, frame_type, index, term, timestamp_ns) + data[offset + 32 : following])
            else:  # a view's: no copy before the stamped one (8 KiB: twice the instructions else)
                append(pack(length, frame_type, index, term, timestamp_ns) + view[offset + 32 : following])
            index += 1
            offset = following
    except struct.error:  # under 32 bytes left: a frame cut inside its header
        offset = -1
    if offset != end:  # a bad frame, or the last one runs past the end: which, and how
        return _stamped_region_checked(region, first_index, term, last_timestamp_ns)
    # Every frame ended inside the region with a length of a record header or more: each had room.
    return out, last


# A region whose frames all take `stride` bytes (one command type of one size: a benchmark's
# transfers, most of a ledger's) is read by a struct of that stride, `iter_unpack`: no method call,
# buffer and offset a frame for its fields (4,525 against 5,265 instructions a record of 144
# bytes, benches/RESULTS.md "leadrec2"). One struct per stride up to `_SLICED_BYTES_MAX`: at most
# 128, made once each.
_STRIDE_FIELDS: dict[int, Any] = {}


def _stamped_uniform(
    data: bytes, stride: int, first_index: int, term: int, last_timestamp_ns: int
) -> tuple[list[bytes], int] | None:
    """`stamped_region` of `data`, a multiple of `stride` bytes, if every frame takes `stride`
    bytes (its length over `stride - 8`, at most `stride`, and a record header's at least) and
    none is of a leader's type; else None (the caller walks it frame by frame: the same records,
    or the error of the first bad frame)."""
    fields = _STRIDE_FIELDS.get(stride)
    if fields is None:
        assert stride <= _SLICED_BYTES_MAX + 7, stride  # the dict's bound
        fields = _STRIDE_FIELDS[stride] = struct.Struct(f"<II16xq{stride - 32}x").iter_unpack
    out: list[bytes] = []
    append = out.append
    pack, leader_only = _pack_stamped_header, LEADER_ONLY_TYPES
    shortest = max(stride - 8, RECORD_HEADER_BYTES - 1)  # exclusive
    index = first_index
    offset = 0
    last = last_timestamp_ns
    for length, frame_type, timestamp_ns in fields(data):
        if not shortest < length <= stride or frame_type & 0xFFFF in leader_only:
            return None
        if timestamp_ns < last:
            timestamp_ns = last
        last = timestamp_ns
        following = offset + stride
        append(pack(length, frame_type, index, term, timestamp_ns) + data[offset + 32 : following])
        index += 1
        offset = following
    return out, last


def _stamped_region_checked(
    region: bytes | memoryview, first_index: int, term: int, last_timestamp_ns: int
) -> tuple[list[bytes], int]:
    """`stamped_region`, checking each frame's room before it reads it (raises on the first bad
    frame; a last frame longer than the region's rest is cut at its end, as before)."""
    out: list[bytes] = []
    append = out.append
    unpack, pack, leader_only = _LENGTH_TYPE_TIMESTAMP.unpack_from, _pack_stamped_header, LEADER_ONLY_TYPES
    index = first_index
    offset = 0
    end = len(region)
    if type(region) is not memoryview:
        region = memoryview(region)
    while offset < end:
        if end - offset < RECORD_HEADER_BYTES:
            raise MalformedFrame(*_frame_at(region, offset))
        length, frame_type, timestamp_ns = unpack(region, offset)
        if length < RECORD_HEADER_BYTES or frame_type & 0xFFFF in leader_only:
            raise MalformedFrame(*_frame_at(region, offset))
        if timestamp_ns < last_timestamp_ns:
            timestamp_ns = last_timestamp_ns
        last_timestamp_ns = timestamp_ns
        following = offset + ((length + 7) & -8)
        append(pack(length, frame_type, index, term, timestamp_ns) + region[offset + 32 : following])
        index += 1
        offset = following
    return out, last_timestamp_ns


def _frame_at(region: memoryview, offset: int) -> tuple[int, memoryview]:
    """The (type, view after the header) of the frame at `offset`, as `RingReader.poll` gives it."""
    if len(region) - offset < _FRAME_HEADER_BYTES:
        return 0, region[offset:offset]
    length, frame_type = FRAME_HEADER.unpack_from(region, offset)
    return frame_type, region[offset + _FRAME_HEADER_BYTES : min(offset + max(length, _FRAME_HEADER_BYTES), len(region))]
