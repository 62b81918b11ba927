"""A named reader of a ring: polls frames (zero-copy views) or regions, then releases them.

Ordering (the reader's half; the argument that it holds across processes without locks is in
`ipc.platform`): a reader loads `published` (and its upstream cursors and limit counter) first,
then the frames below that, then stores its cursor. Frames returned by `poll` and `poll_region`
are zero-copy views into the ring and stay valid until the reader's next `poll`/`poll_region`/
`read`/`release`: only then does its cursor move past them, and only then may the writer reuse
their bytes; `release_to(position)` moves it to `position`, and the bytes below that may be
reused at once. `read` returns a copy.

A reader may depend on other readers (`upstream`), so the business-logic reader never overtakes
the journaller, and on an external limit counter (the commit position): it reads up to
`min(published, upstream cursors..., limit)`.

The per-frame methods' globals are bound here by assignment, not by import: CPython compiles a
method call on an imported name without LOAD_METHOD (`tests/test_hot_path_bytecode.py`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from ipc import ring_layout
from ipc.counters import Counter
from ipc.segment import HEADER_BYTES

if TYPE_CHECKING:
    from ipc.ring import Ring

__all__ = ["RingReader"]

PADDING_TYPE: Final = ring_layout.PADDING_TYPE
_PADDING_WORD: Final = ring_layout.PADDING_WORD
_LENGTH_MASK: Final = ring_layout.LENGTH_MASK
_PUBLISHED: Final = ring_layout.PUBLISHED
_cursor_word: Final = ring_layout.cursor_word
_parked_word: Final = ring_layout.parked_word
frame_bytes: Final = ring_layout.frame_bytes
# The region `poll_region` returns when nothing is readable (a view of no bytes, shared: it
# costs the empty cycle no slice of the ring).
_NO_BYTES: Final = memoryview(b"")


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
        # A reader with a limit is rung by the limit's advancer only, not on every publish.
        parked_value = ring_layout.PARKED if limit is None else ring_layout.PARKED_ON_LIMIT
        self.doorbell = ring._bells[name].bind((self._control, _parked_word(slot)), self.ready, parked_value)

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

    def next_frame_bytes(self) -> int:
        """The ring bytes (aligned) of the next unread frame, 0 if none is readable: what
        `poll_region` needs to return that frame alone when it is larger than a caller's bound.
        Padding at the lap's end is not a frame: the next one is after it."""
        position = self._pending
        if position >= self._refresh():
            return 0
        word = self._words[(position & self._mask) >> 3]
        if word >= _PADDING_WORD:
            position += word & _LENGTH_MASK
            if position >= self._available:
                return 0
            word = self._words[(position & self._mask) >> 3]
        return ((word & _LENGTH_MASK) + 7) & -8

    def poll_region(self, max_bytes: int, *, limit_on_frames: bool = False, max_frames: int = 0) -> tuple[int, memoryview]:
        """A contiguous run of whole frames, at most `max_bytes`, as (start position, view).

        Padding is excluded (a region never crosses the wrap). An empty view means nothing is
        readable, or the next frame is larger than `max_bytes`. Releases the previous poll first;
        `release()` moves the cursor past the region, `release_to()` past part of it.

        A region that ends where the readable bytes end is taken without walking its frames when
        they end on a frame boundary: always for a reader bounded by `published` and cursors; for
        one with a limit counter only with `limit_on_frames`, by which the caller vouches that
        the limit holds a frame boundary (as `Ring.reader` asks of it). If it ever does not, the
        region's last frame runs past its end: such a caller must not take a frame that does.

        `max_frames` (0: none) bounds the frames a region that must be walked holds: a caller that
        takes a few frames a poll from a large readable run (the blp: 64 of a catch-up's MiBs that
        meet the lap's end) walks only those, not all the run's frames again at every poll.
        """
        if self._pending != self._position:
            self.release()
        position = self._pending
        available = self._refresh()
        if position >= available:  # nothing readable: the idle cycle's poll
            return position, _NO_BYTES
        words = self._words
        mask = self._mask
        word = words[(position & mask) >> 3]
        if word >= _PADDING_WORD:
            position += word & _LENGTH_MASK
            self._pending = self._position = position
            self._control[self._cursor] = position
        start = position
        index = start & mask
        lap_end = start - index + self._capacity
        end_max = start + max_bytes
        if end_max > available:
            end_max = available
        if end_max > lap_end:
            end_max = lap_end
        if end_max <= start:
            end = start
        elif end_max == available and available != lap_end and (limit_on_frames or self._limit is None):
            # The whole readable run lies inside this lap, so it holds no padding, and it ends
            # on a frame boundary (cursors always do; the limit counter as vouched for).
            end = end_max & -8
        else:
            end = start
            frames_left = max_frames or -1
            while end < end_max and frames_left:
                word = words[(end & mask) >> 3]
                if word >= _PADDING_WORD:
                    break
                frame_end = end + (((word & _LENGTH_MASK) + 7) & -8)
                if frame_end > end_max:
                    break
                end = frame_end
                frames_left -= 1
        self._pending = end
        return start, self._data[index : index + (end - start)]

    def release_to(self, position: int) -> None:
        """Move the cursor to `position`, a frame boundary in what the last `poll_region`
        returned: the frames after it are returned again by the next poll."""
        assert self._position <= position <= self._pending, (self._position, position, self._pending)
        self._position = self._pending = position
        self._control[self._cursor] = position

    def close(self) -> None:
        """Give up this reader slot (its cursor stays where it is). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._control[_parked_word(self._slot)] = 0
        self._control[_parked_word(self._slot) + 1] = 0
        self._ring._open_readers.pop(self.name, None)
