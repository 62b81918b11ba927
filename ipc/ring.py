"""A single-writer, multi-reader ring of variable-length frames in shared memory.

Theory of operation
-------------------
The ring is a `capacity`-byte data area (a power of two) addressed by 64-bit *positions* that only
grow: the byte at position p lives at offset `p & (capacity - 1)`. A frame is

    [length u32: 8 + payload bytes, unaligned][type u32][payload][zero pad to 8]

so every frame starts 8-byte aligned and its first 8 bytes are one aligned word. A frame never
straddles the end of the data area: when it would, the writer first fills the rest of the lap
with a padding frame (type `PADDING_TYPE`, length = the bytes left), which readers skip.

Cursors, one writer each, each on its own 128-byte line:

    published            written by the writer: every frame below it is complete
    reader[i].cursor     written by reader i: it has finished with every frame below it
    reader[i].parked     written by reader i: it is blocked on its doorbell

Invariants (positions):

    min(reader cursors) <= reader cursor <= available(reader) <= published <= claim
    claim - capacity <= min(reader cursors)             (gating: nothing unread is overwritten)
    available(reader) = min(published, upstream cursors..., limit)

The writer claims space privately, fills it, and makes everything claimed visible with one store
of `published` (`publish`). Every write API (`try_claim`, `try_write`, `try_write_batch`,
`try_write_frames`) claims through one method, `RingWriter._claim(size)`, which alone gates and
pads at the wrap; the APIs only build frames. The writer caches the gate (the minimum reader cursor
plus the capacity) and re-reads the reader lines only when the cached value would gate it
(Disruptor's `cachedGatingSequence`), so a writer well ahead of its readers touches no reader line.

A reader reads `published` (and its upstream cursors and limit counter), then the frames below
that, then stores its cursor. Frames returned by `poll` and `poll_region` are zero-copy views into
the ring and stay valid until the reader's next `poll`/`poll_region`/`read`/`release`: only then
does its cursor move past them, and only then may the writer reuse their bytes. `read` returns a
copy. Why this is safe across processes without locks is argued in `ipc.platform`.

Readers are declared by name when the ring is created (a declared reader that never attaches still
holds the writer back: that is the point). A reader may depend on other readers (`upstream`), so
the business-logic reader never overtakes the journaller, and on an external limit counter (the
commit position).

Layout of the segment payload (offsets in bytes):

    0                     meta line: reader count
    128                   reader names, READERS_MAX x 32 bytes
    640                   writer line: published, writer pid
    768 + 256 i           reader i: cursor line [cursor], parked line [parked, reader pid]
    768 + 256 n           data area, `capacity` bytes
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable, Sequence
from itertools import repeat
from types import TracebackType

from ipc.counters import Counter
from ipc.doorbell import Doorbell, bell_name
from ipc.platform import check_memory_ordering, store_load_fences
from ipc.segment import HEADER_BYTES, LINE_BYTES, Segment, SegmentError

__all__ = [
    "CAPACITY_BYTES_MAX",
    "CAPACITY_BYTES_MIN",
    "FRAME_HEADER",
    "FRAME_HEADER_BYTES",
    "PADDING_TYPE",
    "READERS_MAX",
    "READER_NAME_BYTES_MAX",
    "RecordTooLarge",
    "Ring",
    "RingError",
    "RingReader",
    "RingWriter",
    "frame_bytes",
]

KIND = "ring"
FRAME_HEADER_BYTES = 8
FRAME_HEADER = struct.Struct("<II")
assert FRAME_HEADER.size == FRAME_HEADER_BYTES
FRAME_ALIGNMENT = 8
PADDING_TYPE = 0xFFFF_FFFF
_PADDING_WORD = PADDING_TYPE << 32
_Payload = bytes | bytearray | memoryview
_LENGTH_MASK = 0xFFFF_FFFF

# The writer reads every reader's cursor on a gate refresh and every parked flag on each publish,
# so each reader costs the writer; a fan-out wider than this belongs in a second stage.
READERS_MAX = 16
READER_NAME_BYTES_MAX = 32
# The smallest ring that holds a useful frame plus the padding before a wrap (tests use tiny rings
# to force many wraps). The largest keeps frame lengths in u32 and the segment in one mapping.
CAPACITY_BYTES_MIN = 64
CAPACITY_BYTES_MAX = 1 << 30

_META_OFFSET = 0
_NAMES_OFFSET = LINE_BYTES
_WRITER_OFFSET = _NAMES_OFFSET + READERS_MAX * READER_NAME_BYTES_MAX
_READERS_OFFSET = _WRITER_OFFSET + LINE_BYTES
_READER_STRIDE = 2 * LINE_BYTES
assert _WRITER_OFFSET % LINE_BYTES == 0
_WORD = 8
_READER_COUNT = _META_OFFSET // _WORD  # >= 1 for the life of the segment
_PUBLISHED = _WRITER_OFFSET // _WORD
_WRITER_PID = _PUBLISHED + 1


def _cursor_word(slot: int) -> int:
    return (_READERS_OFFSET + slot * _READER_STRIDE) // _WORD


def _parked_word(slot: int) -> int:
    return (_READERS_OFFSET + slot * _READER_STRIDE + LINE_BYTES) // _WORD


def _data_offset(reader_count: int) -> int:
    return _READERS_OFFSET + reader_count * _READER_STRIDE


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


_SEVEN = 7
# Headers of frames by payload length, per frame type, so a batch's headers are C-level lookups.
# Lengths seen are few in practice; the bound keeps a stream of distinct lengths from growing it.
FRAME_HEADERS_CACHED_MAX = 4096


class _FrameHeaders(dict[int, bytes]):
    """payload length -> the 8-byte frame header for `type`, built on first use."""

    def __init__(self, type: int) -> None:
        super().__init__()
        self.type = type

    def __missing__(self, length: int) -> bytes:
        if len(self) >= FRAME_HEADERS_CACHED_MAX:
            self.clear()
        header = FRAME_HEADER.pack(length + FRAME_HEADER_BYTES, self.type)
        self[length] = header
        return header


class _Pads(dict[int, bytes]):
    """payload length -> the zero bytes that pad its frame to 8."""

    def __missing__(self, length: int) -> bytes:
        return _PAD_BY_REMAINDER[length & 7]


_PAD_BY_REMAINDER = tuple(b"\0" * ((-r) & 7) for r in range(8))
_PADS = _Pads()


class RingError(SegmentError):
    """A ring is misconfigured or misused (unknown reader, reader already attached, ...)."""


class RecordTooLarge(ValueError):
    """A frame can never fit in the ring, however far the readers advance."""


def _too_large(name: str, payload_bytes: int, capacity: int) -> RecordTooLarge:
    return RecordTooLarge(
        f"a frame of {frame_bytes(payload_bytes)} bytes (payload {payload_bytes} + "
        f"{FRAME_HEADER_BYTES} header, 8-aligned) can never fit ring {name} of capacity "
        f"{capacity} bytes; split the payload or create the ring with a larger capacity."
    )


class Ring:
    """A mapped ring segment. Make the writer and readers from it; close it when done.

    Attributes:
        name, capacity (data bytes), readers (declared reader names, in slot order).
    """

    def __init__(self, segment: Segment, readers: tuple[str, ...]) -> None:
        self.name = segment.name
        self.capacity = segment.capacity
        self.readers = readers
        self.segment = segment
        data_offset = _data_offset(len(readers))
        self._data_offset = data_offset
        buffer = segment.buffer
        self._control = buffer[:data_offset].cast("q")
        self._data = buffer[data_offset : data_offset + self.capacity]
        self._data_words = self._data.cast("Q")
        self._bells: dict[str, Doorbell] = {}
        self._writer: RingWriter | None = None
        self._open_readers: dict[str, RingReader] = {}

    @classmethod
    def create(
        cls, name: str, capacity_bytes: int, readers: Sequence[str] = ("journaller", "blp"), epoch: int | None = None
    ) -> Ring:
        """Create ring `name` with `capacity_bytes` of data and the declared reader slots
        (`epoch`: see `Segment.create`).

        Raises:
            ValueError: capacity not a power of two in range, bad or duplicate reader names.
            SegmentError: the name exists (stale or in use; the message says which).
            PlatformError: the memory-ordering argument does not hold on this machine.
        """
        check_memory_ordering()
        _check_capacity(name, capacity_bytes)
        names = tuple(readers)
        _check_readers(names)
        payload_bytes = _data_offset(len(names)) + capacity_bytes
        segment = Segment.create(name, KIND, payload_bytes, capacity=capacity_bytes, epoch=epoch)
        try:
            buffer = segment.buffer
            struct.pack_into("<Q", buffer, _META_OFFSET, len(names))
            for slot, reader in enumerate(names):
                encoded = reader.encode("ascii")
                offset = _NAMES_OFFSET + slot * READER_NAME_BYTES_MAX
                buffer[offset : offset + len(encoded)] = encoded
            ring = cls(segment, names)
            for reader in names:
                ring._bells[reader] = Doorbell.create(bell_name(name, reader))
        except BaseException:
            segment.close()
            segment.unlink()
            raise
        return ring

    @classmethod
    def attach(cls, name: str, capacity_bytes: int | None = None, epoch: int | None = None) -> Ring:
        """Attach ring `name` after validating its header and layout.

        Args:
            capacity_bytes: if given, the capacity the caller expects; a different one is refused.
            epoch: if given, the epoch the caller expects (see `Segment.attach`); checked before
                the caller can claim the writer or a reader slot.

        Raises:
            SegmentError: missing, foreign, stale, another epoch, wrong version, wrong capacity
                or layout.
            PlatformError: the memory-ordering argument does not hold on this machine.
        """
        check_memory_ordering()
        segment = Segment.attach(name, KIND, epoch=epoch)
        try:
            readers = _validate_layout(segment, capacity_bytes)
            ring = cls(segment, readers)
            for reader in readers:
                ring._bells[reader] = Doorbell.attach(bell_name(name, reader))
        except FileNotFoundError as error:
            segment.close()
            raise SegmentError(f"{name}: {error} (the ring's creator died while creating it?)") from None
        except BaseException:
            segment.close()
            raise
        return ring

    def writer(self) -> RingWriter:
        """The ring's one writer, resuming at the published cursor.

        Raises:
            RingError: another live process (or this one) already has the writer.
        """
        if self._writer is not None:
            raise RingError(f"{self.name}: this process already has the writer of this ring")
        _claim_owner(self._control, _WRITER_PID, f"{self.name}: the writer")
        self._writer = RingWriter(self)
        return self._writer

    def reader(
        self, name: str, upstream: Sequence[str] = (), limit: Counter | None = None
    ) -> RingReader:
        """Reader `name` (declared at creation), resuming at its cursor.

        Args:
            upstream: readers this one must stay behind (it reads only what they have passed).
            limit: a counter holding a position this reader must not pass (a frame boundary,
                e.g. the commit position).

        Raises:
            RingError: `name` or an upstream name was not declared, or the reader is attached
                elsewhere.
        """
        slot = self._slot(name)
        upstream_slots = tuple(self._slot(u) for u in upstream)
        if slot in upstream_slots:
            raise RingError(f"{self.name}: reader {name!r} cannot be its own upstream")
        if name in self._open_readers:
            raise RingError(f"{self.name}: this process already has reader {name!r}")
        _claim_owner(self._control, _parked_word(slot) + 1, f"{self.name}: reader {name!r}")
        reader = RingReader(self, name, slot, upstream_slots, limit)
        self._open_readers[name] = reader
        return reader

    def doorbell(self, reader: str) -> Doorbell:
        """The doorbell of `reader`, bound to its parked flag: `ring()` wakes it only if parked.

        Another process that unblocks this reader (e.g. the journaller, by advancing the limit
        counter) rings this after each advance.
        """
        slot = self._slot(reader)
        return self._bells[reader].bind((self._control, _parked_word(slot)))

    def cursor(self, reader: str) -> int:
        """Reader `reader`'s cursor (for monitoring)."""
        return self._control[_cursor_word(self._slot(reader))]

    @property
    def published_position(self) -> int:
        return self._control[_PUBLISHED]

    def _slot(self, reader: str) -> int:
        try:
            return self.readers.index(reader)
        except ValueError:
            raise RingError(
                f"{self.name}: reader {reader!r} was not declared; declared readers are "
                f"{list(self.readers)}. Declare it in Ring.create(readers=...)."
            ) from None

    def close(self) -> None:
        """Detach: release the writer and reader slots held here, unmap. Idempotent."""
        if self._writer is not None:
            self._control[_WRITER_PID] = 0
            self._writer = None
        for reader in self._open_readers.values():
            reader._closed = True
            self._control[_parked_word(reader._slot)] = 0
            self._control[_parked_word(reader._slot) + 1] = 0
        self._open_readers.clear()
        for bell in self._bells.values():
            bell.close()
        self._bells.clear()
        self._data_words.release()
        self._data.release()
        self._control.release()
        self.segment.close()

    def unlink(self) -> None:
        """Remove the ring's name and its doorbells. Idempotent."""
        self.segment.unlink()
        for reader in self.readers:
            Doorbell(bell_name(self.name, reader), None).unlink()  # type: ignore[arg-type]

    def __enter__(self) -> Ring:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _check_capacity(name: str, capacity_bytes: int) -> None:
    if capacity_bytes & (capacity_bytes - 1) or not (
        CAPACITY_BYTES_MIN <= capacity_bytes <= CAPACITY_BYTES_MAX
    ):
        raise ValueError(
            f"ring {name}: capacity_bytes={capacity_bytes} must be a power of two in "
            f"CAPACITY_BYTES_MIN={CAPACITY_BYTES_MIN}..CAPACITY_BYTES_MAX={CAPACITY_BYTES_MAX}"
        )


def _check_readers(names: tuple[str, ...]) -> None:
    if not 1 <= len(names) <= READERS_MAX:
        raise ValueError(f"a ring needs 1..READERS_MAX={READERS_MAX} readers, got {len(names)}")
    if len(set(names)) != len(names):
        raise ValueError(f"reader names must be unique: {list(names)}")
    for reader in names:
        if not reader.isascii() or not reader.isidentifier() or len(reader) > READER_NAME_BYTES_MAX:
            raise ValueError(
                f"reader name {reader!r} must be an ASCII identifier of at most "
                f"{READER_NAME_BYTES_MAX} bytes"
            )


def _validate_layout(segment: Segment, capacity_expected: int | None) -> tuple[str, ...]:
    name, capacity = segment.name, segment.capacity
    if capacity_expected is not None and capacity != capacity_expected:
        raise SegmentError(
            f"{name} has capacity {capacity} bytes, expected {capacity_expected}: it was created "
            "with a different configuration. Stop the node and recreate its segments."
        )
    if capacity & (capacity - 1) or not CAPACITY_BYTES_MIN <= capacity <= CAPACITY_BYTES_MAX:
        raise SegmentError(
            f"{name} has capacity {capacity} bytes, not a power of two in "
            f"{CAPACITY_BYTES_MIN}..{CAPACITY_BYTES_MAX}: corrupt header. Recreate the segment."
        )
    (count,) = struct.unpack_from("<Q", segment.buffer, _META_OFFSET)
    if not 1 <= count <= READERS_MAX:
        raise SegmentError(f"{name} declares {count} readers, not 1..{READERS_MAX}: corrupt layout.")
    if segment.payload_bytes != _data_offset(count) + capacity:
        raise SegmentError(
            f"{name} has {segment.payload_bytes} payload bytes but {count} readers and capacity "
            f"{capacity} need {_data_offset(count) + capacity}: corrupt layout."
        )
    names = []
    for slot in range(count):
        offset = _NAMES_OFFSET + slot * READER_NAME_BYTES_MAX
        raw = bytes(segment.buffer[offset : offset + READER_NAME_BYTES_MAX]).rstrip(b"\0")
        names.append(raw.decode("ascii", "replace"))
    try:
        _check_readers(tuple(names))
    except ValueError as error:
        raise SegmentError(f"{name}: corrupt reader table: {error}") from None
    return tuple(names)


def _claim_owner(control: memoryview, word: int, what: str) -> None:
    # Best effort: two processes claiming at the same instant both succeed. It catches the
    # configuration mistake of two live processes using one slot, which would break the
    # one-writer-per-line rule.
    owner = control[word]
    me = os.getpid()
    if owner == me:
        raise RingError(f"{what} is already held by this process")
    if owner != 0:
        import psutil

        try:
            alive = psutil.Process(owner).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            alive = False
        if alive:
            raise RingError(f"{what} is already held by pid {owner}, which is running; stop it first")
    control[word] = me


class RingWriter:
    """The one writer of a ring. Not thread-safe; use from one thread.

    `try_claim`/`try_write`/`try_write_batch`/`try_write_frames` return a falsy result when the
    slowest reader gates the writer; the caller idles and retries.

    Every write path claims its bytes through `_claim`, the one place that gates and pads; the
    wrappers only build frames. `try_write` inlines `_claim`'s common case (no wrap, below the
    cached gate): it is the per-record hot path, where the call would cost ~50 ns, ~8% of a
    `try_write` (measured in one process, before and after).
    """

    __slots__ = (
        "_bells",
        "_capacity",
        "_claim_limit",
        "_claim_position",
        "_control",
        "_cursor_words",
        "_data",
        "_headers",
        "_mask",
        "_name",
        "_words",
    )

    def __init__(self, ring: Ring) -> None:
        self._name = ring.name
        self._control = ring._control
        self._data = ring._data
        self._words = ring._data_words
        self._capacity = ring.capacity
        self._mask = ring.capacity - 1
        self._cursor_words = tuple(_cursor_word(slot) for slot in range(len(ring.readers)))
        bells: tuple[tuple[int, Callable[[], None]], ...] = tuple(
            (_parked_word(slot), ring._bells[reader].post) for slot, reader in enumerate(ring.readers)
        )
        # The writer is the ringer of the park/wake protocol (ipc.doorbell): after storing
        # `published` and before loading a parked flag it must fence, where this process needs a
        # fence of its own (lock fences; with membarrier the parker's fence covers it). The fence
        # rides in the bells loop as a first bell whose word, the reader count, is never 0, so it
        # always "rings": the loop in `publish` and `try_write` is then the same either way, and
        # with membarrier a publish pays nothing for the protocol.
        ringer_fence = store_load_fences().ringer
        if ringer_fence is not None:
            bells = ((_READER_COUNT, ringer_fence), *bells)
        self._bells = bells
        # Resume after the last published frame: anything a dead writer claimed but did not
        # publish was never visible and is overwritten.
        self._claim_position = self._control[_PUBLISHED]
        self._headers: dict[int, _FrameHeaders] = {}
        # Invariant: claim_position <= claim_limit <= min(reader cursors) + capacity. The limit
        # is cached (Disruptor's `cachedGatingSequence`); `_ungated` refreshes it.
        gate = self._min_cursor()
        assert gate <= self._claim_position, (gate, self._claim_position)
        self._claim_limit = gate + self._capacity

    @property
    def published_position(self) -> int:
        return self._control[_PUBLISHED]

    @property
    def claim_position(self) -> int:
        """End of everything claimed, published or not."""
        return self._claim_position

    def _min_cursor(self) -> int:
        control = self._control
        return min([control[word] for word in self._cursor_words])

    def _ungated(self, end: int) -> bool:
        """Whether claiming up to `end` overwrites nothing unread; refreshes the cached limit."""
        self._claim_limit = self._min_cursor() + self._capacity
        return end <= self._claim_limit

    def _claim(self, size: int) -> int:
        """Claim `size` bytes (one or more whole frames) for the caller to fill.

        The one place that gates and pads. A claim that would cross the end of the data area is
        preceded by a padding frame that fills the rest of the lap; the padding is claimed on its
        own (padding and frame together may exceed the capacity and would then never fit) and,
        when nothing else is pending, published at once: readers could otherwise never pass it
        and free the space the frame waits for.

        Args:
            size: bytes to claim, a multiple of 8, at most the capacity.

        Returns:
            The offset of the claimed bytes in the data area, or -1 when the slowest reader gates
            the claim (then nothing is claimed beyond a padding frame, which a caller publishes
            before idling).
        """
        capacity = self._capacity
        position = self._claim_position
        index = position & self._mask
        room = capacity - index
        if size > room:
            if position + room > self._claim_limit and not self._ungated(position + room):
                return -1
            self._words[index >> 3] = _PADDING_WORD | room
            self._claim_position = position + room
            if self._control[_PUBLISHED] == position:
                self.publish()
            position += room
            index = 0
        end = position + size
        if end > self._claim_limit and not self._ungated(end):
            return -1
        self._claim_position = end
        return index

    def try_claim(self, length: int, type: int) -> memoryview | None:
        """Claim a frame of `length` payload bytes; returns the payload view to fill, or None.

        The frame is invisible to readers until `publish()`. The view is valid until then.
        After None, publish what you have claimed before idling: readers cannot pass an
        unpublished claim, so the space the writer waits for would never be freed.

        Raises:
            RecordTooLarge: the frame is larger than the ring.
        """
        assert 0 <= type < PADDING_TYPE, type
        size = frame_bytes(length)
        if size > self._capacity:
            raise _too_large(self._name, length, self._capacity)
        index = self._claim(size)
        if index < 0:
            return None
        words = self._words
        words[(index + size - 8) >> 3] = 0  # the zero pad (the payload overwrites the rest)
        words[index >> 3] = (type << 32) | (length + FRAME_HEADER_BYTES)
        return self._data[index + FRAME_HEADER_BYTES : index + FRAME_HEADER_BYTES + length]

    def publish(self) -> None:
        """Make every claimed frame visible with one cursor store; wake parked readers (the
        ringer's side of the park/wake protocol, `ipc.doorbell`)."""
        control = self._control
        control[_PUBLISHED] = self._claim_position
        for parked, post in self._bells:
            if control[parked]:
                post()

    def try_write(self, payload: _Payload, type: int) -> bool:
        """Write and publish one frame. False if gated (nothing written).

        Raises:
            RecordTooLarge: the frame is larger than the ring.
        """
        assert 0 <= type < PADDING_TYPE, type
        length = len(payload)
        size = (length + 15) & -8  # frame_bytes(length), inlined
        position = self._claim_position
        index = position & self._mask
        end = position + size
        # `_claim`'s common case, inlined: no wrap and below the cached limit. Anything else (the
        # wrap, a limit refresh, a frame too large) goes through `_claim` itself.
        if index + size > self._capacity or end > self._claim_limit:
            return self._write_each(((type, payload),)) == 1
        words = self._words
        if length & 7:
            words[(index + size - 8) >> 3] = 0  # the zero pad (the payload overwrites the rest)
        words[index >> 3] = (type << 32) | (length + 8)
        self._data[index + 8 : index + 8 + length] = payload
        self._claim_position = end
        # publish(), inlined for the same reason.
        control = self._control
        control[_PUBLISHED] = end
        for parked, post in self._bells:
            if control[parked]:
                post()
        return True

    def try_write_batch(self, payloads: Sequence[_Payload], type: int) -> int:
        """Write as many of `payloads` as fit, in order, then publish once.

        The common case (the batch fits before the wrap and below the gate) is one claim, one
        join of headers, payloads and pads, one copy into the ring and one cursor store, with no
        per-record Python bytecode.

        Returns:
            How many payloads were written (a prefix of `payloads`); 0 if gated.

        Raises:
            RecordTooLarge: some payload can never fit (nothing is written).
        """
        assert 0 <= type < PADDING_TYPE, type
        count = len(payloads)
        if count == 0:
            return 0
        lengths = list(map(len, payloads))
        longest = max(lengths)
        if frame_bytes(longest) > self._capacity:
            raise _too_large(self._name, longest, self._capacity)
        headers = self._headers.get(type)
        if headers is None:
            headers = self._headers[type] = _FrameHeaders(type)
        if any(map(_SEVEN.__and__, lengths)):
            pieces: list[_Payload] = [b""] * (3 * count)
            pieces[0::3] = map(headers.__getitem__, lengths)
            pieces[1::3] = payloads
            pieces[2::3] = map(_PADS.__getitem__, lengths)
        else:
            pieces = [b""] * (2 * count)
            pieces[0::2] = map(headers.__getitem__, lengths)
            pieces[1::2] = payloads
        if self._write_joined(b"".join(pieces)):
            return count
        return self._write_each(zip(repeat(type), payloads))

    def try_write_frames(self, frames: Sequence[tuple[int, _Payload]]) -> int:
        """Like `try_write_batch` for frames of mixed types: `(type, payload)` pairs, one publish.

        The common case (no wrap, below the gate) builds every header with one `pack` each,
        joins and copies once.

        Returns:
            How many frames were written (a prefix of `frames`); 0 if gated.

        Raises:
            RecordTooLarge: some payload can never fit (nothing is written).
        """
        if not frames:
            return 0
        pack = FRAME_HEADER.pack
        pieces: list[_Payload] = []
        append = pieces.append
        longest = 0
        for type, payload in frames:
            length = len(payload)
            if length > longest:
                longest = length
            append(pack(length + FRAME_HEADER_BYTES, type))
            append(payload)
            if length & 7:
                append(_PAD_BY_REMAINDER[length & 7])
        if frame_bytes(longest) > self._capacity:
            raise _too_large(self._name, longest, self._capacity)
        if self._write_joined(b"".join(pieces)):
            return len(frames)
        return self._write_each(frames)

    def _write_joined(self, frames: bytes) -> bool:
        """Claim, copy and publish whole frames joined in one buffer, if they fit before the wrap
        and below the gate. False (nothing written) otherwise: the caller writes them one by one,
        so a batch fills the lap before the padding and a gated batch writes what fits."""
        size = len(frames)
        if (self._claim_position & self._mask) + size > self._capacity:
            return False
        index = self._claim(size)
        if index < 0:
            return False
        self._data[index : index + size] = frames
        self.publish()
        return True

    def _write_each(self, frames: Iterable[tuple[int, _Payload]]) -> int:
        """Frame by frame through `try_claim` until one is gated, then publish once (with any
        padding claimed before the gated frame). Returns how many frames were written.

        The slow path of the batch writes (a batch that crosses the wrap, or of which only a
        prefix fits below the gate): ~1-2% of the frames in `benches.ring`'s batch runs.
        """
        written = 0
        claim = self.try_claim
        for type, payload in frames:
            view = claim(len(payload), type)
            if view is None:
                break
            view[:] = payload
            written += 1
        if self._claim_position != self._control[_PUBLISHED]:
            self.publish()
        return written


class RingReader:
    """One named reader of a ring. Not thread-safe; use from one thread.

    Views returned by `poll` and `poll_region` are valid until the next `poll`, `poll_region`,
    `read` or `release` of this reader (each of which first moves the cursor past them); copy
    anything you keep longer.
    """

    __slots__ = (
        "__weakref__",
        "_available",
        "_capacity",
        "_closed",
        "_control",
        "_cursor",
        "_data",
        "_data_offset",
        "_direct",
        "_limit",
        "_mask",
        "_mmap",
        "_pending",
        "_position",
        "_ring",
        "_slot",
        "_upstream",
        "_words",
        "doorbell",
        "name",
    )

    def __init__(
        self,
        ring: Ring,
        name: str,
        slot: int,
        upstream_slots: tuple[int, ...],
        limit: Counter | None,
    ) -> None:
        self.name = name
        self._ring = ring
        self._slot = slot
        self._closed = False
        self._control = ring._control
        self._data = ring._data
        self._words = ring._data_words
        self._mmap = ring.segment.mmap
        self._data_offset = HEADER_BYTES + ring._data_offset  # of the data area in the mmap
        self._capacity = ring.capacity
        self._mask = ring.capacity - 1
        self._cursor = _cursor_word(slot)
        self._upstream = tuple(_cursor_word(s) for s in upstream_slots)
        self._limit = limit.word if limit is not None else None
        self._direct = not self._upstream and limit is None  # bounded by `published` alone
        self._position = self._control[self._cursor]
        self._pending = self._position
        self._available = self._position
        self.doorbell = ring._bells[name].bind((self._control, _parked_word(slot)), self.ready)

    @property
    def position(self) -> int:
        """This reader's cursor: it has finished with every frame below it."""
        return self._position

    def _refresh(self) -> int:
        control = self._control
        available = control[_PUBLISHED]
        for word in self._upstream:
            cursor = control[word]
            if cursor < available:
                available = cursor
        if self._limit is not None:
            view, index = self._limit
            limit = view[index]
            if limit < available:
                available = limit
        self._available = available
        return available

    def available(self) -> int:
        """Bytes readable beyond what was already returned (re-reads the cursors)."""
        return self._refresh() - self._pending

    def ready(self) -> bool:
        """Whether anything is readable now (the blocking idle strategy's re-check)."""
        return self._refresh() > self._pending

    def release(self) -> None:
        """Move the cursor past everything returned so far, letting the writer reuse it."""
        if self._pending != self._position:
            self._position = self._pending
            self._control[self._cursor] = self._pending

    def read(self) -> tuple[int, bytes] | None:
        """The next frame as (type, payload copy), advancing past it; None if none is readable."""
        if self._pending != self._position:  # frames of a poll are still held: release them
            self.release()
        position = self._pending
        available = self._available
        if position >= available:
            if self._direct:
                available = self._available = self._control[_PUBLISHED]
            else:
                available = self._refresh()
            if position >= available:
                return None
        words = self._words
        index = position & self._mask
        word = words[index >> 3]
        if word >= _PADDING_WORD:
            position += word & _LENGTH_MASK
            if position >= available:
                self._position = self._pending = position
                self._control[self._cursor] = position
                return None
            index = 0
            word = words[0]
        length = word & _LENGTH_MASK
        end = position + ((length + 7) & -8)
        if end > available:
            return None  # a limit inside a frame: wait for it to move past the frame
        start = self._data_offset + index
        payload = self._mmap[start + 8 : start + length]
        self._position = self._pending = end
        self._control[self._cursor] = end
        return word >> 32, payload

    def poll(self, max_frames: int) -> list[tuple[int, memoryview]]:
        """Up to `max_frames` frames as (type, zero-copy payload view); padding is skipped.

        Releases the frames of the previous poll first, and never crosses the wrap (the next poll
        continues from the start of the data area). The views are valid until the next `poll`,
        `poll_region`, `read` or `release`.
        """
        self.release()
        position = self._pending
        available = self._refresh()
        if position >= available:
            return []
        index = position & self._mask
        base = position - index
        limit = available - base
        if limit > self._capacity:
            limit = self._capacity
        frames: list[tuple[int, memoryview]] = []
        append = frames.append
        words = self._words
        data = self._data
        # Per frame: one word load, one view, one tuple. Padding can only be the last frame of a
        # lap and a frame can cross only a limit that is not on a frame boundary, so both are
        # checked once, after the loop.
        for _ in range(max_frames):
            if index >= limit:
                break
            word = words[index >> 3]
            length = word & 0xFFFF_FFFF
            append((word >> 32, data[index + 8 : index + length]))
            index += (length + 7) & -8
        if index > limit:
            _, view = frames.pop()
            index -= frame_bytes(len(view))
        if frames and frames[-1][0] == PADDING_TYPE:
            frames.pop()
        self._pending = base + index
        return frames

    def poll_region(self, max_bytes: int) -> tuple[int, memoryview]:
        """A contiguous run of whole frames, at most `max_bytes`, as (start position, view).

        Padding is excluded (a region never crosses the wrap). An empty view means nothing is
        readable, or the next frame is larger than `max_bytes`. Releases the previous poll first;
        `release()` moves the cursor past the region.
        """
        self.release()
        position = self._pending
        available = self._refresh()
        words = self._words
        mask = self._mask
        if position < available:
            word = words[(position & mask) >> 3]
            if word >= _PADDING_WORD:
                position += word & _LENGTH_MASK
                self._pending = self._position = position
                self._control[self._cursor] = position
        start = position
        index = start & mask
        lap_end = start - index + self._capacity
        end_max = min(available, start + max_bytes, lap_end)
        if end_max <= start:
            end = start
        elif end_max == available and available != lap_end and self._limit is None:
            # The whole readable run lies inside this lap, so it holds no padding, and it ends
            # on a frame boundary (cursors always do; a limit counter might not).
            end = end_max
        else:
            end = start
            while end < end_max:
                word = words[(end & mask) >> 3]
                if word >= _PADDING_WORD:
                    break
                frame_end = end + (((word & _LENGTH_MASK) + 7) & -8)
                if frame_end > end_max:
                    break
                end = frame_end
        self._pending = end
        return start, self._data[index : index + (end - start)]

    def close(self) -> None:
        """Give up this reader slot (its cursor stays where it is). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._control[_parked_word(self._slot)] = 0
        self._control[_parked_word(self._slot) + 1] = 0
        self._ring._open_readers.pop(self.name, None)
