"""Rolling upgrade of a cluster's app (issue 16 part 3; docs/evolution.md, "Rolling upgrades of a
cluster"): three real nodes running the ledger v1 under a client on every node are upgraded one
at a time to ledger v2 (tests/fixtures/ledger_v2_additive.py: one new command), leadership moved away
before each restart. The new command is refused until `seqd cluster raise-version` makes v2
active at one index on every node, then accepted; the nodes converge with equal rolling hashes
and equal snapshot state hashes; a node started again with the old code stops at the raise.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.cli_cluster import EXIT_OK, raise_version, transfer_leader
from daemon.cluster_harness import Cluster, ClusterNode
from daemon.config import load_config
from daemon.layout import APP_VERSION_ACTIVE, ROLE_COUNTERS, Role
from sequencer import snapshot as snapshots
from tests.cluster_workload import CLIENT_TIMEOUT_S
from tests.test_cluster_faults import ACKS, STOP_TIMEOUT_S, TIMEOUTS, Scenario, _log_tails

# A whole cluster scenario (~20 s on a quiet 2-core machine, minutes under load); the processor
# and gateway rules it rests on are tested on their own too (tests/test_app_versions.py,
# tests/test_gateway.py).
pytestmark = [pytest.mark.timeout(300)]
V1 = "sequencer.apps.ledger:Ledger"
V2 = "tests.fixtures.ledger_v2_additive:LedgerV2"
EXIT_DATAERR = 65
WAIT_S = 60.0


@pytest.fixture
def scenario(tmp_dir: Path, unique: str) -> Iterator[Scenario]:
    made = Scenario(Cluster(tmp_dir, unique, cluster=TIMEOUTS, settings={"node": {"app": V1}}), tmp_dir)
    yield made
    if made.workload is not None:
        made.workload.kill()
    made.cluster.close()


def _install(node: ClusterNode, app: str) -> None:
    """Point the node's config at another build of the app (what a package upgrade does)."""
    text = node.config_path.read_text()
    old = V2 if app == V1 else V1
    assert f'"{old}"' in text, text
    node.config_path.write_text(text.replace(f'"{old}"', f'"{app}"'))
    node.config = load_config(node.config_path)


def _wait(condition: object, what: str, cluster: Cluster) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what} within {WAIT_S} s; {cluster.describe()}"
        time.sleep(0.02)


def test_a_cluster_upgraded_node_by_node_under_load_activates_the_new_version_at_one_index(
    scenario: Scenario,
) -> None:
    from sequencer.apps.ledger import Deposit
    from sequencer.client import Client, CommandRejected
    from tests.fixtures.ledger_v2_additive import LEDGER_V2_SCHEMA, TransferAll
    from tests.nemesis.history import read_history

    cluster = scenario.cluster
    scenario.begin()
    lines: list[str] = []
    for number in cluster.nodes:
        leader, _term = scenario.leader()
        if leader == number:
            assert transfer_leader(cluster[number].config, 0, 30.0, lines.append) == EXIT_OK, lines
        assert cluster.stop([number], timeout_s=STOP_TIMEOUT_S) == {number: 0}, _log_tails(cluster)
        _install(cluster[number], V2)
        cluster.start([number])
        scenario.progress(ACKS)

    # Every node runs v2 code, but v2 is not active: a v2 command is refused, saying how. The v1
    # clients stop here: after the raise replies carry version 2, which a v1 client refuses to
    # read (clients move to the new schema with the raise: docs/evolution.md).
    assert scenario.workload is not None
    histories = scenario.workload.stop()
    assert all(op.outcome == "ok" for path in histories for op in read_history(path)), "a v1 request failed"
    node = cluster[1]
    with Client(node.socket_path, schema=LEDGER_V2_SCHEMA, timeout_s=CLIENT_TIMEOUT_S) as client:
        with pytest.raises(CommandRejected, match="not made active yet"):
            client.call(TransferAll("alice", "bob"))
    assert raise_version(node.config, 0, 30.0, lines.append) == EXIT_OK, lines
    for each in cluster.nodes.values():
        _wait(lambda each=each: each.read_counters()[APP_VERSION_ACTIVE.name] == 2, f"node {each.number} active v2", cluster)
    # Each node's gateway takes the new limit within a heartbeat of its blp.
    with Client(cluster[2].socket_path, schema=LEDGER_V2_SCHEMA, timeout_s=CLIENT_TIMEOUT_S,
                reconnect_timeout_s=CLIENT_TIMEOUT_S) as client:  # fmt: skip
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                moved = client.call(TransferAll("erin", "frank"))
                break
            except CommandRejected as refused:
                assert "not made active yet" in str(refused) and time.monotonic() < deadline, refused
                time.sleep(0.05)
        assert moved.target == "frank"
        client.call(Deposit("frank", 3))  # an old command type, sent at version 2
    # A node started again with the old code refuses to go past the raise; with the new code
    # again it rejoins.
    old = next(n for n in cluster.nodes if n != scenario.leader()[0])
    assert cluster.stop([old], timeout_s=STOP_TIMEOUT_S) == {old: 0}
    _install(cluster[old], V1)
    cluster[old].start(wait=False)
    process = cluster[old].process
    assert process is not None
    assert process.wait(WAIT_S) == EXIT_DATAERR, _log_tails(cluster)
    assert "knows only up to version 1" in cluster[old].log_text(), _log_tails(cluster)
    _install(cluster[old], V2)
    cluster.start([old])
    with Client(cluster[old].socket_path, schema=LEDGER_V2_SCHEMA, timeout_s=CLIENT_TIMEOUT_S) as client:
        assert client.call(TransferAll("frank", "erin")).target == "erin"
    cluster.wait_converged()

    # The same state at the same index on every node: a snapshot record, written by each.
    leader, _term = scenario.leader()
    os.kill(cluster[leader].read_counters()[ROLE_COUNTERS[Role.SEQUENCER].pid.name], signal.SIGUSR1)  # seqd snapshot

    def newest(number: int) -> Any:
        infos = [i for i in snapshots.list_snapshots(cluster[number].config.snapshot_dir) if i.header is not None]
        return infos[-1] if infos else None

    _wait(lambda: all(newest(n) is not None for n in cluster.nodes) and len({newest(n).index for n in cluster.nodes}) == 1,
          "a snapshot at one index on each node", cluster)  # fmt: skip
    hashes = {n: newest(n).header.state_hash for n in cluster.nodes}
    assert len(set(hashes.values())) == 1, hashes
