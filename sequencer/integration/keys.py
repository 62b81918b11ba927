"""Idempotency keys and timer ids of integration requests: the state machine's half (no I/O).

A state machine that asks an external system for an action publishes an *integration request*:
an event with a `key` field, the **log index of the record that first asked** for the action.
The key is unique (no two records share an index), the same on every replica and every replay,
and known to the state machine without any counter of its own (`ctx.index`). A retry re-publishes
the request with the same key, so the external system, which deduplicates on it, performs the
action once however many times it is asked; a retry under a new key would pay twice whenever the
first call was merely slow.

Each pending request has a timer that tracks its answer. Timer ids are one namespace per state
machine, so requests take the upper half: `request_timer_id(key)` sets the top bit of the u64,
and an app built on the ledger keeps its own timer ids (reservation ids) below it.
"""

from __future__ import annotations

__all__ = ["KEY_MAX", "REQUEST_TIMER_BIT", "request_key_of_timer", "request_timer_id"]

REQUEST_TIMER_BIT = 1 << 63  # timer ids at or above this are integration requests' timers
KEY_MAX = REQUEST_TIMER_BIT - 1  # a log index below 2^63: far more than any log holds


def request_timer_id(key: int) -> int:
    """The timer id that tracks the answer to the request with idempotency key `key`."""
    assert 1 <= key <= KEY_MAX, key
    return REQUEST_TIMER_BIT | key


def request_key_of_timer(timer_id: int) -> int | None:
    """The request key a timer id tracks, or None for a timer that is not a request's."""
    if timer_id & REQUEST_TIMER_BIT:
        return timer_id & KEY_MAX
    return None
