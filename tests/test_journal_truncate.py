"""`Journal.truncate_after` is crash-safe at every step (sequencer/journal/truncate.py).

A child process opens a journal and truncates it with a hook that `os._exit`s after one step of
TRUNCATION_STEPS (no cleanup, no close: as a crash, short of a power loss). The parent reopens and
checks: before the commit point (the intent made durable) the old log stands whole; from it on
the log ends exactly at the index asked for; either way every record at or below that index is
byte for byte what was written, and `seqd log check` finds the journal clean.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sequencer import logtools
from sequencer.journal import (
    BATCH_HEADER_BYTES,
    INTENT_NAME,
    INTENT_TEMP_NAME,
    TRUNCATION_STEPS,
    JournalCorruptError,
    JournalFullError,
    LimitedDiskSpace,
    list_segments,
    read_records,
)
from tests.test_journal import (
    SMALL_SEGMENT_BYTES,
    assert_records,
    batch_offsets,
    fill,
    make_batch,
    open_journal,
)

ROOT = Path(__file__).resolve().parent.parent
CRASH_EXIT = 77
CHILD_TIMEOUT_S = 60.0
BATCHES = 40  # of 10 records each: about 16 segments of SMALL_SEGMENT_BYTES

CHILD = f"""
import os, sys
from sequencer.journal import Journal
from sequencer.journal.truncate import finish_interrupted_truncation

directory, index, crash_step, crash_occurrence, during = sys.argv[1:6]
seen = {{}}

def hook(step):
    seen[step] = seen.get(step, 0) + 1
    if step == crash_step and seen[step] == int(crash_occurrence):
        os._exit({CRASH_EXIT})

if during == "recovery":
    finish_interrupted_truncation(__import__("pathlib").Path(directory), hook)
else:
    journal = Journal.open(directory, segment_bytes={SMALL_SEGMENT_BYTES})
    journal.truncation_hook = hook
    journal.truncate_after(int(index))
sys.exit(3)  # the step never came
"""


def crash_child(directory: Path, index: int, step: str, occurrence: int = 1,
                during: str = "truncate") -> None:  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(directory), str(index), step, str(occurrence), during],
        cwd=ROOT, timeout=CHILD_TIMEOUT_S, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == CRASH_EXIT, (result.returncode, result.stderr)


def build(directory: Path) -> int:
    with open_journal(directory) as journal:
        fill(journal, [10] * BATCHES)
        return journal.last_index


def assert_clean(directory: Path) -> None:
    report = logtools.check(directory)
    assert report.ok, str(report)
    assert not (directory / INTENT_NAME).exists()
    assert not (directory / INTENT_TEMP_NAME).exists()


def steps_for(index: int) -> list[tuple[str, int]]:
    """Every (step, occurrence) a truncation after `index` of the built journal passes."""
    segments_after = sum(1 for first, _ in list_segments_of_built() if first > index + 1)
    inside_batch = index % 10 != 0
    steps: list[tuple[str, int]] = [("intent_written", 1), ("intent_durable", 1)]
    steps += [("segment_deleted", n) for n in sorted({1, segments_after}) if segments_after]
    if inside_batch:
        steps.append(("batch_rewritten", 1))
    steps += [("segment_cut", 1), ("intent_removed", 1)]
    return steps


_BUILT: list[tuple[int, Path]] = []


def list_segments_of_built() -> list[tuple[int, Path]]:
    """The segment layout of `build` (computed once, in a scratch directory)."""
    if not _BUILT:
        import tempfile

        with tempfile.TemporaryDirectory() as scratch:
            build(Path(scratch) / "j")
            _BUILT.extend(list_segments(Path(scratch) / "j"))
    return _BUILT


# index 0: everything; 15: inside a batch of an early segment; 200: a batch boundary in the
# middle; 395: inside a batch of the last segment.
CASES = [(index, step, n) for index in (0, 15, 200, 395) for step, n in steps_for(index)]


def test_every_step_of_truncation_is_covered() -> None:
    assert {step for _, step, _ in CASES} == set(TRUNCATION_STEPS)


@pytest.mark.parametrize(("index", "step", "occurrence"), CASES)
def test_a_crash_at_any_step_keeps_every_record_up_to_the_cut_and_no_record_after_it_returns(
    tmp_dir, index, step, occurrence
):
    directory = tmp_dir / "journal"
    last = build(directory)
    crash_child(directory, index, step, occurrence)
    with open_journal(directory) as journal:
        committed = step != "intent_written"  # the intent is durable from "intent_durable" on
        expected_last = index if committed else last
        assert journal.last_index == expected_last
        assert journal.durable_index == expected_last
        assert journal.recovery.torn_tail is None
        assert journal.recovery.truncation_finished == (
            index if committed and step != "intent_removed" else None
        )
        # The journal carries on: a new term's records after the cut.
        journal.append(make_batch(expected_last + 1, 5, term=2))
        journal.sync()
    assert_records(directory, 1, expected_last + 5, term_of=lambda i: 1 if i <= expected_last else 2)
    assert_clean(directory)


@pytest.mark.parametrize("step", ["segment_deleted", "batch_rewritten", "segment_cut"])
def test_a_crash_while_recovery_finishes_a_truncation_is_finished_by_the_next_open(tmp_dir, step):
    directory = tmp_dir / "journal"
    build(directory)
    crash_child(directory, 15, "intent_durable")
    crash_child(directory, 15, step, during="recovery")
    with open_journal(directory) as journal:
        assert journal.last_index == 15
    assert_records(directory, 1, 15)
    assert_clean(directory)


def test_a_torn_rewrite_of_the_cut_batch_is_redone_from_the_intent(tmp_dir):
    """The kept records of the cut batch are overwritten in place; their copy in the intent is
    durable first, so garbage there (a torn write at power loss) loses none of them."""
    directory = tmp_dir / "journal"
    build(directory)
    crash_child(directory, 395, "batch_rewritten")
    _, segment = list_segments(directory)[-1]
    offset = next(o for o, _size, first, last in batch_offsets(segment) if first <= 395 <= last)
    with segment.open("r+b") as file:
        file.seek(offset + BATCH_HEADER_BYTES + 40)
        file.write(b"\xab" * 200)
    with open_journal(directory) as journal:
        assert journal.last_index == 395
    assert_records(directory, 1, 395)
    assert_clean(directory)


def test_without_the_intent_a_crash_mid_truncation_would_lose_kept_records_or_refuse(tmp_dir):
    """Why the intent exists: the same crash, with the intent removed, is not recoverable."""
    directory = tmp_dir / "journal"
    build(directory)
    crash_child(directory, 395, "batch_rewritten")
    (directory / INTENT_NAME).unlink()
    _, segment = list_segments(directory)[-1]
    offset = next(o for o, _size, first, last in batch_offsets(segment) if first <= 395 <= last)
    with segment.open("r+b") as file:
        file.seek(offset + BATCH_HEADER_BYTES + 40)
        file.write(b"\xab" * 200)
    try:
        with open_journal(directory) as journal:
            assert journal.last_index < 391  # the torn-tail cut dropped records the caller kept
    except JournalCorruptError:
        pass  # or refused, because old batches follow the torn one


def test_a_damaged_intent_refuses_to_open_naming_the_file(tmp_dir):
    directory = tmp_dir / "journal"
    build(directory)
    crash_child(directory, 15, "intent_durable")
    intent = directory / INTENT_NAME
    data = bytearray(intent.read_bytes())
    data[-1] ^= 0x01
    intent.write_bytes(bytes(data))
    with pytest.raises(JournalCorruptError, match=r"truncate\.intent.*CRC-32C mismatch.*replica"):
        open_journal(directory)
    assert logtools.check(directory).ok is False


def test_a_full_disk_refuses_a_truncation_before_anything_changes(tmp_dir):
    directory = tmp_dir / "journal"
    last = build(directory)
    capacity = tmp_dir / "capacity"
    disk = LimitedDiskSpace(capacity)
    with open_journal(directory, disk=disk) as journal:
        capacity.write_text(str(_used(directory)))  # not one byte free
        with pytest.raises(JournalFullError, match="truncation after index 15"):
            journal.truncate_after(15)
        assert journal.last_index == last
        assert not (directory / INTENT_TEMP_NAME).exists()
        capacity.unlink()
        journal.truncate_after(15)  # space freed: it goes through
        assert journal.last_index == 15
    assert_records(directory, 1, 15)
    assert_clean(directory)


def _used(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


def test_truncation_to_an_earlier_segment_then_reopen_reads_back_only_the_kept_records(tmp_dir):
    directory = tmp_dir / "journal"
    build(directory)
    with open_journal(directory) as journal:
        journal.truncate_after(15)
        assert len(journal.segments) == 1 + sum(1 for f, _ in list_segments_of_built() if 1 < f <= 16)
    assert [r.index for r in read_records(directory)] == list(range(1, 16))
    assert_clean(directory)
    assert os.listdir(directory)  # the directory itself is kept


def test_log_check_reports_a_pending_truncation(tmp_dir):
    directory = tmp_dir / "journal"
    build(directory)
    crash_child(directory, 15, "intent_durable")
    report = logtools.check(directory)
    assert report.truncation_pending == 15
    assert "interrupted truncation after index 15 is pending" in str(report)
