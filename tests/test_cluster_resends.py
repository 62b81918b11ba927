"""A follower's forwards that the old leader logged but never committed, resent to a new leader
that may or may not hold them: five real voters, the fault proxy on every link (issue 11).

The rule under test (`PendingForwards.resend(with_logged=True)`, `ForwardStream`'s
`another_leader`, docs/cluster.md "Clients on a follower"): on a change of leader a follower
resends every pending record, those already in its own log included. With five voters the old
leader can reach this follower and no majority before it dies: the follower's log then holds the
client's first commands, the new leader's does not, and a resend of only the records not in the
follower's log would get the client's later commands committed first; the follower then cuts the
conflicting suffix and restarts, and its client's resend of the first ones comes behind a later
request id of the same client: answered DUPLICATE, never applied. The unit rule is in
tests/test_cluster_helpers.py; this forces the interleaving on real processes:

1. the old leader L can reach only the follower F (and, in the `holds` case, node A too, whose
   answers to L are cut: A logs what L sends, L never counts it), so nothing commits;
2. F's client sends FIRST commands: L logs them and replicates them to F ("logged" at F);
3. L's link to F is cut; the client sends LATER commands: forwarded, never logged at F;
4. L is killed (SIGKILL); F is cut from the three others (so its longer log cannot win it the
   election), which elect a new leader N among themselves (in the `holds` case A, the only one
   with the longest log); then the network heals.
5. F learns of N and resends FIRST and LATER, in order. `lacks`: N's log conflicts with F's, F
   cuts its suffix and restarts its pipeline, its client reconnects and resends; `holds`: N commits
   FIRST (and LATER, which L sent to A) itself, and F's copies are duplicates the dedup table turns
   away.

Then L is restarted, all five converge, pass `seqd log check`, and the history checker finds every
acknowledged command applied exactly once with the reply the replay gives.

About 30-40 s on a quiet 2-core machine (five nodes, two elections at a 1.5 s timeout): behind
SEQD_FAULTS_LONG=1 (the three-node leader kills of tests/test_cluster_faults.py prove the resend
in CI).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.cluster_harness import Cluster
from daemon.layout import RAFT_LAST_INDEX, RAFT_PENDING_FORWARDS
from sequencer import logtools
from sequencer.apps.ledger import Deposit, Ledger
from sequencer.history.checker import check_files
from sequencer.history.recorder import (
    HistoryWriter,
    RecordingClient,
    RecordingRequest,
    read_history,
)
from tests.cluster_workload import CLIENT_TIMEOUT_S, open_accounts

LONG = os.environ.get("SEQD_FAULTS_LONG", "") not in ("", "0")
pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(not LONG, reason="five nodes, two elections: ~35 s; set SEQD_FAULTS_LONG=1"),
]

# Long enough that L, cut from the majority in step 1, still leads (check-quorum steps it down
# after one election timeout) while F's FIRST commands go to it and come back logged: a few ms,
# seconds on a loaded machine.
ELECTION_TIMEOUT_MS = 1500
TIMEOUTS = {"tick_ms": 10, "heartbeat_ms": 50, "election_timeout_ms": ELECTION_TIMEOUT_MS}
FIRST = 4  # commands L logs at F
LATER = 4  # commands of the same client sent after, never logged at F
WAIT_S = 60.0  # each wait ends as soon as its condition holds
STOP_TIMEOUT_S = 30.0


@pytest.fixture
def cluster(tmp_dir: Path, unique: str) -> Iterator[Cluster]:
    made = Cluster(tmp_dir, unique, size=5, cluster=TIMEOUTS)
    try:
        yield made
    finally:
        made.close()


def _wait_counter(cluster: Cluster, number: int, name: str, least: int, why: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while (value := cluster[number].read_counters()[name]) < least:
        assert time.monotonic() < deadline, (
            f"{why}: node {number}'s {name} is {value}, not {least}; {cluster.describe()}\n"
            + "\n".join(f"--- node {n} log ---\n{node.log_text()[-2000:]}" for n, node in cluster.nodes.items())
        )
        time.sleep(0.01)


@pytest.mark.parametrize("new_leader_log", ["lacks", "holds"])
def test_forwards_the_old_leader_logged_but_never_committed_are_resent_and_applied_exactly_once(
    cluster: Cluster, tmp_dir: Path, new_leader_log: str
) -> None:
    network = cluster.network
    assert network is not None
    cluster.start()
    view = cluster.wait_leader()
    old_leader, term = view.number, view.term or 0
    follower, holder, *rest = (n for n in cluster.nodes if n != old_leader)
    others = [holder, *rest]
    open_accounts(cluster[old_leader].socket_path, tmp_dir / "setup.jsonl")
    history = tmp_dir / "client-follower.jsonl"
    from sequencer.client import Client

    with HistoryWriter(history) as sink, RecordingClient(
        Client(cluster[follower].socket_path, schema=Ledger.schema, timeout_s=CLIENT_TIMEOUT_S,
               reconnect_timeout_s=CLIENT_TIMEOUT_S, in_flight_max=FIRST + LATER, client_name="f"),
        "f", sink,
    ) as client:  # fmt: skip
        client.call(Deposit("alice", 1))  # the session is open and commits through the follower
        base = cluster[follower].read_counters()[RAFT_LAST_INDEX.name]
        # 1. L reaches F (and the holder, deaf to its answers), no majority: nothing commits.
        if new_leader_log == "lacks":
            network.partition([old_leader, follower], *([n] for n in others))
        else:
            network.partition([old_leader, follower, holder], *([n] for n in rest))
            network.cut(holder, old_leader)
        # 2. FIRST: logged at F (and at the holder), not committed.
        requests: list[RecordingRequest] = [client.submit(Deposit("alice", 10 + k)) for k in range(FIRST)]
        client.client.flush(WAIT_S)  # `submit` batches; the waits below pump nothing
        _wait_counter(cluster, follower, RAFT_LAST_INDEX.name, base + FIRST, "FIRST not logged at the follower")
        if new_leader_log == "holds":
            _wait_counter(cluster, holder, RAFT_LAST_INDEX.name, base + FIRST, "FIRST not logged at the holder")
        # 3. LATER: L can no longer replicate to F; F takes them (pending), never logs them.
        network.cut(old_leader, follower)
        requests += [client.submit(Deposit("bob", 20 + k)) for k in range(LATER)]
        client.client.flush(WAIT_S)
        _wait_counter(cluster, follower, RAFT_PENDING_FORWARDS.name, FIRST + LATER, "LATER not taken by the follower")
        assert not any(request.pending.done() for request in requests), "committed without a majority"
        log_start = len(cluster[follower].log_text())
        # 4. L dies; the three others elect a leader without F, whose longer log would win.
        cluster.kill(old_leader)
        network.partition([follower], others)
        new_view = cluster.wait_leader(among=others, term_above=term)
        new_leader = new_view.number
        if new_leader_log == "holds":
            assert new_leader == holder, f"only node {holder} held the longest log; {cluster.describe()}"
        network.heal()
        # 5. Every command of the client is answered, exactly once (the checker, below).
        for request in requests:
            request.result(CLIENT_TIMEOUT_S)
        client.call(Deposit("bob", 1))
    follower_log = cluster[follower].log_text()[log_start:]
    resent = [int(count) for count in re.findall(
        rf"resending ([0-9]+) pending records: a new leader, node {new_leader}\b", follower_log)]  # fmt: skip
    assert resent and resent[0] >= FIRST + LATER, (
        f"node {follower} did not resend its {FIRST} logged and {LATER} other pending records to node "
        f"{new_leader} (resends logged: {resent})\n{follower_log[-3000:]}"
    )
    if new_leader_log == "lacks":
        assert "conflicts with this node's" in follower_log, follower_log[-3000:]
    cluster.start([old_leader])
    cluster.wait_leader(agreeing=cluster.size)
    cluster.wait_converged()
    cluster.stop(timeout_s=STOP_TIMEOUT_S)
    for number, node in cluster.nodes.items():
        report = logtools.check(node.config.journal_dir)
        assert report.ok, f"seqd log check on node {number}: {report}"
    histories = [history, tmp_dir / "setup.jsonl"]
    verdict = check_files(
        histories,
        {f"n{n}": node.config.journal_dir for n, node in cluster.nodes.items()},
        {f"n{n}": node.config.snapshot_dir for n, node in cluster.nodes.items()},
    )
    assert verdict.ok, str(verdict)
    operations = [op for op in read_history(history) if op.client == "f"]
    assert len(operations) == FIRST + LATER + 2, operations
    assert all(op.outcome == "ok" and op.reply_status == "ok" for op in operations), [
        op.describe() for op in operations
    ]
