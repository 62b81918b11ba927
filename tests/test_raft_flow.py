"""Flow control: the leader's window per follower in messages and in payload bytes, and what one
pass reads from storage for every follower together (`sequencer.raft.tracker`, `leader`).

Issue 11: "flow control by bytes and by messages in flight per follower: a slow or dead follower
must not stall the leader or grow its memory". etcd-io/raft bounds the same with
`MaxInflightMsgs` and `MaxInflightBytes` (`tracker/inflights.go`): a soft byte bound, so one
message may cross it and a single entry larger than the window still goes.

Driven message by message, like tests/test_raft_paper.py.
"""

from __future__ import annotations

import pytest

from sequencer.raft import AppendEntries, AppendEntriesResponse, Message, RaftConfig
from sequencer.raft.tracker import PROBE, REPLICATE, SNAPSHOT, Progress
from tests.sim.direct import DirectCluster

PAYLOAD = b"0123456789"  # 10 bytes
BYTES_MAX = 100
PER_MESSAGE = 3  # entries per AppendEntries: 30 payload bytes


def appends_to(messages: list[Message], target: int) -> list[AppendEntries]:
    return [m for m in messages if isinstance(m, AppendEntries) and m.target == target and m.terms]


def payload_bytes(messages: list[AppendEntries]) -> int:
    return sum(len(payload) for message in messages for payload in message.payloads)


def leader_with_a_window(**config: int) -> DirectCluster:
    cluster = DirectCluster(3, entries_per_message_max=PER_MESSAGE, inflight_bytes_max=BYTES_MAX,
                            **config)
    cluster.elect(1)
    cluster.tick(1)
    cluster.stabilize()
    return cluster


def test_a_follower_that_never_answers_gets_at_most_the_windows_bytes() -> None:
    cluster = leader_with_a_window()
    cluster.isolate(2)
    leader = cluster.core(1)
    sent_before = len(cluster.sent)
    leader.propose_batch([PAYLOAD] * 200)
    for _ in range(40):  # passes, ticks and node 3's answers: nothing frees node 2's window
        cluster.process()
        cluster.deliver()
        cluster.tick(1)
    sent = appends_to(cluster.sent[sent_before:], 2)
    # Sent while under 100 bytes: 30, 60, 90, then 120 (the message that crosses it), no more.
    assert payload_bytes(sent) == 120, [len(m.terms) for m in sent]
    assert leader._leader is not None
    progress = leader._leader.tracker.progress[2]
    assert progress.inflight_bytes == 120 and len(progress.inflight) == 4
    assert cluster.core(3).log.last_index == leader.log.last_index  # the other one was not held


def test_answers_release_the_bytes_they_acknowledge() -> None:
    cluster = leader_with_a_window()
    leader = cluster.core(1)
    assert leader._leader is not None
    progress = leader._leader.tracker.progress[2]
    leader.propose_batch([PAYLOAD] * 200)
    cluster.process(1)
    first = appends_to(cluster.outbox, 2)
    assert payload_bytes(first) == 120 and progress.inflight_bytes == 120
    # Node 2 answers the first message only: its 30 bytes are freed, and one more message goes.
    cluster.deliver(drop=lambda m: m.target != 2 or m is not first[0])
    cluster.process(2)
    answers = [m for m in cluster.outbox if isinstance(m, AppendEntriesResponse)]
    assert len(answers) == 1 and answers[0].success and answers[0].index == first[0].previous_index + 3
    cluster.outbox.clear()
    leader.step(answers[0])
    assert progress.inflight_bytes == 90
    cluster.process(1)
    assert payload_bytes(appends_to(cluster.outbox, 2)) == 30 and progress.inflight_bytes == 120
    # Everything answered in the end: the window is empty and the follower holds the whole log.
    cluster.outbox.clear()
    progress.heartbeat_answered(leader.log.last_index, 64, BYTES_MAX)  # resend what was dropped
    cluster.stabilize()
    assert cluster.core(2).log.last_index == leader.log.last_index
    assert progress.inflight_bytes == 0 and not progress.inflight


def _replicating_with_bytes_in_flight() -> Progress:
    progress = Progress(2, 11)
    progress.match_index = 10
    progress.become_replicate()
    for last_index in (13, 16, 19):
        progress.sent_append(last_index, 10, 30)
    assert progress.inflight_bytes == 90 and progress.state is REPLICATE
    return progress


@pytest.mark.parametrize(
    "transition",
    [
        pytest.param(lambda p: p.reject(12, 11), id="a rejection"),
        pytest.param(lambda p: p.heard_from(2, 10, 19), id="a new start of the follower"),
        pytest.param(lambda p: p.heard_from(2, 5, 19), id="a new start that lost entries"),
        pytest.param(lambda p: p.become_snapshot(50), id="a snapshot"),
        pytest.param(lambda p: p.become_probe(11), id="a probe (snapshot timeout)"),
    ],
)
def test_every_change_of_state_empties_the_byte_window(transition: object) -> None:
    progress = _replicating_with_bytes_in_flight()
    progress.incarnation = 1
    transition(progress)  # type: ignore[operator]
    assert progress.state in (PROBE, SNAPSHOT)
    assert progress.inflight_bytes == 0 and not progress.inflight
    # Probed, then matched again: the window opens whole.
    if progress.state is PROBE:
        progress.sent_append(progress.next_index + 2, 10, 30)
        progress.acknowledge(progress.next_index - 1)
        assert progress.state is REPLICATE and progress.has_room(64, BYTES_MAX)
        assert progress.inflight_bytes == 0


def test_a_rejection_through_the_leader_resets_the_window_it_held() -> None:
    cluster = leader_with_a_window()
    leader = cluster.core(1)
    assert leader._leader is not None
    progress = leader._leader.tracker.progress[2]
    leader.propose_batch([PAYLOAD] * 200)
    cluster.process(1)
    first = appends_to(cluster.outbox, 2)[0]
    cluster.outbox.clear()
    assert progress.inflight_bytes == 120
    # Node 2 lost its log (it says so in a rejection of the first message): probe again.
    leader.step(AppendEntriesResponse(1, 2, 1, leader.term, False, first.previous_index + 1,
                                      first.previous_index - 1, 0))
    assert progress.state is PROBE and progress.inflight_bytes == 0 and not progress.inflight


def test_one_entry_larger_than_the_window_still_goes_alone() -> None:
    cluster = leader_with_a_window()
    cluster.isolate(2)
    leader = cluster.core(1)
    sent_before = len(cluster.sent)
    leader.propose_batch([b"x" * (3 * BYTES_MAX), PAYLOAD])
    cluster.process(1)
    sent = appends_to(cluster.sent[sent_before:], 2)
    # The message holds as many entries as fit the entry bound; the byte bound only stops the next.
    assert [len(m.terms) for m in sent] == [2] and payload_bytes(sent) == 3 * BYTES_MAX + 10
    leader.propose(PAYLOAD)
    cluster.process(1)
    assert appends_to(cluster.sent[sent_before:], 2) == sent  # full until it is answered
    cluster.heal()
    cluster.stabilize()
    cluster.tick(1)
    cluster.stabilize()
    assert cluster.core(2).log.last_index == leader.log.last_index


def test_one_pass_reads_at_most_its_budget_from_storage_for_every_follower() -> None:
    """Two followers far behind the retention window: each pass of the leader (readies until
    none is due, as the replicator runs them) reads at most `storage_read_bytes_per_pass_max`
    from storage, plus the read that crosses it, not both followers' windows; the rest goes as
    their answers refill the budget, and both catch up."""
    cluster = DirectCluster(5, log_retention_entries=2, storage_read_bytes_max=20,
                            storage_read_bytes_per_pass_max=40)
    cluster.elect(1)
    cluster.tick(1)
    cluster.stabilize()
    leader = cluster.core(1)
    cluster.isolate(4)
    cluster.isolate(5)
    for _ in range(20):
        leader.propose_batch([PAYLOAD] * 5)
        cluster.stabilize()
    assert leader.log.offset_index > 50  # what nodes 4 and 5 need is in storage only
    cluster.heal()
    cluster.tick(1)
    storage = cluster.storages[1]
    most_read = 0
    for _ in range(1000):
        before = storage.reads
        cluster.process(1)
        most_read = max(most_read, (storage.reads - before) * len(PAYLOAD))
        cluster.process()
        if not cluster.outbox:
            break
        cluster.deliver()
    assert 0 < most_read <= 40 + 20, most_read
    for node_id in (4, 5):
        assert cluster.core(node_id).log.last_index == leader.log.last_index
        assert cluster.disks[node_id].terms == cluster.disks[1].terms


def test_a_ready_sends_nothing_from_storage_once_the_pass_budget_is_spent() -> None:
    """The budget, in the sans-I/O core: two followers catching up from storage share one
    ready's `storage_read_bytes_per_pass_max`; `has_ready` agrees (a caller that runs readies
    until none is due stops), and answers or a tick give a new pass."""
    from sequencer.raft.leader import Leader
    from sequencer.raft.log import RaftLog
    from sequencer.raft.storage import MemoryLogStorage

    storage = MemoryLogStorage()
    storage.write(1, [1] * 100, [PAYLOAD] * 100)
    log = RaftLog(storage=storage)
    log.start_after(100, 1)  # 1..100 in storage only
    log.append_run(1, [PAYLOAD] * 5)
    sent: list[Message] = []
    config = RaftConfig(1, (1, 2, 3), storage_read_bytes_max=20, storage_read_bytes_per_pass_max=45,
                        inflight_bytes_max=1000)
    leader = Leader(config, 1, log, (2, 3), 2, sent.append)
    for peer in (2, 3):
        progress = leader.tracker.progress[peer]
        progress.match_index = 10
        progress.become_replicate()  # both at 11: 90 entries (900 bytes) to read from storage
    assert leader.appends_due(0)
    leader.flush_appends(0, None)
    read = payload_bytes(appends_to(sent, 2)) + payload_bytes(appends_to(sent, 3))
    # 20-byte reads while under 45: 20, 40, 60, then the budget is spent.
    assert read == 60, read
    assert not leader.appends_due(0)  # a ready now would send nothing: has_ready says so
    sent.clear()
    leader.flush_appends(0, None)
    assert sent == []
    leader.heartbeat_tick()  # a tick starts a new pass
    assert leader.appends_due(0)
    leader.flush_appends(0, None)
    assert 0 < payload_bytes(appends_to(sent, 2)) + payload_bytes(appends_to(sent, 3)) <= 60
    # A follower fed from memory is not held by the spent budget.
    sent.clear()
    progress = leader.tracker.progress[3]
    progress.match_index = 102
    progress.become_replicate()
    leader.flush_appends(0, None)
    assert appends_to(sent, 3) and not appends_to(sent, 2)


def test_a_message_from_memory_is_cut_at_the_read_bound_so_large_entries_fit_a_peer_frame() -> None:
    # 1024 entries of a few KiB (or five 1 MiB commands) in memory made one AppendEntries larger
    # than PEER_FRAME_BYTES_MAX: the transport dropped it, and the leader sent it again, forever.
    cluster = DirectCluster(3, entries_per_message_max=100, storage_read_bytes_max=25)
    cluster.elect(1)
    cluster.tick(1)
    cluster.stabilize()
    leader = cluster.core(1)
    sent_before = len(cluster.sent)
    leader.propose_batch([PAYLOAD] * 10)
    cluster.stabilize()
    sent = appends_to(cluster.sent[sent_before:], 2)
    # 10 + 10 + 10 reaches 25 at the third entry: messages of three entries (30 bytes), then one.
    assert [len(m.terms) for m in sent] == [3, 3, 3, 1]
    assert cluster.core(2).log.last_index == leader.log.last_index
