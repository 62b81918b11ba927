"""A doorbell an event loop can poll: a named FIFO, for a reader that lives in an asyncio loop.

Why: the semaphore doorbell (`ipc.doorbell`) is waited on by a blocking `sem_timedwait`, which an
event loop cannot do, so a reader in a loop (the sequencer, egress's reader; the replicator, the
proposal ring's) used to park a *waker thread* on it that handed each wake to the loop through `call_soon_threadsafe`. That
costs a thread hand-off per wake (the GIL taken back from the busy loop thread after the
semaphore wait and after the hand-off wait: ~7 futex calls, 1.1-1.4 us of the sequencer's CPU per
command, issue 13) and adds two thread switches to every reply's latency. A FIFO is a file
descriptor the loop watches itself (`loop.add_reader`), so the blp's ring wakes the loop directly.

Why a named FIFO and not an eventfd: an eventfd can only be inherited or passed over a Unix
socket, and seqd's processes attach to each other by name, unrelated to each other (a restarted
role, a bench or test that builds rings without a supervisor). A FIFO is nameable like the
segment and the semaphores: it lives beside them in /dev/shm, as `<ring name>.<reader>.fifo`,
mode 0600, created with the ring (`Ring.create(pollable=...)`), removed with it (`Ring.unlink`,
`ipc.segment.remove_stale`), and any process of the node's user opens it by name. Both sides open
it `O_RDWR | O_NONBLOCK` (Linux defines `O_RDWR` on a FIFO): an open never waits for the other
side, a ring never fails with `EPIPE`/`SIGPIPE` because the reader is gone (a restarting
sequencer), and a read never blocks.

Ring and wait (the `posix_ipc.Semaphore` interface `ipc.doorbell.Doorbell` calls):
- `release()` (the ring, R4 of the park/wake protocol) writes one byte. A full pipe
  (`EAGAIN`: 64 KiB of rings nobody read, e.g. while the reader restarts) drops it, and nothing
  is lost: the protocol needs a *pending* wake after the ring, not a count of them, and a full
  pipe is one (the argument in `ipc.doorbell` only uses "a post makes the next wait return").
- `acquire(timeout_s)` waits until readable (`poll`), then reads every pending byte at once: the
  wait and the drain in one, since the bytes carry nothing but "rung". The reader polls its ring
  after it, so it sees the work of every ring it swallowed (each byte is written after its R1).
- `fileno()`: for `loop.add_reader`; `LoopWaiter` below is the loop's side of the protocol.
"""

from __future__ import annotations

import errno
import os
import select
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import posix_ipc

__all__ = ["FIFO_SUFFIX", "LOOP_TIMEOUT_MS_DEFAULT", "READ_BYTES_MAX", "FifoBell", "LoopWaiter", "fifo_path"]

FIFO_SUFFIX = ".fifo"
SHM_DIRECTORY = Path("/dev/shm")
# One read swallows this many pending rings: a pipe holds 64 KiB by default, so one read usually
# empties it; what is left keeps the descriptor readable and is read on the next wake.
READ_BYTES_MAX = 1 << 16
_RING = b"\x01"
_OPEN_FLAGS = os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW


def fifo_path(name: str) -> Path:
    """Where the FIFO doorbell `name` (a POSIX-style name, `/seqd.<node>.<ring>.<reader>`) lives."""
    assert name.startswith("/") and "/" not in name[1:], name
    return SHM_DIRECTORY / f"{name[1:]}{FIFO_SUFFIX}"


class FifoBell:
    """One named FIFO, opened read-write and non-blocking; the semaphore interface of a doorbell."""

    def __init__(self, name: str, fd: int) -> None:
        self.name = name
        self._fd = fd
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)
        self._write = os.write
        self._read = os.read

    @classmethod
    def create(cls, name: str) -> FifoBell:
        """Create the FIFO `name` (mode 0600), or reuse one left by a crashed creator."""
        path = fifo_path(name)
        try:
            os.mkfifo(path, 0o600)
        except FileExistsError:
            pass  # left by a creator that died: `open` checks it is ours and a FIFO
        bell = cls.open(name)
        bell.drain()
        return bell

    @classmethod
    def open(cls, name: str) -> FifoBell:
        """Open the existing FIFO `name`.

        Raises:
            FileNotFoundError: no such doorbell; its creator has not run yet.
            PermissionError: the path is not a FIFO of this user (then it is not seqd's).
        """
        path = fifo_path(name)
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"doorbell {path} does not exist; start the process that creates it first"
            ) from None
        except OSError as error:
            if error.errno != errno.ELOOP:
                raise
            raise PermissionError(f"{path} is a symbolic link, not a seqd doorbell; remove it") from None
        info = os.fstat(fd)
        if not stat.S_ISFIFO(info.st_mode) or info.st_uid != os.getuid():
            os.close(fd)
            raise PermissionError(
                f"{path} is not a FIFO owned by uid {os.getuid()} (mode {stat.filemode(info.st_mode)}, "
                f"uid {info.st_uid}): not a seqd doorbell of this user. Remove it if it is garbage."
            )
        return cls(name, fd)

    def fileno(self) -> int:
        return self._fd

    def release(self) -> None:
        """Ring: one byte; a full pipe already holds a pending wake (module docstring)."""
        try:
            self._write(self._fd, _RING)
        except BlockingIOError:
            pass

    def acquire(self, timeout_s: float) -> None:
        """Wait until rung or `timeout_s` passes, then swallow every pending ring.

        Raises:
            posix_ipc.BusyError: the timeout passed with no ring (the semaphore's convention).
            posix_ipc.SignalError: a signal interrupted the wait.
        """
        if timeout_s > 0:
            try:
                if not self._poll.poll(timeout_s * 1000.0):
                    raise posix_ipc.BusyError("no ring")
            except InterruptedError:
                raise posix_ipc.SignalError("interrupted") from None
        if not self.drain():
            raise posix_ipc.BusyError("no ring")

    @property
    def value(self) -> int:
        """Rings pending after `acquire` (always 0: it swallows them all), for `Doorbell.drain`."""
        return 0

    def drain(self) -> int:
        """Swallow pending rings without blocking; returns how many bytes were read."""
        try:
            return len(self._read(self._fd, READ_BYTES_MAX))
        except BlockingIOError:
            return 0

    def close(self) -> None:
        """Close this process's descriptor; the FIFO stays for others. Idempotent."""
        if self._fd >= 0:
            self._poll.unregister(self._fd)
            os.close(self._fd)
            self._fd = -1


def unlink_fifo(name: str) -> None:
    """Remove the FIFO doorbell `name`. Idempotent."""
    fifo_path(name).unlink(missing_ok=True)


# As a blocking wait's timeout (`ipc.idle.BLOCKING_TIMEOUT_MS_DEFAULT`): no ring is missed, so
# this only bounds what a ringer that died or stalled between its publish and its ring costs;
# 100 timer wakes a second when idle is nothing.
LOOP_TIMEOUT_MS_DEFAULT = 10.0


class _Loop(Protocol):
    def add_reader(self, fd: int, callback: Callable[..., Any], *args: Any) -> None: ...
    def remove_reader(self, fd: int) -> bool: ...
    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> Any: ...


class _Bell(Protocol):
    def park(self) -> None: ...
    def unpark(self) -> None: ...
    def ready(self) -> bool: ...
    def fileno(self) -> int: ...
    def drain(self) -> int: ...


class LoopWaiter:
    """The park/wake protocol for a reader in an event loop: armed once, woken by the loop.

    A thread parks just before it blocks and unparks when it wakes (`ipc.idle`). An event loop
    cannot: it does not say when it is about to sleep in `epoll_wait`, so a reader in it cannot
    set its flag at that moment. So the reader parks once, when it starts (P1 store the flag, P2
    the fence, P3 re-check: `Doorbell.park` and `ready`), and stays parked while it is attached:
    the wait (P4) is the loop's own, on the FIFO's descriptor, and there is no P5 until `stop`.
    The writer's side is unchanged (R1 store the cursor, R2 fence, R3 load the flag, R4 ring),
    and R3 always loads 1 once P1 is visible, so every publish after that rings, and a publish
    that R3 saw before it is seen by P3 (`ipc.doorbell`'s argument, once). Each ring leaves the
    descriptor readable until the reader reads it (`FifoBell.release`), and the reader reads it
    before it polls the ring (`_on_readable`), so a ring that lands during a poll wakes the loop
    once more: no publish is missed.

    The price of never unparking is a ring on every publish, a `write(2)` by the writer even while
    the reader is busy (~0.5 us of CPU, once per blp cycle, not per record); unparking while busy
    would cost a fence (a membarrier, ~1.5 us) at every re-park instead, and the loop would still
    have to re-park before every sleep it cannot see coming.

    The safety net of a blocking wait's timeout (`ipc.idle`), kept: every `timeout_ms` the waiter
    looks at the ring itself, so a ringer that died or stalled between its publish and its ring
    costs at most that; `timeouts_with_work` counts the looks that found work waiting, each one a
    ring that never came (zero unless a ringer died or stalled: the stress test checks it).

    Args:
        loop: the event loop (`add_reader`/`remove_reader`/`call_later`).
        doorbell: the reader's doorbell, bound to its parked flag and its `ready`, on a FIFO.
        on_ready: called in the loop when work may be waiting: it must poll the ring.
        timeout_ms: how often the waiter looks without a ring (0: never, for tests of the ring).
    """

    def __init__(
        self, loop: _Loop, doorbell: _Bell, on_ready: Callable[[], None], timeout_ms: float = LOOP_TIMEOUT_MS_DEFAULT
    ) -> None:
        assert timeout_ms >= 0, timeout_ms
        self.loop = loop
        self.doorbell = doorbell
        self.on_ready = on_ready
        self.timeout_s = timeout_ms / 1000
        self.fd = doorbell.fileno()
        self.wakes = 0
        self.timeouts = 0
        self.timeouts_with_work = 0
        self.started = False
        self._rung = False  # a wake since the last timeout
        self._timer: Any = None

    def start(self) -> None:
        """Park (flag, fence), watch the descriptor, then re-check for work published before."""
        doorbell = self.doorbell
        doorbell.park()
        self.loop.add_reader(self.fd, self._on_readable)
        self.started = True
        if self.timeout_s:
            self._timer = self.loop.call_later(self.timeout_s, self._on_timeout)
        if doorbell.ready():
            self.on_ready()

    def _on_readable(self) -> None:
        self.wakes += 1
        self._rung = True
        self.doorbell.drain()  # first: a ring after this leaves the descriptor readable
        self.on_ready()

    def _on_timeout(self) -> None:
        if not self.started:
            return
        self._timer = self.loop.call_later(self.timeout_s, self._on_timeout)
        if self._rung:  # woken in this period: the ring works, nothing to look for
            self._rung = False
            return
        self.timeouts += 1
        if self.doorbell.ready():
            self.timeouts_with_work += 1
            self.on_ready()

    def stop(self) -> None:
        """Stop watching and unpark (a stopped reader is not rung). Idempotent."""
        if self.started:
            self.started = False
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self.loop.remove_reader(self.fd)
            self.doorbell.unpark()
