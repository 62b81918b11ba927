"""The one writer of a ring: claims space, fills frames, publishes them with one store.

Ordering (the writer's half; the argument that it holds across processes without locks is in
`ipc.platform`): the writer fills every byte it has claimed, then makes all of it visible with one
store of `published` (`publish`). A reader loads `published` before it loads any frame below it,
so it never sees a frame half-written, and the writer overwrites only bytes below the minimum
reader cursor plus the capacity, which readers store only after they have finished with them.

Every write API (`try_claim`, `try_write`, `try_write_batch`, `try_write_frames`) claims through
one method, `RingWriter._claim(size)`, which alone gates and pads at the wrap; the APIs only build
frames. The writer caches the gate (the minimum reader cursor plus the capacity) and re-reads the
reader lines only when the cached value would gate it (Disruptor's `cachedGatingSequence`), so a
writer well ahead of its readers touches no reader line.

The per-frame methods' globals are bound here by assignment, not by import: CPython compiles a
method call on an imported name without LOAD_METHOD (`tests/test_hot_path_bytecode.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from itertools import repeat
from typing import TYPE_CHECKING, Final

from ipc import ring_layout
from ipc.platform import store_load_fences

if TYPE_CHECKING:
    from ipc.ring import Ring

__all__ = ["FRAME_HEADERS_CACHED_MAX", "RingWriter"]

FRAME_HEADER_BYTES: Final = ring_layout.FRAME_HEADER_BYTES
FRAME_HEADER: Final = ring_layout.FRAME_HEADER
PADDING_TYPE: Final = ring_layout.PADDING_TYPE
_PADDING_WORD: Final = ring_layout.PADDING_WORD
_READER_COUNT: Final = ring_layout.READER_COUNT
assert ring_layout.PARKED > 0 >= ring_layout.PARKED_ON_LIMIT  # the bells loop rings flags > 0
_PUBLISHED: Final = ring_layout.PUBLISHED
_cursor_word: Final = ring_layout.cursor_word
_parked_word: Final = ring_layout.parked_word
frame_bytes: Final = ring_layout.frame_bytes
_too_large: Final = ring_layout.too_large
_Payload = ring_layout.Payload


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
        # rides in the bells loop as a first bell whose word, the reader count, is always > 0, so
        # it always "rings": the loop in `publish` and `try_write` is then the same either way, and
        # with membarrier a publish pays nothing for the protocol. A reader parked on its limit
        # (flag PARKED_ON_LIMIT < 0, ipc.ring_layout) is left to the limit's advancer.
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
        size = (length + 15) & -8  # frame_bytes(length), inlined
        position = self._claim_position
        index = position & self._mask
        end = position + size
        # `_claim`'s common case, inlined (the sequencer claims once per command): no wrap and
        # below the cached limit. The wrap, a limit refresh and a frame too large go through
        # `_claim` itself.
        if index + size > self._capacity or end > self._claim_limit:
            if size > self._capacity:
                raise _too_large(self._name, length, self._capacity)
            index = self._claim(size)
            if index < 0:
                return None
        else:
            self._claim_position = end
        words = self._words
        if length & 7:
            words[(index + size - 8) >> 3] = 0  # the zero pad (the payload overwrites the rest)
        words[index >> 3] = (type << 32) | (length + 8)
        return self._data[index + 8 : index + 8 + length]

    def publish(self) -> None:
        """Make every claimed frame visible with one cursor store; wake parked readers (the
        ringer's side of the park/wake protocol, `ipc.doorbell`)."""
        control = self._control
        control[_PUBLISHED] = self._claim_position
        for parked, post in self._bells:
            if control[parked] > 0:
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
            if control[parked] > 0:
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

    def try_write_joined(self, frames: bytes) -> bool:
        """Write and publish whole frames already laid out as the ring holds them (each an 8-byte
        header, its payload and its zero pad; e.g. records copied from another ring or a journal)
        with one copy, if they fit before the wrap and below the gate. False (nothing written)
        otherwise: the caller writes them one by one through `try_claim`."""
        assert len(frames) & 7 == 0, len(frames)
        return self._write_joined(frames)

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

