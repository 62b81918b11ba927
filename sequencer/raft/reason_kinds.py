"""Log a repeated reason once per kind, with the count, however its numbers change.

A reason a peer sends (why it refused this node's forwarded records) is a sentence that embeds
numbers that change from one refusal to the next: a term, a leader, an inbox's fill. A throttle
keyed on the exact text logs every refusal of a storm (a leader stepping down under load, an inbox
full at every resend); one keyed on the last reason logs every one of two alternating reasons. So
a reason's kind is its text with every run of digits masked, and each kind is logged the first
time, then at every power of two of its own count (Agrona's `DistinctErrorLog` logs each distinct
error once with a count; daemon/errorlog.py does it with a summary per time window, and lives in
the daemon, which this package may not import): N refusals of k kinds in one episode (no kind
quiet for QUIET_S) cost at most k * (log2(N) + 1) lines, and every one is still counted. A kind
unseen for QUIET_S starts over, so a later storm of it is logged again (else a storm of 600 left
the next one silent until its 1024th).
"""

from __future__ import annotations

import re

__all__ = ["QUIET_S", "REASON_KINDS_MAX", "ReasonKinds", "reason_kind"]

# Kinds remembered. Our own reasons have a handful of kinds (daemon/roles/replicator_setup.py's
# `forwarded_refusal`: malformed, a test hook, not leading, inbox full); a peer of another build
# may send others, and one that puts non-digit data in its reasons must not grow the table without
# bound: past this, new kinds share one count (OVERFLOW_KIND).
REASON_KINDS_MAX = 32
OVERFLOW_KIND = "(other reasons)"
# A kind not seen for this long is a new episode: its count starts over (its first is logged). A
# refusal storm lasts as long as a leader change or a full inbox, seconds; a minute apart is news.
QUIET_S = 60.0

_DIGITS = re.compile(r"\d+")


def reason_kind(reason: str) -> str:
    """`reason` with each run of digits masked: "term 7, leader 2" and "term 8, leader 3" are
    one kind."""
    return _DIGITS.sub("#", reason)


class ReasonKinds:
    """Counts reasons by kind and says which to log."""

    __slots__ = ("_counts", "kinds_max")

    def __init__(self, kinds_max: int = REASON_KINDS_MAX) -> None:
        assert kinds_max >= 1, kinds_max
        self.kinds_max = kinds_max
        self._counts: dict[str, tuple[int, float]] = {}  # kind -> (count, last seen, seconds)

    def count(self, reason: str, now_s: float) -> int:
        """Count `reason` under its kind at `now_s` (any monotonic clock, in seconds).

        Returns:
            The kind's count if this one is to be logged (its first, then at every power of
            two), else 0.
        """
        counts = self._counts
        kind = reason_kind(reason)
        if kind not in counts and len(counts) >= self.kinds_max:
            kind = OVERFLOW_KIND
        count, seen_s = counts.get(kind, (0, now_s))
        count = 1 if now_s - seen_s >= QUIET_S else count + 1
        counts[kind] = (count, now_s)
        return count if count & (count - 1) == 0 else 0
