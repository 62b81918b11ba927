"""Errors counted every time, logged once per kind with a repeat count.

A node under a misbehaving client can hit the same error thousands of times a second: a line per
occurrence would flood the journal, cost more than the error, and hide every other message. So,
as Agrona's `DistinctErrorLog` does, each distinct error (a key the caller chooses, or the type
and raising line of an exception) is logged in full the first time; repeats are only counted,
and at most once per window a summary says how many more there were. Every occurrence is also
added to a shared-memory counter, so `seqd status` and the metrics endpoint see the true rate
however little is logged.

The clock is an argument (`now_s`), read once by the caller's duty cycle, so a test drives time
by hand. Not thread-safe: one log per role process, used from its one loop.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "DISTINCT_KEYS_MAX",
    "OVERFLOW_KEY",
    "SUMMARY_WINDOW_S",
    "DistinctErrorLog",
    "ErrorObservation",
    "exception_key",
]

# A summary of repeats at most once a minute per key: a persistent fault costs one log line a
# minute, and a reader still sees that it goes on.
SUMMARY_WINDOW_S = 60.0
# Distinct keys remembered. Keys name code paths, not data, so a node has tens; a caller that
# puts data in its keys (a client id, a path) would grow the table without bound, so past this
# every new key is counted under OVERFLOW_KEY.
DISTINCT_KEYS_MAX = 1024
OVERFLOW_KEY = "errorlog.overflow"


@dataclass
class ErrorObservation:
    """What is known about one distinct error."""

    key: str
    first_s: float
    last_logged_s: float
    total: int = 1
    unlogged: int = 0  # occurrences since the last line logged for this key
    last_message: str = ""


class DistinctErrorLog:
    """Counts every error; logs the first of each key, then a summary of repeats per window."""

    def __init__(
        self,
        logger: logging.Logger,
        counter_add: Callable[[int], object] | None = None,
        window_s: float = SUMMARY_WINDOW_S,
        keys_max: int = DISTINCT_KEYS_MAX,
        level: int = logging.ERROR,
    ) -> None:
        """Args:
        logger: where lines go.
        counter_add: adds to a shared-memory error counter, e.g. `counters[ERRORS_PROTOCOL].add`;
            called with 1 on every occurrence.
        window_s: the shortest time between two lines for one key.
        keys_max: distinct keys remembered before new ones are pooled under OVERFLOW_KEY.
        level: the logging level of every line.
        """
        assert window_s >= 0, window_s
        assert keys_max >= 1, keys_max
        self._logger = logger
        self._counter_add = counter_add
        self.window_s = window_s
        self.keys_max = keys_max
        self.level = level
        self._observations: dict[str, ErrorObservation] = {}
        self.total = 0

    def record(
        self,
        key: str,
        message: str,
        now_s: float,
        counter_add: Callable[[int], object] | None = None,
    ) -> bool:
        """Count one occurrence of error `key`; log it if it is the first, or summarise repeats
        if the window since the last line for this key has passed.

        Args:
            key: names the kind of error (a code path, never per-occurrence data).
            message: says what happened and what to do; the first one of a key is logged whole.
            now_s: the caller's clock, in seconds (monotonic).
            counter_add: a counter for this call instead of the one given at construction.

        Returns:
            True if a line was logged.
        """
        self.total += 1
        add = counter_add if counter_add is not None else self._counter_add
        if add is not None:
            add(1)
        observation = self._observations.get(key)
        if observation is None and len(self._observations) >= self.keys_max:
            message = (
                f"more than {self.keys_max} distinct error keys; new ones are counted here "
                f"(the latest: {key}: {message}). Error keys should name code paths, not data."
            )
            key = OVERFLOW_KEY
            observation = self._observations.get(key)
        if observation is None:
            self._observations[key] = ErrorObservation(
                key=key, first_s=now_s, last_logged_s=now_s, last_message=message
            )
            self._logger.log(self.level, "%s: %s", key, message)
            return True
        observation.total += 1
        observation.unlogged += 1
        observation.last_message = message
        if now_s - observation.last_logged_s >= self.window_s:
            self._log_summary(observation, now_s)
            return True
        return False

    def record_exception(
        self,
        error: BaseException,
        now_s: float,
        counter_add: Callable[[int], object] | None = None,
    ) -> bool:
        """`record` keyed by the exception's type and the line that raised it; the first one of
        a key is logged with its traceback."""
        key = exception_key(error)
        first = key not in self._observations
        message = str(error) or type(error).__name__
        if first and len(self._observations) < self.keys_max:
            message += "\n" + "".join(traceback.format_exception(error)).rstrip()
        return self.record(key, message, now_s, counter_add=counter_add)

    def flush(self, now_s: float, force: bool = False) -> int:
        """Log the summary of every key with unlogged repeats whose window has passed (all of
        them with `force`, e.g. at shutdown). Call it from the duty cycle now and then, so a
        burst that stopped is still reported. Returns the number of lines logged."""
        lines = 0
        for observation in self._observations.values():
            if observation.unlogged == 0:
                continue
            if force or now_s - observation.last_logged_s >= self.window_s:
                self._log_summary(observation, now_s)
                lines += 1
        return lines

    def observation(self, key: str) -> ErrorObservation | None:
        return self._observations.get(key)

    def counts(self) -> dict[str, int]:
        """Total occurrences per key."""
        return {key: observation.total for key, observation in self._observations.items()}

    def _log_summary(self, observation: ErrorObservation, now_s: float) -> None:
        assert observation.unlogged > 0, observation
        self._logger.log(
            self.level,
            "%d more of %s in the last %.0f s (%d since the first, %.0f s ago); latest: %s",
            observation.unlogged,
            observation.key,
            now_s - observation.last_logged_s,
            observation.total,
            now_s - observation.first_s,
            observation.last_message,
        )
        observation.unlogged = 0
        observation.last_logged_s = now_s


def exception_key(error: BaseException) -> str:
    """The exception's type and the place that raised it: the same bug gives the same key,
    whatever the message's data."""
    name = f"{type(error).__module__}.{type(error).__qualname__}"
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return name
    innermost = frames[-1]
    return f"{name}@{innermost.filename}:{innermost.lineno}"
