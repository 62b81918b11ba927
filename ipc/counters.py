"""A segment of named 64-bit counters, each on its own 128-byte line, one writer each.

Positions (log published, journal durable, commit, blp applied, egress published and consumed),
the Raft standing, term, leader, heartbeats and error counts live here, so `seqd status` can read
them without talking to the daemon. Each counter has exactly one writing process: `add` is a load
then a store, not an atomic increment, and is correct only because no one else stores that line.
This module does not know who owns what; its user does, and hands a process that must not write a
counter a `read_only` handle to it, whose `set` and `add` raise (the daemon does so for every
counter a role does not own: daemon/layout.py). Readers see each value whole (aligned 8-byte
loads, see `ipc.platform`).

Layout of the segment payload: a table of names (`NAME_BYTES_MAX` bytes each, rounded up to whole
lines), then one 128-byte line per counter with the value in its first 8 bytes. What the names
mean is the user's: it declares a `layout_version` at create, which the segment header carries
and `attach` checks when told which version it reads.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from types import TracebackType

from ipc.platform import check_memory_ordering
from ipc.segment import LINE_BYTES, Segment, SegmentError

__all__ = ["COUNTERS_MAX", "NAME_BYTES_MAX", "Counter", "CounterWriteError", "Counters", "ReadOnlyCounter", "words"]

KIND = "counters"
# `seqd status` prints all of them; 256 lines is 32 KiB, far more than a node needs.
COUNTERS_MAX = 256
NAME_BYTES_MAX = 64
_WORDS_PER_LINE = LINE_BYTES // 8


def _names_bytes(count: int) -> int:
    raw = count * NAME_BYTES_MAX
    return (raw + LINE_BYTES - 1) // LINE_BYTES * LINE_BYTES


class CounterWriteError(Exception):
    """A process wrote a counter it only may read (a programmer error: the message names both)."""


class Counter:
    """One shared 64-bit signed counter. Only its one writer may call `set` and `add`."""

    __slots__ = ("_index", "_view", "name")

    def __init__(self, name: str, view: memoryview, index: int) -> None:
        self.name = name
        self._view = view
        self._index = index

    def get(self) -> int:
        return self._view[self._index]

    def set(self, value: int) -> None:
        self._view[self._index] = value

    def add(self, delta: int) -> int:
        """Add `delta` (single writer only) and return the new value."""
        value = self._view[self._index] + delta
        self._view[self._index] = value
        return value

    @property
    def word(self) -> tuple[memoryview, int]:
        """(view, index) of the counter's shared word, for a hot loop that loads it without a
        method call: `view[index]` is the same aligned 8-byte load as `get()`."""
        return self._view, self._index

    def read_only(self, why: str) -> ReadOnlyCounter:
        """A handle to the same word whose `set` and `add` raise `CounterWriteError(why)`, for a
        process that reads this counter but does not own it."""
        return ReadOnlyCounter(self.name, self._view, self._index, why)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.get()})"


def words(*counters: Counter) -> tuple[memoryview, tuple[int, ...]]:
    """The one view `counters` share and each one's index in it (`Counter.word`), for a hot loop
    that stores and loads several as `view[index]`: a subscript rather than a method call each."""
    view = counters[0].word[0]
    indexes = []
    for counter in counters:
        counter_view, index = counter.word
        assert counter_view is view, f"counter {counter.name} is not in the counters view"
        indexes.append(index)
    return view, tuple(indexes)


class ReadOnlyCounter(Counter):
    """A counter another process owns: `get` and `word` as usual (`word` is for loads only),
    `set` and `add` raise. The check costs nothing on the owner's path: the owner holds a plain
    `Counter`."""

    __slots__ = ("_why",)

    def __init__(self, name: str, view: memoryview, index: int, why: str) -> None:
        super().__init__(name, view, index)
        self._why = why

    def set(self, value: int) -> None:
        raise CounterWriteError(self._why)

    def add(self, delta: int) -> int:
        raise CounterWriteError(self._why)


class Counters:
    """A mapped counters segment: `counters["journal.durable"].get()`."""

    def __init__(self, segment: Segment, names: tuple[str, ...]) -> None:
        self.segment = segment
        self.name = segment.name
        self.names = names
        offset = _names_bytes(len(names))
        self._values = segment.buffer[offset : offset + len(names) * LINE_BYTES].cast("q")
        self._counters = {
            name: Counter(name, self._values, slot * _WORDS_PER_LINE) for slot, name in enumerate(names)
        }

    @classmethod
    def create(
        cls, name: str, counter_names: Sequence[str], epoch: int | None = None, layout_version: int = 0
    ) -> Counters:
        """Create counters segment `name` holding `counter_names`, all zero (`epoch`: see
        `Segment.create`; `layout_version`: the version of the caller's table of names, stored
        as the segment's content version).

        Raises:
            ValueError: no names, too many, duplicates, or a name that is not short ASCII.
            SegmentError: the segment exists (stale or in use; the message says which).
        """
        check_memory_ordering()
        names = tuple(counter_names)
        _check_names(names)
        payload_bytes = _names_bytes(len(names)) + len(names) * LINE_BYTES
        segment = Segment.create(
            name, KIND, payload_bytes, capacity=len(names), epoch=epoch, content_version=layout_version
        )
        for slot, counter in enumerate(names):
            encoded = counter.encode("ascii")
            offset = slot * NAME_BYTES_MAX
            segment.buffer[offset : offset + len(encoded)] = encoded
        return cls(segment, names)

    @classmethod
    def attach(
        cls, name: str, epoch: int | None = None, stale_ok: bool = False, layout_version: int | None = None
    ) -> Counters:
        """Attach counters segment `name` after validating its header and name table.

        Args:
            epoch, stale_ok: see `Segment.attach` (expect this epoch; read a dead creator's values).
            layout_version: if given, the version of the table of names this process reads.

        Raises:
            SegmentVersionError: another header version, or another `layout_version`.
            SegmentError: missing, foreign, stale, another epoch or a corrupt layout.
        """
        check_memory_ordering()
        segment = Segment.attach(name, KIND, epoch=epoch, stale_ok=stale_ok, content_version=layout_version)
        try:
            count = segment.capacity
            if not 1 <= count <= COUNTERS_MAX:
                raise SegmentError(f"{name} declares {count} counters, not 1..{COUNTERS_MAX}: corrupt header.")
            expected = _names_bytes(count) + count * LINE_BYTES
            if segment.payload_bytes != expected:
                raise SegmentError(
                    f"{name} has {segment.payload_bytes} payload bytes, {count} counters need "
                    f"{expected}: corrupt layout."
                )
            names = []
            for slot in range(count):
                raw = bytes(segment.buffer[slot * NAME_BYTES_MAX : (slot + 1) * NAME_BYTES_MAX])
                names.append(raw.rstrip(b"\0").decode("ascii", "replace"))
            try:
                _check_names(tuple(names))
            except ValueError as error:
                raise SegmentError(f"{name}: corrupt counter name table: {error}") from None
        except BaseException:
            segment.close()
            raise
        return cls(segment, tuple(names))

    def __getitem__(self, name: str) -> Counter:
        try:
            return self._counters[name]
        except KeyError:
            raise KeyError(
                f"{self.name} has no counter {name!r}; it has {list(self.names)}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._counters

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def line_offset(self, name: str) -> int:
        """Byte offset of counter `name`'s line in the segment payload (for tests and tools)."""
        return _names_bytes(len(self.names)) + self.names.index(name) * LINE_BYTES

    def snapshot(self) -> dict[str, int]:
        """Every counter's value (each read whole; the set is not one instant)."""
        values = self._values
        return {name: values[slot * _WORDS_PER_LINE] for slot, name in enumerate(self.names)}

    def close(self) -> None:
        """Unmap (the name stays). `Counter` objects from here must not be used after. Idempotent."""
        if self.segment._mmap is None:
            return
        self._values.release()
        self.segment.close()

    def unlink(self) -> None:
        self.segment.unlink()

    def __enter__(self) -> Counters:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _check_names(names: tuple[str, ...]) -> None:
    if not 1 <= len(names) <= COUNTERS_MAX:
        raise ValueError(f"a counters segment holds 1..COUNTERS_MAX={COUNTERS_MAX} counters, got {len(names)}")
    if len(set(names)) != len(names):
        raise ValueError(f"counter names must be unique: {list(names)}")
    for name in names:
        if not name or not name.isascii() or not name.isprintable() or len(name) > NAME_BYTES_MAX:
            raise ValueError(
                f"counter name {name!r} must be 1..{NAME_BYTES_MAX} printable ASCII characters"
            )
