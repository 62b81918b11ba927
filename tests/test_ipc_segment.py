"""Segment headers: creation is exclusive and private; attach refuses anything not exactly right."""

from __future__ import annotations

import multiprocessing
import os
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

import posix_ipc
import pytest

import ipc
from ipc import platform as ipc_platform
from ipc.segment import (
    HEADER_BYTES,
    LAYOUT_VERSION,
    MAGIC,
    Segment,
    SegmentError,
    SegmentVersionError,
    creator_status,
    remove_stale,
)

SHM = Path("/dev/shm")
FORK = multiprocessing.get_context("fork")


@pytest.fixture
def name(unique: str) -> Iterator[str]:
    segment = ipc.segment_name(unique, "seg")
    yield segment
    try:
        posix_ipc.unlink_shared_memory(segment)
    except posix_ipc.ExistentialError:
        pass


def _poke(name: str, offset: int, data: bytes) -> None:
    path = SHM / name[1:]
    with path.open("r+b") as file:
        file.seek(offset)
        file.write(data)


def _create_and_exit(name: str, kind: str) -> None:
    # A creator that dies without unlinking, as a killed owner would.
    segment = Segment.create(name, kind, 256)
    segment.close()
    os._exit(0)


def _stale(name: str, kind: str = "test") -> None:
    child = FORK.Process(target=_create_and_exit, args=(name, kind))
    child.start()
    child.join(30)
    assert child.exitcode == 0, child.exitcode


def test_segment_name_is_per_node_and_rejects_separators():
    assert ipc.segment_name("n1", "log") == "/seqd.n1.log"
    with pytest.raises(ValueError, match="letters, digits"):
        ipc.segment_name("n1/../x", "log")
    with pytest.raises(ValueError, match="letters, digits"):
        ipc.segment_name("n1", "a.b")


def test_created_segment_is_private_and_attachable_by_name(name):
    with Segment.create(name, "test", 1000, capacity=7) as created:
        mode = stat.S_IMODE((SHM / name[1:]).stat().st_mode)
        assert mode == 0o600, oct(mode)
        created.buffer[0:5] = b"hello"
        with Segment.attach(name, "test") as attached:
            assert bytes(attached.buffer[0:5]) == b"hello"
            assert attached.capacity == 7
            assert attached.payload_bytes == 1000
            assert attached.creator_pid == os.getpid()
            assert attached.epoch == created.epoch
        created.unlink()
    assert not (SHM / name[1:]).exists()


def test_create_never_reuses_a_live_segment(name):
    with Segment.create(name, "test", 256):
        with pytest.raises(SegmentError, match=f"in use: created by pid {os.getpid()}, which is running"):
            Segment.create(name, "test", 256)


def test_attach_to_missing_segment_says_start_the_creator(name):
    with pytest.raises(SegmentError, match="does not exist"):
        Segment.attach(name, "test")


def test_attach_refuses_foreign_magic(name):
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=4096)
    os.write(shm.fd, b"NOTSEQD!" + b"\1" * 200)
    shm.close_fd()
    with pytest.raises(SegmentError, match="not a seqd segment: magic is b'NOTSEQD!'"):
        Segment.attach(name, "test")


def test_attach_refuses_a_segment_smaller_than_a_header(name):
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=HEADER_BYTES - 1)
    shm.close_fd()
    with pytest.raises(SegmentError, match="smaller than a seqd header"):
        Segment.attach(name, "test")


def test_attach_refuses_wrong_layout_version(name):
    with Segment.create(name, "test", 256):
        _poke(name, 8, struct.pack("<I", LAYOUT_VERSION + 98))
        with pytest.raises(SegmentVersionError, match=f"layout version {LAYOUT_VERSION + 98}, this seqd reads version {LAYOUT_VERSION}"):
            Segment.attach(name, "test")


def test_attach_refuses_a_content_version_it_does_not_read(name):
    with Segment.create(name, "test", 256, content_version=7) as created:
        assert created.content_version == 7
        with pytest.raises(SegmentVersionError, match="holds test of layout version 7, this seqd reads version 8"):
            Segment.attach(name, "test", content_version=8)
        with Segment.attach(name, "test", content_version=7) as attached:
            assert attached.content_version == 7
        with Segment.attach(name, "test") as attached:  # a reader that does not care
            assert attached.content_version == 7


def test_remove_stale_reads_the_creator_of_a_first_version_header(name):
    """Fields only go at the end of the header: a leftover of the previous release (version 1,
    no content version) is still recognised as stale and removed."""
    _stale(name)
    _poke(name, 8, struct.pack("<I", 1))
    _poke(name, 72, bytes(4))
    assert remove_stale(name)


def test_attach_refuses_wrong_kind(name):
    with Segment.create(name, "counters", 256):
        with pytest.raises(SegmentError, match="is a 'counters' segment, not a 'ring' segment"):
            Segment.attach(name, "ring")


def test_attach_refuses_size_not_matching_header(name):
    with Segment.create(name, "test", 256):
        _poke(name, 16, struct.pack("<Q", 4096))
        with pytest.raises(SegmentError, match="header says 128 \\+ 4096 bytes but the segment is 384"):
            Segment.attach(name, "test")


def test_attach_refuses_a_segment_whose_creator_has_exited(name):
    _stale(name)
    with pytest.raises(SegmentError, match=r"which has exited \(stale segment\)\. If no seqd runs"):
        Segment.attach(name, "test")


def test_attach_refuses_a_segment_whose_creator_pid_was_reused(name):
    with Segment.create(name, "test", 256):
        # Our pid, but a start time an hour earlier: the pid now names another process.
        (started_s,) = struct.unpack_from("<d", (SHM / name[1:]).read_bytes(), 40)
        _poke(name, 40, struct.pack("<d", started_s - 3600))
        with pytest.raises(SegmentError, match="pid now belongs to another process"):
            Segment.attach(name, "test")


def test_attach_with_an_epoch_refuses_the_same_name_created_again(name):
    with Segment.create(name, "test", 256, epoch=7) as first:
        assert first.epoch == 7
        with Segment.attach(name, "test", epoch=7) as attached:
            assert attached.epoch == 7
        first.unlink()
    # A process told epoch 7 must never use the segment that replaced it, though it is valid.
    with Segment.create(name, "test", 256, epoch=8) as second:
        with pytest.raises(SegmentError, match=r"has epoch 0x0000000000000008, this process expects 0x0000000000000007"):
            Segment.attach(name, "test", epoch=7)
        with Segment.attach(name, "test") as unchecked:
            assert unchecked.epoch == 8
        second.unlink()


def test_create_refuses_an_epoch_the_header_cannot_hold(name):
    with pytest.raises(ValueError, match="EPOCH_MAX"):
        Segment.create(name, "test", 256, epoch=1 << 64)
    assert not (SHM / name[1:]).exists()


def test_stale_ok_reads_what_a_dead_creator_left_and_says_who_it_was(name):
    _stale(name)
    with Segment.attach(name, "test", stale_ok=True) as leftover:
        assert leftover.creator_pid != os.getpid()
        assert creator_status(leftover.creator_pid, leftover.creator_start_time_s) == "which has exited"
    with pytest.raises(SegmentError, match="stale segment"):
        Segment.attach(name, "test")


def test_attach_refuses_a_half_initialised_segment_of_a_dead_creator(name):
    _stale(name)
    _poke(name, 0, b"\0" * len(MAGIC))
    with pytest.raises(SegmentError, match="half-initialised"):
        Segment.attach(name, "test")


def test_create_over_a_stale_segment_reports_it_and_how_to_remove_it(name):
    _stale(name)
    with pytest.raises(SegmentError, match=r"stale segment\).*remove /dev/shm/.*remove_stale"):
        Segment.create(name, "test", 256)


def test_remove_stale_removes_only_stale_segments(name):
    with Segment.create(name, "test", 256) as live:
        with pytest.raises(SegmentError, match="is running"):
            remove_stale(name)
        assert (SHM / name[1:]).exists()
        live.unlink()
    _stale(name)
    assert remove_stale(name) is True
    assert not (SHM / name[1:]).exists()
    assert remove_stale(name) is False
    Segment.create(name, "test", 256).close()  # the name is free again


def test_remove_stale_refuses_a_foreign_segment(name):
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=4096)
    os.write(shm.fd, b"x" * 4096)
    shm.close_fd()
    with pytest.raises(SegmentError, match="not a seqd segment"):
        remove_stale(name)
    assert (SHM / name[1:]).exists()


def test_close_keeps_views_handed_out_valid(name):
    segment = Segment.create(name, "test", 256)
    view = segment.buffer[0:4]
    view[:] = b"abcd"
    segment.close()  # the view still pins the mapping
    assert bytes(view) == b"abcd"
    segment.unlink()


def test_memory_ordering_check_refuses_weakly_ordered_machines(monkeypatch):
    ipc.check_memory_ordering()  # this machine: x86-64
    monkeypatch.setattr(ipc_platform.platform, "machine", lambda: "aarch64")
    monkeypatch.delenv(ipc_platform.UNSAFE_OVERRIDE_ENV, raising=False)
    with pytest.raises(ipc.PlatformError, match="'aarch64', not x86-64"):
        ipc.check_memory_ordering()
    monkeypatch.setenv(ipc_platform.UNSAFE_OVERRIDE_ENV, "1")
    with pytest.warns(RuntimeWarning, match="NOT guaranteed"):
        ipc.check_memory_ordering()
