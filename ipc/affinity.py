"""CPU pinning helpers (psutil), for the supervisor that places each role on its own core.

Pinning matters only with busy-spinning roles: a spinning process that the scheduler moves between
cores loses its cache lines and steals time from the others. With fewer cores than roles, do not
pin spinners; use the backoff or blocking idle strategy instead.
"""

from __future__ import annotations

from collections.abc import Iterable

import psutil

__all__ = ["available_cpus", "pin", "pinned_cpus"]


def available_cpus() -> list[int]:
    """The CPUs this process may run on."""
    return sorted(psutil.Process().cpu_affinity() or [])


def pinned_cpus(pid: int | None = None) -> list[int]:
    """The CPUs process `pid` (default: this one) may run on."""
    return sorted(psutil.Process(pid).cpu_affinity() or [])


def pin(cpu: int | Iterable[int], pid: int | None = None) -> list[int]:
    """Restrict process `pid` (default: this one) to `cpu` (one CPU or several).

    Returns:
        The CPUs it was allowed before, so a caller can undo the pin.

    Raises:
        ValueError: a CPU that this machine (or this process's cgroup) does not offer.
    """
    cpus = sorted({cpu} if isinstance(cpu, int) else set(cpu))
    machine = set(range(psutil.cpu_count(logical=True) or 1))
    missing = [c for c in cpus if c not in machine]
    if not cpus or missing:
        raise ValueError(f"cannot pin to CPUs {cpus}: this machine has CPUs {sorted(machine)}")
    process = psutil.Process(pid)
    before = sorted(process.cpu_affinity() or [])
    try:
        process.cpu_affinity(cpus)
    except (OSError, ValueError) as error:  # e.g. outside this cgroup's cpuset
        raise ValueError(f"cannot pin to CPUs {cpus}: {error}") from error
    return before
