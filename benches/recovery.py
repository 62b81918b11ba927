"""Snapshots and recovery: the blp's pause while a snapshot is written, restore, replay, and
recovery from snapshot + tail against replay from genesis (issue 4).

    python -m benches.recovery [--quick] [--json] [--accounts N] [--records M] [--tail T]

Napkin math. A ledger account is a dict entry (~100 B key + 72 B struct + ~50 B of dict slot):
1M accounts are ~250 MB of heap. `os.fork()` copies the page tables of that heap, 4 KiB pages:
~60k PTEs, a few ms; after it, the parent takes a copy-on-write fault (~1-3 us) the first time it
writes each page, and a transfer writes refcounts and balances on ~4 pages. The child encodes the
state (msgspec, ~50 ns per field: ~0.2 s for 1M accounts), hashes and writes ~40 MB and fsyncs.
Replay runs the blp's recovery (`sequencer.recovery`): `read_runs` + `replay_run`
(one view per journal batch, one header word per record). Earlier it was `read_records` (~1 us a
record, benches/journal.py) plus `apply_frame` (~3-4 us a transfer, benches/processor.py), so
~200k records/s: 10M records take ~50 s from genesis, and a snapshot + 1M-record tail ~5 s plus
the restore. With the snapshot at `records - tail`, the speed-up cannot exceed records / tail.

What runs, all in this process on the real pieces (nothing is mocked):

1. Write a journal of `records` real ledger records (one SESSION_OPEN, OpenAccount + Deposit
   for each of `accounts` accounts, then Transfers between random accounts), encoded with
   `encode_record`, appended with `Journal.append` in batches of BATCH_RECORDS, one sync. The
   state is built by applying these records, not by restoring a synthetic body.
2. Recovery from genesis: `recovery.replay` (`read_runs` + `Processor.replay_run`) over the
   whole journal, as `recover` does. At index `records - tail` the clock stops while the state is
   written with `write_snapshot` (in-process), then goes on.
3. Recovery with the snapshot: `newest_valid_snapshot` + `recovery.recover` (restore, then the
   same loop over the tail), as the blp recovers. Both end with the same rolling hash, or the run fails.
4. The snapshot pause, on the state from step 2: an apply loop of fresh transfer records in
   polls of FRAMES_PER_POLL (the blp's batch), a SNAPSHOT record in it, on which the loop forks
   `fork_and_write_snapshot` as the blp does, and goes on applying until the child has exited.
   The pause is the longest gap between two consecutive applies in that window (the fork call
   and its copy-on-write aftermath included); the same loop without a snapshot is the baseline.
   Encoding the next poll's records (the sequencer's work) happens off the clock.
5. Restore: `read_snapshot` + `Processor.restore` of the file the forked child wrote.

The journal is read from the page cache (it was just written): a cold-disk recovery adds the
disk's read time (~1.2 GB for 10M records).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path
from typing import Any

import psutil

from benches._measure import MEASURE_S_MIN
from benches._sched_trace import SchedTrace
from daemon.roles.blp import FRAMES_PER_POLL_MAX
from daemon.snapshot_writer import fork_and_write_snapshot, reap_snapshot_writer
from ipc.affinity import available_cpus, pin
from sequencer import snapshot as snapshots
from sequencer.apps.ledger import LEDGER_SCHEMA, Deposit, Ledger, OpenAccount, Transfer
from sequencer.journal import Journal, read_records
from sequencer.processor import Processor
from sequencer.record import (
    COMMAND_PREFIX,
    FRAME_HEADER,
    FRAME_HEADER_BYTES,
    RecordType,
    encode_record,
    encode_session_open,
    walk_records,
)
from sequencer.recovery import recover, replay

BATCH_RECORDS = 8192  # ~1 MB a journal append: what a busy journaller pass writes
FRAMES_PER_POLL = FRAMES_PER_POLL_MAX  # the blp's batch
SESSION_ID = 1 << 56 | 1
CLIENT_ID = 7
DEPOSIT = 1_000_000_000
TRANSFER_AMOUNT_MAX = 10  # deposits of 10^9 never run out: every transfer is applied
PAUSE_TARGET_MS = 5.0
STALL_ACCOUNTS = (1_000_000, 5_000_000)  # issue 13's snapshot_stall_ms_1m and _5m
SPEEDUP_TARGET = 10.0
# The pause loop runs at least this long after the child exits, so a late copy-on-write storm or
# the reap is inside the window; and the baseline runs as many polls as the snapshot window.
AFTER_CHILD_S = 0.2
CHILD_TIMEOUT_S = 300.0  # a 1M-account snapshot takes ~2 s; far beyond means a stuck child
# The replica writer's feed to the snapshotter process: a u32 length before each run of records.
FEED_LENGTH = struct.Struct("<I")
# Building 5M accounts takes the snapshotter process as long as the blp (~1-2 min on 2 loaded cores).
SNAPSHOTTER_READY_TIMEOUT_S = 600.0
STALL_WRITERS = ("fork", "replica")
# The real snapshotter's first; "pinned": the blp (this process) pinned to a CPU, the snapshotter
# at SCHED_IDLE on the others, as a node with `roles.blp.cpu` set runs them.
SNAPSHOTTER_POLICIES = ("idle", "normal", "pinned")
SNAPSHOTTER_NAME = "snapshotter"  # the child, in the scheduler trace's causes

_COMMAND = int(RecordType.COMMAND)
_COMMAND_VERSION = LEDGER_SCHEMA.version
_encode = LEDGER_SCHEMA.encode_command
_pack_prefix = COMMAND_PREFIX.pack


class RecordSource:
    """A gapless run of real ledger records, stamped as the sequencer would stamp them."""

    def __init__(self, accounts: int, seed: int = 1) -> None:
        self.accounts = accounts
        self.index = 0
        self.request_id = 0
        self.timestamp_ns = 1_700_000_000_000_000_000
        self.rng = random.Random(seed)
        # The replica writer's bench: every record made after `feed` is set is also appended to
        # it (length-prefixed runs), for the snapshotter process to apply (`_snapshotter_child`).
        self.feed: Any = None
        # No list of names: this object lives in the blp's process here, and its memory would
        # count in the fork's page tables (1M names are ~60 MB).

    def _record(self, record_type: int, payload: bytes, session_id: int = SESSION_ID,
                request_id: int = 0) -> bytes:  # fmt: skip
        self.index += 1
        self.timestamp_ns += 1000
        return encode_record(record_type, 1 if record_type != _COMMAND else _COMMAND_VERSION,
                             self.index, 1, self.timestamp_ns, session_id, request_id,
                             payload)  # fmt: skip

    def _command(self, command: Any) -> bytes:
        self.request_id += 1
        _, data = _encode(command)
        # A well-behaved client acks every reply before the next request: one saved reply.
        return self._record(_COMMAND, _pack_prefix(self.request_id - 1) + data,
                            request_id=self.request_id)  # fmt: skip

    def session_open(self) -> bytes:
        return self._record(int(RecordType.SESSION_OPEN), encode_session_open(CLIENT_ID, "n1"))

    def snapshot(self) -> bytes:
        return self._fed(self._record(int(RecordType.SNAPSHOT), b"", session_id=0))

    def _fed(self, run: bytes) -> bytes:
        if self.feed is not None:
            self.feed.write(FEED_LENGTH.pack(len(run)) + run)
            self.feed.flush()
        return run

    def setup(self, first: int, count: int) -> bytes:
        """OpenAccount + Deposit for accounts first..first+count-1 (2 * count records)."""
        parts = []
        for n in range(first, first + count):
            name = f"acct-{n:07d}"
            parts.append(self._command(OpenAccount(name)))
            parts.append(self._command(Deposit(name, DEPOSIT)))
        return b"".join(parts)

    def transfers(self, count: int) -> bytes:
        accounts = self.accounts
        randrange = self.rng.randrange
        parts = []
        for _ in range(count):
            source = randrange(accounts)
            target = (source + 1 + randrange(accounts - 1)) % accounts
            amount = 1 + randrange(TRANSFER_AMOUNT_MAX)
            transfer = Transfer(f"acct-{source:07d}", f"acct-{target:07d}", amount)
            parts.append(self._command(transfer))
        return self._fed(b"".join(parts))


def frames_of(batch: bytes) -> list[tuple[int, memoryview]]:
    """(frame type, view after the frame header) per record: what the blp's ring poll yields."""
    view = memoryview(batch)
    return [
        (frame_type, view[start + FRAME_HEADER_BYTES : start + length])
        for (length, frame_type), start, _after in walk_records(view, FRAME_HEADER)
    ]


# -- 1. the journal ------------------------------------------------------------------------------


def write_journal(directory: Path, source: RecordSource, records: int) -> dict[str, float]:
    """Appends `records` records (setup first, then transfers); returns figures."""
    accounts = source.accounts
    assert records >= 1 + 2 * accounts + 1, "the journal must hold the setup and a transfer"
    started = time.perf_counter()
    append_s = 0.0
    with Journal.open(directory) as journal:

        def append(batch: bytes) -> None:
            nonlocal append_s
            begin = time.perf_counter()
            journal.append(batch)
            append_s += time.perf_counter() - begin

        append(source.session_open())
        for first in range(0, accounts, BATCH_RECORDS // 2):
            append(source.setup(first, min(BATCH_RECORDS // 2, accounts - first)))
        while source.index < records:
            append(source.transfers(min(BATCH_RECORDS, records - source.index)))
        begin = time.perf_counter()
        journal.sync()
        append_s += time.perf_counter() - begin
        assert journal.last_index == records, (journal.last_index, records)
    journal_bytes = sum(path.stat().st_size for path in directory.glob("*.seg"))
    return {
        "journal_write_s": time.perf_counter() - started,
        "journal_append_s": append_s,
        "journal_bytes": journal_bytes,
    }


# -- 2, 3. recovery ------------------------------------------------------------------------------


def recover_from_genesis(
    journal_dir: Path, snapshot_dirs: dict[int, Path], records: int
) -> tuple[Processor[Any], float, float]:
    """Replays everything; at each index of `snapshot_dirs` writes a snapshot there, off the
    clock. Returns (processor, replay seconds, seconds of the last snapshot write)."""
    processor: Processor[Any] = Processor(Ledger, node="n1")
    elapsed = 0.0
    write_s = 0.0
    for index in sorted(snapshot_dirs):
        started = time.perf_counter()
        replay(processor, journal_dir, index)
        elapsed += time.perf_counter() - started
        begin = time.perf_counter()
        header, body = processor.snapshot_file_contents()
        snapshots.write_snapshot(snapshot_dirs[index], header, body)
        write_s = time.perf_counter() - begin
    started = time.perf_counter()
    replay(processor, journal_dir, records)
    elapsed += time.perf_counter() - started
    assert processor.applied_index == records, (processor.applied_index, records)
    return processor, elapsed, write_s


def recover_from_snapshot(
    journal_dir: Path, snapshot_dir: Path, records: int
) -> tuple[Processor[Any], dict[str, float]]:
    """What the blp does at start: newest valid snapshot, then `recovery.recover`."""
    started = time.perf_counter()
    found = snapshots.newest_valid_snapshot(snapshot_dir)
    assert found is not None, f"no valid snapshot in {snapshot_dir}"
    read_s = time.perf_counter() - started
    recovered = recover(Ledger, journal_dir, found, records, node="n1")
    total_s = time.perf_counter() - started
    return recovered.processor, {
        "snapshot_read_s": read_s,
        "snapshot_restore_s": recovered.restore_s,
        "tail_replay_s": recovered.replay_s,
        "tail_records": recovered.replayed,
        "recovery_snapshot_s": total_s,
    }


def bench_read_only(journal_dir: Path, records: int) -> float:
    """Records/s of `read_records` alone: the floor under replay."""
    started = time.perf_counter()
    count = 0
    for _record in read_records(journal_dir, 1, records):
        count += 1
    assert count == records, (count, records)
    return records / (time.perf_counter() - started)


# -- 4. the snapshot pause -----------------------------------------------------------------------


class PauseRun:
    """Figures of one apply loop: the longest gap, the gaps over 1 ms, the apply rate."""

    def __init__(self) -> None:
        self.gaps_ns = array("q")
        self.ends_ns = array("q")  # when each gap ended (time.perf_counter_ns)
        self.cause = ""  # what the longest gap was, when a SchedTrace watched the loop
        self.gc_ms_max = 0.0  # the longest collection in the loop, when a SchedTrace watched it
        # The replica writer's: CPU time the snapshotter took on this process's CPU while this
        # process was off it in the loop, in all and its longest stretch (a SchedTrace's).
        self.snapshotter_took_ms = 0.0
        self.snapshotter_took_ms_max = 0.0
        self.applied = 0
        self.elapsed_s = 0.0
        self.fork_ms = 0.0
        self.fork_to_next_apply_ms = 0.0
        self.child_s = 0.0
        self.snapshot_index = 0

    @property
    def max_gap_ms(self) -> float:
        return max(self.gaps_ns) / 1e6

    def explain(self, trace: SchedTrace, names: dict[int, str]) -> None:
        """The longest gap's cause and the longest collection, from `trace` of this loop."""
        longest = max(range(len(self.gaps_ns)), key=self.gaps_ns.__getitem__)
        end_ns = self.ends_ns[longest]
        self.cause = trace.cause(os.getpid(), end_ns - self.gaps_ns[longest], end_ns, names)
        self.gc_ms_max = max((ended - begun for _, begun, ended in trace.collections), default=0) / 1e6
        off = trace.off_cpu(os.getpid(), self.ends_ns[0] - self.gaps_ns[0], self.ends_ns[-1], names)
        self.snapshotter_took_ms = off.ran_ns.get(SNAPSHOTTER_NAME, 0) / 1e6
        self.snapshotter_took_ms_max = off.longest_ns.get(SNAPSHOTTER_NAME, 0) / 1e6

    def percentile_gap_us(self, fraction: float) -> float:
        ordered = sorted(self.gaps_ns)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] / 1e3

    @property
    def stalled_ms(self) -> float:
        """Time spent in gaps over 1 ms (what a client would see as stalls)."""
        return sum(gap for gap in self.gaps_ns if gap > 1_000_000) / 1e6

    @property
    def per_s(self) -> float:
        return self.applied / self.elapsed_s


def apply_loop(
    processor: Processor[Any],
    source: RecordSource,
    snapshot_dir: Path | None,
    polls_min: int,
    seconds_min: float = 0.0,
    writer: str = "fork",
    trace: SchedTrace | None = None,
    names: dict[int, str] | None = None,
) -> PauseRun:
    """Applies polls of fresh transfers; with `snapshot_dir`, a SNAPSHOT record leads the
    second poll and the loop runs until the forked writer has exited plus AFTER_CHILD_S.
    `writer="replica"`: the loop forks nothing at the SNAPSHOT record (the blp with
    `snapshot.writer = "replica"`); the snapshotter process, fed the same records, writes the
    file, and the loop runs until the file is there plus AFTER_CHILD_S. With `trace`, the run
    says what its longest gap was (`names`: what to call some pids in it)."""
    run = PauseRun()
    gaps = run.gaps_ns
    ends = run.ends_ns
    apply_frame = processor.apply_frame
    drain = processor.drain_outputs
    clock = time.perf_counter_ns
    child_pid = 0
    child_started_ns = 0
    child_done_ns = 0
    fork_before_ns = 0
    polls = 0
    active_ns = 0
    if trace is not None:
        trace.start()
    while True:
        # Encoding the poll's records is the sequencer's work: off the clock.
        head = source.snapshot() if snapshot_dir is not None and polls == 1 else b""
        batch = head + source.transfers(FRAMES_PER_POLL)
        frames = frames_of(batch)
        poll_started = previous = clock()
        for kind, view in frames:
            apply_frame(kind, view)
            if processor.snapshot_requested and writer == "replica":
                processor.snapshot_requested = False
                run.snapshot_index = processor.applied_index
                child_started_ns = clock()
                child_pid = -1  # the snapshotter's file is awaited below
                fork_before_ns = previous  # fork_to_next_apply_ms: this record and the next
            elif processor.snapshot_requested:
                processor.snapshot_requested = False
                assert snapshot_dir is not None
                before = clock()
                child_pid = fork_and_write_snapshot(
                    snapshot_dir, processor.snapshot_file_contents
                )
                child_started_ns = clock()
                run.fork_ms = (child_started_ns - before) / 1e6
                run.snapshot_index = processor.applied_index
                fork_before_ns = before
            elif fork_before_ns:
                # The first record applied after the fork: the stall as the blp role sees it.
                run.fork_to_next_apply_ms = (clock() - fork_before_ns) / 1e6
                fork_before_ns = 0
            now = clock()
            gaps.append(now - previous)
            ends.append(now)
            previous = now
        drain()
        if child_pid == -1:
            assert snapshot_dir is not None
            if snapshots.snapshot_path(snapshot_dir, run.snapshot_index).exists():  # renamed: whole
                child_done_ns = clock()
                run.child_s = (child_done_ns - child_started_ns) / 1e9
                child_pid = 0
            elif (clock() - child_started_ns) / 1e9 > CHILD_TIMEOUT_S:
                raise RuntimeError(f"the snapshotter wrote no snapshot within {CHILD_TIMEOUT_S} s")
        elif child_pid:
            code = reap_snapshot_writer(child_pid)
            if code is not None:
                assert code == 0, f"the snapshot writer exited with {code}"
                child_done_ns = clock()
                run.child_s = (child_done_ns - child_started_ns) / 1e9
                child_pid = 0
            elif (clock() - child_started_ns) / 1e9 > CHILD_TIMEOUT_S:
                os.kill(child_pid, 9)
                os.waitpid(child_pid, 0)
                raise RuntimeError(f"the snapshot writer ran over {CHILD_TIMEOUT_S} s")
        active_ns += clock() - poll_started
        run.applied += len(frames)
        polls += 1
        if polls < polls_min or active_ns / 1e9 < seconds_min:
            continue
        if snapshot_dir is None:
            break
        if child_done_ns and (clock() - child_done_ns) / 1e9 >= AFTER_CHILD_S:
            break
    run.elapsed_s = active_ns / 1e9
    if trace is not None:
        trace.stop()
        run.explain(trace, names or {})
    return run


def bench_pause(
    processor: Processor[Any], source: RecordSource, snapshot_dir: Path, runs: int
) -> tuple[list[PauseRun], list[PauseRun]]:
    """(with snapshot, baseline) runs, alternating; each baseline as long as its snapshot run."""
    apply_loop(processor, source, None, 4)  # warm-up, discarded
    with_snapshot, baseline = [], []
    for _ in range(runs):
        run = apply_loop(processor, source, snapshot_dir, 2)
        with_snapshot.append(run)
        baseline.append(apply_loop(processor, source, None, max(2, run.applied // FRAMES_PER_POLL)))
    return with_snapshot, baseline


def bench_child_write(processor: Processor[Any], snapshot_dir: Path) -> float:
    """Seconds from fork to the child's exit when the parent only waits: the write alone."""
    started = time.perf_counter()
    pid = fork_and_write_snapshot(snapshot_dir, processor.snapshot_file_contents)
    _, status = os.waitpid(pid, 0)
    elapsed = time.perf_counter() - started
    assert os.waitstatus_to_exitcode(status) == 0, status
    return elapsed


def build_state(accounts: int, node: str = "n1") -> tuple[Processor[Any], RecordSource]:
    """A ledger of `accounts` accounts built by applying their OpenAccount + Deposit records
    (`node`: the processor's, "n1" the blp's, whose session the records are)."""
    processor: Processor[Any] = Processor(Ledger, node=node)
    source = RecordSource(accounts)
    apply_frame = processor.apply_frame
    for kind, view in frames_of(source.session_open()):
        apply_frame(kind, view)
    for first in range(0, accounts, BATCH_RECORDS // 2):
        for kind, view in frames_of(source.setup(first, min(BATCH_RECORDS // 2, accounts - first))):
            apply_frame(kind, view)
        processor.drain_outputs()
    return processor, source


def stall_label(accounts: int) -> str:
    """1_000_000 -> "1m", 5_000_000 -> "5m", 2_000 -> "2k": the suffix of snapshot_stall_ms_*."""
    for divisor, suffix in ((1_000_000, "m"), (1_000, "k")):
        if accounts % divisor == 0:
            return f"{accounts // divisor}{suffix}"
    return str(accounts)


def bench_stall(accounts: int, snapshot_dir: Path, seconds_min: float) -> dict[str, Any]:
    """The blp's snapshot stall at a state of `accounts` accounts: the longest gap between two
    applies of an apply loop that forks the snapshot writer (as `bench_pause`), measured for at
    least `seconds_min` of applying."""
    started = time.perf_counter()
    processor, source = build_state(accounts)
    build_s = time.perf_counter() - started
    apply_loop(processor, source, None, 4)  # warm-up, discarded
    trace = SchedTrace.open()
    try:
        run = apply_loop(processor, source, snapshot_dir, 2, seconds_min, trace=trace)
        baseline = apply_loop(processor, source, None, max(2, run.applied // FRAMES_PER_POLL), trace=trace)
    finally:
        if trace is not None:
            trace.close()
    label = stall_label(accounts)
    figures = {
        f"snapshot_stall_ms_{label}": run.max_gap_ms,
        f"snapshot_stall_baseline_ms_{label}": baseline.max_gap_ms,  # as long, no snapshot
        **causes("", label, run, baseline),
        f"snapshot_stall_fork_ms_{label}": run.fork_ms,
        f"snapshot_stall_measured_s_{label}": run.elapsed_s,
        f"snapshot_stall_build_s_{label}": build_s,
    }
    del processor, source
    gc.collect()
    for path in snapshot_dir.iterdir():
        path.unlink()
    return figures


def causes(writer: str, label: str, run: PauseRun, baseline: PauseRun) -> dict[str, Any]:
    """What the longest gaps of a stall window and of its baseline were, and the longest
    collection in each (empty without a SchedTrace)."""
    if not run.cause:
        return {}
    return {
        f"snapshot_stall{writer}_cause_{label}": run.cause,
        f"snapshot_stall{writer}_baseline_cause_{label}": baseline.cause,
        f"snapshot_stall{writer}_gc_ms_max_{label}": run.gc_ms_max,
        f"snapshot_stall{writer}_baseline_gc_ms_max_{label}": baseline.gc_ms_max,
        **({} if not writer else {
            # What the snapshotter itself took from the blp: its CPU on the blp's CPU while the
            # blp waited, over the window and in its longest stretch (the baseline's: following).
            f"snapshotter_took_ms_{label}": run.snapshotter_took_ms,
            f"snapshotter_took_ms_max_{label}": run.snapshotter_took_ms_max,
            f"snapshotter_took_baseline_ms_{label}": baseline.snapshotter_took_ms,
            f"snapshotter_took_baseline_ms_max_{label}": baseline.snapshotter_took_ms_max,
        }),
    }


def stall_summary(results: dict[str, Any], stall_accounts: tuple[int, ...],
                  stall_writers: tuple[str, ...]) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Per writer and size ("replica 5m"): the stall, its baseline and what each longest gap was."""
    summary = {}
    for count in stall_accounts:
        label = stall_label(count)
        for writer in stall_writers:
            infix = "" if writer == "fork" else "_replica"
            summary[f"{writer} {label}"] = {
                "stall_ms": round(results[f"snapshot_stall{infix}_ms_{label}"], 3),
                "baseline_ms": round(results[f"snapshot_stall{infix}_baseline_ms_{label}"], 3),
                "cause": results.get(f"snapshot_stall{infix}_cause_{label}", ""),
                "baseline_cause": results.get(f"snapshot_stall{infix}_baseline_cause_{label}", ""),
            }
            if writer == "replica" and f"snapshotter_took_ms_{label}" in results:
                summary[f"{writer} {label}"]["snapshotter_took_ms"] = round(results[f"snapshotter_took_ms_{label}"], 3)
                summary[f"{writer} {label}"]["snapshotter_took_ms_max"] = round(results[f"snapshotter_took_ms_max_{label}"], 3)
    return summary


def bench_stall_replica(accounts: int, snapshot_dir: Path, seconds_min: float,
                        policy: str = SNAPSHOTTER_POLICIES[0]) -> dict[str, Any]:  # fmt: skip
    """The blp's snapshot stall with `snapshot.writer = "replica"` at `accounts` accounts: the
    longest gap between two applies while the snapshotter, a second process with its own copy
    of the state fed the same records, writes the snapshot (`benches._snapshotter_child`); and
    its cost: the second apply's CPU per record, the second copy's memory. Both copies end with
    the same state hash, or the run fails. `policy`: the snapshotter's scheduling, "idle" (as
    the real one, `run_at_idle_priority`), "normal" (as it was before) or "pinned" (this process
    pinned to its first CPU, the snapshotter at SCHED_IDLE on the others)."""
    label = stall_label(accounts)
    unpinned = available_cpus()
    pinned = policy == "pinned"
    if pinned:
        policy = f"idle-off:{unpinned[0]}"  # what the child does (benches._snapshotter_child)
    work = snapshot_dir.parent / f"snapshotter-{label}"
    work.mkdir()
    feed_path, ready, result = work / "feed.bin", work / "ready", work / "result.json"
    feed = open(feed_path, "wb")  # closed in the finally below
    # Started before the blp's state is built: the two build at once, on the two cores.
    child = subprocess.Popen([sys.executable, "-m", "benches._snapshotter_child", str(feed_path),
                              str(snapshot_dir), str(accounts), str(ready), str(result), policy])  # fmt: skip
    if pinned:  # after the child's start, which would inherit it
        pin(unpinned[0])
    trace = SchedTrace.open()
    try:
        started = time.perf_counter()
        processor, source = build_state(accounts)
        build_s = time.perf_counter() - started
        deadline = time.monotonic() + SNAPSHOTTER_READY_TIMEOUT_S
        while not ready.exists():
            if child.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the snapshotter process did not build its state (exit {child.poll()})")
            time.sleep(0.05)
        source.feed = feed
        warm = apply_loop(processor, source, None, 4)  # warm-up, discarded; fed to the snapshotter too
        names = {child.pid: SNAPSHOTTER_NAME}
        run = apply_loop(processor, source, snapshot_dir, 2, seconds_min, writer="replica", trace=trace, names=names)
        baseline = apply_loop(processor, source, None, max(2, run.applied // FRAMES_PER_POLL), trace=trace, names=names)
        blp_rss_mib = psutil.Process().memory_info().rss / 2**20
        feed.write(FEED_LENGTH.pack(0))
        feed.flush()
        child.wait(timeout=CHILD_TIMEOUT_S)
        assert child.returncode == 0, f"the snapshotter process exited with {child.returncode}"
        child_figures = json.loads(result.read_text())
        assert child_figures["written"] == [run.snapshot_index], (child_figures["written"], run.snapshot_index)
        assert child_figures["state_hash"] == processor.state_hash().hex(), "the two copies of the state disagree"
        figures = {
            f"snapshot_stall_replica_ms_{label}": run.max_gap_ms,
            f"snapshot_stall_replica_baseline_ms_{label}": baseline.max_gap_ms,  # the snapshotter only following
            **causes("_replica", label, run, baseline),
            f"snapshot_stall_replica_at_record_ms_{label}": run.fork_to_next_apply_ms,  # the SNAPSHOT record and the next
            f"snapshot_stall_replica_measured_s_{label}": run.elapsed_s,
            f"snapshot_stall_replica_write_s_{label}": run.child_s,  # SNAPSHOT applied -> file renamed
            f"snapshotter_encode_write_s_{label}": child_figures["write_wall_s"],
            f"snapshotter_apply_us_per_record_{label}": 1e6 * child_figures["apply_cpu_s"] / child_figures["records"],
            f"blp_apply_us_per_record_{label}": 1e6 / warm.per_s,
            f"snapshotter_rss_mib_{label}": child_figures["rss_mib"],
            f"snapshotter_scheduling_{label}": child_figures["scheduling"],  # what the child got: SCHED_IDLE or the fallback
            f"blp_rss_mib_{label}": blp_rss_mib,
            f"snapshot_stall_replica_build_s_{label}": build_s,
        }
        del processor, source
    finally:
        if trace is not None:
            trace.close()
        pin(unpinned)
        feed.close()
        if child.poll() is None:
            child.kill()
            child.wait()
        shutil.rmtree(work, ignore_errors=True)
    gc.collect()
    for path in snapshot_dir.iterdir():
        path.unlink()
    return figures


# -- 5. restore ----------------------------------------------------------------------------------


def bench_restore(path: Path, runs: int) -> tuple[float, float, float]:
    """Median (read_snapshot s, Processor.restore s, accounts restored)."""
    reads, restores = [], []
    accounts = 0
    for _ in range(runs):
        started = time.perf_counter()
        _, body = snapshots.read_snapshot(path)
        read_done = time.perf_counter()
        processor: Processor[Any] = Processor.restore(Ledger, body, node="n1")
        restores.append(time.perf_counter() - read_done)
        reads.append(read_done - started)
        accounts = len(processor.app.accounts)  # type: ignore[attr-defined]
        del processor, body
        gc.collect()
    return statistics.median(reads), statistics.median(restores), accounts


def anon_huge_mib() -> float:
    """MiB of this process's heap on transparent huge pages (a fork copies 1 PMD per 2 MiB
    of them instead of 512 PTEs)."""
    try:
        with open("/proc/self/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


# -- the run -------------------------------------------------------------------------------------


def run(accounts: int, records: int, tail: int, runs: int, base: Path | None,
        stall_accounts: tuple[int, ...] = STALL_ACCOUNTS, seconds_min: float = MEASURE_S_MIN,
        stall_writers: tuple[str, ...] = STALL_WRITERS,
        snapshotter_policy: str = SNAPSHOTTER_POLICIES[0]) -> dict[str, Any]:
    assert 0 < tail < records, (tail, records)
    # The main tail, and shorter ones: the speed-up is bounded by records / tail, so how it
    # grows as the tail shrinks says what a snapshot interval buys.
    tails = sorted({tail, max(1, tail // 2), max(1, tail // 10)}, reverse=True)
    assert records - tail > 1 + 2 * accounts, "the snapshot must come after the setup records"
    results: dict[str, Any] = {"accounts": accounts, "journal_records": records,
                               "tail_records": tail}  # fmt: skip
    root = Path(tempfile.mkdtemp(dir=base, prefix="seqd-bench-recovery-"))
    try:
        journal_dir = root / "journal"
        recovery_snapshots = {records - t: root / f"snapshots-tail-{t}" for t in tails}
        pause_snapshots = root / "snapshots-pause"
        for directory in recovery_snapshots.values():
            directory.mkdir()
        pause_snapshots.mkdir()
        source = RecordSource(accounts)
        results.update(write_journal(journal_dir, source, records))

        results["read_only_records_per_s"] = bench_read_only(journal_dir, records)
        genesis, genesis_s, write_s = recover_from_genesis(
            journal_dir, recovery_snapshots, records
        )
        results["recovery_genesis_s"] = genesis_s
        results["replay_records_per_s"] = records / genesis_s
        results["snapshot_write_inprocess_s"] = write_s
        by_tail = {}
        for t in tails:
            recovered, figures = recover_from_snapshot(
                journal_dir, recovery_snapshots[records - t], records
            )
            assert recovered.rolling_hash == genesis.rolling_hash, "recoveries disagree"
            assert recovered.state_hash() == genesis.state_hash(), "recoveries disagree"
            del recovered
            gc.collect()
            if t == tail:
                results.update(figures)
                results["recovery_speedup"] = genesis_s / figures["recovery_snapshot_s"]
                results["recovery_speedup_bound"] = records / tail
            by_tail[t] = {
                "recovery_snapshot_s": round(figures["recovery_snapshot_s"], 3),
                "speedup": round(genesis_s / figures["recovery_snapshot_s"], 2),
            }
        results["recovery_by_tail"] = by_tail

        results["rss_mib"] = psutil.Process().memory_info().rss / 2**20
        results["anon_huge_mib"] = anon_huge_mib()
        with_snapshot, baseline = bench_pause(genesis, source, pause_snapshots, runs)
        pauses = [r.max_gap_ms for r in with_snapshot]
        results["snapshot_pause_ms"] = statistics.median(pauses)
        results["snapshot_pause_ms_max"] = max(pauses)
        results["snapshot_pause_ms_runs"] = pauses
        results["fork_ms"] = statistics.median(r.fork_ms for r in with_snapshot)
        results["fork_to_next_apply_ms"] = statistics.median(
            r.fork_to_next_apply_ms for r in with_snapshot
        )
        results["baseline_max_gap_ms"] = statistics.median(r.max_gap_ms for r in baseline)
        results["gap_us_p999_during_snapshot"] = statistics.median(
            r.percentile_gap_us(0.999) for r in with_snapshot
        )
        results["gap_us_p999_baseline"] = statistics.median(
            r.percentile_gap_us(0.999) for r in baseline
        )
        results["stalled_ms_during_snapshot"] = statistics.median(r.stalled_ms for r in with_snapshot)
        results["stalled_ms_baseline"] = statistics.median(r.stalled_ms for r in baseline)
        results["apply_per_s_during_snapshot"] = statistics.median(r.per_s for r in with_snapshot)
        results["apply_per_s_baseline"] = statistics.median(r.per_s for r in baseline)
        results["snapshot_child_s_while_applying"] = statistics.median(
            r.child_s for r in with_snapshot
        )
        results["snapshot_write_s"] = statistics.median(
            bench_child_write(genesis, pause_snapshots) for _ in range(runs)
        )
        newest = snapshots.list_snapshots(pause_snapshots)[0]
        assert newest.valid, newest.error
        results["snapshot_bytes"] = newest.path.stat().st_size
        del genesis
        gc.collect()

        read_s, restore_s, restored = bench_restore(newest.path, runs)
        assert restored == accounts + 1, (restored, accounts)  # the mint too
        results["snapshot_read_s"] = read_s
        results["processor_restore_s"] = restore_s
        results["restore_s"] = read_s + restore_s

        # Issue 13: the stall at fixed state sizes, whatever --accounts is, one state at a time.
        stall_dir = root / "snapshots-stall"
        stall_dir.mkdir()
        results["snapshot_stall_ms_writer"] = "fork"  # snapshot_stall_ms_*; the replica's: *_replica_*
        for count in stall_accounts:
            if "fork" in stall_writers:
                results.update(bench_stall(count, stall_dir, seconds_min))
            if "replica" in stall_writers:
                results.update(bench_stall_replica(count, stall_dir, seconds_min, snapshotter_policy))
        results["snapshotter_policy"] = snapshotter_policy
        results["snapshot_stall_summary"] = stall_summary(results, stall_accounts, stall_writers)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    results["pause_target_met"] = results["snapshot_pause_ms_max"] < PAUSE_TARGET_MS
    results["speedup_target_met"] = results["recovery_speedup"] >= SPEEDUP_TARGET
    results["runs"] = runs
    results["python"] = sys.version.split()[0]
    results["cpus"] = os.cpu_count()
    results["load_average_1m"] = os.getloadavg()[0]
    # The allocator decides the page size of the heap, and so the fork's cost (see RESULTS.md).
    results["pythonmalloc"] = os.environ.get("PYTHONMALLOC", "")
    results["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES", "")
    return {key: round(value, 4) if isinstance(value, float) else value
            for key, value in results.items()}  # fmt: skip


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="200k accounts, 1M records (< 60 s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--accounts", type=int, default=None, help="ledger accounts")
    parser.add_argument("--records", type=int, default=None, help="journal records")
    parser.add_argument("--tail", type=int, default=None, help="records after the snapshot")
    parser.add_argument("--runs", type=int, default=None, help="pause and restore runs")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default /tmp)")
    parser.add_argument("--stall-accounts", default=",".join(map(str, STALL_ACCOUNTS)),
                        help="state sizes of the snapshot_stall_ms_* figures, comma-separated")
    parser.add_argument("--stall-writers", default=",".join(STALL_WRITERS),
                        help="snapshot.writer modes of the stall figures: fork (snapshot_stall_ms_*), "
                        "replica (snapshot_stall_replica_ms_*), comma-separated")
    parser.add_argument("--snapshotter-policy", choices=SNAPSHOTTER_POLICIES, default=SNAPSHOTTER_POLICIES[0],
                        help="the replica writer's snapshotter process: idle (SCHED_IDLE, as the real "
                        "snapshotter runs), normal (as it ran before; for before/after runs) or pinned (this process, the blp, "
                        "pinned to a CPU and the snapshotter at SCHED_IDLE on the others, as with roles.blp.cpu set)")
    parser.add_argument("--min-seconds", type=float, default=MEASURE_S_MIN,
                        help=f"apply at least this long around each stall (default {MEASURE_S_MIN}; 0 for a smoke run)")
    args = parser.parse_args(argv)
    try:
        stall_accounts = tuple(int(count) for count in args.stall_accounts.split(",") if count)
    except ValueError:
        parser.error(f"--stall-accounts={args.stall_accounts!r}: give account counts separated by commas, e.g. 1000000,5000000")
    if args.quick:
        accounts, records, tail, runs = 200_000, 1_000_000, 100_000, 3
    else:
        accounts, records, tail, runs = 1_000_000, 10_000_000, 1_000_000, 3
    accounts = args.accounts or accounts
    records = args.records or records
    tail = args.tail or tail
    runs = args.runs or runs
    stall_writers = tuple(writer for writer in args.stall_writers.split(",") if writer)
    if not set(stall_writers) <= set(STALL_WRITERS):
        parser.error(f"--stall-writers={args.stall_writers!r}: give {' and/or '.join(STALL_WRITERS)}, separated by commas")
    results = run(accounts, records, tail, runs, args.dir, stall_accounts, args.min_seconds, stall_writers,
                  args.snapshotter_policy)
    if args.json:
        print(json.dumps(results))
    else:
        for key, value in results.items():
            if key == "snapshot_stall_summary":
                continue
            shown = f"{value:>16,}" if isinstance(value, int) and not isinstance(value, bool) else (
                f"{value:>16,.4f}" if isinstance(value, float) else f"{value!s:>16}")
            print(f"{key:36} {shown}")
    print_stall_summary(results.get("snapshot_stall_summary", {}))
    return 0


def print_stall_summary(summary: dict[str, dict[str, Any]]) -> None:
    """The stall figures a reader compares, on stderr (stdout stays one JSON object with --json)."""
    for name, figures in summary.items():
        print(f"{name:>10}: stall {figures['stall_ms']:8.3f} ms ({figures['cause'] or 'no trace'})\n"
              f"{'':>10}  baseline {figures['baseline_ms']:8.3f} ms ({figures['baseline_cause'] or 'no trace'})"
              + (f"\n{'':>10}  the snapshotter on the blp's CPU while the blp waited: {figures['snapshotter_took_ms']:.3f} ms "
                 f"in all, {figures['snapshotter_took_ms_max']:.3f} ms at most at once" if "snapshotter_took_ms" in figures else ""),
              file=sys.stderr)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
