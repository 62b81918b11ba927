"""Timers: the one home of the timer schedule, on both sides of the log (sans-I/O).

Theory of operation
-------------------
Timers are state (docs/snapshots-timers-versions.md). An app's `ctx.schedule(timer_id,
deadline_ns)` is decided in the blp, which has no clock; the clock is read only by the sequencer.
So a timer crosses the pipeline twice, and each crossing has its encoding here:

    blp: PendingTimers (in the state)  --TIMER_SCHEDULE / TIMER_CANCEL on egress-->  sequencer
    sequencer: TimerQueue (wall clock) --TIMER_FIRED(timer_id, deadline_ns) record--> blp

- `PendingTimers` is the blp's half: timer_id -> deadline_ns in scheduling order, part of the
  state and of every snapshot. It decides whether a fire counts: only if the timer is still
  scheduled with exactly the fired deadline, so a fire that raced a cancel or a reschedule, or a
  second fire of the same deadline, is ignored the same way on every replica.
- `TimerQueue` is the sequencer's half: a heap keyed by deadline plus each timer's current
  deadline, so a cancel or a reschedule costs O(1) and leaves a stale heap entry that is skipped
  when it surfaces. It is never persisted: after a restart the blp re-emits every pending timer
  (`PendingTimers.rearm`), and a deadline that passed while the node was down is due at once.

Neither half reads a clock: the queue is asked what is due at a `now_ns` its caller passes in.
"""

from __future__ import annotations

import heapq
import struct
from collections.abc import Iterable
from typing import Final, NamedTuple

from sequencer.record import RecordError

__all__ = [
    "TIMER_CANCEL",
    "TIMER_FIRED_PAYLOAD",
    "TIMER_SCHEDULE",
    "PendingTimers",
    "TimerCancel",
    "TimerQueue",
    "TimerSchedule",
    "decode_timer_fired",
    "encode_timer_cancel",
    "encode_timer_fired",
    "encode_timer_schedule",
]

# The egress payloads the blp writes (`sequencer.egress` frames them with their EgressKind) and
# the payload of the TIMER_FIRED record the sequencer writes (docs/contracts.md).
TIMER_SCHEDULE: Final = struct.Struct("<Qq")  # timer_id, deadline_ns
TIMER_CANCEL: Final = struct.Struct("<Q")  # timer_id
TIMER_FIRED_PAYLOAD: Final = struct.Struct("<Qq")  # timer_id, deadline_ns


class TimerSchedule(NamedTuple):
    timer_id: int
    deadline_ns: int


class TimerCancel(NamedTuple):
    timer_id: int


def encode_timer_schedule(timer_id: int, deadline_ns: int) -> bytes:
    return TIMER_SCHEDULE.pack(timer_id, deadline_ns)


def encode_timer_cancel(timer_id: int) -> bytes:
    return TIMER_CANCEL.pack(timer_id)


def encode_timer_fired(timer_id: int, deadline_ns: int) -> bytes:
    """The TIMER_FIRED record payload: `<Qq timer_id, deadline_ns>`."""
    return TIMER_FIRED_PAYLOAD.pack(timer_id, deadline_ns)


def decode_timer_fired(payload: bytes | bytearray | memoryview) -> tuple[int, int]:
    """(timer_id, deadline_ns) of a TIMER_FIRED record payload.

    Raises:
        RecordError: the payload is not exactly 16 bytes.
    """
    if len(payload) != TIMER_FIRED_PAYLOAD.size:
        raise RecordError(
            f"TIMER_FIRED payload of {len(payload)} bytes, expected {TIMER_FIRED_PAYLOAD.size}"
        )
    timer_id, deadline_ns = TIMER_FIRED_PAYLOAD.unpack_from(payload, 0)
    return timer_id, deadline_ns


class PendingTimers:
    """The blp's timers: part of the state, so every replica and every replay agrees.

    Invariant: every entry is pending (scheduled, neither fired nor cancelled), in the order it
    was last scheduled (the order snapshots keep and `rearm` re-emits).
    """

    __slots__ = ("_deadlines",)

    def __init__(self, pending: Iterable[tuple[int, int]] = ()) -> None:
        self._deadlines: dict[int, int] = dict(pending)  # timer_id -> deadline_ns

    def __len__(self) -> int:
        return len(self._deadlines)

    def schedule(self, timer_id: int, deadline_ns: int) -> bytes:
        """Schedule or reschedule; returns the TIMER_SCHEDULE payload to emit.

        A reschedule replaces: the old deadline's fire will not match and is ignored.
        """
        self._deadlines.pop(timer_id, None)  # to the end: scheduling order
        self._deadlines[timer_id] = deadline_ns
        return TIMER_SCHEDULE.pack(timer_id, deadline_ns)

    def cancel(self, timer_id: int) -> bytes | None:
        """Cancel a pending timer; returns the TIMER_CANCEL payload to emit, or None when the
        timer is not pending (never scheduled, fired or cancelled already): nothing to emit."""
        if self._deadlines.pop(timer_id, None) is None:
            return None
        return TIMER_CANCEL.pack(timer_id)

    def fire(self, timer_id: int, deadline_ns: int) -> bool:
        """Whether a TIMER_FIRED for (timer_id, deadline_ns) runs `on_timer`; if so the timer is
        no longer pending. False for a fire that raced a cancel or a reschedule, or a repeat."""
        if self._deadlines.get(timer_id) != deadline_ns:
            return False
        del self._deadlines[timer_id]
        return True

    def rearm(self) -> list[bytes]:
        """A TIMER_SCHEDULE payload per pending timer, in scheduling order: after a restart the
        sequencer's queue is empty and is refilled from these."""
        pack = TIMER_SCHEDULE.pack
        return [pack(timer_id, deadline_ns) for timer_id, deadline_ns in self._deadlines.items()]

    def items(self) -> list[tuple[int, int]]:
        """(timer_id, deadline_ns) per pending timer, in scheduling order (for snapshots)."""
        return list(self._deadlines.items())

    def as_dict(self) -> dict[int, int]:
        return dict(self._deadlines)


class TimerQueue:
    """The sequencer's timer schedule: which timers fall due, and when the next one does.

    Invariants: `_deadlines` holds each pending timer's current deadline; every pending timer has
    an entry `(deadline_ns, timer_id)` in the heap; heap entries that match no current deadline
    (cancelled, rescheduled or fired) are stale and are dropped when they reach the top.
    """

    __slots__ = ("_deadlines", "_heap")

    def __init__(self) -> None:
        self._heap: list[tuple[int, int]] = []  # (deadline_ns, timer_id)
        self._deadlines: dict[int, int] = {}  # timer_id -> current deadline_ns

    def __len__(self) -> int:
        """Timers pending (the `timers.pending` counter)."""
        return len(self._deadlines)

    def schedule(self, timer_id: int, deadline_ns: int) -> None:
        """A TIMER_SCHEDULE from the blp: (re)schedule; an older deadline goes stale."""
        self._deadlines[timer_id] = deadline_ns
        heapq.heappush(self._heap, (deadline_ns, timer_id))

    def cancel(self, timer_id: int) -> None:
        """A TIMER_CANCEL from the blp; cancelling a timer that is not pending is a no-op."""
        self._deadlines.pop(timer_id, None)

    def _drop_stale(self) -> None:
        heap = self._heap
        deadlines = self._deadlines
        while heap and deadlines.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)

    def next_deadline_ns(self) -> int | None:
        """The earliest pending deadline, or None when no timer is pending."""
        self._drop_stale()
        return self._heap[0][0] if self._heap else None

    def next_due(self, now_ns: int) -> TimerSchedule | None:
        """The earliest pending timer whose deadline is at or before `now_ns`, or None.

        It stays pending until `fired()`: the caller sequences its TIMER_FIRED record first, and
        when the log ring is full it asks again later.
        """
        self._drop_stale()
        heap = self._heap
        if not heap or heap[0][0] > now_ns:
            return None
        deadline_ns, timer_id = heap[0]
        return TimerSchedule(timer_id, deadline_ns)

    def fired(self, due: TimerSchedule) -> None:
        """The TIMER_FIRED record of `due` (what `next_due` returned) is sequenced."""
        heap = self._heap
        assert heap and heap[0] == (due.deadline_ns, due.timer_id), (heap[:1], due)
        heapq.heappop(heap)
        del self._deadlines[due.timer_id]
