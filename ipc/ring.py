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

Modules: this one holds the `Ring` (creating, attaching and validating the segment; handing out
the writer and reader slots) and re-exports the ring's public names; `ipc.ring_layout` holds the
segment layout and the frame format (`frame_bytes`), `ipc.ring_writer` the `RingWriter` (its
ordering half, the one `_claim` path, the doorbell fence) and `ipc.ring_reader` the `RingReader`
(its ordering half).

Readers are declared by name when the ring is created (a declared reader that never attaches still
holds the writer back: that is the point). A reader may depend on other readers (`upstream`), so
the business-logic reader never overtakes the journaller, and on an external limit counter (the
commit position).

The layout of the segment and of a frame is in `ipc.ring_layout`.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from types import TracebackType

from ipc import ring_layout, ring_writer
from ipc.counters import Counter
from ipc.doorbell import Doorbell, bell_name, unlink_bell
from ipc.platform import check_memory_ordering
from ipc.ring_layout import (
    CAPACITY_BYTES_MAX,
    CAPACITY_BYTES_MIN,
    FRAME_ALIGNMENT,
    FRAME_HEADER,
    FRAME_HEADER_BYTES,
    PADDING_TYPE,
    READER_NAME_BYTES_MAX,
    READERS_MAX,
    RecordTooLarge,
    frame_bytes,
)
from ipc.ring_reader import RingReader
from ipc.ring_writer import FRAME_HEADERS_CACHED_MAX, RingWriter
from ipc.segment import HEADER_BYTES as HEADER_BYTES  # importable from here as before the split
from ipc.segment import LINE_BYTES as LINE_BYTES
from ipc.segment import Segment, SegmentError

__all__ = [
    "CAPACITY_BYTES_MAX",
    "CAPACITY_BYTES_MIN",
    "FRAME_ALIGNMENT",
    "FRAME_HEADER",
    "FRAME_HEADERS_CACHED_MAX",
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
# The layout's words under the names the ring's code (and the protocol tests) use.
_META_OFFSET = ring_layout.META_OFFSET
_NAMES_OFFSET = ring_layout.NAMES_OFFSET
_WRITER_OFFSET = ring_layout.WRITER_OFFSET
_READERS_OFFSET = ring_layout.READERS_OFFSET
_READER_STRIDE = ring_layout.READER_STRIDE
_WORD = ring_layout.WORD
_READER_COUNT = ring_layout.READER_COUNT
_POLLABLE_READERS = ring_layout.POLLABLE_READERS
_PUBLISHED = ring_layout.PUBLISHED
_WRITER_PID = ring_layout.WRITER_PID
_PADDING_WORD = ring_layout.PADDING_WORD
_LENGTH_MASK = ring_layout.LENGTH_MASK
_cursor_word = ring_layout.cursor_word
_parked_word = ring_layout.parked_word
_data_offset = ring_layout.data_offset
_too_large = ring_layout.too_large
_Payload = ring_layout.Payload
_SEVEN = ring_writer._SEVEN
_FrameHeaders = ring_writer._FrameHeaders
_Pads = ring_writer._Pads
_PAD_BY_REMAINDER = ring_writer._PAD_BY_REMAINDER
_PADS = ring_writer._PADS


class RingError(SegmentError):
    """A ring is misconfigured or misused (unknown reader, reader already attached, ...)."""



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
        cls,
        name: str,
        capacity_bytes: int,
        readers: Sequence[str] = ("journaller", "blp"),
        epoch: int | None = None,
        pollable: Sequence[str] = (),
    ) -> Ring:
        """Create ring `name` with `capacity_bytes` of data and the declared reader slots
        (`epoch`: see `Segment.create`).

        Args:
            pollable: readers that wait in an event loop: their doorbell is a FIFO whose
                descriptor the loop watches (`ipc.doorbell_fifo`), the others' a semaphore.

        Raises:
            ValueError: capacity not a power of two in range, bad or duplicate reader names, a
                pollable reader that is not declared.
            SegmentError: the name exists (stale or in use; the message says which).
            PlatformError: the memory-ordering argument does not hold on this machine.
        """
        check_memory_ordering()
        _check_capacity(name, capacity_bytes)
        names = tuple(readers)
        _check_readers(names)
        unknown = [reader for reader in pollable if reader not in names]
        if unknown:
            raise ValueError(f"pollable readers {unknown} are not among the declared readers {list(names)}")
        payload_bytes = _data_offset(len(names)) + capacity_bytes
        segment = Segment.create(name, KIND, payload_bytes, capacity=capacity_bytes, epoch=epoch)
        ring: Ring | None = None
        try:
            buffer = segment.buffer
            struct.pack_into("<QQ", buffer, _META_OFFSET, len(names), _pollable_mask(names, pollable))
            for slot, reader in enumerate(names):
                encoded = reader.encode("ascii")
                offset = _NAMES_OFFSET + slot * READER_NAME_BYTES_MAX
                buffer[offset : offset + len(encoded)] = encoded
            ring = cls(segment, names)
            for reader in names:
                ring._bells[reader] = Doorbell.create(bell_name(name, reader), reader in pollable)
        except BaseException:
            for bell in ring._bells.values() if ring is not None else ():
                bell.close()
            segment.close()
            segment.unlink()
            for reader in names:
                unlink_bell(bell_name(name, reader))
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
        ring: Ring | None = None
        try:
            readers = _validate_layout(segment, capacity_bytes)
            ring = cls(segment, readers)
            pollable = ring.pollable
            for reader in readers:
                ring._bells[reader] = Doorbell.attach(bell_name(name, reader), reader in pollable)
        except BaseException as error:
            for bell in ring._bells.values() if ring is not None else ():
                bell.close()
            segment.close()
            if isinstance(error, FileNotFoundError):
                raise SegmentError(f"{name}: {error} (the ring's creator died while creating it?)") from None
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

    @property
    def pollable(self) -> tuple[str, ...]:
        """The readers whose doorbell is a FIFO (`Ring.create(pollable=...)`)."""
        mask = self._control[_POLLABLE_READERS]
        return tuple(reader for slot, reader in enumerate(self.readers) if mask >> slot & 1)

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
            unlink_bell(bell_name(self.name, reader))

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


def _pollable_mask(names: tuple[str, ...], pollable: Sequence[str]) -> int:
    return sum(1 << slot for slot, reader in enumerate(names) if reader in pollable)


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
