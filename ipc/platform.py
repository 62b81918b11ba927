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

The one reordering x86-64 does allow is a later load passing an earlier store (store buffering).
It matters only for the blocking idle strategy: the reader stores "parked" and then loads the
cursor, while the writer stores the cursor and then loads "parked"; both may read the old value,
so a doorbell ring can be missed. That is why a parked reader waits with a timeout: a missed ring
costs at most one timeout and never loses data.

On a weakly ordered machine (arm64, POWER) facts 2-4 are false without barriers, which Python
code cannot issue; on a big-endian machine the frame header words would be laid out differently
from what other tools expect. So seqd refuses to create or attach a ring there.
"""

from __future__ import annotations

import os
import platform
import sys
import warnings

__all__ = ["UNSAFE_OVERRIDE_ENV", "PlatformError", "check_memory_ordering"]

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
