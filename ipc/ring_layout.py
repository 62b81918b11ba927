"""The bytes of a ring segment: where each shared word lives, and what a frame looks like.

Shared by the ring (`ipc.ring`, which creates and validates the layout), its writer
(`ipc.ring_writer`) and its readers (`ipc.ring_reader`); see `ipc.ring` for the theory of
operation.

Layout of the segment payload (offsets in bytes):

    0                     meta line: reader count, pollable readers (a bit per slot)
    128                   reader names, READERS_MAX x 32 bytes
    640                   writer line: published, writer pid
    768 + 256 i           reader i: cursor line [cursor], parked line [parked, reader pid]
    768 + 256 n           data area, `capacity` bytes

Every shared word is alone on its 128-byte line with one writer. A frame is

    [length u32: 8 + payload bytes, unaligned][type u32][payload][zero pad to 8]

so every frame starts 8-byte aligned and its first 8 bytes are one aligned word (read whole as
`type << 32 | length`). A padding frame (type `PADDING_TYPE`) fills the rest of a lap.
"""

from __future__ import annotations

import struct

from ipc.segment import LINE_BYTES

FRAME_HEADER_BYTES = 8
FRAME_HEADER = struct.Struct("<II")
assert FRAME_HEADER.size == FRAME_HEADER_BYTES
FRAME_ALIGNMENT = 8
PADDING_TYPE = 0xFFFF_FFFF
# A frame's first word, read whole, is at least this when the frame is padding.
PADDING_WORD = PADDING_TYPE << 32
LENGTH_MASK = 0xFFFF_FFFF
Payload = bytes | bytearray | memoryview

# The writer reads every reader's cursor on a gate refresh and every parked flag on each publish,
# so each reader costs the writer; a fan-out wider than this belongs in a second stage.
READERS_MAX = 16
READER_NAME_BYTES_MAX = 32
# The smallest ring that holds a useful frame plus the padding before a wrap (tests use tiny rings
# to force many wraps). The largest keeps frame lengths in u32 and the segment in one mapping.
CAPACITY_BYTES_MIN = 64
CAPACITY_BYTES_MAX = 1 << 30

META_OFFSET = 0
NAMES_OFFSET = LINE_BYTES
WRITER_OFFSET = NAMES_OFFSET + READERS_MAX * READER_NAME_BYTES_MAX
READERS_OFFSET = WRITER_OFFSET + LINE_BYTES
READER_STRIDE = 2 * LINE_BYTES
assert WRITER_OFFSET % LINE_BYTES == 0
WORD = 8
# Indexes of the control words, in 8-byte words from the start of the payload.
READER_COUNT = META_OFFSET // WORD  # >= 1 for the life of the segment
# Bit i set: reader i's doorbell is a FIFO an event loop watches (`ipc.doorbell_fifo`), not a
# semaphore. Written once at creation; 0 in a ring created before the FIFO doorbell existed.
POLLABLE_READERS = READER_COUNT + 1
PUBLISHED = WRITER_OFFSET // WORD
WRITER_PID = PUBLISHED + 1


def cursor_word(slot: int) -> int:
    """Index of reader `slot`'s cursor word."""
    return (READERS_OFFSET + slot * READER_STRIDE) // WORD


def parked_word(slot: int) -> int:
    """Index of reader `slot`'s parked flag (its pid is the next word); values below."""
    return (READERS_OFFSET + slot * READER_STRIDE + LINE_BYTES) // WORD


# A reader's parked flag: 0 while it runs; PARKED while it blocks on its doorbell, and the
# writer's publish rings it (a publish rings every flag > 0). A reader bounded by a limit counter
# (`Ring.reader(limit=...)`: the blp on the commit position) parks with PARKED_ON_LIMIT instead: a
# publish gives it nothing to read until the limit moves, and whoever moves the limit rings it
# (`Ring.doorbell`, which rings any flag != 0). Rung on publish as well, it woke twice per record
# at a low rate, once for nothing (benches/RESULTS.md, "Target 1: each role's cost per wake-up").
PARKED = 1
PARKED_ON_LIMIT = -1


def data_offset(reader_count: int) -> int:
    """Offset of the data area in the payload of a ring with `reader_count` readers."""
    return READERS_OFFSET + reader_count * READER_STRIDE


def frame_bytes(payload_bytes: int) -> int:
    """Bytes a frame with `payload_bytes` of payload occupies in the ring (header, pad).

    The one definition of a frame's size. The per-record paths inline it, where a call costs
    ~20 ns: `(payload_bytes + 15) & -8` from a payload length, `(length + 7) & -8` from a frame's
    length field (which counts the header); the assertion below ties both to this definition.
    """
    return (payload_bytes + FRAME_HEADER_BYTES + FRAME_ALIGNMENT - 1) & -FRAME_ALIGNMENT


# The inlined spellings of `frame_bytes`: a payload length + 15, a length field + 7, then & -8.
assert FRAME_HEADER_BYTES + FRAME_ALIGNMENT - 1 == 15
assert FRAME_ALIGNMENT - 1 == 7
assert -FRAME_ALIGNMENT == -8


class RecordTooLarge(ValueError):
    """A frame can never fit in the ring, however far the readers advance."""


def too_large(name: str, payload_bytes: int, capacity: int) -> RecordTooLarge:
    """The error for a frame of `payload_bytes` that can never fit ring `name`."""
    return RecordTooLarge(
        f"a frame of {frame_bytes(payload_bytes)} bytes (payload {payload_bytes} + "
        f"{FRAME_HEADER_BYTES} header, 8-aligned) can never fit ring {name} of capacity "
        f"{capacity} bytes; split the payload or create the ring with a larger capacity."
    )
