"""Counters: named 64-bit values, each alone on a 128-byte line, visible across processes."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from typing import Any

import pytest

import ipc
from ipc.counters import Counter, Counters, CounterWriteError, ReadOnlyCounter
from ipc.segment import LINE_BYTES, SegmentError, SegmentVersionError

FORK = multiprocessing.get_context("fork")
NAMES = ["log.published", "journal.durable", "commit", "blp.applied", "raft_role", "term"]


@pytest.fixture
def counters(unique: str) -> Iterator[Counters]:
    created = Counters.create(ipc.segment_name(unique, "counters"), NAMES)
    yield created
    created.close()
    created.unlink()


def test_each_counter_sits_alone_on_its_own_128_byte_line(counters):
    offsets = [counters.line_offset(name) for name in NAMES]
    assert all(offset % LINE_BYTES == 0 for offset in offsets)
    assert len({offset // LINE_BYTES for offset in offsets}) == len(NAMES)
    # Writing one counter changes no byte of any other line.
    before = bytes(counters.segment.buffer)
    counters["commit"].set(-1)
    after = bytes(counters.segment.buffer)
    changed = {i // LINE_BYTES for i in range(len(before)) if before[i] != after[i]}
    assert changed == {counters.line_offset("commit") // LINE_BYTES}


def test_set_add_get_and_snapshot(counters):
    counters["term"].set(7)
    assert counters["term"].add(3) == 10
    assert counters["commit"].add(-2) == -2
    assert counters.snapshot() == {name: {"term": 10, "commit": -2}.get(name, 0) for name in NAMES}
    assert counters["term"].get() == 10
    assert counters.names == tuple(NAMES)


def test_unknown_counter_is_a_clear_error(counters):
    with pytest.raises(KeyError, match="has no counter 'nope'; it has"):
        counters["nope"]


def _child_writes(name: str, done: Any) -> None:
    attached = Counters.attach(name)
    attached["journal.durable"].set(1 << 40)
    attached["raft_role"].add(2)
    attached.close()
    done.set()


def test_values_written_by_another_process_are_visible_by_name(counters):
    done = FORK.Event()
    child = FORK.Process(target=_child_writes, args=(counters.name, done))
    child.start()
    try:
        assert done.wait(30)
        attached = Counters.attach(counters.name)
        assert attached.snapshot()["journal.durable"] == 1 << 40
        assert counters["raft_role"].get() == 2
        attached.close()
    finally:
        child.join(30)
        if child.is_alive():
            child.kill()
            child.join(5)


def test_attach_with_an_epoch_refuses_counters_created_with_another(unique):
    name = ipc.segment_name(unique, "epoch")
    created = Counters.create(name, NAMES, epoch=5)
    try:
        created["term"].set(9)
        with pytest.raises(SegmentError, match="has epoch 0x0000000000000005"):
            Counters.attach(name, epoch=6)
        with Counters.attach(name, epoch=5) as attached:
            assert attached["term"].get() == 9
    finally:
        created.close()
        created.unlink()


def test_attach_refuses_a_ring_segment(unique):
    ring = ipc.Ring.create(ipc.segment_name(unique, "ring"), 256, readers=("a",))
    try:
        with pytest.raises(SegmentError, match="is a 'ring' segment, not a 'counters' segment"):
            Counters.attach(ring.name)
    finally:
        ring.close()
        ring.unlink()


def test_counter_names_are_checked(unique):
    with pytest.raises(ValueError, match="unique"):
        Counters.create(ipc.segment_name(unique, "c"), ["a", "a"])
    with pytest.raises(ValueError, match="printable ASCII"):
        Counters.create(ipc.segment_name(unique, "c"), ["x" * 65])


def test_a_read_only_handle_reads_the_same_word_and_refuses_every_write(counters):
    owned = counters["commit"]
    read_only = owned.read_only("the blp may not write commit: the journaller owns it")
    assert isinstance(read_only, Counter)  # usable wherever a counter is read (a ring limit)
    owned.set(41)
    assert read_only.get() == 41
    view, index = read_only.word
    assert view[index] == 41
    with pytest.raises(CounterWriteError, match="the blp may not write commit: the journaller owns it"):
        read_only.set(1)
    with pytest.raises(CounterWriteError, match="the journaller owns it"):
        read_only.add(1)
    assert owned.get() == 41
    assert type(owned) is Counter and type(read_only) is ReadOnlyCounter


def test_attach_with_a_layout_version_refuses_counters_of_another(unique):
    name = ipc.segment_name(unique, "versioned")
    created = Counters.create(name, NAMES, layout_version=3)
    try:
        with pytest.raises(SegmentVersionError, match="counters of layout version 3, this seqd reads version 4"):
            Counters.attach(name, layout_version=4)
        with Counters.attach(name, layout_version=3) as attached:
            assert attached.names == tuple(NAMES)
    finally:
        created.close()
        created.unlink()
