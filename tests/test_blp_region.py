"""The blp's region walk: records applied from one ring region by offset compute what the golden
log pins (tests/test_processor_golden.py), across wraps, padding and any commit step, and a frame
the commit limit cuts is never applied.

The blp takes whole frames of the log ring as one region (`RingReader.poll_region`, trusting the
commit position to be a frame boundary) and hands `Processor.apply_frame` each record as
(frame type, region, start, end): a record mis-sliced by the walk (its start, its end, the pad
after it) changes a decode, a hash or an output, and the pins below see it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import ipc
from daemon.layout import (
    COUNTER_NAMES,
    EGRESS_READERS,
    GATEWAY_EVENT_SUBSCRIBERS,
    LOG_READERS,
    CounterView,
    Role,
)
from daemon.roles.blp import FRAMES_PER_POLL_MAX, BlpAgent
from ipc.counters import Counters
from ipc.ring import Ring
from ipc.ring_reader import RingReader
from sequencer.apps.ledger import Ledger
from sequencer.processor import Processor
from sequencer.record import FRAME_HEADER, RecordType, encode_record
from tests.test_processor_golden import (
    GOLDEN_OUTPUTS_FOLLOWER,
    GOLDEN_OUTPUTS_SINGLE,
    GOLDEN_ROLLING_HASH,
    GOLDEN_ROLLING_HASHES_DIGEST,
    GOLDEN_STATE_HASH,
    golden_log,
    hashes_digest,
)

NOW_NS = 1


class Rig:
    """A blp on a log ring of `capacity` bytes; stands in for the sequencer (writes records into
    the ring) and the journaller (moves the commit limit)."""

    def __init__(self, unique: str, capacity: int, *, follower: bool) -> None:
        self.counters = Counters.create(ipc.segment_name(unique, "counters"), COUNTER_NAMES)
        self.log_ring = Ring.create(ipc.segment_name(unique, "log"), capacity, readers=LOG_READERS)
        self.egress_ring = Ring.create(ipc.segment_name(unique, "egress"), 1 << 20, readers=EGRESS_READERS)
        self.writer = self.log_ring.writer()
        self.journaller = self.log_ring.reader(Role.JOURNALLER)  # passes each record as it is written
        self.egress = self.egress_ring.reader(EGRESS_READERS[0])
        processor: Processor[Ledger] = Processor(Ledger)
        if follower:
            processor.emit_for(2, cluster=True)  # node 2's blp, as the golden test's follower
        else:
            self.counters[GATEWAY_EVENT_SUBSCRIBERS.name].set(1)  # events are written to egress
        self.agent = BlpAgent(processor, self.log_ring, self.egress_ring, CounterView(self.counters, Role.BLP),
                              snapshot_dir=Path("/nonexistent"), snapshot_keep=1, delete_journal=False,
                              fork_snapshots=False)  # fmt: skip
        self.agent.on_start()
        self.outputs = hashlib.blake2b(digest_size=16)
        self.written = 0  # records written
        self.ends: list[int] = [0]  # ring position after each record written

    def write(self, record: bytes) -> bool:
        length, frame_type = FRAME_HEADER.unpack_from(record)
        if not self.writer.try_write(record[FRAME_HEADER.size : length], frame_type):
            return False
        self.written += 1
        self.ends.append(self.writer.published_position)
        self.journaller.poll_region(1 << 20)
        self.journaller.release()
        return True

    def commit(self, index: int, position: int | None = None) -> None:
        self.counters["commit.index"].set(index)
        self.counters["commit.position"].set(self.ends[index] if position is None else position)

    def cycles(self) -> None:
        """Duty cycles until one finds nothing; the egress read as the sequencer would."""
        while self.agent.do_work(NOW_NS) or self.agent.unwritten:
            self.read_egress()
        self.read_egress()

    def read_egress(self) -> None:
        while (frame := self.egress.read()) is not None:
            kind, payload = frame
            self.outputs.update(kind.to_bytes(2, "little") + len(payload).to_bytes(4, "little") + payload)

    def close(self) -> None:
        for ring in (self.log_ring, self.egress_ring):
            ring.close()
            ring.unlink()
        self.counters.close()
        self.counters.unlink()


@pytest.fixture
def rigs(unique: str) -> Iterator[list[Rig]]:
    made: list[Rig] = []
    yield made
    for rig in made:
        rig.close()


@pytest.mark.parametrize("follower", [False, True], ids=["single", "follower"])
@pytest.mark.parametrize(("capacity", "step"), [(1 << 16, 1), (1 << 16, 1000), (1 << 10, 5), (1 << 10, 1000)])
def test_the_region_walk_applies_the_golden_log_as_pinned(rigs, unique, follower, capacity, step):
    """Every commit step from 1 record to all; a 1 KiB ring wraps (with padding) every ~8 records
    and cuts regions at its end."""
    rig = Rig(f"{unique}{len(rigs)}", capacity, follower=follower)
    rigs.append(rig)
    records = golden_log()
    hashes = []
    while rig.written < len(records):
        first = rig.written
        while rig.written < len(records) and rig.written - first < step and rig.write(records[rig.written]):
            pass
        assert rig.written > first, "the blp released nothing"
        rig.commit(rig.written)
        rig.cycles()
        assert rig.agent.processor.applied_index == rig.written
        if step == 1:
            hashes.append(rig.agent.processor.rolling_hash)
    processor = rig.agent.processor
    assert processor.rolling_hash == GOLDEN_ROLLING_HASH
    assert processor.state_hash().hex() == GOLDEN_STATE_HASH
    assert rig.outputs.hexdigest() == (GOLDEN_OUTPUTS_FOLLOWER if follower else GOLDEN_OUTPUTS_SINGLE)
    if step == 1:
        assert hashes_digest(hashes) == GOLDEN_ROLLING_HASHES_DIGEST
    assert rig.counters["blp.applied.position"].get() == rig.ends[len(records)]
    assert rig.counters["blp.applied.index"].get() == len(records)


def test_a_frame_the_commit_limit_cuts_is_not_applied_until_the_limit_passes_it(rigs, unique):
    """The commit position is a frame boundary by contract; were it ever inside a frame, the walk
    stops before that frame (as the per-frame poll did) rather than apply a cut record."""
    rig = Rig(unique, 1 << 16, follower=False)
    rigs.append(rig)
    records = golden_log()[:12]
    for record in records:
        assert rig.write(record)
    for inside in (8, 24, 40):  # in the header, the tail, the payload of record 6
        rig.commit(5, rig.ends[5] + inside)
        rig.cycles()
        assert rig.agent.processor.applied_index == 5
        assert rig.counters["blp.applied.position"].get() == rig.ends[5]
        assert rig.agent.reader.position == rig.ends[5]
    rig.commit(12)
    rig.cycles()
    assert rig.agent.processor.applied_index == 12
    assert rig.counters["blp.applied.position"].get() == rig.ends[12]


def test_a_backlog_that_meets_the_laps_end_is_walked_a_cycles_frames_at_a_time(rigs, unique, monkeypatch):
    """A catch-up's backlog (the commit far ahead, the readable run crossing the ring's lap end) is
    applied 64 frames a cycle with each poll walking only those: a walk of the whole run up to the
    lap's end at every poll made a follower's catch-up quadratic in its backlog (200k records:
    0.9 s -> 26 s in `benches.cluster --only catchup`)."""
    rig = Rig(unique, 1 << 16, follower=True)
    rigs.append(rig)
    for record in golden_log():
        assert rig.write(record)
    rig.commit(rig.written)
    rig.cycles()
    dropped = rig.agent.processor.commands_without_session
    backlog = 1000  # 64 KiB of 64-byte records from ~9 KiB in: ~860 before the lap's end
    for index in range(rig.written + 1, rig.written + backlog + 1):  # sessions never opened: dropped
        assert rig.write(encode_record(RecordType.COMMAND, 1, index, 1, 1 << 62, 12345, index, b"x" * 16))
    rig.commit(rig.written)
    polled: list[int] = []  # frames in each region polled (every one of the backlog's is 64 bytes)
    poll_region = RingReader.poll_region

    def counted(reader: RingReader, *args: Any, **kwargs: Any) -> tuple[int, memoryview]:
        start, region = poll_region(reader, *args, **kwargs)
        polled.append(len(region) // 64)
        return start, region

    monkeypatch.setattr(RingReader, "poll_region", counted)
    rig.cycles()
    assert rig.agent.processor.applied_index == rig.written
    assert rig.agent.processor.commands_without_session - dropped == backlog
    # A region up to the lap's end is walked frame by frame: 64 of them a poll (~1,000 frames in
    # all, with the run after the wrap taken whole, unwalked), not every one left to the lap's end
    # again at each poll (~6,000 here, quadratic in the backlog).
    assert sum(polled) <= 2 * backlog, polled
    assert any(frames == FRAMES_PER_POLL_MAX for frames in polled), polled
