"""Keeping the state machine deterministic, and proving it.

Two tools:

- Hashes. The blp folds every output it computes (for every session, routed or not) into a
  CRC-32C rolling hash, and hashes the encoded state at each snapshot with BLAKE2b. Both are
  functions of bytes only, so they agree across processes, machines and PYTHONHASHSEEDs: two
  replicas (or a replay) that agree on them computed the same outputs and state. `seqd verify`
  replays the journal in a fresh process with another hash seed and compares; an app that
  iterates a set of strings or reads the clock shows up as the first index where they differ.
- `guard()`, a debug mode: while it is active, reading the clock or a random source through the
  usual module functions raises `NondeterminismError`. The processor wraps every call into the app
  with it when built with `debug=True`. It patches module attributes, so a name imported before
  (`from time import time`) escapes it: it is a tripwire for the common mistakes, not a sandbox.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import random
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import crc32c

__all__ = [
    "STATE_HASH_BYTES",
    "NondeterminismError",
    "first_divergence",
    "guard",
    "rolling_hash_update",
    "state_hash",
]

# 128 bits: a chance collision between two different states is out of the question, and the
# digest fits the snapshot header in 16 bytes.
STATE_HASH_BYTES = 16


def rolling_hash_update(rolling_hash: int, data: bytes) -> int:
    """Folds one output into the rolling hash (CRC-32C, hardware-accelerated, ~1 GB/s+)."""
    return crc32c.crc32c(data, rolling_hash)


def state_hash(body: bytes) -> bytes:
    """The hash of an encoded state (a snapshot body)."""
    return hashlib.blake2b(body, digest_size=STATE_HASH_BYTES).digest()


def first_divergence(
    left: Sequence[tuple[int, int]], right: Sequence[tuple[int, int]]
) -> int | None:
    """Given two runs' (index, rolling_hash) pairs, returns the first index where they differ.

    Returns None when every index present in both runs agrees.
    """
    right_by_index = dict(right)
    for index, value in left:
        other = right_by_index.get(index)
        if other is not None and other != value:
            return index
    return None


class NondeterminismError(Exception):
    """The state machine read the clock or a random source inside apply (debug mode)."""


def _forbidden(name: str) -> Any:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise NondeterminismError(
            f"{name}() called inside the state machine: a replay would see a different value. "
            "Use ctx.now for time; derive anything random from the command (the client "
            "chooses it) or from ctx.index"
        )

    return refuse


class _GuardedDatetime(datetime.datetime):
    now = classmethod(_forbidden("datetime.datetime.now"))  # type: ignore[assignment,var-annotated]
    utcnow = classmethod(_forbidden("datetime.datetime.utcnow"))  # type: ignore[assignment,var-annotated]
    today = classmethod(_forbidden("datetime.datetime.today"))  # type: ignore[assignment,var-annotated]


class _GuardedDate(datetime.date):
    today = classmethod(_forbidden("datetime.date.today"))  # type: ignore[assignment,var-annotated]


_RANDOM_FUNCTIONS = (
    "random", "randint", "randrange", "randbytes", "choice", "choices", "shuffle", "sample",
    "uniform", "gauss", "normalvariate", "getrandbits", "triangular", "betavariate",
    "expovariate", "seed",
)  # fmt: skip

_PATCHES: list[tuple[Any, str, Any]] = [
    *[(time, name, _forbidden(f"time.{name}")) for name in (
        "time", "time_ns", "monotonic", "monotonic_ns", "perf_counter", "perf_counter_ns",
        "process_time", "process_time_ns", "clock_gettime", "clock_gettime_ns",
    )],
    *[(random, name, _forbidden(f"random.{name}")) for name in _RANDOM_FUNCTIONS],
    (os, "urandom", _forbidden("os.urandom")),
    (os, "getrandom", _forbidden("os.getrandom")),
    (uuid, "uuid1", _forbidden("uuid.uuid1")),
    (uuid, "uuid4", _forbidden("uuid.uuid4")),
    (datetime, "datetime", _GuardedDatetime),
    (datetime, "date", _GuardedDate),
]  # fmt: skip

_depth = 0
_saved: list[tuple[Any, str, Any]] = []


@contextmanager
def guard() -> Iterator[None]:
    """Makes the clock, `random`, `os.urandom`, `uuid.uuid1/4` and `datetime.now` raise.

    Re-entrant; restores every patched attribute on exit, even when the body raises.
    """
    global _depth
    if _depth == 0:
        _saved.clear()
        for module, name, replacement in _PATCHES:
            original = getattr(module, name, None)
            if original is None:
                continue
            _saved.append((module, name, original))
            setattr(module, name, replacement)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            for module, name, original in _saved:
                setattr(module, name, original)
            _saved.clear()
