"""The journal on a full disk: room reserved ahead, writes refused before they start, recovery
that needs no free space (issue 17, part 2).

Most tests shrink the disk with `LimitedDiskSpace` (the journal directory behaves as a file
system of the size written in a file), so they run unprivileged and fast; the ones where the
kernel's own ENOSPC matters (a partial copy, a file system smaller than a segment) run on a small
tmpfs when root (`tests/small_fs.py`).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from sequencer import logtools
from sequencer.journal import (
    SEGMENT_BYTES_DEFAULT,
    SEGMENT_HEADER_BYTES,
    SPARE_NAME,
    WRITE_SLACK_BYTES,
    Journal,
    JournalFullError,
    LimitedDiskSpace,
    list_segments,
    scan_segment,
)
from sequencer.journal import writer as journal_module
from tests.small_fs import SMALL_FS_BYTES, SmallFilesystem, small_filesystem  # noqa: F401
from tests.test_journal import assert_records, make_batch

SEGMENT_BYTES = 8192
HALF = SEGMENT_BYTES // 2


class Disk:
    """A LimitedDiskSpace and the knob that resizes it."""

    def __init__(self, directory: Path, capacity: int) -> None:
        self.capacity_path = directory.parent / f"{directory.name}.capacity"
        self.space = LimitedDiskSpace(self.capacity_path)
        self.resize(capacity)

    def resize(self, capacity: int) -> None:
        self.capacity_path.write_text(str(capacity))

    def used(self, directory: Path) -> int:
        return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


@pytest.fixture
def journal_dir(tmp_dir: Path) -> Path:
    directory = tmp_dir / "journal"
    directory.mkdir()
    return directory


def fill_to(journal: Journal, offset: int, batch_records: int = 2) -> None:
    """Append small batches until the active segment's write offset reaches `offset`."""
    while journal._write_offset < offset:
        journal.append(make_batch(journal.last_index + 1, batch_records))
    journal.sync()


def test_next_segment_is_preallocated_once_the_active_one_is_half_full_and_the_roll_uses_it(journal_dir):
    with Journal.open(journal_dir, segment_bytes=SEGMENT_BYTES) as journal:
        fill_to(journal, HALF - 512)
        assert journal.reserve_space() is None
        assert not (journal_dir / SPARE_NAME).exists()  # not yet: less than half full
        fill_to(journal, HALF)
        assert journal.reserve_space() is None
        spare = journal_dir / SPARE_NAME
        assert spare.stat().st_size == SEGMENT_BYTES
        spare_inode = spare.stat().st_ino
        segments = len(journal.segments)
        while len(journal.segments) == segments:
            journal.append(make_batch(journal.last_index + 1, 2))
        assert not spare.exists()
        assert journal.segments[-1].stat().st_ino == spare_inode  # the roll renamed the spare
        assert journal.reserve_space() is None
        last = journal.last_index
        journal.sync()
    assert not (journal_dir / SPARE_NAME).exists()  # closing gives the space back
    assert_records(journal_dir, 1, last)


def test_shortage_shows_while_half_a_segment_of_room_is_left_and_a_roll_that_does_not_fit_writes_nothing(journal_dir):
    disk = Disk(journal_dir, capacity=1 << 20)
    with Journal.open(journal_dir, segment_bytes=SEGMENT_BYTES, disk=disk.space) as journal:
        disk.resize(disk.used(journal_dir) + SEGMENT_BYTES - 1)  # no room for a second segment
        fill_to(journal, HALF)
        shortage = journal.reserve_space()
        assert shortage is not None
        assert (shortage.needed_bytes, shortage.free_bytes) == (SEGMENT_BYTES, SEGMENT_BYTES - 1)
        assert "preallocate the next segment" in str(shortage)
        assert "the node resumes by itself" in str(shortage)
        # The rest of the active segment is preallocated: appends go on until it is full.
        with pytest.raises(JournalFullError) as raised:
            while True:
                journal.append(make_batch(journal.last_index + 1, 2))
        assert journal._write_offset > SEGMENT_BYTES - 512
        last = journal.last_index
        assert raised.value.needed_bytes == SEGMENT_BYTES
        assert "nothing was written" in str(raised.value)
        assert len(list_segments(journal_dir)) == 1
        assert not list(journal_dir.glob("*.tmp"))  # the failed segment file is gone
        assert journal.sync() == last  # not fail-stop: the journal still works

        disk.resize(1 << 20)  # space is freed
        journal.append(make_batch(last + 1, 2))
        assert journal.reserve_space() is None
        journal.sync()
    assert_records(journal_dir, 1, last + 2)


def test_without_preallocation_a_write_that_does_not_fit_is_refused_before_any_byte_is_written(journal_dir):
    disk = Disk(journal_dir, capacity=1 << 20)
    with Journal.open(journal_dir, segment_bytes=SEGMENT_BYTES, preallocate=False, disk=disk.space) as journal:
        fill_to(journal, 1024)
        assert journal.reserve_space() is None
        used = disk.used(journal_dir)
        disk.resize(used + HALF + WRITE_SLACK_BYTES - 1)
        shortage = journal.reserve_space()
        assert shortage is not None and shortage.needed_bytes == HALF + WRITE_SLACK_BYTES
        journal.append(make_batch(journal.last_index + 1, 2))  # what fits is still written

        disk.resize(disk.used(journal_dir) + WRITE_SLACK_BYTES + 100)
        segment = journal.segments[-1]
        size, last = segment.stat().st_size, journal.last_index
        with pytest.raises(JournalFullError):
            journal.append(make_batch(last + 1, 4))  # ~500 bytes: more than the 100 left
        assert segment.stat().st_size == size and journal.last_index == last
        journal.sync()
    with Journal.open(journal_dir, segment_bytes=SEGMENT_BYTES, preallocate=False) as journal:
        assert journal.recovery is not None and journal.recovery.torn_tail is None
        assert journal.last_index == last
        journal.append(make_batch(last + 1, 4))
        journal.sync()
    assert_records(journal_dir, 1, last + 4)


def test_enospc_in_the_middle_of_a_write_is_cut_back_so_nothing_is_torn(journal_dir, monkeypatch):
    """The disk can fill between the check and the write (another writer on the file system):
    the journal cuts the file back to where the write began and stays usable."""
    with Journal.open(journal_dir, segment_bytes=SEGMENT_BYTES, preallocate=False) as journal:
        fill_to(journal, 1024)
        segment = journal.segments[-1]
        size, last = segment.stat().st_size, journal.last_index
        real_pwritev = os.pwritev

        def half_then_full(fd: int, buffers: list[bytes], offset: int) -> int:
            data = b"".join(bytes(b) for b in buffers)
            return os.pwrite(fd, data[: len(data) // 2], offset)

        def full(fd: int, data: bytes, offset: int) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(journal_module.os, "pwritev", half_then_full)
        with monkeypatch.context() as patch:
            patch.setattr(journal_module.os, "pwrite", full)
            with pytest.raises(JournalFullError):
                journal.append(make_batch(last + 1, 6))
        monkeypatch.setattr(journal_module.os, "pwritev", real_pwritev)
        assert segment.stat().st_size == size and journal.last_index == last
        journal.append(make_batch(last + 1, 6))  # usable: not fail-stop
        journal.sync()
    with Journal.open(journal_dir, segment_bytes=SEGMENT_BYTES, preallocate=False) as journal:
        assert journal.recovery is not None and journal.recovery.torn_tail is None
    assert_records(journal_dir, 1, last + 6)


def _tear(segment: Path, garbage_bytes: int) -> int:
    """A crash mid-append: half a batch after the last one. Returns where it starts."""
    end = scan_segment(segment).end_offset
    with segment.open("r+b") as file:
        file.seek(end)
        file.write(b"SQBT" + b"\xab" * (garbage_bytes - 4))
    return end


@pytest.mark.parametrize("preallocate", [True, False])
def test_torn_tail_on_a_full_disk_is_cut_without_a_copy_and_no_file_is_left(journal_dir, preallocate):
    disk = Disk(journal_dir, capacity=1 << 20)
    with Journal.open(journal_dir, segment_bytes=SEGMENT_BYTES, preallocate=preallocate, disk=disk.space) as journal:
        fill_to(journal, 1024)
        last = journal.last_index
    segment = list_segments(journal_dir)[-1][1]
    offset = _tear(segment, 512)
    disk.resize(disk.used(journal_dir))  # not a byte free
    with Journal.open(journal_dir, segment_bytes=SEGMENT_BYTES, preallocate=preallocate, disk=disk.space) as journal:
        assert journal.recovery is not None
        torn = journal.recovery.torn_tail
        assert torn is not None and torn.offset == offset
        assert torn.broken_path is None
        assert torn.copy_error is not None and "No space left" in torn.copy_error
        assert "WITHOUT a copy: no room on the disk" in str(journal.recovery)
        assert journal.last_index == last
    assert not list(journal_dir.glob("*.broken*"))
    report = logtools.check(journal_dir)
    assert report.ok and not report.broken_copies and not report.empty_leftovers, report
    assert_records(journal_dir, 1, last)


def test_partial_copy_of_a_torn_tail_is_removed_when_the_disk_fills_during_it(
    small_filesystem: SmallFilesystem,  # noqa: F811
):
    """On a real file system the copy can get part of the way: that part is no evidence either."""
    directory = small_filesystem.journal_dir
    segment_bytes = 1 << 20
    disk = small_filesystem.disk_space()
    with Journal.open(directory, segment_bytes=segment_bytes, disk=disk) as journal:
        fill_to(journal, 1024)
        last = journal.last_index
    segment = list_segments(directory)[-1][1]
    _tear(segment, 256 << 10)  # inside the preallocated segment: needs no space
    small_filesystem.fill(leave_bytes=64 << 10)  # room for a quarter of the copy
    with Journal.open(directory, segment_bytes=segment_bytes, disk=disk) as journal:
        assert journal.recovery is not None and journal.recovery.torn_tail is not None
        assert journal.recovery.torn_tail.broken_path is None
        assert journal.last_index == last
    assert not list(directory.glob("*.broken*"))
    small_filesystem.free_space()
    assert_records(directory, 1, last)


def test_first_segment_larger_than_the_file_system_is_refused_naming_both_sizes_and_the_setting(
    small_filesystem: SmallFilesystem,  # noqa: F811
):
    directory = small_filesystem.journal_dir
    disk = small_filesystem.disk_space()
    with pytest.raises(JournalFullError) as raised:
        Journal.open(directory, segment_bytes=SEGMENT_BYTES_DEFAULT, disk=disk)
    message = str(raised.value)
    assert "cannot create its first segment" in message
    assert f"journal.segment_bytes={SEGMENT_BYTES_DEFAULT}" in message
    assert f"(of {SMALL_FS_BYTES})" in message
    assert "lower journal.segment_bytes (for example to 8388608)" in message  # a quarter, rounded down
    assert not any(directory.glob("*.seg*"))
    with Journal.open(directory, segment_bytes=8 << 20, disk=disk) as journal:  # the advice works
        journal.append(make_batch(1, 3))
        journal.sync()


def test_log_check_does_not_count_an_empty_broken_file_as_evidence(journal_dir):
    with Journal.open(journal_dir, segment_bytes=SEGMENT_BYTES) as journal:
        fill_to(journal, 1024)
    segment = list_segments(journal_dir)[-1][1]
    empty = segment.with_name(f"{segment.name}.broken-{SEGMENT_HEADER_BYTES}")
    empty.touch()
    kept = segment.with_name(f"{segment.name}.broken-100")
    kept.write_bytes(b"SQBT" + bytes(12))
    report = logtools.check(journal_dir)
    assert report.ok
    assert report.broken_copies == [kept]
    assert report.empty_leftovers == [empty]
    assert "1 empty .broken file(s), not evidence" in str(report)
