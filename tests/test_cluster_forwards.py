"""A follower's forwarded records on real nodes: one lost on the way is sent again, while the
node's other records keep committing, and its late arrival harms no live session (issue 11); a
command dropped mid-stream is sent again before any later one, so it is applied, once, in order.

The flake this reproduces: a follower's sequencer writes its node_start (the ADMIN record that
closes its sessions of earlier starts) before its peer link to the leader is up, so the forward
is lost. Its first client's records then commit; the replicator resent only when nothing had
committed for 2 s, so the node_start stayed pending until the next change of leader, reached the
log after the client's SESSION_OPEN and closed that live session: its later commands were
dropped (`commands_without_session`) with no reply and no resend, and the client stalled for
good. The fault hook SEQD_FAULT_LOSE_ADMIN_FORWARDS loses the node_start on purpose, so the
order (session open first, node_start after) is forced rather than hoped for.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.cluster_harness import Cluster, ClusterNode
from daemon.fault_hooks import (
    FAULT_DROP_COMMAND_FORWARD_ENV,
    FAULT_LOSE_ADMIN_FORWARDS_ENV,
    FAULT_MALFORM_COMMAND_PROPOSAL_ENV,
    FAULT_REFUSE_COMMAND_FORWARDS_ENV,
)
from sequencer.logtools import dump
from sequencer.record import ADMIN_NODE_START
from tests.node_fixtures import TransferDriver, balances, expected_balances, open_accounts

ACCOUNTS = ["alice", "bob", "carol", "dave"]
WAIT_S = 60.0  # a loaded 2-core machine; each wait ends as soon as its condition holds
# The follower's COMMAND forward its replicator drops: well into the client's pipelined stream, so
# later commands of the same session are in flight behind it (the same batch carries them).
DROPPED_COMMAND = 40
# The batch of forwards holding a COMMAND the leader refuses: one in the client's first burst of
# REFUSAL_IN_FLIGHT commands, which several forwarded batches carry, so later ones follow it.
REFUSED_BATCH = 2
REFUSAL_IN_FLIGHT = 256


@pytest.fixture
def cluster(tmp_dir: Path, unique: str) -> Iterator[Cluster]:
    made = Cluster(tmp_dir, unique, proxied=False, cluster={"election_timeout_ms": 300})
    try:
        yield made
    finally:
        made.close()


def _wait_counters_at_least(node: ClusterNode, least: dict[str, int]) -> dict[str, int]:
    """The node's counters once each of `least` reached its value (the replicator publishes its
    forward figures once a tick)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        values = node.read_counters()
        if all(values[name] >= value for name, value in least.items()):
            return values
        assert time.monotonic() < deadline, (
            f"node {node.number}'s counters did not reach {least} within {WAIT_S} s: "
            f"{ {name: values[name] for name in least} }"
        )
        time.sleep(0.02)


def _node_starts_in_log(journal_dir: Path, number: int) -> int:
    return sum(
        1
        for row in dump(journal_dir, types=["ADMIN"])
        if row["payload"].get("op") == ADMIN_NODE_START and row["payload"].get("number") == number
    )


def _start_with_hook(cluster: Cluster, hook: str, path: Path, value: object) -> tuple[ClusterNode, ClusterNode]:
    """Every node started with the fault hook `hook` reading `path` (which holds `value`), and
    ACCOUNTS opened through the leader: the leader and one follower."""
    path.write_text(str(value))
    for node in cluster.nodes.values():
        node.start(wait=False, environment={hook: str(path)})
    for node in cluster.nodes.values():
        node.wait_serving()
    leader = cluster[cluster.wait_leader(timeout_s=WAIT_S).number]
    follower = cluster[next(n for n in cluster.nodes if n != leader.number)]
    open_accounts(leader.socket_path, ACCOUNTS)
    return leader, follower


def test_a_lost_node_start_is_resent_while_traffic_commits_and_keeps_the_live_session_open(
    cluster: Cluster, tmp_dir: Path
) -> None:
    lose = tmp_dir / "lose-admin-forwards"
    _, follower = _start_with_hook(cluster, FAULT_LOSE_ADMIN_FORWARDS_ENV, lose, 1)
    journal_dir = follower.config.journal_dir
    # A client on the follower opens its session and commits while the node_start is lost.
    driver = TransferDriver(follower.socket_path, ACCOUNTS, seed=1).start()
    try:
        driver.wait_acknowledged(50, timeout_s=WAIT_S)
        assert _node_starts_in_log(journal_dir, follower.number) == 0, "the hook lost nothing"
        lose.write_text("0")  # the link is good again: only a resend brings the node_start now
        # It goes again while the client's records keep committing (a resend only after 2 s
        # with nothing committed would never come while the driver runs).
        deadline = time.monotonic() + WAIT_S
        while _node_starts_in_log(journal_dir, follower.number) == 0:
            assert driver.error is None, driver.error
            assert time.monotonic() < deadline, (
                f"node {follower.number}'s node_start was not resent within {WAIT_S} s while its "
                f"client committed ({len(driver.acknowledged)} acks)"
            )
            time.sleep(0.05)
        # Its late arrival closed no live session: the client carries on.
        driver.wait_acknowledged(len(driver.acknowledged) + 100, timeout_s=WAIT_S)
    finally:
        driver.stop(timeout_s=WAIT_S)
    # The resend is counted where an operator sees it (`seqd status`, the metrics); the hook lost
    # the record silently (nothing dropped by the transport), so only its age sent it again.
    _wait_counters_at_least(follower, {"raft.forwards_resent": 1})


@pytest.mark.parametrize(
    ("hook", "nth", "in_flight", "counted_by"),
    [
        (FAULT_DROP_COMMAND_FORWARD_ENV, DROPPED_COMMAND, 16, "follower"),
        (FAULT_REFUSE_COMMAND_FORWARDS_ENV, REFUSED_BATCH, REFUSAL_IN_FLIGHT, "leader"),
    ],
    ids=["dropped-by-the-follower", "refused-by-the-leader"],
)
def test_a_command_forward_lost_mid_stream_is_applied_once_before_the_later_ones(
    cluster: Cluster, tmp_dir: Path, hook: str, nth: int, in_flight: int, counted_by: str
) -> None:
    """The defect: the follower's transport dropped one forwarded COMMAND (a full socket), or the
    leader refused a batch (its inbox full, or it no longer led), and the later commands of the
    session went through and committed; the lost one, resent 2 s later, came after a later
    request id of its client, so the blp answered it DUPLICATE without ever applying it (the
    driver fails on that reply). Now a drop breaks the link's forward stream, and a refusal
    closes the connection, until the follower restarts it with every pending record in order.
    The operator sees it in the node's counters (`seqd status`, the metrics): the follower's
    broken stream, or the leader's refused one, and the records dropped; a refusal's reason, sent
    back by the leader, in the follower's log and `raft.forward_refusals_received`."""
    lose = tmp_dir / "lose-command-forward"
    leader, follower = _start_with_hook(cluster, hook, lose, nth)
    lost = Path(f"{lose}.lost")  # written by the node when its hook loses the forward
    driver = TransferDriver(follower.socket_path, ACCOUNTS, seed=2, in_flight=in_flight).start()
    try:
        deadline = time.monotonic() + WAIT_S
        while not lost.exists():
            assert driver.error is None, driver.error
            assert time.monotonic() < deadline, f"the hook lost nothing within {WAIT_S} s"
            time.sleep(0.02)
        driver.wait_acknowledged(len(driver.acknowledged) + 200, timeout_s=WAIT_S)
    finally:
        driver.stop(timeout_s=WAIT_S)  # fails on a DUPLICATE reply: a command never applied
    # Every acknowledged transfer applied exactly once (the balances are a command: linearizable).
    assert balances(leader.socket_path, ACCOUNTS) == expected_balances(ACCOUNTS, [driver])
    # And in order: in every session, each request id first reaches the log after the one
    # before it (a resent copy after its first is harmless; one first seen late is the defect).
    first_seen: dict[int, dict[int, None]] = {}
    for row in dump(leader.config.journal_dir, types=["COMMAND"]):
        first_seen.setdefault(row["session_id"], {}).setdefault(row["request_id"], None)
    assert sum(len(ids) for ids in first_seen.values()) >= len(driver.acknowledged)
    for session_id, ids in first_seen.items():
        assert list(ids) == sorted(ids), f"session {session_id}: a command reached the log late"
    # Published in the counters segment, on the node that lost the forward.
    if counted_by == "follower":
        _wait_counters_at_least(follower, {"raft.forward_streams_broken": 1, "raft.forwards_dropped": 1})
    else:
        _wait_counters_at_least(leader, {"raft.forward_streams_refused": 1, "raft.forwards_dropped": 1})
        # The leader said why, and the follower logged and counted it (before, it saw only its
        # connection close).
        _wait_counters_at_least(follower, {"raft.forward_refusals_received": 1})
        said = f"forwarded records were refused by node {leader.number}: node {leader.number} refused the batch"
        assert said in follower.log_text(), follower.log_text()[-3000:]


def test_a_malformed_proposal_restarts_its_node_and_stalls_no_client(cluster: Cluster, tmp_dir: Path) -> None:
    """The defect: a record in a follower's proposal ring that is no whole record (a bug or
    memory corruption on that node) was forwarded; the leader refused the batch and closed the
    connection, the follower restarted its stream with the same record first, refused again,
    for good: every client of the follower stalled. Now the follower's replicator checks what it
    takes from its proposal ring and stops on such a record (fail-stop): its pipeline restarts
    from the journal, its clients reconnect and resend in order, and nothing acknowledged is lost.
    The hook makes the N-th COMMAND a node's replicator takes from its ring a TERM_START (the
    leader's client sends fewer: only the follower's is hit), once per node."""
    malform = tmp_dir / "malform-command-proposal"
    leader, follower = _start_with_hook(cluster, FAULT_MALFORM_COMMAND_PROPOSAL_ENV, malform, DROPPED_COMMAND)
    hit = Path(f"{malform}.lost")
    driver = TransferDriver(follower.socket_path, ACCOUNTS, seed=3, in_flight=16).start()
    try:
        deadline = time.monotonic() + WAIT_S
        while not hit.exists():
            assert time.monotonic() < deadline, f"the hook changed nothing within {WAIT_S} s"
            time.sleep(0.02)
        driver.wait_acknowledged(len(driver.acknowledged) + 200, timeout_s=WAIT_S)
    finally:
        driver.stop(timeout_s=WAIT_S)
    assert balances(leader.socket_path, ACCOUNTS) == expected_balances(ACCOUNTS, [driver])
    assert "malformed record to its proposal ring" in follower.log_text()
    _wait_counters_at_least(follower, {"supervisor.restarts": 1})
