"""ReconnectBackoff: how long a peer transport's dialler waits before it dials again.

Sans-I/O: the random source is passed in, and the caller does the waiting.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["ReconnectBackoff"]


class _Uniform(Protocol):
    """What ReconnectBackoff needs of a random source (random.Random has it)."""

    def uniform(self, a: float, b: float) -> float: ...


class ReconnectBackoff:
    """Delays between a dialler's attempts: doubling from `first_ms` to `max_ms`, with jitter.

    Each delay is drawn from [base/2, base] ("equal jitter"), so nodes that lost a peer at the same
    moment do not redial in lockstep, and never waits less than half the base. `reset()` after a
    connection authenticates. The random source is passed in (a seeded one in tests).
    """

    __slots__ = ("_base_ms", "_first_ms", "_max_ms", "_random")

    def __init__(self, first_ms: float, max_ms: float, random_source: _Uniform) -> None:
        if not 0 < first_ms <= max_ms:
            raise ValueError(f"need 0 < first_ms={first_ms} <= max_ms={max_ms}")
        self._first_ms = first_ms
        self._max_ms = max_ms
        self._base_ms = first_ms
        self._random = random_source

    def next_delay_ms(self) -> float:
        base = self._base_ms
        self._base_ms = min(base * 2, self._max_ms)
        delay = self._random.uniform(base / 2, base)
        assert delay <= self._max_ms, (delay, self._max_ms)
        return delay

    def reset(self) -> None:
        self._base_ms = self._first_ms
