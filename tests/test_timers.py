"""Both halves of the timer schedule (`sequencer.timers`), without a processor or a sequencer."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sequencer.record import RecordError
from sequencer.timers import (
    TIMER_SCHEDULE,
    PendingTimers,
    TimerQueue,
    TimerSchedule,
    decode_timer_fired,
    encode_timer_fired,
)


def test_timer_fired_round_trips_and_rejects_a_wrong_size():
    assert decode_timer_fired(encode_timer_fired(3, -9)) == (3, -9)
    with pytest.raises(RecordError, match="expected 16"):
        decode_timer_fired(b"\0" * 15)


# -- the blp's half --------------------------------------------------------------------------


def test_a_fire_runs_only_for_the_deadline_still_scheduled():
    timers = PendingTimers()
    timers.schedule(1, 100)
    timers.schedule(1, 200)  # a reschedule replaces
    assert not timers.fire(1, 100)  # the old deadline's fire is stale
    assert timers.fire(1, 200)
    assert not timers.fire(1, 200)  # a second fire of the same deadline is ignored
    assert len(timers) == 0


def test_cancel_emits_only_for_a_pending_timer():
    timers = PendingTimers()
    assert timers.cancel(5) is None  # never scheduled
    timers.schedule(5, 10)
    assert timers.cancel(5) is not None
    timers.schedule(6, 10)
    assert timers.fire(6, 10)
    assert timers.cancel(6) is None  # cancel after the fire: nothing to emit


def test_rearm_and_snapshot_keep_the_scheduling_order():
    timers = PendingTimers()
    timers.schedule(3, 30)
    timers.schedule(1, 10)
    timers.schedule(3, 31)  # rescheduled: moves to the end
    assert timers.items() == [(1, 10), (3, 31)]
    assert [TIMER_SCHEDULE.unpack(frame) for frame in timers.rearm()] == [(1, 10), (3, 31)]
    assert PendingTimers(timers.items()).as_dict() == {1: 10, 3: 31}


# -- the sequencer's half ----------------------------------------------------------------------


def _drain(queue: TimerQueue, now_ns: int) -> list[TimerSchedule]:
    fired = []
    while (due := queue.next_due(now_ns)) is not None:
        queue.fired(due)
        fired.append(due)
    return fired


def test_due_timers_come_in_deadline_order_and_stale_entries_never_fire():
    queue = TimerQueue()
    queue.schedule(1, 300)
    queue.schedule(2, 100)
    queue.schedule(3, 200)
    queue.schedule(4, 150)
    queue.cancel(3)
    queue.schedule(4, 250)  # the entry at 150 goes stale
    assert queue.next_deadline_ns() == 100
    assert _drain(queue, 260) == [TimerSchedule(2, 100), TimerSchedule(4, 250)]
    assert len(queue) == 1
    assert queue.next_deadline_ns() == 300
    assert _drain(queue, 299) == []
    assert _drain(queue, 300) == [TimerSchedule(1, 300)]
    assert queue.next_deadline_ns() is None


def test_a_due_timer_stays_pending_until_its_fire_is_sequenced():
    queue = TimerQueue()
    queue.schedule(7, 10)
    assert queue.next_due(10) == TimerSchedule(7, 10)
    assert queue.next_due(10) == TimerSchedule(7, 10)  # the ring was full: asked again
    assert len(queue) == 1
    queue.fired(TimerSchedule(7, 10))
    assert queue.next_due(10) is None


_operations = st.lists(
    st.tuples(st.booleans(), st.integers(0, 5), st.integers(0, 50)), max_size=40
)


@given(_operations, st.integers(0, 60))
def test_queue_fires_exactly_the_current_deadlines_due_in_order(operations, now_ns):
    """Against a dumb oracle: a dict of current deadlines, sorted."""
    queue = TimerQueue()
    oracle: dict[int, int] = {}
    for schedule, timer_id, deadline_ns in operations:
        if schedule:
            queue.schedule(timer_id, deadline_ns)
            oracle[timer_id] = deadline_ns
        else:
            queue.cancel(timer_id)
            oracle.pop(timer_id, None)
    expected = sorted((deadline, timer_id) for timer_id, deadline in oracle.items() if deadline <= now_ns)
    assert [(due.deadline_ns, due.timer_id) for due in _drain(queue, now_ns)] == expected
    assert len(queue) == len(oracle) - len(expected)
