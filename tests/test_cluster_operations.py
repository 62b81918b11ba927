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
from daemon.layout import COMMANDS_TOTAL, RAFT_STEP_DOWNS, RAFT_TRANSFER_OUTCOME, TransferOutcome
from tests.nemesis.history import read_history
from tests.test_cluster_faults import ACKS, STOP_TIMEOUT_S, TIMEOUTS, Scenario, _log_tails

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(300)
COMMANDS_IN_FLIGHT = 20
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


def test_transfer_leader_hands_leadership_over_and_refuses_what_it_cannot_do(tmp_dir: Path, unique: str) -> None:
    """`seqd cluster transfer-leader --to N` on the leader's machine: N leads the next term, the
    old leader follows it, the command says so and exits 0; without --to the best follower takes
    over. Each refusal (run on a follower, an unknown target, this node) exits 1 with a line
    saying what is wrong and what to do, and leadership does not move."""
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

        done = _transfer_cli(cluster[leader.number].config_path, "--to", str(follower))
        assert done.returncode == EXIT_OK, (done.stdout, done.stderr, cluster.describe())
        assert f"leadership moved from node {leader.number} to node {follower}" in done.stdout, done.stdout
        now = cluster.wait_leader(term_above=leader.term or 0, agreeing=cluster.size)
        assert now.number == follower, cluster.describe()
        # The old leader's replicator marks the transfer done at its pass after the step-down that
        # the command saw (its standing is published at the end of the pass that stepped down):
        # waited for, not read once.
        deadline = time.monotonic() + CLI_TIMEOUT_S
        while (counters := cluster[leader.number].read_counters())[RAFT_TRANSFER_OUTCOME.name] != TransferOutcome.DONE:
            assert time.monotonic() < deadline, f"transfer outcome {counters[RAFT_TRANSFER_OUTCOME.name]}, not done"
            time.sleep(0.01)
        assert counters[RAFT_STEP_DOWNS.name] >= 1
        from daemon import status

        shown = status.render_json(status.sample_status(cluster[follower].node, gap_s=0.0))["raft"]  # no rate read
        assert shown["role"] == "leader" and shown["elections"] >= 1, shown
        assert sorted(shown["members"]) == sorted(cluster.nodes) and shown["members"][0] == follower, shown
        assert all(f["last_contact_ms"] is not None and f["last_contact_ms"] < 60_000 for f in shown["followers"]), shown

        assert transfer_leader(cluster[follower].config, 0, 10.0, lines.append) == EXIT_OK, lines  # best follower
        assert cluster.wait_leader(term_above=now.term or 0, agreeing=cluster.size).number != follower


def test_a_draining_follower_answers_the_commands_its_clients_sent_before_closing(tmp_dir: Path, unique: str) -> None:
    """SIGTERM of a follower whose clients' commands are forwarded but not yet committed (the
    leader is paused, so they commit only once the other node takes over): the drain waits until
    they are committed and applied here and their replies sent, so the client gets every reply
    without reconnecting (its reconnect timeout is shorter than the node is down for good)."""
    from sequencer.apps.ledger import Deposit, Ledger, OpenAccount
    from sequencer.client import Client, TimedOut

    with Cluster(tmp_dir, unique, proxied=False, cluster=TIMEOUTS) as cluster:
        cluster.start()
        leader = cluster.wait_leader(agreeing=cluster.size).number
        follower = next(n for n in cluster.nodes if n != leader)
        node = cluster[follower]
        with Client(node.socket_path, schema=Ledger.schema, timeout_s=30.0, reconnect_timeout_s=2.0) as client:
            client.call(OpenAccount("alice"))
            sequenced = node.read_counters()[COMMANDS_TOTAL.name]
            cluster.pause(leader)
            try:
                pending = [client.submit(Deposit("alice", 1)) for _ in range(COMMANDS_IN_FLIGHT)]
                with pytest.raises(TimedOut):
                    pending[0].result(timeout_s=0.05)  # sends them; nothing commits while paused
                deadline = time.monotonic() + 30.0
                while node.read_counters()[COMMANDS_TOTAL.name] < sequenced + COMMANDS_IN_FLIGHT:
                    assert time.monotonic() < deadline, node.read_counters()
                    time.sleep(0.01)
                node.terminate()  # the drain waits for the other follower to take over and commit
                try:
                    replies = [request.result() for request in pending]
                except Exception:
                    print(_log_tails(cluster, 6000))
                    raise
            finally:
                cluster.resume(leader)
        assert len(replies) == COMMANDS_IN_FLIGHT
        assert node.stop(STOP_TIMEOUT_S, signalled=True) == 0, _log_tails(cluster)


def test_rolling_restart_under_load_fails_no_request(scenario: Scenario) -> None:
    """The rolling restart of docs/cluster.md, node by node under load from a client on every
    node: stop it with SIGTERM (systemd stop), start it, wait until it has caught up and its
    client goes on. The first node is the leader, moved away with `seqd cluster transfer-leader`
    first; the second is the new leader, stopped with SIGTERM alone: it hands leadership over
    before it drains (another node leads before its process has exited). Every node exits 0;
    every request of every client completes ok (only latency: each client waits for its node and
    resends); the checker finds nothing; the hashes agree."""
    cluster = scenario.cluster
    scenario.begin()
    restarted: list[int] = []
    for step in range(cluster.size):
        leader, term = scenario.leader()
        if step == 0:
            number = leader
            moved = _transfer_cli(cluster[number].config_path)
            assert moved.returncode == 0, (moved.stdout, moved.stderr, cluster.describe())
            leader, term = scenario.leader(term_above=term)
            assert leader != number
        elif step == 1:
            number = leader  # the hand-over on SIGTERM
        else:
            number = next(n for n in cluster.nodes if n not in restarted)
        assert cluster.stop([number], timeout_s=STOP_TIMEOUT_S) == {number: 0}, _log_tails(cluster)
        if step == 1:
            # Read at once: without the hand-over the others would still follow the stopped node
            # here, for an election timeout.
            views = [v for n, v in cluster.views().items() if n != number and v is not None]
            assert {v.leader for v in views} - {number, 0} and number not in {v.leader for v in views}, cluster.describe()
            assert "leadership handed over" in cluster[number].log_text(), _log_tails(cluster)
        restarted.append(number)
        scenario.progress(ACKS, [n for n in cluster.nodes if n != number])
        cluster.start([number])
        scenario.progress(ACKS)  # its client reconnected, resent, and goes on
    assert sorted(restarted) == sorted(cluster.nodes)
    scenario.finish()
    _assert_every_request_ok(scenario)


def _assert_every_request_ok(scenario: Scenario) -> None:
    """No client saw an error: every operation of every client's history ended ok (a
    rejection for insufficient funds is a reply, so ok)."""
    assert scenario.workload is not None
    operations = [op for path in scenario.workload.histories.values() for op in read_history(path)]
    failed = [op for op in operations if op.outcome != "ok"]
    assert not failed, failed[:5]
