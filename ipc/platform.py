"""The memory-ordering argument for the ring and counters, and the check that it holds here.

Theory of operation
-------------------
Every shared word (a ring's published cursor, a reader's cursor, a parked flag, a counter) is an
8-byte integer at an 8-byte-aligned offset of a page-aligned `mmap`, and has exactly one writing
process. Python code stores it with `view[i] = value` on a `memoryview.cast("q")` and loads it with
`view[i]`. The argument that a reader never sees a partial record rests on four facts:

1. Atomicity. CPython's memoryview packs and unpacks a `q`/`Q` item with a fixed-size 8-byte
   `memcpy`, which gcc and clang compile to one 8-byte `mov`. An aligned 8-byte `mov` is atomic on
   x86-64 (Intel SDM vol. 3, 8.1.1), so a cursor is never seen torn.
2. Store order (writer). The writer copies a frame's header and payload into the ring, then, in a
   later bytecode and a separate C call, stores the published cursor. x86-64 is TSO: stores become
   visible to other cores in program order (SDM 8.2.2, "stores are not reordered with other
   stores"). The C compiler cannot move the payload stores past the cursor store either: they are
   in different opaque calls through the interpreter loop. So a reader that sees the new cursor
   sees every byte before it.
3. Load order (reader). A reader loads the published cursor, then loads the frames below it. x86-64
   does not reorder loads with other loads, so it cannot read frame bytes older than the cursor it
   saw.
4. Gating (writer reuse of space). A reader finishes loading a frame (or stops using the views it
   was given) before it stores its cursor past it; x86-64 does not reorder a store before an
   earlier load. The writer loads that cursor before it overwrites the space, so it never
   overwrites bytes a reader is still reading.

The one reordering x86-64 does allow is a later load passing an earlier store (store buffering,
SDM 8.2.3.4). It matters where one process stores and then loads a word another process stores:
the doorbell's park/wake protocol (Dekker's pattern), argued in `ipc.doorbell`. A reader parking
stores its parked flag, then loads the cursors; a ringer (the ring's writer, or a role that
advances a limit counter) stores its cursor or counter, then loads the parked flag. Without a full
fence between the store and the load on both sides, both loads may return the old values: the
reader sleeps on work that is already published and the ringer does not ring. Python has no fence
instruction, so `store_load_fences()` gives each side one, chosen once per process:

- "membarrier" (Linux 4.16+, the default where the kernel and any seccomp filter allow it): the
  parker calls `membarrier(MEMBARRIER_CMD_GLOBAL_EXPEDITED)`, which returns only after every
  thread of every registered process that is running on a CPU has executed a full memory barrier
  (an IPI), and a thread that is not running has passed one in the scheduler; the syscall itself
  is a full barrier for the caller. Every process that rings registers
  (`MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED`) and needs no fence of its own: its store and its
  load are separate C calls through the interpreter loop, so the compiler cannot swap them, and
  the parker's barrier lands, in the ringer's program order, either before its store (then its
  later load sees the parked flag, already globally visible) or after it (then the store is
  visible to the parker's later load of the cursor). This is the asymmetric fence of liburcu's
  membarrier flavour and folly's `asymmetricHeavyBarrier`: the rare side (a reader about to
  sleep, ~0.5-2 us) pays, the hot side (every publish) pays nothing.
- "lock" (the fallback, or `SEQD_STORE_LOAD_FENCES=lock`): both sides acquire and release a
  `threading.Lock`. CPython's lock is a glibc semaphore (3.11, 3.12) or a `PyMutex` (3.13+) whose
  uncontended acquire and release are compare-and-swaps, `lock cmpxchg` on x86-64, and a locked
  instruction is a full barrier (SDM 8.2.2: loads and stores are not reordered with locked
  instructions). ~0.1 us per publish on a 2-core VM.

All processes of a node run on one kernel under one seccomp filter, so they all choose the same
(a parker on "lock" and a ringer on "membarrier" would not be fenced; `SEQD_STORE_LOAD_FENCES`
must be the same for all of them).

On a weakly ordered machine (arm64, POWER) facts 2-4 are false without barriers, which Python
code cannot issue; on a big-endian machine the frame header words would be laid out differently
from what other tools expect. So seqd refuses to create or attach a ring there.
"""

from __future__ import annotations

import os
import platform
import sys
import threading
import warnings
from collections.abc import Callable
from typing import NamedTuple

__all__ = [
    "FENCES_ENV",
    "UNSAFE_OVERRIDE_ENV",
    "PlatformError",
    "StoreLoadFences",
    "check_memory_ordering",
    "store_load_fences",
]

# Setting this to 1 skips the check: for experiments on other CPUs only. Rings may then deliver
# torn or stale records; never use it in production.
UNSAFE_OVERRIDE_ENV = "SEQD_UNSAFE_ALLOW_WEAK_ORDERING"

_MACHINES_TSO = frozenset({"x86_64", "amd64"})


class PlatformError(RuntimeError):
    """The machine or interpreter does not give the ordering the ring relies on."""


def check_memory_ordering() -> None:
    """Raise unless the ring's memory-ordering argument (module docstring) holds on this machine.

    Raises:
        PlatformError: not little-endian x86-64 CPython, and the unsafe override is not set.
    """
    machine = platform.machine().lower()
    problems = []
    if machine not in _MACHINES_TSO:
        problems.append(f"CPU architecture is {machine!r}, not x86-64 (total store order)")
    if sys.byteorder != "little":
        problems.append(f"byte order is {sys.byteorder}, not little-endian")
    if sys.maxsize < 1 << 62:
        problems.append("the interpreter is 32-bit, so 8-byte stores are not single moves")
    if sys.implementation.name != "cpython":
        problems.append(
            f"the interpreter is {sys.implementation.name}, not CPython (whose memoryview item "
            "stores are single aligned 8-byte moves)"
        )
    if not problems:
        return
    detail = "; ".join(problems)
    if os.environ.get(UNSAFE_OVERRIDE_ENV) == "1":
        warnings.warn(
            f"seqd shared-memory ordering is NOT guaranteed here ({detail}); continuing because "
            f"{UNSAFE_OVERRIDE_ENV}=1. Records may be torn or stale.",
            RuntimeWarning,
            stacklevel=2,
        )
        return
    raise PlatformError(
        f"seqd's shared-memory rings are only correct on little-endian x86-64 CPython: {detail}. "
        f"Run on x86-64, or set {UNSAFE_OVERRIDE_ENV}=1 for experiments only (unsafe: readers "
        "may see torn or stale records)."
    )


# ---- store-load fences for the doorbell (module docstring; the protocol is in ipc.doorbell) ----

# "lock" forces the lock fences; "membarrier" requires membarrier (PlatformError without it);
# unset or "auto" chooses membarrier where it works. Every process of a node must see the same.
FENCES_ENV = "SEQD_STORE_LOAD_FENCES"
_FENCE_CHOICES = ("auto", "membarrier", "lock")
# membarrier(2) on x86-64: the syscall number (arch/x86/entry/syscalls/syscall_64.tbl) and the
# commands (include/uapi/linux/membarrier.h).
_SYS_MEMBARRIER_X86_64 = 324
_MEMBARRIER_CMD_QUERY = 0
_MEMBARRIER_CMD_GLOBAL_EXPEDITED = 1 << 1
_MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED = 1 << 2


class StoreLoadFences(NamedTuple):
    """What each side of the park/wake protocol calls between its store and its load.

    Attributes:
        kind: "membarrier" or "lock" (module docstring).
        parker: called by a reader after it stores its parked flag, before it loads the cursors.
        ringer: called by a ringer after it stores a cursor or counter, before it loads a parked
            flag; None when the parker's fence covers the ringer (membarrier), so a publish pays
            nothing for it.
    """

    kind: str
    parker: Callable[[], None]
    ringer: Callable[[], None] | None


_FENCE_LOCK = threading.Lock()
_fence_acquire = _FENCE_LOCK.acquire
_fence_release = _FENCE_LOCK.release


def lock_fence() -> None:
    """A full barrier: the lock's acquire and release are locked instructions (module docstring).

    `acquire`/`release` rather than `with`: ~0.1 us against ~0.3 us for the context manager.
    """
    _fence_acquire()
    _fence_release()


_LOCK_FENCES = StoreLoadFences("lock", lock_fence, lock_fence)
_chosen: tuple[int, StoreLoadFences] | None = None  # (pid that chose, its fences)


def store_load_fences() -> StoreLoadFences:
    """This process's store-load fences; the first call in a process chooses (and registers it
    for membarrier), so call it before the process first rings or parks.

    Raises:
        PlatformError: `SEQD_STORE_LOAD_FENCES` names an unknown kind, or "membarrier" where the
            kernel or a seccomp filter does not allow it.
    """
    global _chosen
    pid = os.getpid()
    if _chosen is None or _chosen[0] != pid:  # a forked child chooses (and registers) again
        _chosen = (pid, _choose_fences(os.environ.get(FENCES_ENV, "auto")))
    return _chosen[1]


def _choose_fences(wanted: str) -> StoreLoadFences:
    if wanted not in _FENCE_CHOICES:
        raise PlatformError(
            f"{FENCES_ENV}={wanted!r} is not one of {', '.join(_FENCE_CHOICES)}; unset it to let "
            "seqd choose"
        )
    if wanted == "lock":
        return _LOCK_FENCES
    membarrier, problem = _membarrier()
    if membarrier is not None:
        return StoreLoadFences("membarrier", membarrier, None)
    if wanted == "membarrier":
        raise PlatformError(
            f"{FENCES_ENV}=membarrier, but {problem}. Unset {FENCES_ENV} to fall back to lock "
            "fences (correct, ~0.1 us more per ring publish)."
        )
    return _LOCK_FENCES


def _membarrier() -> tuple[Callable[[], None] | None, str]:
    """The parker's fence through membarrier(2), with this process registered; or (None, why not)."""
    if platform.machine().lower() not in _MACHINES_TSO or not sys.platform.startswith("linux"):
        return None, "membarrier(2) is used only on Linux x86-64"
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    syscall = libc.syscall
    syscall.restype = ctypes.c_long
    supported = syscall(_SYS_MEMBARRIER_X86_64, _MEMBARRIER_CMD_QUERY, 0, 0)
    if supported < 0 or not supported & _MEMBARRIER_CMD_GLOBAL_EXPEDITED:
        error = os.strerror(ctypes.get_errno()) if supported < 0 else "not supported"
        return None, f"membarrier(MEMBARRIER_CMD_GLOBAL_EXPEDITED) is unavailable ({error}; Linux 4.16+)"
    if syscall(_SYS_MEMBARRIER_X86_64, _MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED, 0, 0) != 0:
        return None, f"membarrier registration failed ({os.strerror(ctypes.get_errno())})"

    def membarrier_fence() -> None:
        # Cannot fail once the query and the registration succeeded; if it ever did, parking
        # without the fence could sleep on published work, so stop loudly instead.
        if syscall(_SYS_MEMBARRIER_X86_64, _MEMBARRIER_CMD_GLOBAL_EXPEDITED, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "membarrier(MEMBARRIER_CMD_GLOBAL_EXPEDITED) failed")

    return membarrier_fence, ""
