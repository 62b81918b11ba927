"""A doorbell: a named POSIX semaphore that wakes a parked reader in another process.

Why a named semaphore and not an eventfd: an eventfd is a file descriptor, so only a process that
inherits it (or receives it over a Unix socket with SCM_RIGHTS) can ring it. seqd's processes
attach to shared memory *by name*, unrelated to each other (a `seqd status` or a restarted role
attaches later), so the doorbell must be nameable too. A POSIX named semaphore
(`sem_open`, via posix_ipc) is: `sem_post` is the ring, `sem_timedwait` the wait, and an uncontended
post is a single atomic instruction in glibc unless a waiter sleeps, when it is one futex wake.
A reader that lives in an event loop cannot block in `sem_timedwait`; its doorbell is a named FIFO
instead (`ipc.doorbell_fifo`, `Ring.create(pollable=...)`), with the same interface here, whose
descriptor the loop watches: the same protocol, with the loop's `epoll_wait` as P4.

A doorbell may be bound to a *parked flag*, a word in shared memory written only by the waiting
reader. The ringer then rings only while the flag is set, so a busy reader costs the writer one
load per publish and no system call.

The park/wake protocol
----------------------
Work is "published" by a store to a shared word (the ring's `published` cursor, or a limit
counter such as the commit position); a reader has work when its cursors say so (`ready`).

    reader (park, ipc.idle.BlockingIdleStrategy)     ringer (RingWriter.publish, Doorbell.ring)
    P1  store parked = 1                              R1  store the cursor or counter
    P2  parker fence                                  R2  ringer fence (none with membarrier)
    P3  load the cursors: work? then unpark, return   R3  load parked: 0? then done
    P4  wait on the semaphore (with a timeout)        R4  post the semaphore
    P5  store parked = 0

Claim: a reader never sleeps in P4 past a publish it did not see in P3 unless that publish's
ringer is still to post. The fences (`ipc.platform.store_load_fences`) make each side's store
globally visible before its load executes (P1 before P3, R1 before R3). If R3 loads 1, R4 posts;
the semaphore counts the post, so the wait returns whether it began before the post or after. If
R3 loads 0, R3 ran before P1 was visible, hence before P3, and R1 was visible before R3, hence
before P3: P3 sees the work and the reader does not wait. Without the fences x86-64 lets R3 pass
R1 and P3 pass P1 in the same run (store buffering): both load the old values and the ring is
missed, which `tests/test_doorbell_protocol.py` finds on a modelled store buffer. A post that lands
after P3 saw the work, or after P5, only makes a later wait return early (a spurious wake, which
re-polls and parks again). The drain after a wake swallows only posts already made, each after
its R1 (a post is a locked instruction), and the caller polls after the drain, so it sees their
work.

Every ringer of a reader must follow R1-R4: the ring's writer does on each publish, and a role
that advances a reader's limit counter rings through `Ring.doorbell(reader).ring()` (the
journaller for the blp). A reader bounded by a limit parks with the flag
`ipc.ring_layout.PARKED_ON_LIMIT` (< 0), which the writer's publish does not ring (it rings flags
> 0) and `ring()` does: a publish below the limit is no work for it, and only the limit's move
is (the claim above, with R1 the limit's store). A reader bounded by an upstream reader is not
rung when that reader moves; it relies on the writer's next ring or the timeout.

The timeout is a safety net for a ringer that dies between R1 and R4 or stalls there for longer
than the timeout; `BlockingIdleStrategy.timeouts_with_work` counts the timeouts that found work
waiting, and the stress test (`benches/doorbell.py`) checks they stay at zero.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType

import posix_ipc

from ipc.doorbell_fifo import FifoBell, unlink_fifo
from ipc.platform import store_load_fences

__all__ = ["DRAIN_MAX", "Doorbell", "bell_name", "unlink_bell"]

# After a wake the waiter swallows the rings that piled up while it was waking, so the next park
# really blocks. A writer rings at most once per publish while the flag is set, so the pile is
# small; the bound keeps a runaway ringer from holding the waiter here.
DRAIN_MAX = 4096
_VALUE_SUPPORTED = posix_ipc.SEMAPHORE_VALUE_SUPPORTED


def bell_name(segment_name: str, reader: str) -> str:
    """The semaphore name of reader `reader` of ring `segment_name`."""
    return f"{segment_name}.{reader}.bell"


def _never_ready() -> bool:
    return False


class Doorbell:
    """One named semaphore, optionally bound to a parked flag in shared memory.

    Args:
        name: the semaphore's POSIX name.
        semaphore: the open posix_ipc semaphore, or a `FifoBell` (the same interface) for a
            reader in an event loop (`ipc.doorbell_fifo`).
        parked: (word view, index) of the parked flag, or None for an unconditional doorbell (e.g.
            one rung by the journaller each time it advances a counter).
        ready: called after parking and before waiting; True means work arrived, do not wait.
        parked_value: what `park` stores in the flag (any value but 0 means parked; a ring's
            reader bounded by a limit counter parks with `ipc.ring_layout.PARKED_ON_LIMIT`, which
            the ring's writer does not ring).
    """

    def __init__(
        self,
        name: str,
        semaphore: posix_ipc.Semaphore | FifoBell,
        parked: tuple[memoryview, int] | None = None,
        ready: Callable[[], bool] | None = None,
        parked_value: int = 1,
    ) -> None:
        assert parked_value != 0, "0 means not parked"
        self.name = name
        self._semaphore = semaphore
        self._fifo = semaphore if isinstance(semaphore, FifoBell) else None
        self._parked = parked
        self._parked_value = parked_value
        self.ready: Callable[[], bool] = ready or _never_ready
        self.rings = 0
        self.interruptions = 0  # waits a signal ended early
        fences = store_load_fences()  # the first call registers this process (ipc.platform)
        self._parker_fence = fences.parker
        self._ringer_fence = fences.ringer

    @classmethod
    def create(cls, name: str, pollable: bool = False) -> Doorbell:
        """Create (or reuse and drain) the semaphore `name`, mode 0600; with `pollable`, the FIFO
        `name` instead (`ipc.doorbell_fifo`: a reader in an event loop watches its descriptor)."""
        if pollable:
            return cls(name, FifoBell.create(name))
        semaphore = posix_ipc.Semaphore(name, posix_ipc.O_CREAT, mode=0o600, initial_value=0)
        bell = cls(name, semaphore)
        bell.drain()
        return bell

    @classmethod
    def attach(cls, name: str, pollable: bool = False) -> Doorbell:
        """Open the existing semaphore `name` (with `pollable`, the FIFO `name`).

        Raises:
            FileNotFoundError: no such doorbell; its creator has not run yet.
            PermissionError: (pollable) the FIFO's path is not a FIFO of this user.
        """
        if pollable:
            return cls(name, FifoBell.open(name))
        try:
            semaphore = posix_ipc.Semaphore(name)
        except posix_ipc.ExistentialError:
            raise FileNotFoundError(
                f"doorbell {name} does not exist; start the process that creates it first"
            ) from None
        return cls(name, semaphore)

    def bind(
        self, parked: tuple[memoryview, int], ready: Callable[[], bool] | None = None, parked_value: int = 1
    ) -> Doorbell:
        """A doorbell on the same semaphore bound to a parked flag (and a readiness check; and
        the value `park` stores in the flag, any but 0)."""
        return Doorbell(self.name, self._semaphore, parked, ready, parked_value)

    @property
    def pollable(self) -> bool:
        """Whether this doorbell is a FIFO an event loop can watch (`fileno`)."""
        return self._fifo is not None

    def fileno(self) -> int:
        """The FIFO's descriptor, for `loop.add_reader` (`ipc.doorbell_fifo.LoopWaiter`).

        Raises:
            ValueError: a semaphore doorbell, which no event loop can watch.
        """
        if self._fifo is None:
            raise ValueError(
                f"doorbell {self.name} is a semaphore, which an event loop cannot watch; create "
                "its ring with this reader in Ring.create(pollable=...)"
            )
        return self._fifo.fileno()

    @property
    def post(self) -> Callable[[], None]:
        """The semaphore's post, unconditional and uncounted: for a ringer that checks the parked
        flag itself in its hot loop (the ring writer's publish) and cannot afford a call. Such a
        ringer must call `ipc.platform.store_load_fences().ringer`, unless None, between its store
        and its load of the flag (R2 of the protocol, module docstring)."""
        return self._semaphore.release  # type: ignore[no-any-return]

    @property
    def parked(self) -> bool:
        """Whether the waiter says it is parked (always False for an unbound doorbell)."""
        if self._parked is None:
            return False
        view, index = self._parked
        return view[index] != 0

    def ring(self) -> bool:
        """Wake the waiter if it is parked (always, for an unbound doorbell). True if rung.

        Call it after the store that published the work (R1 of the protocol, module docstring).
        """
        if self._parked is not None:
            if self._ringer_fence is not None:
                self._ringer_fence()
            view, index = self._parked
            if not view[index]:
                return False
        self._semaphore.release()
        self.rings += 1
        return True

    def park(self) -> None:
        """Announce that the waiter is about to block: set the parked flag, then fence, so the
        caller's next check for work is ordered after the flag (P1, P2; module docstring). An
        unbound doorbell is rung unconditionally and needs neither."""
        if self._parked is not None:
            view, index = self._parked
            view[index] = self._parked_value
            self._parker_fence()

    def unpark(self) -> None:
        if self._parked is not None:
            view, index = self._parked
            view[index] = 0

    def wait(self, timeout_ms: float) -> bool:
        """Block until rung or `timeout_ms` passes. True if rung; False on timeout, or when a
        signal interrupted the wait (then `interruptions` counts it)."""
        assert timeout_ms >= 0, timeout_ms
        try:
            self._semaphore.acquire(timeout_ms / 1000.0)
        except posix_ipc.BusyError:
            return False
        except posix_ipc.SignalError:
            # A signal (SIGTERM: stop) interrupted the wait; its handler has set a flag the
            # caller's loop reads, so this is just an early wake-up.
            self.interruptions += 1
            return False
        if self._fifo is None:  # a FIFO's wait has swallowed every pending ring already
            self.drain()
        return True

    def take_pending(self) -> bool:
        """Swallow the rings already pending, without a system call; True if there were any.

        A ring that lands after the waiter's wake-up drain, from a ringer that loaded the parked
        flag before the waiter unparked, is pending with no work behind it that the waiter has
        not seen (each post follows its R1, and the waiter polls after this). A waiter about to
        park takes it here instead, and polls again, rather than pay a park's fence (membarrier:
        an IPI to every CPU) for a wait that returns at once. Only a semaphore's count can be
        read without a system call; for a FIFO (or where `sem_getvalue` is missing) this is
        always False, and the wait swallows the pending rings as before.
        """
        if self._fifo is not None or not _VALUE_SUPPORTED or self._semaphore.value <= 0:
            return False
        self.drain()
        return True

    def drain(self) -> int:
        """Swallow pending rings without blocking; returns how many.

        The count is read first (`sem_getvalue`, which keeps the GIL): usually one ring is
        pending after a wake, and a try-wait that finds none costs an exception and a release
        and retake of the GIL, which in a threaded process (the replicator's waker) means
        waiting for the other thread to give it back.
        """
        if self._fifo is not None:
            return self._fifo.drain()
        semaphore = self._semaphore
        drained = 0
        while drained < DRAIN_MAX and (not _VALUE_SUPPORTED or semaphore.value > 0):
            try:
                semaphore.acquire(0)
            except posix_ipc.BusyError:
                break
            drained += 1
        return drained

    def close(self) -> None:
        """Close this process's handle; the semaphore stays for others."""
        try:
            self._semaphore.close()
        except posix_ipc.ExistentialError:
            pass

    def unlink(self) -> None:
        """Remove the name (the semaphore's, or the FIFO's). Idempotent."""
        unlink_bell(self.name)

    def __enter__(self) -> Doorbell:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def unlink_bell(name: str) -> None:
    """Remove the doorbell `name` of either kind (a semaphore, a FIFO). Idempotent."""
    try:
        posix_ipc.unlink_semaphore(name)
    except posix_ipc.ExistentialError:
        pass
    unlink_fifo(name)
