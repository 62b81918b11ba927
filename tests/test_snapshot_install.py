"""Catch-up through a snapshot (daemon/snapshot_install.py): the leader's chunked stream, the
follower's temp file, and the install request the supervisor finishes before recovery.

The stream runs here between a sender and a receiver in one process, over a "network" the test
controls (drop, hold back); the three real nodes are in tests/test_cluster_faults.py
(`test_a_follower_wiped_while_down_rejoins_through_a_snapshot_once_the_leader_compacted`).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from daemon.snapshot_install import (
    INSTALL_NAME,
    SNAPSHOT_ACK_TIMEOUT_S,
    SNAPSHOT_CATCH_UP_HOLD_S,
    SNAPSHOT_CHUNK_BYTES,
    SNAPSHOT_CHUNKS_IN_FLIGHT_MAX,
    SNAPSHOT_STREAM_ABANDON_S,
    SNAPSHOT_TEMP_NAME,
    SnapshotReceiver,
    SnapshotSender,
    finish_install_request,
    read_install_request,
    write_install_request,
)
from sequencer import logtools
from sequencer import snapshot as snapshots
from sequencer.determinism import STATE_HASH_BYTES
from sequencer.journal import Journal, read_records
from sequencer.raft.messages import Message, SnapshotChunk, SnapshotChunkAck
from sequencer.snapshot import SnapshotHeader
from tests.test_journal import SMALL_SEGMENT_BYTES, fill, make_batch, open_journal

CLUSTER = 7
LEADER, FOLLOWER = 1, 2
TERM = 3
WINDOW_BYTES = SNAPSHOT_CHUNK_BYTES * SNAPSHOT_CHUNKS_IN_FLIGHT_MAX


def make_snapshot(directory: Path, index: int, body_bytes: int, term: int = TERM) -> Path:
    body = random.Random(index).randbytes(body_bytes)
    header = SnapshotHeader("ledger", 1, index, term, 1_000, bytes(STATE_HASH_BYTES))
    return snapshots.write_snapshot(directory, header, body)


class Link:
    """The sender's chunks to the receiver and the acknowledgements back, in order, with drops."""

    def __init__(self, leader_dir: Path, follower_dir: Path) -> None:
        self.sent: list[Message] = []
        self.sender = SnapshotSender(CLUSTER, LEADER, leader_dir, self.sent.extend)
        self.receiver = SnapshotReceiver(follower_dir)
        self.in_flight_bytes_max = 0
        self.chunks = 0

    def deliver(self, now_s: float, drop: set[int] = frozenset()) -> None:  # type: ignore[assignment]
        """Deliver what was sent (dropping the chunks at those offsets, once), until quiet."""
        while self.sent:
            batch, self.sent[:] = list(self.sent), []
            stream = self.sender.streams.get(FOLLOWER)
            if stream is not None:
                self.in_flight_bytes_max = max(self.in_flight_bytes_max, stream.sent - stream.acked)
            for message in batch:
                assert isinstance(message, SnapshotChunk)
                self.chunks += 1
                if message.offset in drop:
                    drop.discard(message.offset)
                    continue
                received = self.receiver.chunk(message)
                self.sender.acknowledged(
                    SnapshotChunkAck(CLUSTER, FOLLOWER, LEADER, TERM, message.index, received), now_s
                )


@pytest.fixture
def dirs(tmp_dir: Path) -> tuple[Path, Path]:
    leader, follower = tmp_dir / "leader", tmp_dir / "follower"
    leader.mkdir()
    follower.mkdir()
    return leader, follower


def test_a_snapshot_arrives_whole_with_never_more_than_the_window_in_flight(dirs):
    leader_dir, follower_dir = dirs
    path = make_snapshot(leader_dir, 500, 5 * WINDOW_BYTES + 12345)
    link = Link(leader_dir, follower_dir)
    link.sender.start(FOLLOWER, TERM, 0.0)
    assert link.sender.holds[FOLLOWER][0] == 501  # the journal after it is held from the start
    link.deliver(0.0)
    assert link.receiver.complete_index == 500
    assert (follower_dir / SNAPSHOT_TEMP_NAME).read_bytes() == path.read_bytes()
    assert link.sender.streams == {} and link.sender.completed == 1
    assert 0 < link.in_flight_bytes_max <= WINDOW_BYTES


def test_a_lost_chunk_is_sent_again_from_the_acknowledged_byte(dirs):
    leader_dir, follower_dir = dirs
    path = make_snapshot(leader_dir, 500, 3 * WINDOW_BYTES)
    link = Link(leader_dir, follower_dir)
    link.sender.start(FOLLOWER, TERM, 0.0)
    # The second chunk is lost: the later chunks are not written, their repeated
    # acknowledgement sends again from it.
    link.deliver(0.0, drop={SNAPSHOT_CHUNK_BYTES})
    assert link.receiver.complete_index == 500
    assert (follower_dir / SNAPSHOT_TEMP_NAME).read_bytes() == path.read_bytes()


def test_a_stream_whose_acknowledgements_stop_resends_after_a_timeout_then_ends(dirs):
    leader_dir, follower_dir = dirs
    make_snapshot(leader_dir, 500, 3 * WINDOW_BYTES)
    link = Link(leader_dir, follower_dir)
    link.sender.start(FOLLOWER, TERM, 0.0)
    first_window = list(link.sent)
    assert sum(len(m.data) for m in first_window) == WINDOW_BYTES  # type: ignore[attr-defined]
    link.sent.clear()  # the follower is gone: nothing arrives
    link.sender.tick(SNAPSHOT_ACK_TIMEOUT_S / 2)
    assert not link.sent
    link.sender.tick(SNAPSHOT_ACK_TIMEOUT_S)
    assert [m.offset for m in link.sent] == [m.offset for m in first_window]  # type: ignore[attr-defined]
    link.sent.clear()
    link.sender.tick(SNAPSHOT_STREAM_ABANDON_S + 1)
    assert link.sender.streams == {}  # the core asks again if the follower still needs it


def test_a_repeated_install_snapshot_continues_the_running_stream(dirs):
    leader_dir, follower_dir = dirs
    make_snapshot(leader_dir, 500, 3 * WINDOW_BYTES)
    link = Link(leader_dir, follower_dir)
    link.sender.start(FOLLOWER, TERM, 0.0)
    sent = len(link.sent)
    link.sender.start(FOLLOWER, TERM, 0.5)
    assert len(link.sent) == sent


def test_a_corrupt_snapshot_is_refused_and_asked_for_again(dirs):
    leader_dir, follower_dir = dirs
    path = make_snapshot(leader_dir, 500, 2 * SNAPSHOT_CHUNK_BYTES)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # the body no longer matches the CRC in its header
    path.write_bytes(bytes(data))
    link = Link(leader_dir, follower_dir)
    link.sender.start(FOLLOWER, TERM, 0.0)
    batch, link.sent[:] = list(link.sent), []
    answers = [link.receiver.chunk(m) for m in batch]  # type: ignore[arg-type]
    assert answers[-1] == 0 and link.receiver.complete_index == 0


def test_the_hold_follows_the_followers_match_and_ends_when_it_caught_up_or_expires(dirs):
    leader_dir, _follower_dir = dirs
    make_snapshot(leader_dir, 500, 1000)
    sender = SnapshotSender(CLUSTER, LEADER, leader_dir, lambda messages: None)
    sender.start(FOLLOWER, TERM, 0.0)
    assert sender.retain_index(lambda peer: 0, 900, 1.0) == 501
    assert sender.retain_index(lambda peer: 700, 900, 2.0) == 701
    assert sender.retain_index(lambda peer: 900, 900, 3.0) == 0  # caught up: no more hold
    sender.start(3, TERM, 10.0)
    assert sender.retain_index(lambda peer: 0, 900, 10.0 + SNAPSHOT_CATCH_UP_HOLD_S) == 0


# ---- the install request ------------------------------------------------------------------------


def journal_with(directory: Path, batches: int) -> None:
    journal = open_journal(directory, segment_bytes=SMALL_SEGMENT_BYTES)
    fill(journal, [10] * batches)
    journal.sync()
    journal.close()


def received(snapshot_dir: Path, index: int, term: int) -> bytes:
    """A complete, durable received file, as `SnapshotReceiver` leaves it."""
    source = make_snapshot(snapshot_dir, index, 4096, term)
    data = source.read_bytes()
    source.unlink()
    (snapshot_dir / SNAPSHOT_TEMP_NAME).write_bytes(data)
    return data


@pytest.mark.parametrize("crash", ["none", "after_rename", "after_some_segments", "after_reset"])
def test_an_install_request_is_finished_whatever_step_a_crash_interrupted(tmp_dir: Path, crash: str):
    data_dir, journal_dir, snapshot_dir = tmp_dir, tmp_dir / "journal", tmp_dir / "snapshots"
    snapshot_dir.mkdir()
    journal_with(journal_dir, 12)  # records 1..120 in several segments
    data = received(snapshot_dir, 500, 4)
    write_install_request(data_dir, 500, 4)
    final = snapshots.snapshot_path(snapshot_dir, 500)
    # Play the steps up to the crash by hand, as a crashed supervisor left them.
    if crash != "none":
        os.rename(snapshot_dir / SNAPSHOT_TEMP_NAME, final)
    if crash == "after_some_segments":
        segments = sorted(journal_dir.glob("*.seg"))
        for path in segments[len(segments) // 2:]:
            path.unlink()
    if crash == "after_reset":
        with Journal.open(journal_dir, segment_bytes=SMALL_SEGMENT_BYTES) as journal:
            journal.restart_after(500, 4)
    with Journal.open(journal_dir, segment_bytes=SMALL_SEGMENT_BYTES) as journal:
        assert finish_install_request(data_dir, snapshot_dir, journal) == 500
        assert (journal.first_index, journal.last_index, journal.last_term) == (501, 500, 4)
        assert journal.term_at(500) == 4
        journal.append(make_batch(501, 5, term=4))
        journal.sync()
    assert read_install_request(data_dir) is None
    assert final.read_bytes() == data
    assert not (snapshot_dir / SNAPSHOT_TEMP_NAME).exists()
    assert [r.index for r in read_records(journal_dir, 501)] == [501, 502, 503, 504, 505]
    assert logtools.check(journal_dir).ok
    with Journal.open(journal_dir, segment_bytes=SMALL_SEGMENT_BYTES) as journal:
        assert finish_install_request(data_dir, snapshot_dir, journal) is None  # done once


def test_an_install_request_whose_snapshot_is_gone_names_both_places_and_what_to_do(tmp_dir: Path):
    snapshot_dir = tmp_dir / "snapshots"
    snapshot_dir.mkdir()
    write_install_request(tmp_dir, 500, 4)
    with Journal.open(tmp_dir / "journal") as journal, pytest.raises(ValueError) as error:
        finish_install_request(tmp_dir, snapshot_dir, journal)
    assert SNAPSHOT_TEMP_NAME in str(error.value) and "Remove the node's data directory" in str(error.value)


def test_a_damaged_install_request_is_refused_naming_the_file(tmp_dir: Path):
    (tmp_dir / INSTALL_NAME).write_text("five\n")
    with pytest.raises(ValueError, match=INSTALL_NAME):
        read_install_request(tmp_dir)
