"""`seqd status` of a real 3-node cluster under the failures docs/cluster.md describes ("What
failures look like in `seqd status`"): the leader shows each follower's match position and lag,
a follower cut off by the fault proxy stops matching and falls behind on the leader while it
says it follows no leader, catches up when healed, and a node killed shows `stopped`.

Before, a node that did not lead listed every other member as a follower with match 0 and the
whole log as its lag (its replicator fills the same slots, and tracks no match); the docs said
it lists none."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from daemon import status
from daemon.cluster_harness import Cluster
from daemon.layout import ROLE_COUNTERS, Role
from sequencer.raft.peer_protocol import PEER_FRAME_BYTES_MAX
from tests.node_fixtures import TransferDriver, open_accounts

pytestmark = pytest.mark.timeout(180)
ACCOUNTS = ["alice", "bob"]
TIMEOUTS = {"tick_ms": 10, "heartbeat_ms": 50, "election_timeout_ms": 300}
WAIT_S = 60.0  # a condition that should hold within a few ticks; generous for a loaded machine


def raft_shown(cluster: Cluster, number: int) -> dict[str, Any]:
    """What `seqd status --json` shows of node `number`'s Raft standing (no wait between samples)."""
    shown = status.render_json(status.sample_status(cluster[number].node, gap_s=0.0))
    return {"liveness": shown["liveness"], **shown["raft"]}


def wait_shown(cluster: Cluster, number: int, holds: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    while True:
        shown = raft_shown(cluster, number)
        if holds(shown):
            return shown
        assert time.monotonic() < deadline, f"node {number}'s status never showed {what}: {shown}; {cluster.describe()}"
        time.sleep(0.05)


def raft_shown_after_a_tick(cluster: Cluster, number: int) -> dict[str, Any]:
    """`raft_shown` as published by a replicator tick that began after this call: the last index
    and the matches are published once a tick (daemon/roles/replicator.py `_publish`), so a
    sample read at once may be a tick older than a record appended and acknowledged before the
    call. A tick adds 1 to `replicator.heartbeat`, then publishes, in one callback: once the
    count is 2 past the one read here, the tick after the read has published."""
    heartbeat = ROLE_COUNTERS[Role.REPLICATOR].heartbeat.name
    seen = cluster[number].read_counters()[heartbeat]
    deadline = time.monotonic() + WAIT_S
    while cluster[number].read_counters()[heartbeat] < seen + 2:
        assert time.monotonic() < deadline, f"node {number}'s replicator did not tick in {WAIT_S} s; {cluster.describe()}"
        time.sleep(0.005)
    return raft_shown(cluster, number)


def by_node(shown: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {follower["node"]: follower for follower in shown["followers"]}


def drive(socket_path: str, transfers: int, seed: int) -> None:
    driver = TransferDriver(socket_path, ACCOUNTS, seed=seed, in_flight=8).start()
    try:
        driver.wait_acknowledged(transfers)
    finally:
        driver.stop()


def test_status_shows_each_followers_match_and_lag_through_a_partition_a_catch_up_and_a_death(
    tmp_dir: Path, unique: str
) -> None:
    with Cluster(tmp_dir, unique, cluster=TIMEOUTS) as cluster:
        assert cluster.network is not None
        cluster.start()
        leader = cluster.wait_leader(agreeing=cluster.size).number
        cut, other = (n for n in cluster.nodes if n != leader)
        open_accounts(cluster[leader].socket_path, ACCOUNTS)
        drive(cluster[leader].socket_path, 50, seed=1)

        # Healthy: both followers hold the leader's log (match = last, lag 0) once quiet.
        def caught_up(shown: dict[str, Any]) -> bool:  # False while it does not lead (no followers)
            followers = by_node(shown)
            return sorted(followers) == sorted((cut, other)) and all(
                f["match_index"] == shown["last_index"] and f["lag"] == 0 for f in followers.values())

        healthy = wait_shown(cluster, leader, caught_up, "both followers at the leader's last index")
        assert healthy["role"] == "leader" and healthy["last_index"] > 50
        term = healthy["term"]
        on_follower = raft_shown(cluster, cut)
        assert on_follower["role"] == "follower" and on_follower["leader"] == leader
        assert on_follower["followers"] == []  # a node that does not lead tracks no match
        assert {p["node"] for p in on_follower["peers"]} == {leader, other}

        # A follower cut off: on the leader its match stops where it was and its lag grows by
        # what commits without it; the other follower keeps up. "Where it was" is a range, not
        # the healthy sample's last index: a record the driver's closing session leaves (or any
        # other) may be appended and shipped between that sample and the cut, and one appended
        # after the cut cannot reach it, so the match lies between the healthy last index and the
        # last index a tick after the cut published (one read at once may be a tick older than a
        # record shipped and acknowledged just before the cut).
        cluster.network.isolate(cut)
        at_cut = raft_shown_after_a_tick(cluster, leader)["last_index"]
        drive(cluster[leader].socket_path, 50, seed=2)

        def left_behind(shown: dict[str, Any]) -> bool:  # False if leadership moved (other not listed)
            follower = by_node(shown).get(other)
            return follower is not None and follower["lag"] == 0 and follower["match_index"] == shown["last_index"]

        partitioned = wait_shown(cluster, leader, left_behind, f"node {other} at the last index")
        behind = by_node(partitioned)[cut]
        cut_match = behind["match_index"]
        assert healthy["last_index"] <= cut_match <= at_cut < partitioned["last_index"], (at_cut, partitioned)
        assert behind["lag"] == partitioned["last_index"] - cut_match > 0, partitioned
        sample = status.sample_status(cluster[leader].node, gap_s=0.0)  # the text and its lag, one sample
        lag, text = by_node(status.render_json(sample)["raft"])[cut]["lag"], status.render_text(sample)
        assert f"follower {cut}: match {cut_match}  lag {lag}" in text, text
        # On the node cut off: no leader after an election timeout, its term unchanged (PreVote),
        # and `raft heard from` shows the leader's last contact past the election timeout.
        alone = wait_shown(cluster, cut, lambda shown: shown["leader"] == 0, "leader 0")
        assert alone["role"] in ("follower", "pre-candidate") and alone["term"] == term, alone
        assert alone["followers"] == []
        timeout_ms = TIMEOUTS["election_timeout_ms"]

        def leader_unheard(shown: dict[str, Any]) -> bool:
            contact_ms = {peer["node"]: peer["last_contact_ms"] for peer in shown["peers"]}.get(leader)
            return contact_ms is not None and contact_ms >= timeout_ms

        wait_shown(cluster, cut, leader_unheard, f"node {leader}'s last contact >= {timeout_ms} ms ago")
        text = status.render_text(status.sample_status(cluster[cut].node, gap_s=0.0))
        assert f"raft heard from node {leader} " in text or f", node {leader} " in text, text

        # Healed: it catches up (match back to the leader's last index, lag 0), its catch-up's
        # in-flight peak within the byte window plus the one message that may cross it.
        cluster.network.heal()
        healed = wait_shown(cluster, leader, caught_up, f"node {cut} caught up after the heal")
        peak = by_node(healed)[cut]["inflight_bytes_peak"]
        window = cluster[leader].config.cluster.inflight_bytes_max  # type: ignore[union-attr]
        assert 0 < peak <= window + PEER_FRAME_BYTES_MAX, healed
        text = status.render_text(status.sample_status(cluster[leader].node, gap_s=0.0))
        assert f"follower {cut}: match" in text and "in flight peak " in text, text
        assert wait_shown(cluster, cut, lambda shown: shown["leader"] == leader, "the leader again")["term"] == term

        # A node down: `stopped` on its own status; on the leader its match stays where it was
        # (between the last index it was seen at and the one a tick after its death published).
        last = healed["last_index"]
        cluster.kill(cut)
        at_death = raft_shown_after_a_tick(cluster, leader)["last_index"]
        assert raft_shown(cluster, cut)["liveness"] == "stopped"
        drive(cluster[leader].socket_path, 20, seed=3)
        down = wait_shown(cluster, leader, left_behind, f"node {other} at the last index")
        dead = by_node(down)[cut]
        assert last <= dead["match_index"] <= at_death < down["last_index"], (last, at_death, down)
        assert dead["lag"] == down["last_index"] - dead["match_index"] > 0, down
