"""The journaller and blp agents one duty cycle at a time, and the runner that drives them.

No role process here: each test creates the node's counters and real shared-memory rings in this
process (unique names, removed at the end), stands in for the sequencer by writing records into
the log ring and reading egress, and calls `do_work` itself. What a role guarantees (the commit
limit, fdatasync before durable, bounded drains, no output dropped) is seen cycle by cycle.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import ipc
from daemon.agent import Agent, AgentRunner
from daemon.layout import COUNTER_NAMES, EGRESS_READERS, LOG_READERS, CounterView, Role, RoleState
from daemon.roles.blp import FRAMES_PER_POLL_MAX, BlpAgent
from daemon.roles.journaller import COMPACTION_LOOK_S, JournallerAgent
from ipc.counters import Counters
from ipc.idle import IdleStrategy
from ipc.ring import Ring, RingReader, RingWriter
from sequencer import egress
from sequencer.apps.ledger import LEDGER_SCHEMA, Deposit, Ledger, OpenAccount, Reserve
from sequencer.journal import Journal, JournalError, read_records
from sequencer.processor import Processor
from sequencer.record import (
    ADMIN_NODE_START,
    ADMIN_RAISE_VERSION,
    FRAME_HEADER_BYTES,
    RECORD_HEADER_BYTES,
    RecordType,
    encode_admin,
    encode_command,
    encode_record,
    encode_session_open,
    frame_type,
)

LOG_CAPACITY_BYTES = 1 << 16
EGRESS_CAPACITY_BYTES = 1 << 16
EGRESS_SMALL_CAPACITY_BYTES = 256  # three or four ledger replies: the sequencer has to keep up
SEGMENT_BYTES = 1 << 20
TERM = 1
TIMESTAMP_NS = 1_000_000_000
SESSION_ID = 1 << 56 | 1
CLIENT_ID = 7
NOW_NS = 5_000_000_000  # the runner's clock reading; the agents only compare it with itself


class Sequencer:
    """Stands in for the sequencer: stamps records into the log ring, publishes them, and reads
    egress. `end_of[index]` is the ring position just after record `index`."""

    def __init__(self, log_ring: Ring, egress_ring: Ring, counters: Counters) -> None:
        self.writer: RingWriter = log_ring.writer()
        self.egress: RingReader = egress_ring.reader("sequencer")
        self.published_position = counters["log.published.position"]
        self.index = 0
        self.request_id = 0
        self.end_of: dict[int, int] = {0: 0}

    def write(self, record_type: int, payload: bytes = b"", version: int = 1, session_id: int = 0,
              request_id: int = 0) -> int:  # fmt: skip
        self.index += 1
        record = encode_record(record_type, version, self.index, TERM, TIMESTAMP_NS + self.index,
                               session_id, request_id, payload)  # fmt: skip
        length = RECORD_HEADER_BYTES + len(payload)
        assert self.writer.try_write(record[FRAME_HEADER_BYTES:length], frame_type(record_type, version))
        self.published_position.set(self.writer.published_position)
        self.end_of[self.index] = self.writer.published_position
        return self.index

    def open_session(self) -> int:
        return self.write(RecordType.SESSION_OPEN, encode_session_open(CLIENT_ID, "n1"),
                          session_id=SESSION_ID)  # fmt: skip

    def command(self, command: Any) -> int:
        self.request_id += 1
        version, data = LEDGER_SCHEMA.encode_command(command)
        return self.write(RecordType.COMMAND, encode_command(self.request_id - 1, data), version=version,
                          session_id=SESSION_ID, request_id=self.request_id)  # fmt: skip

    def open_accounts(self, count: int, prefix: str = "a") -> int:
        """`count` OpenAccount commands; returns the last index."""
        for number in range(count):
            last = self.command(OpenAccount(f"{prefix}{number}"))
        return last

    def read_egress(self) -> list[Any]:
        outputs = []
        while (frame := self.egress.read()) is not None:
            outputs.append(egress.decode(*frame))
        return outputs


@dataclass
class Node:
    """One node's shared memory and journal, in this process."""

    counters: Counters
    log_ring: Ring
    egress_ring: Ring
    journal_dir: Path
    snapshot_dir: Path
    sequencer: Sequencer
    journals: list[Journal] = field(default_factory=list)

    def __getitem__(self, name: str) -> int:
        return self.counters[name].get()

    def commit(self, index: int) -> None:
        """What the journaller publishes after a sync, for blp tests that need no journal."""
        self.counters["commit.index"].set(index)
        self.counters["commit.position"].set(self.sequencer.end_of[index])

    def journaller(self, batch_bytes_max: int = 1 << 16, delete_journal: bool = False) -> JournallerAgent:
        journal = Journal.open(self.journal_dir, segment_bytes=SEGMENT_BYTES, preallocate=False)
        self.journals.append(journal)
        agent = JournallerAgent(self.log_ring, journal, CounterView(self.counters, Role.JOURNALLER), batch_bytes_max=batch_bytes_max,
                                delete_journal=delete_journal)  # fmt: skip
        agent.on_start()
        return agent

    def blp(self, processor: Processor[Any] | None = None) -> BlpAgent:
        agent = BlpAgent(processor or Processor(Ledger, node="n1"), self.log_ring, self.egress_ring,
                         CounterView(self.counters, Role.BLP), snapshot_dir=self.snapshot_dir, snapshot_keep=2,
                         delete_journal=False)  # fmt: skip
        agent.on_start()
        return agent


def make_node(unique: str, tmp_path: Path, egress_capacity_bytes: int) -> Iterator[Node]:
    counters = Counters.create(ipc.segment_name(unique, "counters"), COUNTER_NAMES)
    log_ring = Ring.create(ipc.segment_name(unique, "log"), LOG_CAPACITY_BYTES, readers=LOG_READERS)
    egress_ring = Ring.create(ipc.segment_name(unique, "egress"), egress_capacity_bytes, readers=EGRESS_READERS)
    node = Node(counters, log_ring, egress_ring, tmp_path / "journal", tmp_path / "snapshots",
                Sequencer(log_ring, egress_ring, counters))  # fmt: skip
    node.snapshot_dir.mkdir()
    try:
        yield node
    finally:
        for journal in node.journals:
            journal.close()
        for ring in (log_ring, egress_ring):
            ring.close()
            ring.unlink()
        counters.close()
        counters.unlink()


@pytest.fixture
def node(unique: str, tmp_path: Path) -> Iterator[Node]:
    yield from make_node(unique, tmp_path, EGRESS_CAPACITY_BYTES)


@pytest.fixture
def small_egress_node(unique: str, tmp_path: Path) -> Iterator[Node]:
    yield from make_node(unique, tmp_path, EGRESS_SMALL_CAPACITY_BYTES)


# ---- the journaller ------------------------------------------------------------------------------


def test_journaller_publishes_durable_and_commit_only_after_the_fdatasync_that_covers_them(node, monkeypatch):
    journaller = node.journaller()
    last = node.sequencer.open_accounts(3)
    seen_at_sync: list[tuple[int, int, int, int]] = []
    real_fdatasync = os.fdatasync

    def fdatasync(fd: int) -> None:
        seen_at_sync.append((node["journal.durable.position"], node["journal.durable.index"],
                             node["commit.position"], node["commit.index"]))  # fmt: skip
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    assert journaller.do_work(NOW_NS) == node.sequencer.end_of[last]
    assert seen_at_sync == [(0, 0, 0, 0)]  # one sync for the cycle, before anything was published
    assert node["journal.durable.index"] == node["commit.index"] == last
    assert node["journal.durable.position"] == node["commit.position"] == node.sequencer.end_of[last]
    assert node["journal.syncs"] == 1


def test_journaller_publishes_nothing_when_the_fdatasync_fails(node, monkeypatch):
    journaller = node.journaller()
    node.sequencer.open_accounts(2)
    journaller.do_work(NOW_NS)
    durable = (node["journal.durable.position"], node["journal.durable.index"], node["commit.position"])
    node.sequencer.open_accounts(2, prefix="b")

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(os, "fdatasync", failing)
    with pytest.raises(JournalError):
        journaller.do_work(NOW_NS)
    assert (node["journal.durable.position"], node["journal.durable.index"], node["commit.position"]) == durable


def test_journaller_takes_at_most_batch_bytes_max_per_cycle(node):
    last = node.sequencer.open_accounts(20)
    record_bytes = node.sequencer.end_of[1]
    batch_bytes_max = 3 * record_bytes  # every OpenAccount record here has the same size
    journaller = node.journaller(batch_bytes_max=batch_bytes_max)
    durable_indexes = []
    while node["journal.durable.index"] < last:
        appended = journaller.do_work(NOW_NS)
        assert 0 < appended <= batch_bytes_max
        durable_indexes.append(node["journal.durable.index"])
    assert durable_indexes == [3, 6, 9, 12, 15, 18, 20]
    assert journaller.do_work(NOW_NS) == 0
    assert [record.index for record in read_records(node.journal_dir)] == list(range(1, last + 1))


def test_journaller_takes_the_records_on_both_sides_of_the_ring_wrap_into_one_fdatasync(node):
    journaller = node.journaller()
    sequencer = node.sequencer
    while sequencer.writer.published_position < LOG_CAPACITY_BYTES - 400:  # ~3 records short of the wrap
        sequencer.write(RecordType.COMMAND, b"x" * 64)
    journaller.do_work(NOW_NS)
    for name in LOG_READERS:  # the other readers let the writer reuse the lap
        if name != Role.JOURNALLER:
            other = node.log_ring.reader(name)
            while other.poll_region(LOG_CAPACITY_BYTES)[1]:
                pass
            other.release()
    last = sequencer.index
    while sequencer.writer.published_position < LOG_CAPACITY_BYTES + 400:  # records on both sides
        last = sequencer.write(RecordType.COMMAND, b"x" * 64)
    syncs = node["journal.syncs"]
    assert journaller.do_work(NOW_NS) > 0
    assert node["journal.syncs"] == syncs + 1  # the region past the wrap joined the first's fdatasync
    assert node["journal.durable.index"] == last
    assert journaller.do_work(NOW_NS) == 0


def test_journaller_is_drained_only_once_everything_published_is_durable(node):
    last = node.sequencer.open_accounts(8)
    journaller = node.journaller(batch_bytes_max=4 * node.sequencer.end_of[1])
    assert not journaller.drained()  # published, not yet journaled
    journaller.do_work(NOW_NS)
    assert not journaller.drained()  # half of it
    journaller.do_work(NOW_NS)
    assert node["journal.durable.index"] == last
    assert not journaller.drained()  # the cycle appended: one more look for late records
    journaller.do_work(NOW_NS)
    assert journaller.drained()


def test_journaller_looks_for_covered_segments_after_each_sync_and_every_compaction_look_s_when_idle(node, monkeypatch):
    journaller = node.journaller(delete_journal=True)
    deletions: list[int] = []
    monkeypatch.setattr(journaller.journal, "delete_segments_before", lambda before: deletions.append(before) or [])
    journaller.do_work(NOW_NS)  # idle: the first look, nothing moved
    node.counters["snapshot.oldest.index"].set(5)
    journaller.do_work(NOW_NS + 1_000_000)  # idle, 1 ms later: no look yet
    assert deletions == []
    journaller.do_work(NOW_NS + int(COMPACTION_LOOK_S * 1e9))  # idle, a look due
    assert deletions == [6]
    node.counters["snapshot.oldest.index"].set(7)
    node.sequencer.open_accounts(1)
    assert journaller.do_work(NOW_NS + int(COMPACTION_LOOK_S * 1e9) + 1)  # a sync: a look at once
    assert deletions == [6, 8]


# ---- the blp ---------------------------------------------------------------------------------


def test_blp_never_applies_past_the_commit_position(node):
    blp = node.blp()
    node.sequencer.open_session()
    last = node.sequencer.open_accounts(5)
    assert blp.do_work(NOW_NS) == 0  # published, nothing committed
    assert blp.processor.applied_index == 0
    node.commit(3)
    for _ in range(3):
        blp.do_work(NOW_NS)
        assert blp.processor.applied_index == 3
    assert node["blp.applied.index"] == 3
    assert node["blp.applied.position"] == node.sequencer.end_of[3]
    assert [reply.index for reply in node.sequencer.read_egress() if isinstance(reply, egress.Reply)] == [2, 3]
    node.commit(last)
    blp.do_work(NOW_NS)
    assert node["blp.applied.index"] == last


def test_blp_applies_at_most_frames_per_poll_max_records_per_cycle(node):
    blp = node.blp()
    node.sequencer.open_session()
    last = node.sequencer.open_accounts(2 * FRAMES_PER_POLL_MAX + 3)
    node.commit(last)
    applied = []
    while (count := blp.do_work(NOW_NS)) > 0:
        assert count <= FRAMES_PER_POLL_MAX
        applied.append(node["blp.applied.index"])
    assert applied == [FRAMES_PER_POLL_MAX, 2 * FRAMES_PER_POLL_MAX, last]


def test_blp_publishes_the_active_app_version_and_a_refused_raise_in_the_cycle_that_applies_them(node):
    # The blp stores them only when they change (not every cycle): each change still shows.
    blp = node.blp()
    node.sequencer.open_session()
    node.commit(node.sequencer.open_accounts(2))
    blp.do_work(NOW_NS)
    assert (node["app.version.active"], node["app.version.raises_refused"]) == (0, 0)
    node.commit(node.sequencer.write(RecordType.ADMIN, encode_admin(ADMIN_NODE_START, node="n1", number=1,
                                                                     app_version=1, members=[1])))  # fmt: skip
    blp.do_work(NOW_NS)
    assert (node["app.version.active"], node["app.version.raises_refused"]) == (1, 0)
    node.commit(node.sequencer.write(RecordType.ADMIN, encode_admin(ADMIN_RAISE_VERSION, version=1, members=[1])))
    blp.do_work(NOW_NS)
    assert (node["app.version.active"], node["app.version.raises_refused"]) == (1, 1)


def test_blp_with_a_full_egress_ring_keeps_the_outputs_applies_nothing_more_and_publishes_after(small_egress_node):
    node = small_egress_node
    blp = node.blp()
    node.sequencer.open_session()
    first_batch = node.sequencer.open_accounts(6)
    node.commit(first_batch)
    blp.do_work(NOW_NS)
    assert blp.processor.applied_index == first_batch
    assert blp.unwritten  # the egress ring holds only a few replies
    # Nothing of the batch counts as applied while its replies are not all in egress.
    assert node["blp.applied.index"] == 0
    assert node["blp.applied.position"] == 0
    last = node.sequencer.open_accounts(2, prefix="b")
    node.commit(last)
    for _ in range(3):  # the sequencer is not reading: no progress, nothing more applied
        assert blp.do_work(NOW_NS) == 0
    assert blp.processor.applied_index == first_batch
    replies = []
    while blp.unwritten:
        replies += node.sequencer.read_egress()
        assert blp.do_work(NOW_NS) > 0
    assert node["blp.applied.index"] == first_batch
    assert node["blp.applied.position"] == node.sequencer.end_of[first_batch]
    for _ in range(10):  # the next batch goes the same way
        blp.do_work(NOW_NS)
        replies += node.sequencer.read_egress()
    assert node["blp.applied.index"] == last
    assert [reply.index for reply in replies if isinstance(reply, egress.Reply)] == list(range(2, last + 1))


def replayed(commands: list[Any]) -> Processor[Any]:
    """A processor that recovery left with `commands` applied (after a SESSION_OPEN at index 1)."""
    processor: Processor[Any] = Processor(Ledger, node="n1")
    run = bytearray(encode_record(RecordType.SESSION_OPEN, 1, 1, TERM, TIMESTAMP_NS, SESSION_ID, 0,
                                  encode_session_open(CLIENT_ID, "n1")))  # fmt: skip
    for index, command in enumerate(commands, start=2):
        version, data = LEDGER_SCHEMA.encode_command(command)
        run += encode_record(RecordType.COMMAND, version, index, TERM, TIMESTAMP_NS + index, SESSION_ID,
                             index - 1, encode_command(index - 2, data))  # fmt: skip
    processor.replay_run(memoryview(bytes(run)))
    return processor


def test_blp_writes_the_re_armed_timers_before_it_applies_a_record(node):
    processor = replayed([OpenAccount("x"), OpenAccount("y"), Deposit("x", 5), Reserve(9, "x", "y", 5, 1000)])
    (deadline_ns,) = processor.timers().values()
    blp = node.blp(processor)
    sequencer = node.sequencer
    sequencer.index = processor.applied_index  # the log goes on from there
    sequencer.request_id = processor.applied_index - 1
    sequencer.end_of = {processor.applied_index: 0}
    node.commit(sequencer.command(OpenAccount("z")))
    blp.do_work(NOW_NS)
    assert sequencer.read_egress() == [egress.TimerSchedule(9, deadline_ns)]
    assert blp.processor.applied_index == 5
    blp.do_work(NOW_NS)
    assert blp.processor.applied_index == 6


def test_blp_applies_only_what_the_journaller_made_durable(node):
    journaller = node.journaller()
    blp = node.blp()
    node.sequencer.open_session()
    last = node.sequencer.open_accounts(4)
    for _ in range(3):
        blp.do_work(NOW_NS)
    assert blp.processor.applied_index == 0
    assert node.sequencer.read_egress() == []  # no reply before the record is durable
    journaller.do_work(NOW_NS)
    blp.do_work(NOW_NS)
    assert node["blp.applied.index"] == last
    assert len([reply for reply in node.sequencer.read_egress() if isinstance(reply, egress.Reply)]) == 4


# ---- the runner ------------------------------------------------------------------------------


class ScriptedAgent(Agent):
    """Returns the scripted work counts, then 0; drained after `drained_after` cycles."""

    def __init__(self, node: Node, work_counts: list[int], drained_after: int, stop_after: int) -> None:
        self.node = node
        self.work_counts = work_counts
        self.drained_after = drained_after
        self.stop_after = stop_after
        self.cycles = 0
        self.calls: list[str] = []
        self.clock_readings: list[int] = []

    def on_start(self) -> None:
        self.calls.append(f"on_start state={self.node['blp.state']}")

    def do_work(self, now_ns: int) -> int:
        self.clock_readings.append(now_ns)
        self.cycles += 1
        if self.cycles == self.stop_after:
            self.node.counters["blp.stop"].set(1)  # the supervisor asks
        if self.cycles == 99:
            raise RuntimeError("a bug in the agent")
        return self.work_counts[self.cycles - 1] if self.cycles <= len(self.work_counts) else 0

    def drained(self) -> bool:
        self.calls.append(f"drained? cycle {self.cycles}")
        return self.cycles >= self.drained_after

    def on_close(self) -> None:
        self.calls.append(f"on_close state={self.node['blp.state']}")


class RecordingIdleStrategy(IdleStrategy):
    def __init__(self) -> None:
        self.work_counts: list[int] = []

    def idle(self, work_count: int) -> None:
        self.work_counts.append(work_count)


def runner(node: Node, agent: Agent, idle: IdleStrategy) -> AgentRunner:
    clock = iter(range(1000, 10**6, 10))
    return AgentRunner(agent, idle, node.counters["blp.heartbeat"], node.counters["blp.stop"],
                       node.counters["blp.state"], clock=lambda: next(clock))  # fmt: skip


def test_runner_idles_every_cycle_and_stops_only_when_asked_and_the_agent_is_drained(node):
    agent = ScriptedAgent(node, [5, 0, 3], drained_after=6, stop_after=4)
    idle = RecordingIdleStrategy()
    runner(node, agent, idle).run()
    assert agent.cycles == 6
    assert idle.work_counts == [5, 0, 3, 0, 0]  # every cycle but the last, with its work count
    assert agent.clock_readings == [1000, 1010, 1020, 1030, 1040, 1050]  # one reading per cycle
    assert agent.calls == [
        f"on_start state={RoleState.STARTING}",
        "drained? cycle 4", "drained? cycle 5", "drained? cycle 6",
        f"on_close state={RoleState.RUNNING}",
    ]  # fmt: skip
    assert node["blp.heartbeat"] == 6
    assert node["blp.state"] == RoleState.DRAINED


def test_runner_closes_the_agent_when_a_cycle_raises_and_never_reports_it_drained(node):
    agent = ScriptedAgent(node, [], drained_after=1000, stop_after=1000)
    with pytest.raises(RuntimeError, match="a bug in the agent"):
        runner(node, agent, RecordingIdleStrategy()).run()
    assert agent.calls[-1] == f"on_close state={RoleState.RUNNING}"
    assert node["blp.heartbeat"] == 98
    assert node["blp.state"] == RoleState.RUNNING
