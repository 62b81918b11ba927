"""The 3-node cluster harness (daemon/cluster_harness.py): the configs it writes, the secret, how
it decides that a leader is agreed, and that it cleans up whatever state the nodes were left in."""

from __future__ import annotations

import os
import random
import socket
import stat
from pathlib import Path

import psutil
import pytest

from daemon.cluster_harness import (
    Cluster,
    RaftView,
    agreed_leader,
    cluster_settings,
    ephemeral_port_range,
    listen_ports,
    node_shm_paths,
    write_secret,
)
from daemon.config import load_config, parse_address
from daemon.layout import Role
from sequencer.raft.raft_role import RaftRole

LEADER, FOLLOWER, CANDIDATE = RaftRole.LEADER, RaftRole.FOLLOWER, RaftRole.CANDIDATE


def _view(number: int, role: RaftRole, term: int, leader: int) -> RaftView:
    return RaftView(number, 2, role, term, leader, 0, 0, 0, 0)


# -- configuration --------------------------------------------------------------------------------


def test_each_node_listens_on_its_own_port_and_dials_each_peer_where_told(tmp_dir: Path) -> None:
    directories = {n: tmp_dir / f"n{n}" for n in (1, 2, 3)}
    peer_ports = {1: 7001, 2: 7002, 3: 7003}
    dial_ports = {(s, t): 9000 + 10 * s + t for s in (1, 2, 3) for t in (1, 2, 3) if s != t}
    every = cluster_settings(directories, {n: f"xn{n}" for n in (1, 2, 3)}, peer_ports, dial_ports,
                             tmp_dir / "secret", {"election_timeout_ms": 500},
                             {"snapshot": {"keep": 2}})  # fmt: skip
    for number, settings in every.items():
        assert settings["node"] == {"name": f"xn{number}", "number": number}
        assert settings["snapshot"] == {"keep": 2}
        assert settings["cluster"]["election_timeout_ms"] == 500
        members = {m["id"]: m for m in settings["cluster"]["members"]}
        assert sorted(members) == [1, 2, 3]
        for member, entry in members.items():
            port = peer_ports[member] if member == number else dial_ports[(number, member)]
            assert entry["peer_address"] == f"127.0.0.1:{port}"
            assert entry["socket_path"] == str(directories[member] / "seqd.sock")


def test_settings_refuse_a_size_that_is_no_cluster_and_a_link_without_a_port(tmp_dir: Path) -> None:
    two = {n: tmp_dir / f"n{n}" for n in (1, 2)}
    with pytest.raises(ValueError, match="2 nodes"):
        cluster_settings(two, {1: "a", 2: "b"}, {1: 1, 2: 2}, {(1, 2): 3, (2, 1): 4}, tmp_dir / "s")
    three = {n: tmp_dir / f"n{n}" for n in (1, 2, 3)}
    links = {(s, t): 9000 for s in (1, 2, 3) for t in (1, 2, 3) if s != t}
    del links[(3, 1)]
    with pytest.raises(ValueError, match=r"\(3, 1\)"):
        cluster_settings(three, {n: str(n) for n in three}, {1: 1, 2: 2, 3: 3}, links, tmp_dir / "s")


def test_the_secret_is_mode_0600_from_creation_and_never_replaced(tmp_dir: Path) -> None:
    path = write_secret(tmp_dir / "cluster.secret")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text().strip()
    assert len(text) >= 64 and int(text, 16) >= 0  # 32 random bytes as hex: the config wants >= 32
    with pytest.raises(FileExistsError):
        write_secret(path)
    assert path.read_text().strip() == text


def test_the_written_configs_validate_and_route_every_directed_link_through_its_proxy(
    tmp_dir: Path, unique: str
) -> None:
    with Cluster(tmp_dir, unique, cluster={"election_timeout_ms": 400}) as cluster:
        assert cluster.network is not None
        real = {number: node.peer_port for number, node in cluster.nodes.items()}
        assert len(set(real.values())) == 3
        for number, node in cluster.nodes.items():
            config = load_config(node.config_path)  # validated, as `seqd run` will
            assert config.cluster is not None
            assert config.node.number == number and config.node.name == f"{unique}n{number}"
            assert config.cluster.election_timeout_ms == 400
            assert Path(config.cluster.secret_file) == cluster.secret_file
            for member in config.cluster.members:
                _host, port = parse_address(member.peer_address)
                if member.id == number:
                    assert port == real[number]  # where it listens
                else:
                    link = cluster.network.links[(number, member.id)]
                    assert port == link.port  # it dials the proxy ...
                    assert link._state.target_port == real[member.id]  # ... which forwards to the peer
            assert config.journal_dir.parent.parent == tmp_dir / f"n{number}"
        assert len({node.socket_path for node in cluster.nodes.values()}) == 3


def test_a_cluster_of_other_than_three_or_five_is_refused(tmp_dir: Path, unique: str) -> None:
    with pytest.raises(ValueError, match="3 or 5"):
        Cluster(tmp_dir, unique, size=4)


# -- leader agreement ------------------------------------------------------------------------------


def test_a_leader_is_agreed_when_a_majority_names_it_in_its_term() -> None:
    views = [_view(1, LEADER, 3, 1), _view(2, FOLLOWER, 3, 1), _view(3, FOLLOWER, 2, 1)]
    leader = agreed_leader(views, quorum=2)
    assert leader is not None and leader.number == 1
    assert agreed_leader(views, quorum=3) is None  # node 3 is still in term 2


def test_a_lone_leader_is_not_agreed() -> None:
    # A partitioned or paused old leader still says it leads; its followers moved on.
    views = [_view(1, LEADER, 3, 1), _view(2, CANDIDATE, 4, 0), _view(3, CANDIDATE, 4, 0)]
    assert agreed_leader(views, quorum=2) is None


def test_the_highest_agreed_term_wins_over_a_stale_leader() -> None:
    views = [_view(1, LEADER, 3, 1), _view(2, LEADER, 5, 2), _view(3, FOLLOWER, 5, 2)]
    leader = agreed_leader([*views, None], quorum=2)  # None: a node that is down
    assert leader is not None and (leader.number, leader.term) == (2, 5)
    assert agreed_leader([None, None, None], quorum=2) is None


# -- cleanup ---------------------------------------------------------------------------------------


def test_shm_paths_of_a_node_are_its_segments_and_bells_only(tmp_dir: Path) -> None:
    for name in ("seqd.abn1.log", "seqd.abn1.proposal", "sem.seqd.abn1.log.blp.bell",
                 "seqd.abn10.log", "sem.seqd.abn10.log.blp.bell", "seqd.xabn1.log"):  # fmt: skip
        (tmp_dir / name).write_bytes(b"")
    assert [p.name for p in node_shm_paths("abn1", tmp_dir)] == [
        "sem.seqd.abn1.log.blp.bell", "seqd.abn1.log", "seqd.abn1.proposal",
    ]  # fmt: skip


def _descendants() -> set[int]:
    return {child.pid for child in psutil.Process().children(recursive=True)}


def test_close_leaves_no_process_or_segment_whatever_state_the_nodes_are_in(
    tmp_dir: Path, unique: str
) -> None:
    cluster = Cluster(tmp_dir, unique)
    try:
        cluster.start()
        assert all(node.view() is not None for node in cluster.nodes.values())
        cluster.kill(1)  # leaves its segments behind, as a power cut does
        assert cluster[1].view() is None
        assert node_shm_paths(cluster[1].node), "a killed node leaves its segments"
        cluster.pause(2)  # a stopped process cannot take its SIGTERM
        assert psutil.Process(cluster[2].process.pid).status() == psutil.STATUS_STOPPED  # type: ignore[union-attr]
        cluster.kill_role(3, Role.BLP)  # node 3's supervisor is restarting its pipeline
    finally:
        cluster.close()
    assert _descendants() == set()
    for node in cluster.nodes.values():
        assert node_shm_paths(node.node) == [], node.node
    cluster.close()  # idempotent


def test_a_cluster_without_a_directory_removes_its_own(unique: str) -> None:
    with Cluster(None, unique, proxied=False) as cluster:
        directory = cluster.directory
        assert cluster.network is None
        assert os.path.exists(cluster.secret_file)
    assert not directory.exists()


def test_peer_ports_are_free_distinct_and_below_the_ephemeral_range() -> None:
    low, _high = ephemeral_port_range()
    ports = listen_ports(5, random.Random(7))
    assert len(set(ports)) == 5
    assert all(port < low for port in ports)  # never one an outgoing connection may take meanwhile
    for port in ports:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", port))


def test_stop_drains_every_node_and_each_exits_0(tmp_dir: Path, unique: str) -> None:
    with Cluster(tmp_dir, unique, proxied=False) as cluster:
        cluster.start()
        cluster.kill_role(2, Role.JOURNALLER)  # a node whose pipeline restarted stops cleanly too
        cluster[2].wait_serving(after_restarts=1)
        assert cluster.stop() == {1: 0, 2: 0, 3: 0}
