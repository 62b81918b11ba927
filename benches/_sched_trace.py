"""Who had the CPU during a gap of `benches.recovery`'s apply loop: the kernel's `sched_switch`
events of every CPU, recorded in a tracefs instance of our own (so nobody else's tracing is
touched) on the monotonic clock, the one `time.perf_counter_ns` reads; and the garbage
collector's passes in this process (`gc.callbacks`).

For a gap [start, end] of the loop's process (pid `pid`): if the process was switched out
inside it, the gap is `preempted` (switched out runnable: `R`) or `blocked` (`S`/`D`: a page
fault's I/O, a lock), and the tasks that ran on its CPU meanwhile, by name and time; else it
stayed on its CPU and the time went in the process itself (a collection, counted apart, or page
faults and interrupts). Needs root and tracefs; without them the cause says only what the GC did.

    trace = SchedTrace.open()   # None without tracefs
    trace.start(); ...; events = trace.stop(); trace.close()
"""

from __future__ import annotations

import bisect
import gc
import os
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TRACEFS = Path("/sys/kernel/tracing")
# Per CPU: a 3-5 s window on 2 loaded CPUs switches ~50k times a CPU, ~60 bytes an event.
BUFFER_KB_PER_CPU = 16384
GAP_NS_MIN = 1_000_000  # the gaps worth explaining: what a 2 ms target would miss
TASKS_SHOWN_MAX = 3
_SWITCH = re.compile(
    r"\[(\d+)\].*?\s(\d+)\.(\d+): sched_switch: prev_comm=(.*?) prev_pid=(\d+) prev_prio=-?\d+ "
    r"prev_state=(\S+) ==> next_comm=(.*?) next_pid=(\d+)"
)


@dataclass
class Switch:
    cpu: int
    at_ns: int
    prev_comm: str
    prev_pid: int
    prev_state: str
    next_comm: str
    next_pid: int


@dataclass
class SchedTrace:
    instance: Path
    collections: list[tuple[int, int, int]] = field(default_factory=list)  # (generation, start, end)
    switches: list[Switch] = field(default_factory=list)  # in time order
    stamps_ns: list[int] = field(default_factory=list)  # their times, for bisect
    _gc_started_ns: int = 0

    @classmethod
    def open(cls) -> SchedTrace | None:
        instance = TRACEFS / "instances" / f"seqd-bench-{os.getpid()}"
        try:
            instance.mkdir()
        except OSError:
            return None  # not root, or no tracefs: the GC alone
        trace = cls(instance)
        try:
            (instance / "trace_clock").write_text("mono")
            (instance / "buffer_size_kb").write_text(str(BUFFER_KB_PER_CPU))
            (instance / "events/sched/sched_switch/enable").write_text("1")
            (instance / "tracing_on").write_text("0")
        except OSError:
            trace.close()
            return None
        return trace

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        now = time.perf_counter_ns()
        if phase == "start":
            self._gc_started_ns = now
        else:
            self.collections.append((info["generation"], self._gc_started_ns, now))

    def start(self) -> None:
        self.collections = []
        self.switches = []
        self.stamps_ns = []
        gc.callbacks.append(self._on_gc)
        (self.instance / "trace").write_text("")  # empties the buffer
        (self.instance / "tracing_on").write_text("1")

    def stop(self) -> None:
        (self.instance / "tracing_on").write_text("0")
        gc.callbacks.remove(self._on_gc)
        with open(self.instance / "trace") as lines:
            for line in lines:
                match = _SWITCH.search(line)
                if match is None:
                    continue
                cpu, seconds, micros, prev_comm, prev_pid, state, next_comm, next_pid = match.groups()
                at_ns = int(seconds) * 1_000_000_000 + int(micros.ljust(9, "0")[:9])
                self.switches.append(Switch(int(cpu), at_ns, prev_comm, int(prev_pid), state, next_comm, int(next_pid)))
        self.switches.sort(key=lambda switch: switch.at_ns)
        self.stamps_ns = [switch.at_ns for switch in self.switches]

    def close(self) -> None:
        try:
            (self.instance / "events/sched/sched_switch/enable").write_text("0")
            self.instance.rmdir()
        except OSError:
            pass

    def gc_ms(self, start_ns: int, end_ns: int) -> dict[int, float]:
        """Milliseconds of collection by generation inside [start_ns, end_ns]."""
        spent: dict[int, float] = defaultdict(float)
        for generation, begun, ended in self.collections:
            overlap = min(ended, end_ns) - max(begun, start_ns)
            if overlap > 0:
                spent[generation] += overlap / 1e6
        return dict(spent)

    def off_cpu(self, pid: int, start_ns: int, end_ns: int, names: dict[int, str]) -> OffCpu:
        """Process `pid`'s time off its CPU inside [start_ns, end_ns], and who ran there meanwhile
        (by `names`, else command name and pid; "idle": no one)."""
        off = OffCpu()
        if not self.switches:
            return off

        def label(switch: Switch) -> str:
            if switch.next_pid == 0:
                return "idle"
            return names.get(switch.next_pid) or f"{switch.next_comm}:{switch.next_pid}"

        first = bisect.bisect_left(self.stamps_ns, start_ns)
        # Where `pid` was when the span began: off its CPU since its last switch-out, or on it.
        cpu, running, since_ns, out_ns = -1, "", start_ns, start_ns
        for switch in reversed(self.switches[:first]):
            if switch.prev_pid == pid:
                cpu = switch.cpu
                break
            if switch.next_pid == pid:
                break
        if cpu >= 0:  # off since before the span: what its CPU ran when the span began
            running = next(label(switch) for switch in reversed(self.switches[:first]) if switch.cpu == cpu)

        def ran(until_ns: int) -> None:
            stretch = until_ns - since_ns
            off.ran_ns[running] += stretch
            off.longest_ns[running] = max(off.longest_ns[running], stretch)

        for switch in self.switches[first:]:
            if switch.at_ns > end_ns:
                break
            if switch.prev_pid == pid:
                cpu, running, since_ns, out_ns = switch.cpu, label(switch), switch.at_ns, switch.at_ns
                off.states.add(switch.prev_state)
                continue
            if cpu < 0:
                continue
            if switch.cpu == cpu:  # while it is off: who its CPU ran
                ran(switch.at_ns)
                running, since_ns = label(switch), switch.at_ns
            if switch.next_pid == pid:  # back, on this CPU or another
                if switch.cpu != cpu:
                    ran(switch.at_ns)
                off.off_ns += switch.at_ns - out_ns
                cpu = -1
        if cpu >= 0:  # still off at the span's end
            ran(end_ns)
            off.off_ns += end_ns - out_ns
        return off

    def cause(self, pid: int, start_ns: int, end_ns: int, names: dict[int, str] | None = None) -> str:
        """What kept process `pid` from applying during [start_ns, end_ns] (see the docstring);
        `names`: what to call some pids (else their command name and pid)."""
        parts = [f"gc gen{generation} {ms:.2f} ms" for generation, ms in sorted(self.gc_ms(start_ns, end_ns).items())]
        if not self.switches:
            return "; ".join(parts) or "no collection (no scheduler trace: needs root and tracefs)"
        off = self.off_cpu(pid, start_ns, end_ns, names or {})
        gap_ms = (end_ns - start_ns) / 1e6
        if not off.ran_ns:
            parts.append(f"on its CPU all {gap_ms:.2f} ms (its own work, page faults, interrupts)")
            return "; ".join(parts)
        kind = "preempted" if off.states <= {"R", "R+"} else f"off its CPU ({'/'.join(sorted(off.states))})"
        shown = sorted(((ns, name) for name, ns in off.ran_ns.items()), reverse=True)[:TASKS_SHOWN_MAX]
        tasks = ", ".join(f"{described(name)} {ns / 1e6:.2f}" for ns, name in shown)
        parts.append(f"{kind} {off.off_ns / 1e6:.2f} of {gap_ms:.2f} ms; on its CPU meanwhile (ms): {tasks}")
        return "; ".join(parts)


@dataclass
class OffCpu:
    """A process's time off its CPU in a span, and who ran on that CPU meanwhile, by name."""

    off_ns: int = 0
    states: set[str] = field(default_factory=set)  # how it left: R (preempted), S, D
    ran_ns: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    longest_ns: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # the longest stretch


def described(name: str) -> str:
    """"python:123" -> "python:123 (daemon.roles.blp)": a python's module, while it still runs."""
    number = name.rpartition(":")[2]
    if not number.isdigit():
        return name
    try:
        argv = Path(f"/proc/{number}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return name
    module = argv[argv.index(b"-m") + 1].decode(errors="replace") if b"-m" in argv else ""
    return f"{name} ({module})" if module else name
