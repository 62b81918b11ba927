"""A segment of named 64-bit counters, each on its own 128-byte line, one writer each.

Positions (log published, journal durable, commit, blp applied, egress published and consumed),
the Raft standing, term, leader, heartbeats and error counts live here, so `seqd status` can read
them without talking to the daemon. Each counter has exactly one writing process by convention
(nothing enforces it): `add` is a load then a store, not an atomic increment, and is correct only
because no one else stores that line. Readers see each value whole (aligned 8-byte loads, see
`ipc.platform`).

Layout of the segment payload: a table of names (`NAME_BYTES_MAX` bytes each, rounded up to whole
lines), then one 128-byte line per counter with the value in its first 8 bytes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from types import TracebackType

from ipc.platform import check_memory_ordering
from ipc.segment import LINE_BYTES, Segment, SegmentError

__all__ = ["COUNTERS_MAX", "NAME_BYTES_MAX", "Counter", "Counters"]

KIND = "counters"
# `seqd status` prints all of them; 256 lines is 32 KiB, far more than a node needs.
COUNTERS_MAX = 256
NAME_BYTES_MAX = 64
_WORDS_PER_LINE = LINE_BYTES // 8


def _names_bytes(count: int) -> int:
    raw = count * NAME_BYTES_MAX
    return (raw + LINE_BYTES - 1) // LINE_BYTES * LINE_BYTES


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

    def __repr__(self) -> str:
        return f"Counter({self.name!r}, {self.get()})"


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
    def create(cls, name: str, counter_names: Sequence[str], epoch: int | None = None) -> Counters:
        """Create counters segment `name` holding `counter_names`, all zero (`epoch`: see
        `Segment.create`).

        Raises:
            ValueError: no names, too many, duplicates, or a name that is not short ASCII.
            SegmentError: the segment exists (stale or in use; the message says which).
        """
        check_memory_ordering()
        names = tuple(counter_names)
        _check_names(names)
        payload_bytes = _names_bytes(len(names)) + len(names) * LINE_BYTES
        segment = Segment.create(name, KIND, payload_bytes, capacity=len(names), epoch=epoch)
        for slot, counter in enumerate(names):
            encoded = counter.encode("ascii")
            offset = slot * NAME_BYTES_MAX
            segment.buffer[offset : offset + len(encoded)] = encoded
        return cls(segment, names)

    @classmethod
    def attach(cls, name: str, epoch: int | None = None, stale_ok: bool = False) -> Counters:
        """Attach counters segment `name` after validating its header and name table.

        Args:
            epoch, stale_ok: see `Segment.attach` (expect this epoch; read a dead creator's values).

        Raises:
            SegmentError: missing, foreign, stale, another epoch, wrong version or a corrupt layout.
        """
        check_memory_ordering()
        segment = Segment.attach(name, KIND, epoch=epoch, stale_ok=stale_ok)
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
