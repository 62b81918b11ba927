"""Fault-injection hooks for the nemesis (`python -m tests.nemesis`), driven by environment
variables, inert unless set (like `SEQD_FAULT_DISK_BYTES` in `sequencer.journal.space`).

Each variable names a file that the test process writes while the node runs, so a fault is
switched on and off at run time without talking to the node; while the file is absent (or holds
0) the node behaves normally.

    SEQD_FAULT_FSYNC_DELAY=PATH    the journaller sleeps PATH's milliseconds before every
                                   fdatasync (a slow disk: every acknowledgement waits for it)
    SEQD_FAULT_CLOCK_OFFSET=PATH   the sequencer's and replicator's wall clock is off by PATH's
                                   milliseconds (negative: jumped backwards); log timestamps must
                                   still never go back (`sequencer.cluster.stamper`), nor the
                                   start ids a start takes (the supervisor's and the replicator's
                                   clocks, daemon/incarnation.py)
    SEQD_FAULT_SYNCED_INDEX=PATH   the journaller writes its durable index to PATH after each
                                   fdatasync and before it publishes it, so a test can cut the
                                   power: kill -9 the node, then drop the journal after that
                                   index (what a lost page cache drops); see `synced_index`
    SEQD_FAULT_LOSE_ADMIN_FORWARDS=PATH  while PATH holds 1, a follower's replicator loses every
                                   ADMIN record it forwards (its node_start) as a lost frame
                                   would: it stays pending and goes again with the next resend
    SEQD_FAULT_DROP_COMMAND_FORWARD=PATH  a follower's replicator drops the N-th COMMAND record
                                   it forwards (N: what PATH holds when the role starts; 0 or
                                   absent: none) as its peer transport drops one on a full
                                   socket, while the records after it go on; it writes N to
                                   PATH.lost when it does (`command_forward_dropper`)
    SEQD_FAULT_REFUSE_COMMAND_FORWARDS=PATH  the leader's replicator refuses the N-th batch of
                                   forwarded records holding a COMMAND that it receives, as a
                                   full inbox does; it writes N to PATH.lost when it does
    SEQD_FAULT_MALFORM_COMMAND_PROPOSAL=PATH  the replicator gives the N-th COMMAND record it
                                   takes from its proposal ring the type TERM_START, as memory
                                   corruption would; it writes N to PATH.lost when it does, and
                                   once that file exists no later start of the role does again
    SEQD_FAULT_SNAPSHOT_HOLD=PATH  while PATH holds 1, the snapshotter stops before the rename
                                   of each snapshot it writes (its temp file whole) and writes the
                                   index to PATH.held, so a test can kill -9 it mid-write

A hook re-reads its file at most every HOOK_REREAD_S, so a fault takes effect within that.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

__all__ = [
    "FAULT_CLOCK_OFFSET_ENV",
    "FAULT_DROP_COMMAND_FORWARD_ENV",
    "FAULT_FSYNC_DELAY_ENV",
    "FAULT_LOSE_ADMIN_FORWARDS_ENV",
    "FAULT_MALFORM_COMMAND_PROPOSAL_ENV",
    "FAULT_REFUSE_COMMAND_FORWARDS_ENV",
    "FAULT_SNAPSHOT_HOLD_ENV",
    "FAULT_SYNCED_INDEX_ENV",
    "SyncedIndexFile",
    "command_forward_dropper",
    "install_fsync_delay",
    "lose_admin_forwards",
    "snapshot_hold",
    "synced_index",
    "wall_clock_ns",
]

FAULT_FSYNC_DELAY_ENV: Final = "SEQD_FAULT_FSYNC_DELAY"
FAULT_CLOCK_OFFSET_ENV: Final = "SEQD_FAULT_CLOCK_OFFSET"
FAULT_SYNCED_INDEX_ENV: Final = "SEQD_FAULT_SYNCED_INDEX"
FAULT_SNAPSHOT_HOLD_ENV: Final = "SEQD_FAULT_SNAPSHOT_HOLD"
FAULT_LOSE_ADMIN_FORWARDS_ENV: Final = "SEQD_FAULT_LOSE_ADMIN_FORWARDS"
FAULT_DROP_COMMAND_FORWARD_ENV: Final = "SEQD_FAULT_DROP_COMMAND_FORWARD"
FAULT_REFUSE_COMMAND_FORWARDS_ENV: Final = "SEQD_FAULT_REFUSE_COMMAND_FORWARDS"
FAULT_MALFORM_COMMAND_PROPOSAL_ENV: Final = "SEQD_FAULT_MALFORM_COMMAND_PROPOSAL"
# How stale a hook's view of its file may be: faults last seconds, so 50 ms is immediate enough,
# and at most 20 small reads a second cost nothing next to the work they slow down.
HOOK_REREAD_S: Final = 0.05
# A delay longer than this is a typo in a test (no fault waits a minute per fdatasync).
FSYNC_DELAY_MS_MAX: Final = 60_000
_INDEX_WIDTH: Final = 20  # digits of a u64: the synced index is rewritten in place, fixed width


class _FileValue:
    """An integer read from a file, re-read at most every HOOK_REREAD_S; 0 while absent."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.value = 0
        self.read_at_s = -HOOK_REREAD_S

    def get(self) -> int:
        now_s = time.monotonic()
        if now_s - self.read_at_s >= HOOK_REREAD_S:
            self.read_at_s = now_s
            try:
                self.value = int(self.path.read_text().strip() or 0)
            except FileNotFoundError:
                self.value = 0
            except ValueError:
                pass  # caught mid-write: keep the last value, read again next time
        return self.value


def install_fsync_delay() -> None:
    """With SEQD_FAULT_FSYNC_DELAY set, wrap `os.fdatasync` in this process (the journaller)."""
    setting = os.environ.get(FAULT_FSYNC_DELAY_ENV)
    if not setting:
        return
    delay = _FileValue(Path(setting))
    real = os.fdatasync

    def slow(fd: int) -> None:
        delay_ms = min(delay.get(), FSYNC_DELAY_MS_MAX)
        if delay_ms > 0:
            time.sleep(delay_ms / 1000)
        real(fd)

    os.fdatasync = slow  # type: ignore[assignment]


def snapshot_hold() -> Callable[[int], None] | None:
    """With SEQD_FAULT_SNAPSHOT_HOLD set, what the snapshotter calls before each rename
    (`hold(index)`): while the file holds 1, say so in PATH.held and wait (for a kill -9)."""
    setting = os.environ.get(FAULT_SNAPSHOT_HOLD_ENV)
    if not setting:
        return None
    hold = _FileValue(Path(setting))

    def held(index: int) -> None:
        if hold.get() == 1:
            Path(setting + ".held").write_text(str(index))
            while hold.get() == 1:
                time.sleep(HOOK_REREAD_S)

    return held


def lose_admin_forwards() -> Callable[[], bool] | None:
    """With SEQD_FAULT_LOSE_ADMIN_FORWARDS set, whether the replicator loses the ADMIN records it
    forwards now (the file holds 1)."""
    setting = os.environ.get(FAULT_LOSE_ADMIN_FORWARDS_ENV)
    if not setting:
        return None
    lose = _FileValue(Path(setting))
    return lambda: lose.get() == 1


def command_forward_dropper(
    variable: str = FAULT_DROP_COMMAND_FORWARD_ENV, once: bool = False
) -> Callable[[], bool] | None:
    """With SEQD_FAULT_DROP_COMMAND_FORWARD set, what the replicator calls for each COMMAND record
    it forwards: True for the N-th (PATH's number, read once now), which it then drops; None
    when unset or 0. With `variable` SEQD_FAULT_REFUSE_COMMAND_FORWARDS, the same for each batch
    holding a COMMAND that it receives forwarded (the N-th refused); with
    SEQD_FAULT_MALFORM_COMMAND_PROPOSAL, for each COMMAND it takes from its proposal ring (the
    N-th made malformed). `once`: None as well when PATH.lost exists (a start before this one did it)."""
    setting = os.environ.get(variable)
    if not setting or (once and Path(setting + ".lost").exists()):
        return None
    nth = _FileValue(Path(setting)).get()
    if nth <= 0:
        return None
    seen = 0

    def drop() -> bool:
        nonlocal seen
        seen += 1
        if seen != nth:
            return False
        Path(setting + ".lost").write_text(str(nth))
        return True

    return drop


def _clock() -> Callable[[], int]:
    setting = os.environ.get(FAULT_CLOCK_OFFSET_ENV)
    if not setting:
        return time.time_ns
    offset = _FileValue(Path(setting))

    def shifted() -> int:
        return time.time_ns() + offset.get() * 1_000_000

    return shifted


# The wall clock of the roles that stamp records: `time.time_ns` itself unless the hook is set
# (decided once, at import: a role's environment does not change while it runs).
wall_clock_ns: Callable[[], int] = _clock()


class SyncedIndexFile:
    """The journaller's side of SEQD_FAULT_SYNCED_INDEX: `write(index)` after each fdatasync."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)

    @classmethod
    def from_environment(cls) -> SyncedIndexFile | None:
        setting = os.environ.get(FAULT_SYNCED_INDEX_ENV)
        return cls(Path(setting)) if setting else None

    def write(self, index: int) -> None:
        os.pwrite(self.fd, str(index).rjust(_INDEX_WIDTH).encode(), 0)


def synced_index(path: Path) -> int | None:
    """What a journaller wrote to its SEQD_FAULT_SYNCED_INDEX file (None: nothing yet)."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text else None
