"""Operating a cluster (issue 12): leadership transfer, a SIGTERM of the leader that hands over
first, and a rolling restart of every node under load with no failed request.

Three real nodes on this machine (daemon/cluster_harness.py), the ledger workload from a
recording client on every node (tests/cluster_workload.py), and the history checker at the end
(the same `Scenario.finish` as tests/test_cluster_faults.py): every acknowledged command is in
the log once at the index its reply named, the journals agree and replay to the same hashes.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.cli_cluster import EXIT_FAILED, EXIT_OK, transfer_leader
from daemon.cluster_harness import Cluster
from daemon.layout import RAFT_STEP_DOWNS, RAFT_TRANSFER_OUTCOME, TransferOutcome
from tests.nemesis.history import read_history
from tests.test_cluster_faults import ACKS, STOP_TIMEOUT_S, TIMEOUTS, Scenario, _log_tails

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(300)
CLI_TIMEOUT_S = 60.0  # a subprocess `seqd cluster transfer-leader` (its own wait is 10 s)


@pytest.fixture
def scenario(tmp_dir: Path, unique: str) -> Iterator[Scenario]:
    made = Scenario(Cluster(tmp_dir, unique, cluster=TIMEOUTS), tmp_dir)
    yield made
    if made.workload is not None:
        made.workload.kill()
    made.cluster.close()


def _transfer_cli(config_path: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", "cluster", "transfer-leader", "--config", str(config_path), *arguments],
        cwd=ROOT, capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False,
    )  # fmt: skip


def test_transfer_leader_hands_leadership_to_the_named_follower(tmp_dir: Path, unique: str) -> None:
    """`seqd cluster transfer-leader --to N` on the leader's machine: N leads the next term, the
    old leader follows it, and the command says so and exits 0."""
    with Cluster(tmp_dir, unique, proxied=False, cluster=TIMEOUTS) as cluster:
        cluster.start()
        leader = cluster.wait_leader()
        target = next(n for n in cluster.nodes if n != leader.number)
        done = _transfer_cli(cluster[leader.number].config_path, "--to", str(target))
        assert done.returncode == 0, (done.stdout, done.stderr, cluster.describe())
        assert f"leadership moved from node {leader.number} to node {target}" in done.stdout, done.stdout
        now = cluster.wait_leader(term_above=leader.term or 0, agreeing=cluster.size)
        assert now.number == target, cluster.describe()
        counters = cluster[leader.number].read_counters()
        assert counters[RAFT_TRANSFER_OUTCOME.name] == TransferOutcome.DONE, counters[RAFT_TRANSFER_OUTCOME.name]
        assert counters[RAFT_STEP_DOWNS.name] >= 1


def test_transfer_leader_refuses_on_a_follower_and_for_an_unknown_target(tmp_dir: Path, unique: str) -> None:
    """Each failure exits non-zero with a line saying what is wrong and what to do; leadership
    does not move."""
    with Cluster(tmp_dir, unique, proxied=False, cluster=TIMEOUTS) as cluster:
        cluster.start()
        leader = cluster.wait_leader(agreeing=cluster.size)
        follower = next(n for n in cluster.nodes if n != leader.number)
        lines: list[str] = []
        assert transfer_leader(cluster[follower].config, 0, 10.0, lines.append) == EXIT_FAILED
        assert f"node {follower} is not the leader" in lines[-1], lines
        assert f"node {leader.number} leads: run this on its machine" in lines[-1], lines
        assert transfer_leader(cluster[leader.number].config, 9, 10.0, lines.append) == EXIT_FAILED
        assert "cannot hand leadership to node 9: it is not a member" in lines[-1], lines
        assert transfer_leader(cluster[leader.number].config, leader.number, 10.0, lines.append) == EXIT_FAILED
        assert "that is this node" in lines[-1], lines
        refused = _transfer_cli(cluster[follower].config_path)
        assert refused.returncode == EXIT_FAILED and "is not the leader" in refused.stderr, refused
        assert cluster.wait_leader(agreeing=cluster.size).number == leader.number, cluster.describe()
        # Best follower: no --to.
        assert transfer_leader(cluster[leader.number].config, 0, 10.0, lines.append) == EXIT_OK, lines


def test_sigterm_of_the_leader_under_load_hands_over_before_it_stops(scenario: Scenario) -> None:
    """systemd stop of the leader's node: it hands leadership over before it drains (a new leader
    leads before the old node's process has exited), exits 0, and its own client, which waits
    and resends through the restart, loses and fails nothing."""
    cluster = scenario.cluster
    scenario.begin()
    leader, term = scenario.leader()
    codes = cluster.stop([leader], timeout_s=STOP_TIMEOUT_S)
    assert codes == {leader: 0}, (codes, _log_tails(cluster))
    # Read at once: without the hand-over the others would still follow the stopped node here,
    # for an election timeout.
    views = [view for number, view in cluster.views().items() if number != leader and view is not None]
    leaders = {view.leader for view in views}
    assert len(leaders) == 1 and leader not in leaders and 0 not in leaders, cluster.describe()
    assert "leadership handed over" in cluster[leader].log_text(), _log_tails(cluster)
    assert max(view.term or 0 for view in views) > term
    survivors = [n for n in cluster.nodes if n != leader]
    scenario.progress(ACKS, survivors)
    cluster.start([leader])
    scenario.progress(ACKS)
    scenario.finish()
    _assert_every_request_ok(scenario)


def test_rolling_restart_under_load_fails_no_request(scenario: Scenario) -> None:
    """The rolling restart of docs/cluster.md, node by node under load from a client on every
    node: move leadership away (`seqd cluster transfer-leader`) if the node leads, stop it with
    SIGTERM, start it, wait until it has caught up and its client goes on. Every request of every
    client completes ok (only latency); the checker finds nothing; the hashes agree."""
    cluster = scenario.cluster
    scenario.begin()
    for number in cluster.nodes:
        leader, _term = scenario.leader()
        if leader == number:
            moved = _transfer_cli(cluster[number].config_path)
            assert moved.returncode == 0, (moved.stdout, moved.stderr, cluster.describe())
            scenario.leader(among=[n for n in cluster.nodes if n != number])
        started = time.monotonic()
        assert cluster.stop([number], timeout_s=STOP_TIMEOUT_S) == {number: 0}, _log_tails(cluster)
        scenario.progress(ACKS, [n for n in cluster.nodes if n != number])
        cluster.start([number])
        scenario.progress(ACKS)  # its client reconnected, resent, and goes on
        assert time.monotonic() - started < STOP_TIMEOUT_S * 4, cluster.describe()
    scenario.finish()
    _assert_every_request_ok(scenario)


def _assert_every_request_ok(scenario: Scenario) -> None:
    """No client saw an error: every operation of every client's history ended ok (a
    rejection for insufficient funds is a reply, so ok)."""
    assert scenario.workload is not None
    operations = [op for path in scenario.workload.histories.values() for op in read_history(path)]
    failed = [op for op in operations if op.outcome != "ok"]
    assert not failed, failed[:5]
