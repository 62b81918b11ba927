"""The Raft core against the sentences of the paper (Ongaro and Ousterhout, extended version).

Each test quotes the sentence it proves and names its section, in the style of etcd-io/raft
`raft_paper_test.go`. The cluster is driven step by step (`tests.sim.direct.DirectCluster`), so
every message that moves is one the test moved.
"""

from __future__ import annotations

import ast
import random
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sequencer.raft import (
    MESSAGE_DECODER,
    AppendEntries,
    AppendEntriesResponse,
    DurableState,
    HardState,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    NotLeaderError,
    ProposalRejected,
    RaftConfig,
    RaftCore,
    RaftLog,
    RaftRole,
    RequestVote,
    RequestVoteResponse,
    Snapshot,
    TimeoutNow,
    quorum_index,
)
from tests.sim.direct import DirectCluster

CLUSTER = 1


def follower(node_id: int = 2, voters: tuple[int, ...] = (1, 2, 3), **durable: object) -> RaftCore:
    durable.setdefault("hard_state", HardState(0, 0, 0))
    state = DurableState(**durable)  # type: ignore[arg-type]
    return RaftCore(RaftConfig(node_id, voters), random.Random(0), state)


def drain(core: RaftCore) -> list[object]:
    """Do the core's readies as a caller would; return the messages it sends."""
    sent: list[object] = []
    while core.has_ready():
        ready = core.ready()
        sent.extend(ready.messages)
        core.advance(ready)
    return sent


# ------------------------------------------------------------------------------ elections


def test_first_election_elects_exactly_one_leader() -> None:
    # 5.2: "A candidate wins an election if it receives votes from a majority of the servers in
    # the full cluster for the same term."
    cluster = DirectCluster(3)
    cluster.elect(1)
    assert [c.raft_role for c in cluster.cores.values()].count(RaftRole.LEADER) == 1
    assert cluster.core(1).term == 1


def test_voter_grants_at_most_one_vote_per_term() -> None:
    # 5.2: "Each server will vote for at most one candidate in a given term, on a
    # first-come-first-served basis."
    core = follower(2)
    core.step(RequestVote(CLUSTER, 1, 2, 1, 0, 0, False))
    core.step(RequestVote(CLUSTER, 3, 2, 1, 0, 0, False))
    votes = [m for m in drain(core) if isinstance(m, RequestVoteResponse)]
    assert [(m.target, m.granted) for m in votes] == [(1, True), (3, False)]
    assert core.vote == 1


def test_voter_denies_a_candidate_whose_log_is_less_up_to_date() -> None:
    # 5.4.1: "the voter denies its vote if its own log is more up-to-date than that of the
    # candidate."
    core = follower(2, hard_state=HardState(2, 0, 0), terms=[1, 2], payloads=[b"a", b"b"])
    core.step(RequestVote(CLUSTER, 1, 2, 3, 5, 1, False))  # longer log, older last term
    core.step(RequestVote(CLUSTER, 3, 2, 3, 1, 2, False))  # same last term, shorter
    votes = [m for m in drain(core) if isinstance(m, RequestVoteResponse)]
    assert [m.granted for m in votes] == [False, False]


def test_vote_is_in_the_ready_that_sends_it() -> None:
    # Figure 2, "Persistent state on all servers (Updated on stable storage before responding to
    # RPCs)": currentTerm and votedFor.
    core = follower(2)
    core.step(RequestVote(CLUSTER, 1, 2, 4, 0, 0, False))
    ready = core.ready()
    assert ready.hard_state == HardState(4, 1, 0)
    assert any(isinstance(m, RequestVoteResponse) and m.granted for m in ready.messages)
    core.advance(ready)


def test_term_and_vote_survive_a_restart() -> None:
    # Figure 2: currentTerm and votedFor are "persistent state on all servers".
    cluster = DirectCluster(3)
    cluster.elect(1)
    cluster.crash(2)
    cluster.restart(2)
    restarted = cluster.core(2)
    assert (restarted.term, restarted.vote) == (1, 1)
    restarted.step(RequestVote(CLUSTER, 3, 2, 1, 99, 1, False))
    assert not [m for m in drain(restarted) if getattr(m, "granted", False)]


def test_pre_vote_does_not_raise_the_term_of_a_partitioned_node() -> None:
    # Thesis 9.6: "a candidate would first ask other servers whether its log was up-to-date
    # enough to get their vote. Only if the candidate believed it could get votes from a majority
    # of the cluster would it increment its term and start a normal election."
    cluster = DirectCluster(3)
    cluster.elect(1)
    cluster.isolate(3)
    for _ in range(100):
        cluster.tick(3)
        cluster.process()
        cluster.deliver()
    assert cluster.core(3).term == 1
    cluster.heal()
    cluster.tick(1, 1)
    cluster.stabilize()
    assert cluster.leader() == 1 and cluster.core(1).term == 1


def test_followers_ignore_vote_requests_while_their_leader_is_live() -> None:
    # Thesis 4.2.3: "if a server receives a RequestVote request within the minimum election
    # timeout of hearing from a current leader, it does not update its term or grant its vote."
    cluster = DirectCluster(3)
    cluster.elect(1)
    core = cluster.core(2)
    core.step(RequestVote(CLUSTER, 3, 2, 5, 100, 5, False))
    assert core.term == 1 and not drain(core)


def test_leader_without_a_majority_steps_down() -> None:
    # Thesis 6.2: "a leader steps down if an election timeout elapses without a successful round
    # of heartbeats to a majority of its cluster."
    cluster = DirectCluster(3)
    cluster.elect(1)
    cluster.isolate(1)
    for _ in range(3 * 10):
        cluster.tick(1)
        cluster.process()
        cluster.deliver()
    assert cluster.core(1).raft_role == RaftRole.FOLLOWER


def test_new_leader_appends_a_no_op_entry_of_its_term() -> None:
    # 8: "each leader [commits] a blank no-op entry into the log at the start of its term."
    cluster = DirectCluster(3)
    cluster.elect(1)
    for core in cluster.cores.values():
        assert (core.log.last_index, core.log.last_term, core.log.payloads[-1]) == (1, 1, b"")
        assert core.commit_index == 1


# ---------------------------------------------------------------------------- replication


def test_basic_agreement_commits_on_every_node() -> None:
    # 5.3: "Once the entry has been safely replicated ... the leader applies the entry to its
    # state machine".
    cluster = DirectCluster(3)
    cluster.elect(1)
    cluster.core(1).propose_batch([b"a", b"b", b"c"])
    cluster.stabilize()
    cluster.tick(1)
    cluster.stabilize()
    for node_id in cluster.ids:
        assert cluster.applied[node_id] == [b"", b"a", b"b", b"c"]


def test_follower_rejects_append_without_the_previous_entry_and_hints_the_term() -> None:
    # 5.3: "If the follower does not find an entry in its log with the same index and term, then
    # it refuses the new entries"; "the follower can include the term of the conflicting entry and
    # the first index it stores for that term."
    core = follower(2, hard_state=HardState(3, 0, 0), terms=[1, 2, 2, 2], payloads=[b"a"] * 4)
    core.step(AppendEntries(CLUSTER, 1, 2, 3, 4, 3, 0, [3], [b"x"]))
    (response,) = drain(core)
    assert isinstance(response, AppendEntriesResponse)
    assert (response.success, response.index, response.hint_term, response.hint_index) == (
        False, 4, 2, 2
    )
    core.step(AppendEntries(CLUSTER, 1, 2, 3, 9, 3, 0, [], []))
    (response,) = drain(core)
    assert isinstance(response, AppendEntriesResponse)
    assert (response.success, response.hint_term, response.hint_index) == (False, 0, 5)


def test_leader_backs_up_a_whole_term_per_rejection() -> None:
    # 5.3: "one AppendEntries RPC will be required for each term with conflicting entries, rather
    # than one RPC per entry."
    leader_log = [1, 1, 1, 4, 4, 5, 5, 6, 6, 6]
    follower_log = [1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3]
    durable = {
        1: DurableState(HardState(6, 1, 0), None, leader_log, [b"%d" % t for t in leader_log]),
        2: DurableState(HardState(6, 1, 0), None, leader_log, [b"%d" % t for t in leader_log]),
        3: DurableState(HardState(3, 0, 0), None, follower_log, [b"%d" % t for t in follower_log]),
    }
    cluster = DirectCluster(3, durable=durable)
    cluster.elect(1)
    cluster.stabilize()
    rejections = [m for m in cluster.sent
                  if isinstance(m, AppendEntriesResponse) and m.source == 3 and not m.success]
    assert len(rejections) <= 2
    assert cluster.core(3).log.terms == cluster.core(1).log.terms


def test_duplicated_old_append_never_truncates_newer_entries() -> None:
    # 5.3, receiver step 3: "If an existing entry conflicts with a new one (same index but
    # different terms), delete the existing entry and all that follow it" -- only then.
    core = follower(2)
    core.step(AppendEntries(CLUSTER, 1, 2, 1, 0, 0, 0, [1, 1, 1], [b"a", b"b", b"c"]))
    drain(core)
    core.step(AppendEntries(CLUSTER, 1, 2, 1, 0, 0, 0, [1], [b"a"]))
    (response,) = drain(core)
    assert core.log.last_index == 3
    assert isinstance(response, AppendEntriesResponse) and response.index == 1


def test_follower_commit_is_min_of_leader_commit_and_last_new_entry() -> None:
    # Figure 2: "If leaderCommit > commitIndex, set commitIndex = min(leaderCommit, index of last
    # new entry)".
    core = follower(2, hard_state=HardState(1, 0, 0), terms=[1, 1, 1, 1], payloads=[b"s"] * 4)
    core.step(AppendEntries(CLUSTER, 1, 2, 2, 1, 1, 10, [2], [b"x"]))
    drain(core)
    assert core.commit_index == 2
    assert core.log.last_index == 2  # the stale tail was replaced


def test_leader_commits_only_entries_of_its_current_term_by_counting() -> None:
    # 5.4.2 (Figure 8): "Raft never commits log entries from previous terms by counting replicas.
    # Only log entries from the leader's current term are committed by counting replicas."
    durable = {
        1: DurableState(HardState(2, 1, 0), None, [1, 2], [b"a", b"b"]),
        2: DurableState(HardState(2, 1, 0), None, [1], [b"a"]),
        3: DurableState(HardState(2, 1, 0), None, [1], [b"a"]),
    }
    cluster = DirectCluster(3, durable=durable)
    leader = cluster.core(1)
    while leader.raft_role == RaftRole.FOLLOWER:
        leader.tick()
    cluster.process(1)
    # Votes arrive; the AppendEntries of term 3 are dropped.
    for _ in range(4):
        cluster.deliver(drop=lambda m: isinstance(m, AppendEntries))
        cluster.process()
    assert leader.raft_role == RaftRole.LEADER and leader.term == 3
    # Node 2 reports it holds index 2 (the term-2 entry) but not yet the no-op at 3.
    leader.step(AppendEntriesResponse(CLUSTER, 2, 1, 3, True, 2, 0, 0))
    drain(leader)
    assert leader.commit_index == 0
    leader.step(AppendEntriesResponse(CLUSTER, 2, 1, 3, True, 3, 0, 0))
    drain(leader)
    assert leader.commit_index == 3


def test_leader_pipelines_batches_up_to_the_inflight_window() -> None:
    # Flow control: at most inflight_messages_max AppendEntries unanswered per follower.
    cluster = DirectCluster(3, entries_per_message_max=10, inflight_messages_max=4)
    cluster.elect(1)
    cluster.core(1).propose_batch([b"p"] * 100)
    cluster.process(1)
    appends = [m for m in cluster.outbox if isinstance(m, AppendEntries) and m.target == 2]
    assert len(appends) == 4
    assert all(len(m.terms) == 10 for m in appends)
    cluster.stabilize()
    assert cluster.core(2).log.last_index == 101


def test_has_ready_is_a_query_so_polling_it_between_proposals_keeps_them_in_one_batch() -> None:
    # Batching: every proposal since the last ready goes out in one AppendEntries per follower,
    # however often the caller asks has_ready() in between; asking changes nothing.
    def leader_ready(polls: int) -> list[object]:
        cluster = DirectCluster(3)
        cluster.elect(1)
        cluster.stabilize()
        leader = cluster.core(1)
        leader.propose(b"a")
        for _ in range(polls):
            assert leader.has_ready()
        leader.propose(b"b")
        ready = leader.ready()
        leader.advance(ready)
        return list(ready.messages)

    polled = leader_ready(polls=3)
    appends = [m for m in polled if isinstance(m, AppendEntries) and m.target == 2]
    assert [len(m.terms) for m in appends] == [2]
    assert polled == leader_ready(polls=0)


def test_lagging_follower_gets_the_snapshot_after_compaction() -> None:
    # 7: "the leader must occasionally send snapshots to followers that lag behind ... when the
    # leader has already discarded the next log entry that it needs to send to a follower."
    cluster = DirectCluster(3)
    cluster.elect(1)
    cluster.isolate(3)
    leader = cluster.core(1)
    leader.propose_batch([b"a", b"b", b"c"])
    cluster.stabilize()
    leader.compact(leader.applied_index, b"state-at-4")
    cluster.heal()
    cluster.tick(1)
    cluster.stabilize()
    follower3 = cluster.core(3)
    assert any(isinstance(m, InstallSnapshot) for m in cluster.sent)
    assert follower3.log.snapshot_index == 4 and follower3.commit_index == 4
    assert cluster.disks[3].snapshot == Snapshot(4, 1, b"state-at-4")


# ---------------------------------------------------------------------------- ReadIndex


def test_read_index_is_answered_only_after_a_majority_confirms_leadership() -> None:
    # 8: "a leader must check whether it has been deposed before processing a read-only request
    # ... by having the leader exchange heartbeat messages with a majority of the cluster".
    cluster = DirectCluster(3)
    cluster.elect(1)
    leader = cluster.core(1)
    leader.read_index(42)
    ready = leader.ready()
    assert not ready.reads
    heartbeats = [m for m in ready.messages if isinstance(m, Heartbeat)]
    leader.advance(ready)
    assert len(heartbeats) == 2
    leader.step(HeartbeatResponse(CLUSTER, 2, 1, 1, heartbeats[0].read_sequence))
    ready = leader.ready()
    assert ready.reads and ready.reads[0].request_id == 42 and ready.reads[0].index == 1
    leader.advance(ready)


def test_read_index_waits_for_the_first_commit_of_the_term() -> None:
    # 8: "the leader must have the latest information on which entries are committed ... Raft
    # handles this by having each leader commit a blank no-op entry".
    cluster = DirectCluster(3)
    core = cluster.core(1)
    while core.raft_role == RaftRole.FOLLOWER:
        core.tick()
    for _ in range(4):
        cluster.process()
        cluster.deliver(drop=lambda m: isinstance(m, AppendEntriesResponse))
    assert core.raft_role == RaftRole.LEADER and core.commit_index == 0
    core.read_index(7)
    assert not [m for m in drain(core) if isinstance(m, Heartbeat)]
    cluster.outbox.clear()
    cluster.tick(1)
    cluster.stabilize()
    assert core.commit_index == 1


# -------------------------------------------------------------------- leadership transfer


def test_leadership_transfer_catches_the_target_up_then_it_wins_the_next_term() -> None:
    # Thesis 3.10: "The prior leader fully updates the target server's log to match its own ...
    # The prior leader sends a TimeoutNow request to the target server. This request has the same
    # effect as the target server's election timer firing: the target server starts a new election
    # (incrementing its term and becoming a candidate)."
    cluster = DirectCluster(3)
    cluster.elect(1)
    cluster.isolate(3)
    leader = cluster.core(1)
    leader.propose_batch([b"a", b"b"])
    cluster.stabilize()
    cluster.heal()
    leader.transfer_leadership(3)
    cluster.stabilize()
    timeouts = [m for m in cluster.sent if isinstance(m, TimeoutNow)]
    assert [(m.source, m.target, m.term) for m in timeouts] == [(1, 3, 1)]
    # Node 2 heard from node 1 within its lease, yet grants the transfer's vote (4.2.3 yields).
    assert cluster.leader() == 3 and cluster.core(3).term == 2
    assert leader.raft_role == RaftRole.FOLLOWER
    cluster.core(3).propose(b"c")
    cluster.stabilize()
    cluster.tick(3)
    cluster.stabilize()
    assert cluster.applied[1] == [b"", b"a", b"b", b"", b"c"]


def test_leader_refuses_proposals_during_a_transfer_and_resumes_after_an_election_timeout() -> None:
    # Thesis 3.10: "The prior leader stops accepting new client requests"; "If the transfer does
    # not complete within [an election timeout], the prior leader aborts the transfer and resumes
    # accepting client requests."
    cluster = DirectCluster(3, check_quorum=False)
    cluster.elect(1)
    cluster.isolate(3)
    leader = cluster.core(1)
    leader.transfer_leadership(3)
    with pytest.raises(ProposalRejected, match="handing leadership to node 3"):
        leader.propose(b"x")
    cluster.tick(1, 10)
    assert leader.raft_role == RaftRole.LEADER
    assert leader.propose(b"x") == 2
    with pytest.raises(ValueError, match="the other voters are"):
        leader.transfer_leadership(1)


# ------------------------------------------------------------------------- the contract


def test_proposal_to_a_follower_raises_not_leader_with_the_leader_id() -> None:
    cluster = DirectCluster(3)
    cluster.elect(1)
    with pytest.raises(NotLeaderError, match="not the Raft leader") as caught:
        cluster.core(2).propose(b"x")
    assert caught.value.leader_id == 1


def test_empty_payload_is_reserved_for_the_no_op() -> None:
    cluster = DirectCluster(1)
    cluster.elect(1)
    with pytest.raises(ProposalRejected, match="reserved"):
        cluster.core(1).propose(b"")


def test_leader_refuses_proposals_beyond_uncommitted_entries_max() -> None:
    cluster = DirectCluster(3, uncommitted_entries_max=10)
    cluster.elect(1)
    cluster.isolate(1)
    leader = cluster.core(1)
    leader.propose_batch([b"p"] * 10)
    with pytest.raises(ProposalRejected, match="uncommitted_entries_max=10"):
        leader.propose(b"q")


def test_single_node_commits_once_its_own_write_is_durable() -> None:
    cluster = DirectCluster(1)
    cluster.elect(1)
    core = cluster.core(1)
    core.propose(b"a")
    ready = core.ready()
    assert ready.entries is not None and ready.committed is None
    core.advance(ready)
    ready = core.ready()
    assert ready.committed is not None and ready.committed.payloads == [b"a"]
    core.advance(ready)


@pytest.mark.parametrize("voters", [(), (1, 2), (1, 2, 3, 4), (1, 2, 3, 4, 5, 6)])
def test_config_accepts_only_one_three_or_five_voters(voters: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="1, 3 or 5"):
        RaftConfig(1, voters)


def test_messages_of_another_cluster_are_dropped_and_counted() -> None:
    core = follower(2)
    core.step(RequestVote(99, 1, 2, 5, 0, 0, False))
    assert core.messages_dropped == 1 and core.term == 0 and not core.has_ready()


def test_every_message_round_trips_through_msgpack() -> None:
    messages = [
        RequestVote(1, 1, 2, 3, 4, 5, True),
        RequestVoteResponse(1, 2, 1, 3, True, False),
        AppendEntries(1, 1, 2, 3, 4, 2, 4, [3, 3], [b"a", b"\x00"]),
        AppendEntriesResponse(1, 2, 1, 3, False, 4, 2, 1),
        Heartbeat(1, 1, 2, 3, 4, 5),
        HeartbeatResponse(1, 2, 1, 3, 5),
        InstallSnapshot(1, 1, 2, 3, Snapshot(10, 2, b"state")),
        TimeoutNow(1, 1, 2, 3),
        RequestVote(1, 1, 2, 3, 4, 5, False, True),
    ]
    for message in messages:
        assert MESSAGE_DECODER.decode(msgspec.msgpack.encode(message)) == message


def test_core_touches_no_socket_file_clock_or_thread() -> None:
    # STYLE.md: "raft/core.py ... touch[es] no socket, file, clock or asyncio"; so does every
    # module the core is split into (config, election, tracker, read_index, log, quorum, ...).
    forbidden = {"socket", "os", "time", "asyncio", "threading", "io", "pathlib", "select"}
    # The peer transport is the one I/O shell in the package (its TCP side, and its refusals'
    # lingering close split out of it); its codec is checked.
    shells = {"transport.py", "peer_refusals.py"}
    paths = sorted(
        path for path in (Path(__file__).parent.parent / "sequencer" / "raft").glob("*.py") if path.name not in shells
    )
    assert len(paths) >= 9, paths
    for path in paths:
        name, source = path.name, path.read_text()
        tree = ast.parse(source)
        imported = {
            alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        } | {
            (node.module or "").split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom)
        }
        assert not imported & forbidden, (name, imported & forbidden)
        assert "open(" not in source, name


# -------------------------------------------------------------------- fast code, dumb oracle


@given(st.lists(st.integers(0, 50), min_size=1, max_size=5), st.data())
def test_quorum_index_is_the_largest_value_a_majority_reached(
    values: list[int], data: st.DataObject
) -> None:
    quorum = data.draw(st.integers(1, len(values)))
    expected = max(v for v in values if sum(1 for w in values if w >= v) >= quorum)
    assert quorum_index(values, quorum) == expected


def test_the_logs_last_index_follows_every_change_of_the_log() -> None:
    """`RaftLog.last_index` is a field kept by each change (it was a property, read ~12 times a
    message): appends, runs, merges that cut, drops to storage, compaction, a restart's start and a
    snapshot's restore, in a random order, against `offset_index + len(terms)`."""
    from sequencer.raft.storage import MemoryLogStorage

    rng = random.Random(7)
    for _ in range(200):
        log = RaftLog(storage=MemoryLogStorage())
        term = 1
        for _ in range(30):
            step = rng.random()
            last = log.offset_index + len(log.terms)
            if step < 0.3:
                terms = [term] * rng.randint(0, 4)
                log.append(terms, [b"x"] * len(terms))
            elif step < 0.45:
                log.append_run(term, [b"y"] * rng.randint(0, 3))
            elif step < 0.6 and last > log.offset_index:
                term += 1  # a new leader replaces a suffix
                previous = rng.randint(log.offset_index, last)
                incoming = [term] * rng.randint(1, 4)
                log.merge(previous, incoming, [b"z"] * len(incoming))
            elif step < 0.7 and last > log.offset_index:
                log.drop_to(rng.randint(log.offset_index + 1, last))
            elif step < 0.8 and last > log.offset_index:
                log.compact(rng.randint(log.offset_index + 1, last))
            elif step < 0.9:
                log.restore(last + rng.randint(0, 3), term)
            elif not log.terms:
                log.start_after(log.offset_index + rng.randint(0, 2), term)
            assert log.last_index == log.offset_index + len(log.terms)


@settings(max_examples=200)
@given(
    st.lists(st.integers(1, 4), max_size=12).map(sorted),
    st.integers(0, 12),
    st.lists(st.integers(1, 6), max_size=8).map(sorted),
)
def test_log_merge_matches_a_naive_model(existing: list[int], at: int, incoming: list[int]) -> None:
    previous_index = min(at, len(existing))
    if existing[:previous_index] and incoming and incoming[0] < existing[previous_index - 1]:
        return  # not a log a leader could send: terms never decrease
    log = RaftLog()
    log.append(list(existing), [b"%d" % t for t in existing])
    log.merge(previous_index, list(incoming), [b"%d" % t for t in incoming])
    # The naive model: keep entries that agree, cut at the first conflict, append the rest.
    model = list(existing)
    for offset, term in enumerate(incoming):
        position = previous_index + offset
        if position < len(model) and model[position] != term:
            del model[position:]
        if position >= len(model):
            model.append(term)
    assert log.terms == model
    assert log.payloads == [b"%d" % t for t in model]
    assert log.last_index == len(model)  # a field the log keeps, not worked out when read
