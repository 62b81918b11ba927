"""Learners and linearizable queries on a real cluster: three voters and one learner (`seqd run`
each, loopback peer ports through the fault proxy), every node with a query replica.

- The learner follows and applies the log: it converges with the voters at the same index with
  the same rolling hash, and never leads; a backup taken from it under load restores into a
  fresh single node with the cluster's hashes at the backup's index.
- A write acknowledged on any node is seen by a linearizable query issued after the
  acknowledgement on any node (the leader, a follower, the learner): each reader is a client of
  its own that never wrote, so read-your-writes (`after` its own last reply) would not see it.
- Killing the learner never affects availability; killing one voter leaves a quorum of voters
  (writes and linearizable queries go on); with two voters down there is no quorum, and a
  linearizable query is refused with `no_quorum` instead of answering stale.
"""

from __future__ import annotations

import importlib.util
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from daemon.backup import take_backup
from daemon.cluster_harness import Cluster
from daemon.harness import NodeProcess
from daemon.layout import BLP_APPLIED_INDEX, RAFT_ROLE, SNAPSHOT_LAST_INDEX
from daemon.verify import replay_hashes
from ipc.segment import SHM_DIRECTORY
from sequencer.apps.ledger import Deposit, Ledger
from sequencer.raft.raft_role import RaftRole
from tests.node_fixtures import TransferDriver, open_accounts

ACCOUNTS = ["alice", "bob", "carol", "dave"]
TIMEOUTS = {"tick_ms": 10, "heartbeat_ms": 50, "election_timeout_ms": 300}
SETTINGS = {"replicas": {"count": 1, "poll_ms": 1.0}, "snapshot": {"every_records": 150}}
QUERY_TIMEOUT_S = 20.0
LEARNER = 4
SNAPSHOT_WAIT_S = 60.0  # bounds the wait for the learner's first snapshot

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(importlib.util.find_spec("daemon.roles.replicator") is None,
                       reason="cluster mode is not built on this branch"),
]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """One cluster for the file (four nodes take ~10 s to start on 2 cores: the CI budget); the
    tests run in file order, the one that kills nodes last, and each also works alone. Its
    processes and shared memory are checked for leaks here, once it is closed."""
    unique = f"t{uuid.uuid4().hex[:10]}"
    made = Cluster(None, unique, 3, learners=1, cluster=TIMEOUTS, settings=SETTINGS)
    try:
        made.start()
        leader = made.wait_leader().number
        open_accounts(made[leader].socket_path, ACCOUNTS)
        yield made
    finally:
        made.close()
    running = [child.pid for child in psutil.Process().children(recursive=True)
               if child.is_running() and child.status() != psutil.STATUS_ZOMBIE]  # fmt: skip
    assert not running, f"processes leaked by the cluster: {running}"
    assert not list(SHM_DIRECTORY.glob(f"*{unique}*")), "shared memory leaked by the cluster"


@pytest.fixture(autouse=True)
def no_leaked_processes() -> Iterator[None]:
    """Overrides tests/conftest.py's per-test check: the module's cluster outlives each test by
    design, and `cluster` checks for leaks when it closes."""
    yield


def _client(cluster: Cluster, number: int):  # type: ignore[no-untyped-def]
    from sequencer.client import Client

    return Client(cluster[number].socket_path, schema=Ledger.schema, timeout_s=QUERY_TIMEOUT_S,
                  reconnect_timeout_s=QUERY_TIMEOUT_S)  # fmt: skip


def _linearizable_balance(client, account: str) -> int:  # type: ignore[no-untyped-def]
    result = client.query("balance", {"account": account}, consistency="linearizable",
                          timeout_s=QUERY_TIMEOUT_S)  # fmt: skip
    return int(result.value["balance"])


def test_a_learner_applies_the_log_and_a_backup_taken_from_it_under_load_restores_that_state(
    cluster: Cluster, tmp_dir: Path, unique: str
) -> None:  # tmp_dir, unique: the backup's and the restored node's
    """The learner converges with the voters (same index, hash and commit) and never leads. A
    backup taken from it while clients write (`seqd backup`: its newest snapshot and the journal
    after it, cut at its commit index) restored into a fresh single node gives the cluster's
    rolling hash and state hash at that index."""
    leader = cluster.wait_leader().number
    assert leader != LEARNER
    with _client(cluster, LEARNER) as client:
        client.call(Deposit("carol", 1))  # a learner's clients write too (forwarded to the leader)
    driver = TransferDriver(cluster[leader].socket_path, ACCOUNTS, seed=1).start()
    driver.wait_acknowledged(300)  # past a snapshot or two (snapshot.every_records)
    # The learner writes its snapshot when it applies the leader's SNAPSHOT record: on a loaded
    # machine that can come after the 300th acknowledgement. The backup is of a snapshot plus
    # the journal after it, so wait for one (bounded; a learner that never snapshots fails here).
    deadline = time.monotonic() + SNAPSHOT_WAIT_S
    while cluster[LEARNER].read_counters()[SNAPSHOT_LAST_INDEX.name] == 0:
        assert time.monotonic() < deadline, f"the learner wrote no snapshot within {SNAPSHOT_WAIT_S} s"
        time.sleep(0.05)
    backup = take_backup(cluster[LEARNER].config, tmp_dir / "backup")  # under load
    driver.wait_acknowledged(len(driver.acknowledged) + 50)
    driver.stop()
    applied = cluster.wait_converged()  # all four: the same index, hash, and commit
    assert applied > backup.index > backup.snapshot_index > 0, (applied, backup)
    views = cluster.views()
    learner = views[LEARNER]
    assert learner is not None and learner.raft_role is RaftRole.FOLLOWER
    counters = cluster[LEARNER].read_counters()
    assert counters["raft.learner"] == 1 and counters[RAFT_ROLE.name] == int(RaftRole.FOLLOWER)
    assert cluster[leader].read_counters()["raft.learner"] == 0

    # The cluster's hashes at the backup's index: the leader's journal replayed up to it.
    rolling = tmp_dir / "rolling.bin"
    index, state_hash = replay_hashes(cluster[leader].config, rolling, to_index=backup.index)
    assert index == backup.index
    rolling_hash = int.from_bytes(rolling.read_bytes()[-8:], "little")

    (tmp_dir / "restored").mkdir(mode=0o750)
    restored = NodeProcess(tmp_dir / "restored", f"{unique}r", {"snapshot": {"every_records": 0}})
    try:
        shutil.copytree(tmp_dir / "backup", restored.config.node.data_dir)
        restored.start()  # recovers from the snapshot and the journal, then records its start
        assert restored.read_counters()[BLP_APPLIED_INDEX.name] > backup.index
    finally:
        restored.stop()
        restored.remove_shared_memory()
    # What the restored node holds at the backup's index is the cluster's state there.
    restored_rolling = tmp_dir / "restored.bin"
    assert replay_hashes(restored.config, restored_rolling, to_index=backup.index) == (backup.index, state_hash)
    assert int.from_bytes(restored_rolling.read_bytes()[-8:], "little") == rolling_hash


def test_a_write_acknowledged_anywhere_is_seen_by_a_linearizable_query_on_any_node(cluster: Cluster) -> None:
    numbers = sorted(cluster.nodes)
    writers = {number: _client(cluster, number) for number in numbers}
    readers = {number: _client(cluster, number) for number in numbers}
    try:
        balance = _linearizable_balance(readers[numbers[0]], "alice")
        for step in range(24):
            writer = numbers[step % len(numbers)]
            reader = numbers[(step * 3 + 1) % len(numbers)]
            writers[writer].call(Deposit("alice", step + 1))
            balance += step + 1
            # Issued after the acknowledgement: it must see the deposit, wherever it ran.
            seen = _linearizable_balance(readers[reader], "alice")
            assert seen == balance, (step, writer, reader, seen, balance)
    finally:
        for client in (*writers.values(), *readers.values()):
            client.close()


def test_killing_the_learner_or_one_voter_keeps_the_cluster_available_and_two_voters_make_no_quorum(
    cluster: Cluster,
) -> None:
    from sequencer.client import QueryError

    leader = cluster.wait_leader().number
    cluster.kill(LEARNER)
    with _client(cluster, leader) as client:
        balance = _linearizable_balance(client, "bob")
        client.call(Deposit("bob", 5))
        assert _linearizable_balance(client, "bob") == balance + 5
    voters = [n for n in cluster.nodes if n not in cluster.learners]
    follower = next(n for n in voters if n != leader)
    cluster.kill(follower)  # two voters of three remain: a quorum
    survivor = next(n for n in voters if n not in (leader, follower))
    with _client(cluster, survivor) as client:
        client.call(Deposit("bob", 7))
        assert _linearizable_balance(client, "bob") == balance + 12
    cluster.kill(survivor)  # one voter of three: no quorum, whether it still thinks it leads or not
    with _client(cluster, leader) as client, pytest.raises(QueryError) as refused:
        client.query("balance", {"account": "bob"}, consistency="linearizable", timeout_s=3.0)
    assert refused.value.code == "no_quorum", refused.value
    assert "majority" in refused.value.message
    cluster.kill(leader)  # a lone voter's drain would wait for a commit that cannot come
