"""The journal's on-disk format: segment and batch headers, their checks, and records read back.

I/O-free: every function here takes bytes (or a function that returns views of a file) and
returns values, so a follower can check a batch it received over the network with the same code
that checks one read from disk. The long form is docs/journal.md; the record inside a batch is
`sequencer.record`'s, stored as it sat in the ring.

    segment = [segment header, 64 bytes][batch][batch]...[zeros to the end of the file]
    batch   = [magic u32][length u32][crc32c u32][count u32][first_index u64][last_index u64]
              [records: `length` bytes, a run of whole records]

The CRC-32C covers the 32-byte batch header (its crc field zeroed) and the record bytes. It is not
chained: order is proven by the indexes (a batch's first index is the previous batch's last + 1).
"""

from __future__ import annotations

import re
import struct
import sys
from array import array
from collections.abc import Callable
from typing import NamedTuple

import crc32c

from sequencer.journal.errors import JournalCorruptError, JournalError
from sequencer.record import (
    FRAME_HEADER,
    RECORD_ALIGNMENT,
    RECORD_HEADER_BYTES,
    RECORD_KEY,
    RecordError,
    RecordType,
    aligned,
    walk_records,
)

__all__ = [
    "BATCH_HEADER",
    "BATCH_HEADER_BYTES",
    "BATCH_MAGIC",
    "SEGMENT_BYTES_DEFAULT",
    "SEGMENT_BYTES_MAX",
    "SEGMENT_BYTES_MIN",
    "SEGMENT_HEADER",
    "SEGMENT_HEADER_BYTES",
    "SEGMENT_LAYOUT_VERSION",
    "SEGMENT_MAGIC",
    "SPARE_NAME",
    "Batch",
    "BatchStatus",
    "Record",
    "SegmentHeader",
    "batch_crc",
    "batch_header",
    "batch_records",
    "check_records",
    "continuing",
    "decode_segment_header",
    "encode_segment_header",
    "last_term_of",
    "offset_of",
    "read_batch",
    "segment_first_index",
    "segment_name",
    "split_run",
]

SEGMENT_MAGIC = b"SEQDJRNL"
SEGMENT_LAYOUT_VERSION = 1
# magic, layout version, header bytes, flags (0), first index, term of the record before the first
# (0: none), journal id (random, the same in every segment of one journal), created (wall clock,
# for operators only), crc32c of the 56 bytes before it, pad.
SEGMENT_HEADER = struct.Struct("<8sHHIQQ16sqI4x")
SEGMENT_HEADER_BYTES = 64
SEGMENT_HEADER_CRC_OFFSET = 56
JOURNAL_ID_BYTES = 16

BATCH_MAGIC = int.from_bytes(b"SQBT", "little")
BATCH_MAGIC_BYTES = b"SQBT"
# magic, length of the record bytes, crc32c, record count, first index, last index
BATCH_HEADER = struct.Struct("<IIIIQQ")
BATCH_HEADER_BYTES = 32
ZERO_BATCH_HEADER = bytes(BATCH_HEADER_BYTES)

SEGMENT_BYTES_DEFAULT = 64 << 20  # etcd's size: a roll (fsync + rename + dir fsync) every 64 MiB
SEGMENT_BYTES_MIN = 4096  # a header and a few small batches: the floor for tests
# The batch length field is a u32 and a batch never spans segments; 1 GiB keeps a segment's
# recovery scan and a truncation intent (at most one batch) bounded.
SEGMENT_BYTES_MAX = 1 << 30

SEGMENT_SUFFIX = ".seg"
TEMP_SUFFIX = ".seg.tmp"
# The preallocated spare that the next roll renames into place. It ends in TEMP_SUFFIX, so a seqd
# that does not know it removes it as an unfinished roll; it never holds a record.
SPARE_NAME = "next" + TEMP_SUFFIX
LOCK_NAME = "journal.lock"
_SEGMENT_NAME = re.compile(r"^(\d{20})\.seg$")

assert SEGMENT_HEADER.size == SEGMENT_HEADER_BYTES
assert BATCH_HEADER.size == BATCH_HEADER_BYTES
assert SEGMENT_HEADER_BYTES % 8 == 0
assert BATCH_HEADER_BYTES % 8 == 0
assert SEGMENT_BYTES_MIN >= SEGMENT_HEADER_BYTES + BATCH_HEADER_BYTES + RECORD_HEADER_BYTES
assert SEGMENT_BYTES_MAX < 1 << 32
assert not _SEGMENT_NAME.match(SPARE_NAME)
assert BATCH_MAGIC_BYTES == BATCH_MAGIC.to_bytes(4, "little")

_PADDING = int(RecordType.PADDING)
# `_check_uniform` reads the record key as native words of a memoryview: the journal's fields are
# little-endian, so it runs only where native words are too (else every run takes the loop).
_NATIVE_WORDS = sys.byteorder == "little" and [array(code).itemsize for code in "HIQ"] == [2, 4, 8]
# Below this many records a run takes the loop: the strided check's fixed cost (~20,000
# instructions: views, lists, arrays) is the loop's for ~10 records (callgrind; benches/RESULTS.md,
# "journrec"), but in time it is slower up to ~20 (the review's timings: 12 records 2.4 us by the
# loop, 3.2-4.3 by the strided check; 24 records 4.4 against 3.4-5.0; 80 records 13-14 against
# 4.5-8.4).
UNIFORM_RUN_RECORDS_MIN = 24 if _NATIVE_WORDS else 1 << 62
assert RECORD_HEADER_BYTES % RECORD_ALIGNMENT == 0
_LENGTH_SPREADS_MAX = 64  # `_length_spread`'s tables kept (one per record size in use)
_length_spreads: dict[int, tuple[bytes, bytes]] = {}
assert RECORD_KEY.format == "<IH2xQQ"  # the offsets `_check_uniform` reads: 0, 4, 8, 16
_EMPTY = memoryview(b"")


# -- names ---------------------------------------------------------------------------------------


def segment_name(first_index: int) -> str:
    return f"{first_index:020d}{SEGMENT_SUFFIX}"


def segment_first_index(name: str) -> int | None:
    """The first index a segment file's name gives, or None for any other file."""
    match = _SEGMENT_NAME.match(name)
    return int(match.group(1)) if match else None


# -- records as read back ------------------------------------------------------------------------


class Record(NamedTuple):
    """One record read from the journal: the header fields, the payload, and the whole record.

    `payload` and `raw` are views into the reader's buffer (no copy); `raw` includes the zero
    padding, so concatenated raws are again a run of whole records (what a follower receives).
    """

    length: int
    type: int
    version: int
    index: int  # type: ignore[assignment]  # shadows tuple.index: the log word wins
    term: int
    timestamp_ns: int
    session_id: int
    request_id: int
    payload: memoryview
    raw: memoryview


# -- batches -------------------------------------------------------------------------------------


class BatchStatus:
    OK = 0  # complete and CRC-valid
    END = 1  # a zero header, or the end of the file: nothing written here yet
    BAD = 2  # see the batch's reason


class Batch(NamedTuple):
    status: int  # BatchStatus
    offset: int
    length: int  # record bytes
    record_count: int
    first_index: int
    last_index: int
    records: memoryview  # the record bytes when CRC-valid (kept by `continuing` when misplaced)
    reason: str

    @property
    def end(self) -> int:
        return self.offset + BATCH_HEADER_BYTES + self.length

    @property
    def claimed_indexes(self) -> tuple[int, int] | None:
        """The indexes a bad batch's header claims, when it claims any."""
        return (self.first_index, self.last_index) if self.first_index else None


def batch_crc(
    length: int, count: int, first_index: int, last_index: int, records: memoryview
) -> int:
    header = BATCH_HEADER.pack(BATCH_MAGIC, length, 0, count, first_index, last_index)
    return crc32c.crc32c(records, crc32c.crc32c(header))


def batch_header(records: memoryview, count: int, first_index: int, last_index: int) -> bytes:
    """The 32-byte header of a batch holding `records`, CRC included."""
    crc = batch_crc(len(records), count, first_index, last_index, records)
    return BATCH_HEADER.pack(BATCH_MAGIC, len(records), crc, count, first_index, last_index)


def read_batch(view: Callable[[int, int], memoryview], offset: int) -> Batch:
    """The batch at `offset`, checked: header plausible, complete, CRC-valid.

    Args:
        view: `view(offset, size)` returns those bytes of the segment, shorter at its end (a
            file window, or a slice of bytes in memory).

    Never raises on bad bytes: the caller decides between torn tail and corruption.
    """
    header = view(offset, BATCH_HEADER_BYTES)
    if len(header) < BATCH_HEADER_BYTES:
        if not any(header):
            return Batch(BatchStatus.END, offset, 0, 0, 0, 0, _EMPTY, "end of file")
        return _bad(offset, f"the file ends {len(header)} bytes into a batch header")
    if header == ZERO_BATCH_HEADER:
        return Batch(BatchStatus.END, offset, 0, 0, 0, 0, _EMPTY, "zero bytes")
    magic, length, crc, count, first_index, last_index = BATCH_HEADER.unpack(header)
    if magic != BATCH_MAGIC:
        return _bad(offset, f"no batch magic (found 0x{magic:08x}, expected 0x{BATCH_MAGIC:08x})")
    if (
        length == 0
        or length % 8
        or count == 0
        or length < count * RECORD_HEADER_BYTES
        or first_index == 0
        or last_index - first_index + 1 != count
    ):
        reason = (
            f"implausible batch header (length {length}, count {count}, indexes "
            f"{first_index}..{last_index})"
        )
        return _bad(offset, reason, first_index=first_index, last_index=last_index)
    records = view(offset + BATCH_HEADER_BYTES, length)
    if len(records) < length:
        reason = f"the file ends {len(records)} bytes into the batch's {length} record bytes"
        return _bad(offset, reason, length, count, first_index, last_index)
    computed = batch_crc(length, count, first_index, last_index, records)
    if computed != crc:
        reason = f"CRC-32C mismatch (stored 0x{crc:08x}, computed 0x{computed:08x})"
        return _bad(offset, reason, length, count, first_index, last_index)
    return Batch(BatchStatus.OK, offset, length, count, first_index, last_index, records, "")


def _bad(offset: int, reason: str, length: int = 0, count: int = 0, first_index: int = 0,
         last_index: int = 0) -> Batch:  # fmt: skip
    return Batch(BatchStatus.BAD, offset, length, count, first_index, last_index, _EMPTY, reason)


def continuing(batch: Batch, expected_index: int) -> Batch:
    """`batch`, marked bad when it is CRC-valid but does not start at `expected_index`: written
    whole, so stale or misplaced bytes, not a torn write (it keeps its record view, which says
    so to `scan_segment`)."""
    if batch.status != BatchStatus.OK or batch.first_index == expected_index:
        return batch
    reason = (
        f"CRC-valid batch of records {batch.first_index}..{batch.last_index} where index "
        f"{expected_index} was expected (stale or misplaced bytes, not a torn write)"
    )
    return batch._replace(status=BatchStatus.BAD, reason=reason)


_new_record = tuple.__new__


def batch_records(batch: Batch) -> list[Record]:
    """Every record of a CRC-valid batch, as views. Checked per batch, not per record: the CRC
    vouches for the bytes and the writer validated them before writing.

    Raises:
        JournalCorruptError: the records do not match the batch header (a writer bug).
    """
    out: list[Record]
    try:
        out = [_new_record(Record, item) for item in walk_records(batch.records, views=True)]
    except RecordError as error:
        raise _not_its_header(batch, str(error)) from None
    if (
        len(out) != batch.record_count
        or out[0].index != batch.first_index
        or out[-1].index != batch.last_index
    ):
        found = f"{len(out)} records, indexes {out[0].index}..{out[-1].index}" if out else "none"
        raise _not_its_header(batch, f"found {found}")
    return out


def _not_its_header(batch: Batch, what: str) -> JournalCorruptError:
    return JournalCorruptError(
        f"batch at offset {batch.offset} (records {batch.first_index}..{batch.last_index}, "
        f"{batch.length} bytes) passes its CRC but its records do not match its header ({what}): "
        "a writer bug. Keep the file for diagnosis; restore the journal from a replica or a backup."
    )


def offset_of(records: memoryview, first_index: int, index: int) -> int:
    """Byte offset of record `index` in a run of whole records starting at `first_index`
    (`index` one past the run's last gives its length)."""
    skip = index - first_index
    if skip == 0:
        return 0
    for count, (_fields, _start, after) in enumerate(walk_records(records, FRAME_HEADER), 1):
        if count == skip:
            return after
    raise AssertionError(f"record {index} is not in the run from {first_index}")


def last_term_of(batch: Batch) -> int:
    """The term of a CRC-valid batch's last record."""
    fields: tuple[int, ...] = ()
    for fields, _start, _after in walk_records(batch.records, RECORD_KEY):  # noqa: B007
        pass
    return int(fields[3])


def check_records(run: memoryview, first_index: int, term_before: int) -> tuple[int, int]:
    """Validate a run that is to continue a log whose last record is `first_index - 1` in term
    `term_before`: whole records, gapless indexes from `first_index`, terms never going back, no
    ring PADDING. Returns (last index, last term).

    A run whose records all take the same aligned size (one schema's commands: the usual batch)
    is checked with no Python per record (`_check_uniform`). Any other run takes the loop: one
    `unpack_from` and four comparisons per record, no generator and no tuple per record beyond
    the fields: ~2,000 instructions a record against ~2,900 for `walk_records` with the same
    checks (callgrind; benches/RESULTS.md, "The journaller's CPU per command"). On anything wrong
    it walks the run again, slowly, to say what (`_explain_bad_run`).

    Raises:
        JournalError: the first thing wrong, with its byte offset in the run.
    """
    end = len(run)
    if end >= RECORD_HEADER_BYTES:
        checked = _check_uniform(run, first_index, term_before)
        if checked is not None:
            return checked
    unpack_from = RECORD_KEY.unpack_from
    header_bytes = RECORD_HEADER_BYTES
    padding = _PADDING
    carry = RECORD_ALIGNMENT - 1
    mask = -RECORD_ALIGNMENT
    position = 0
    expected = first_index
    term = term_before
    try:
        while position < end:
            length, record_type, index, record_term = unpack_from(run, position)
            if index != expected or record_term < term or record_type == padding or length < header_bytes:
                break
            position += (length + carry) & mask
            term = record_term
            expected += 1
        # A length running past the end leaves the loop past it: one comparison after the loop
        # instead of one per record.
        if position == end:
            return expected - 1, term
    except struct.error:  # fewer bytes left than a record's key
        pass
    _explain_bad_run(run, first_index, term_before)
    raise AssertionError(f"check_records refused a run _explain_bad_run accepts: {first_index}, {term_before}")


def _check_uniform(run: memoryview, first_index: int, term_before: int) -> tuple[int, int] | None:
    """`check_records` of a run whose records all take the first record's aligned size, with no
    Python per record: each field of the record key is read as a strided view of the run (its
    u32, u16 or u64 words, one every `size` bytes) and checked by comparisons in C. Types, terms
    and lengths are compared with the first record's repeated (an `array`: item by item, with no
    object per item); lengths that differ within the alignment, by one translate of their bytes
    (`_length_spread`), or where that cannot decide, by their least and greatest; the indexes
    with the range they must be. None for any other run, good or bad, and for a short
    one: the loop then checks it (and explains what is wrong).

    Equivalence with the loop (tests/test_journal_check.py): when every length lies within
    [max(size - 7, RECORD_HEADER_BYTES), size], each record's aligned length is `size`, so the
    loop's walk visits exactly the offsets 0, size, 2 * size, ... up to the end and applies the
    same four checks there; this accepts only such runs (the first record's length is checked
    against the header's too: every length equal to it, 41 to 47 would pass the others), and
    returns what the loop would.
    """
    length, record_type, _index, term = RECORD_KEY.unpack_from(run, 0)
    size = (length + RECORD_ALIGNMENT - 1) & -RECORD_ALIGNMENT
    end = len(run)
    if length < RECORD_HEADER_BYTES or end % size or end < size * UNIFORM_RUN_RECORDS_MIN:
        return None
    count = end // size
    # A run of several sizes mostly fails here, at the cost of one more unpack: the last record
    # is not where a uniform run would put it.
    last_length, _type, last_index, _term = RECORD_KEY.unpack_from(run, end - size)
    if last_index != first_index + count - 1 or not size - RECORD_ALIGNMENT < last_length <= size:
        return None
    lengths = run.cast("I")[:: size >> 2]
    if lengths != array("I", (length,)) * count:  # lengths that differ within the alignment
        spread = _length_spreads.get(size) or _length_spread(size)
        if spread[0]:
            if lengths.tobytes().translate(spread[0]) != spread[1] * count:
                return None
        else:
            listed = lengths.tolist()
            if min(listed) < max(size - RECORD_ALIGNMENT + 1, RECORD_HEADER_BYTES) or max(listed) > size:
                return None
    types = run.cast("H")[2 :: size >> 1]
    if (record_type == _PADDING or types != array("H", (record_type,)) * count) and _PADDING in types.tolist():
        return None
    words = run.cast("Q")
    step = size >> 3
    if words[1::step].tolist() != list(range(first_index, first_index + count)):
        return None
    if term < term_before:
        return None
    terms = words[2::step]
    if terms != array("Q", (term,)) * count:  # a term changes inside the run
        listed = terms.tolist()
        if listed != sorted(listed):
            return None
        term = listed[-1]
    return first_index + count - 1, term


def _length_spread(size: int) -> tuple[bytes, bytes]:
    """(table, size's bytes) for `_check_uniform`'s lengths of one aligned `size`: the table maps
    every low byte a length of that size may have (of lo to size, lo = max(size - 7,
    RECORD_HEADER_BYTES)) to size's, and every other byte to itself, so a u32 length translated
    equals size's four bytes iff it lies in [lo, size]: its low byte in that spread, its other
    three size's. That holds when lo and size share their upper three bytes and none of those
    lies in the spread (else a translated upper byte could match: then the table is empty and
    the caller compares the lengths as a list). Kept per size (a few sizes in use)."""
    low = max(size - RECORD_ALIGNMENT + 1, RECORD_HEADER_BYTES)
    size_bytes = size.to_bytes(4, "little")
    spread = bytes(range(low & 0xFF, (size & 0xFF) + 1))
    usable = low >> 8 == size >> 8 and not any(byte in spread for byte in size_bytes[1:])
    table = bytes.maketrans(spread, size_bytes[:1] * len(spread)) if usable else b""
    if len(_length_spreads) >= _LENGTH_SPREADS_MAX:
        _length_spreads.clear()
    _length_spreads[size] = (table, size_bytes)
    return table, size_bytes


def _explain_bad_run(run: memoryview, first_index: int, term_before: int) -> tuple[int, int]:
    """`check_records` the slow way (the walk, then each check): raises the error that says what
    is wrong; returns as `check_records` does for a good run (the tests' reference)."""
    expected = first_index
    term = term_before
    try:
        for (_length, record_type, index, record_term), start, _after in walk_records(
            run, RECORD_KEY
        ):
            if index != expected:
                raise JournalError(
                    f"record at byte {start} of the batch has index {index}, expected {expected} "
                    f"(journal last index {first_index - 1}): a batch must continue the log "
                    "without gaps"
                )
            if record_term < term:
                raise JournalError(
                    f"record {index} has term {record_term} < {term}, the term before it: terms "
                    "never go backwards in a log"
                )
            if record_type == _PADDING:
                raise JournalError(f"record {index} at byte {start} is ring PADDING, not a record")
            term = record_term
            expected += 1
    except RecordError as error:
        raise JournalError(
            f"batch of {len(run)} bytes, not a whole record run: {error} (record {expected})"
        ) from None
    return expected - 1, term


class RunPart(NamedTuple):
    start: int  # byte offsets in the run
    end: int
    first_index: int
    last_index: int
    last_term: int


def split_run(
    run: memoryview, first_index: int, capacity_bytes: int, segment_bytes: int
) -> list[RunPart]:
    """A checked run (`check_records`) cut at record boundaries into parts of at most
    `capacity_bytes` each: a batch larger than a segment becomes several batches.

    Raises:
        JournalError: a record larger than `capacity_bytes` (nothing can hold it).
    """
    parts: list[RunPart] = []
    start = 0
    start_index = index = first_index
    term = previous_term = 0
    for (length, _type, index, term), position, after in walk_records(run, RECORD_KEY):
        step = after - position
        if step > capacity_bytes:
            raise JournalError(
                f"record {index} of {aligned(length)} bytes cannot fit a segment of "
                f"{segment_bytes} bytes (room for {capacity_bytes}); raise segment_bytes"
            )
        if after - start > capacity_bytes:
            parts.append(RunPart(start, position, start_index, index - 1, previous_term))
            start, start_index = position, index
        previous_term = term
    parts.append(RunPart(start, len(run), start_index, index, term))
    return parts


# -- segment headers -----------------------------------------------------------------------------


class SegmentHeader(NamedTuple):
    first_index: int
    prev_term: int
    journal_id: bytes
    created_ns: int


_NOT_A_CRASH = (
    "Segment headers are written before the file is renamed into place, so this is not a "
    "crash artefact: restore the journal from a replica or a backup; do not delete the file."
)


def decode_segment_header(data: memoryview | bytes, where: str) -> SegmentHeader:
    """The header at the start of segment `where` (a path, for messages).

    Raises:
        JournalCorruptError: short, bad magic or bad CRC.
        JournalError: another layout version (written by another seqd).
    """
    if len(data) < SEGMENT_HEADER_BYTES:
        raise JournalCorruptError(
            f"journal segment {where} is {len(data)} bytes, shorter than its header. {_NOT_A_CRASH}"
        )
    magic, layout_version, header_bytes, _flags, first_index, prev_term, journal_id, created_ns, \
        crc = SEGMENT_HEADER.unpack(data[:SEGMENT_HEADER_BYTES])  # fmt: skip
    if magic != SEGMENT_MAGIC:
        raise JournalCorruptError(
            f"journal segment {where} at offset 0: magic {magic!r}, expected {SEGMENT_MAGIC!r}: "
            f"not a seqd journal segment. {_NOT_A_CRASH}"
        )
    computed = crc32c.crc32c(data[:SEGMENT_HEADER_CRC_OFFSET])
    if computed != crc:
        raise JournalCorruptError(
            f"journal segment {where} at offset 0: header CRC-32C mismatch (stored 0x{crc:08x}, "
            f"computed 0x{computed:08x}). {_NOT_A_CRASH}"
        )
    if layout_version != SEGMENT_LAYOUT_VERSION or header_bytes != SEGMENT_HEADER_BYTES:
        raise JournalError(
            f"journal segment {where} has layout version {layout_version} (header {header_bytes} "
            f"bytes); this seqd reads version {SEGMENT_LAYOUT_VERSION} ({SEGMENT_HEADER_BYTES} "
            "bytes). Run the seqd version that wrote it."
        )
    return SegmentHeader(first_index, prev_term, journal_id, created_ns)


def encode_segment_header(
    first_index: int, prev_term: int, journal_id: bytes, created_ns: int
) -> bytes:
    assert len(journal_id) == JOURNAL_ID_BYTES, journal_id
    fields = (SEGMENT_MAGIC, SEGMENT_LAYOUT_VERSION, SEGMENT_HEADER_BYTES, 0, first_index, prev_term,
              journal_id, created_ns, 0)  # fmt: skip
    crc = crc32c.crc32c(SEGMENT_HEADER.pack(*fields)[:SEGMENT_HEADER_CRC_OFFSET])
    return SEGMENT_HEADER.pack(*fields[:-1], crc)
