"""`seqd status` rendering: live, lagging, stale, degraded and stopped nodes from synthetic
counter values; a node that is not running is never shown as zeros."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.layout import (
    COUNTER_NAMES,
    COUNTERS_LAYOUT_VERSION,
    Role,
    counters_name,
    create_counters,
)
from daemon.status import (
    Liveness,
    NodeStatus,
    StatusTracker,
    read_counters,
    render_json,
    render_text,
    sample_status,
    watch,
)

ROOT = Path(__file__).resolve().parent.parent
SUPERVISOR_PID = 4242
ROLE_PIDS = {"sequencer": 4243, "journaller": 4244, "blp": 4245}
STALE_AFTER_S = 1.0


def live_values(**overrides: int) -> dict[str, int]:
    values = {
        "supervisor.pid": SUPERVISOR_PID,
        "supervisor.heartbeat": 100,
        "supervisor.restarts": 0,
        "node.state": 2,
        "recovery.records": 1500,
        "sequencer.pid": ROLE_PIDS["sequencer"],
        "sequencer.cpu": 2,
        "sequencer.idle": 0,
        "sequencer.heartbeat": 1000,
        "journaller.pid": ROLE_PIDS["journaller"],
        "journaller.cpu": 3,
        "journaller.idle": 2,
        "journaller.heartbeat": 2000,
        "blp.pid": ROLE_PIDS["blp"],
        "blp.cpu": -1,
        "blp.idle": 3,
        "blp.heartbeat": 3000,
        "replicator.pid": 0,
        "replicator.heartbeat": 0,
        "log.published.position": 64_000,
        "log.published.index": 1000,
        "journal.durable.position": 64_000,
        "journal.durable.index": 1000,
        "commit.position": 64_000,
        "commit.index": 1000,
        "blp.applied.position": 64_000,
        "blp.applied.index": 1000,
        "egress.published.position": 32_000,
        "egress.consumed.position": 32_000,
        "sessions.open": 3,
        "sessions.total": 7,
        "commands.total": 990,
        "sequencer.errors": 2,
        "journaller.errors": 0,
        "blp.errors": 0,
        "errors.protocol": 2,
        "errors.journal": 0,
        "snapshot.last.index": 500,
        "raft.role": 0,
        "raft.term": 0,
        "raft.leader": 0,
    }
    values.update(overrides)
    return values


def advanced(values: dict[str, int], records: int = 100, record_bytes: int = 64) -> dict[str, int]:
    """The same node one interval later: every heartbeat moved, `records` more through the pipe."""
    moved = dict(values)
    for name in (
        "supervisor.heartbeat",
        "sequencer.heartbeat",
        "journaller.heartbeat",
        "blp.heartbeat",
    ):
        moved[name] += 10
    for name in ("log.published", "journal.durable", "commit", "blp.applied"):
        moved[f"{name}.index"] += records
        moved[f"{name}.position"] += records * record_bytes
    moved["commands.total"] += records
    return moved


class Pids:
    def __init__(self, alive: set[int]) -> None:
        self.alive = alive

    def __call__(self, pid: int) -> bool:
        return pid in self.alive


@pytest.fixture
def pids() -> Pids:
    return Pids({SUPERVISOR_PID, *ROLE_PIDS.values()})


@pytest.fixture
def tracker(pids: Pids) -> StatusTracker:
    return StatusTracker(
        "n1", stale_after_s=STALE_AFTER_S, pid_alive=pids, wall_clock=lambda: 1.7e9
    )


def test_live_node_shows_roles_positions_and_rates(tracker: StatusTracker) -> None:
    first = live_values()
    tracker.observe(first, now_s=10.0)
    status = tracker.observe(advanced(first, records=500), now_s=10.5)
    assert status.liveness == Liveness.LIVE
    assert status.reason == ""
    assert status.state == "serving"
    assert status.rates["records"] == 1000.0
    assert status.rates["commands"] == 1000.0
    assert status.rates["bytes"] == 64_000.0
    assert status.rates["errors"] == 0.0
    blp = next(role for role in status.roles if role.name == "blp")
    assert (blp.pid, blp.running, blp.cpu, blp.idle) == (4245, True, -1, "blocking")
    assert blp.heartbeats_per_s == 20.0
    text = render_text(status)
    assert "seqd node n1: LIVE, SERVING" in text
    assert "sequencer" in text
    assert "spin" in text
    assert "backoff" in text
    replicator_row = next(line for line in text.splitlines() if line.startswith("replicator"))
    assert replicator_row.split() == ["replicator", "-", "-", "-", "off", "-", "-", "-"]
    assert "records 1.00k" in text
    assert "protocol 2" in text
    assert "last index 500" in text


def test_a_node_with_a_snapshotter_shows_its_lag_and_last_snapshot(tracker: StatusTracker, pids: Pids) -> None:
    """snapshot.writer = "replica": the blp writes no snapshot (its counter stays 0); the
    snapshotter's row says how far behind the commit index it is and which snapshot it wrote."""
    pids.alive.add(4300)
    values = live_values(**{"snapshot.last.index": 0, "snapshotter.pid": 4300, "snapshotter.applied.index": 940,
                            "snapshotter.snapshot.index": 900, "snapshotter.writes": 2, "snapshotter.restarts": 0,
                            "snapshotter.errors": 0})  # fmt: skip
    status = tracker.observe(values, now_s=10.0)
    assert status.snapshot_last_index == 900
    snapshotter = render_json(status)["snapshot"]["snapshotter"]
    assert snapshotter["running"] is True
    assert (snapshotter["applied_index"], snapshotter["lag_records"], snapshotter["snapshot_index"]) == (940, 60, 900)
    header, row = [line for line in render_text(status).splitlines() if line.startswith("snapshotter")]
    assert header.split()[3:6] == ["applied", "lag", "snapshot"]
    assert row.split() == ["snapshotter", "4300", "yes", "940", "60", "900", "2", "0", "0"]
    without = tracker.observe(live_values(), now_s=11.0)
    assert render_json(without)["snapshot"]["snapshotter"] is None


def test_first_sample_has_no_rates_rather_than_zero_rates(tracker: StatusTracker) -> None:
    status = tracker.observe(live_values(), now_s=0.0)
    assert status.liveness == Liveness.LIVE
    assert set(status.rates.values()) == {None}
    assert render_json(status)["rates_per_s"]["records"] is None


def test_lagging_node_reports_lags_in_records_and_bytes(tracker: StatusTracker) -> None:
    values = live_values(
        **{
            "log.published.index": 1500,
            "log.published.position": 96_000,
            "journal.durable.index": 1200,
            "journal.durable.position": 76_800,
            "commit.index": 1200,
            "commit.position": 76_800,
            "blp.applied.index": 1000,
            "blp.applied.position": 64_000,
            "egress.published.position": 40_000,
            "egress.consumed.position": 32_000,
        }
    )
    status = tracker.observe(values, now_s=0.0)
    lags = {lag.stage: (lag.records, lag.bytes) for lag in status.lags}
    assert lags == {
        "journal": (300, 19_200),
        "commit": (300, 19_200),
        "apply": (200, 12_800),
        "egress": (None, 8_000),
    }
    document = render_json(status)
    assert document["lags"]["apply"] == {"records": 200, "bytes": 12_800}
    text = render_text(status)
    assert "12800" in text
    assert "19200" in text


def test_supervisor_gone_is_stopped_with_last_values_not_zeros(
    tracker: StatusTracker, pids: Pids
) -> None:
    values = live_values()
    tracker.observe(values, now_s=0.0)
    pids.alive.clear()
    status = tracker.observe(values, now_s=2.0)
    assert status.liveness == Liveness.STOPPED
    assert "supervisor pid 4242 is not running" in status.reason
    assert not status.current
    assert status.positions["published"] == 64_000  # the last values, kept and marked
    assert set(status.rates.values()) == {None}
    assert all(role.running is not True for role in status.roles)
    text = render_text(status)
    assert text.startswith("seqd node n1: STOPPED (last state written: serving)")
    assert "the values below are the last it wrote" in text
    assert "rates/s   - (node not running)" in text
    document = render_json(status)
    assert document["liveness"] == "stopped"
    assert document["current"] is False


def test_missing_segment_is_stopped_with_the_reason(tracker: StatusTracker) -> None:
    status = tracker.observe(
        None, now_s=0.0, missing_reason="node n1 is not running: no /seqd.n1.counters"
    )
    assert status.liveness == Liveness.STOPPED
    text = render_text(status)
    assert text == "seqd node n1: STOPPED - node n1 is not running: no /seqd.n1.counters\n"
    assert "0" not in text.replace("n1", "")
    document = render_json(status)
    assert document["positions"] == {}
    assert document["supervisor"]["pid"] is None


def test_node_that_reports_stopped_is_stopped(tracker: StatusTracker) -> None:
    status = tracker.observe(live_values(**{"node.state": 4}), now_s=0.0)
    assert status.liveness == Liveness.STOPPED
    assert status.reason == "the node reports it has stopped"


def test_supervisor_heartbeat_frozen_past_the_bound_is_stale(tracker: StatusTracker) -> None:
    values = live_values()
    assert tracker.observe(values, now_s=0.0).liveness == Liveness.LIVE
    # Below the bound a frozen heartbeat is a scheduling hiccup, not a hang.
    assert tracker.observe(values, now_s=0.5).liveness == Liveness.LIVE
    status = tracker.observe(values, now_s=1.5)
    assert status.liveness == Liveness.STALE
    assert "heartbeat has not moved for 1.5 s" in status.reason
    assert set(status.rates.values()) == {None}
    assert render_text(status).startswith("seqd node n1: STALE")


def test_stale_node_becomes_live_when_heartbeats_move_again(tracker: StatusTracker) -> None:
    values = live_values()
    tracker.observe(values, now_s=0.0)
    assert tracker.observe(values, now_s=2.0).liveness == Liveness.STALE
    assert tracker.observe(advanced(values), now_s=3.0).liveness == Liveness.LIVE


def test_stuck_role_makes_the_node_degraded_and_is_named(tracker: StatusTracker) -> None:
    values = live_values()
    tracker.observe(values, now_s=0.0)
    later = advanced(values)
    later["blp.heartbeat"] = values["blp.heartbeat"]
    status = tracker.observe(later, now_s=1.2)
    assert status.liveness == Liveness.DEGRADED
    assert status.reason == "blp heartbeat has not moved for 1.2 s"
    assert "STUCK 1.2s" in render_text(status)
    assert render_json(status)["roles"]["blp"]["stuck_s"] == pytest.approx(1.2)


def test_dead_role_makes_the_node_degraded(tracker: StatusTracker, pids: Pids) -> None:
    pids.alive.discard(ROLE_PIDS["journaller"])
    status = tracker.observe(live_values(), now_s=0.0)
    assert status.liveness == Liveness.DEGRADED
    assert status.reason == "journaller pid 4244 is not running"
    assert "NO" in render_text(status)


def test_new_incarnation_resets_rates_and_heartbeat_ages(
    tracker: StatusTracker, pids: Pids
) -> None:
    values = live_values()
    tracker.observe(values, now_s=0.0)
    pids.alive.add(5000)
    restarted = live_values(**{"supervisor.pid": 5000, "commands.total": 0})
    status = tracker.observe(restarted, now_s=5.0)
    assert status.liveness == Liveness.LIVE  # same heartbeat values, but a different process
    assert status.rates["commands"] is None  # not -990/5 s


def test_recovering_node_says_how_far_it_got(tracker: StatusTracker) -> None:
    status = tracker.observe(
        live_values(**{"node.state": 1, "recovery.records": 12_345}), now_s=0.0
    )
    assert status.state == "recovering"
    assert "recovering: 12345 records replayed" in render_text(status)


@pytest.mark.parametrize(("state", "name"), [(1, "short"), (2, "full")])
def test_node_short_of_disk_space_says_so_and_stays_live(tracker: StatusTracker, state: int, name: str) -> None:
    values = live_values(**{"journal.disk_full": state, "journal.free_bytes": 524_288, "errors.disk_full": 12})
    status = tracker.observe(values, now_s=0.0)
    assert status.liveness == Liveness.LIVE
    text = render_text(status)
    assert text.splitlines()[0].startswith("seqd node n1: LIVE, SERVING, DISK FULL")
    assert "! DISK FULL: 524288 bytes free for the journal" in text
    assert "refused with disk_full" in text
    assert render_json(status)["disk"] == {"state": name, "full": True, "free_bytes": 524_288, "refused": 12}
    roomy = tracker.observe(live_values(**{"journal.disk_full": 0}), now_s=0.1)
    assert "DISK FULL" not in render_text(roomy)
    assert render_json(roomy)["disk"]["full"] is False


def test_missing_counter_names_show_as_unknown_not_zero(tracker: StatusTracker) -> None:
    sparse = {"supervisor.pid": SUPERVISOR_PID, "supervisor.heartbeat": 1, "node.state": 2}
    status = tracker.observe(sparse, now_s=0.0)
    assert status.liveness == Liveness.LIVE
    text = render_text(status)
    document = render_json(status)
    assert document["positions"]["published"] is None
    assert document["lags"]["journal"] == {"records": None, "bytes": None}
    assert document["sessions"]["open"] is None
    assert document["roles"]["blp"]["pid"] is None
    assert "open -  total -" in text
    json.dumps(document)  # plain JSON types only


def test_cluster_node_shows_its_raft_standing(tracker: StatusTracker, pids: Pids) -> None:
    pids.alive.add(4246)
    values = live_values(
        **{
            "replicator.pid": 4246,
            "replicator.heartbeat": 5,
            "raft.role": 3,
            "raft.term": 7,
            "raft.leader": 1,
        }
    )
    status = tracker.observe(values, now_s=0.0)
    assert (status.raft.role, status.raft.term, status.raft.leader) == ("leader", 7, 1)
    assert "raft leader term 7 leader 1" in render_text(status)
    single = tracker.observe(live_values(), now_s=0.1)
    assert single.raft.role is None


def test_a_cluster_leader_shows_its_commit_and_each_followers_match_lag_and_window_peak(
    tracker: StatusTracker, pids: Pids
) -> None:
    pids.alive.add(4246)
    replicator = {"replicator.pid": 4246, "replicator.heartbeat": 5, "raft.term": 7, "raft.leader": 1}
    raft = {
        "raft.commit.index": 1490, "raft.last_index": 1500, "raft.pending_forwards": 3,
        "raft.peer1.node": 2, "raft.peer1.match_index": 1480, "raft.peer1.inflight_bytes_peak": 108416,
        "raft.peer2.node": 3, "raft.peer2.match_index": 1500, "raft.peer2.inflight_bytes_peak": 3392,
        "raft.peer3.node": 0, "raft.peer3.match_index": 0,  # an empty slot (a 3-node cluster)
    }  # fmt: skip
    leader = tracker.observe(live_values(**replicator, **raft, **{"raft.role": 3}), now_s=0.0)
    text = render_text(leader)
    assert "raft commit 1490  last 1500  pending forwards 3" in text
    assert "follower 2: match 1480  lag 20  last contact never  in flight peak 108416 bytes" in text, text
    assert "follower 3: match 1500  lag 0  last contact never  in flight peak 3392 bytes" in text, text
    assert "raft heard from" not in text  # the leader's follower lines say it
    document = render_json(leader)["raft"]
    assert (document["commit_index"], document["last_index"], document["pending_forwards"]) == (1490, 1500, 3)
    assert document["followers"] == [
        {"node": 2, "match_index": 1480, "lag": 20, "last_contact_ms": None, "inflight_bytes_peak": 108416},
        {"node": 3, "match_index": 1500, "lag": 0, "last_contact_ms": None, "inflight_bytes_peak": 3392},
    ]  # fmt: skip
    assert document["peers"] == [{"node": 2, "last_contact_ms": None}, {"node": 3, "last_contact_ms": None}]
    # A follower's replicator fills the same slots (the other members), but tracks no match: they
    # say 0, which is no follower's match (its lag would be the whole log). It lists no follower,
    # only when it last heard from each member.
    follower_values = {**raft, "raft.peer1.node": 1, "raft.peer1.match_index": 0, "raft.peer2.match_index": 0,
                       "raft.peer1.last_contact_ms": int(1.7e9 * 1000) - 9}  # fmt: skip
    follower = tracker.observe(live_values(**replicator, **follower_values, **{"raft.role": 0}), now_s=0.1)
    assert render_json(follower)["raft"]["followers"] == []
    assert render_json(follower)["raft"]["peers"] == [{"node": 1, "last_contact_ms": 9}, {"node": 3, "last_contact_ms": None}]
    assert "follower 1" not in render_text(follower) and "follower 3" not in render_text(follower)
    assert "raft heard from node 1 9 ms ago, node 3 never" in render_text(follower), render_text(follower)
    # A segment whose replicator publishes only its standing (an older layout): the rest unknown.
    standing_only = tracker.observe(live_values(**replicator, **{"raft.role": 3}), now_s=0.2)
    assert "raft commit -  last -  pending forwards -" in render_text(standing_only)
    single = render_json(tracker.observe(live_values(), now_s=0.3))["raft"]
    assert single["followers"] is None and single["peers"] is None and single["commit_index"] is None
    assert "journal held" not in text  # no follower catching up after a snapshot
    holding = tracker.observe(live_values(**replicator, **raft, **{"raft.role": 3, "raft.retain.index": 1201}),
                              now_s=0.4)  # fmt: skip
    assert "pending forwards 3  journal held from 1201" in render_text(holding)
    assert render_json(holding)["raft"]["retain_index"] == 1201


def test_a_cluster_node_shows_its_members_elections_step_downs_refusals_and_last_contacts(
    tracker: StatusTracker, pids: Pids
) -> None:
    """Issue 12: the cluster view has the members, each follower's last contact (as an age, from
    the wall-clock time the replicator stored), and the counts of elections, step-downs and peer
    refusals, in the text and in --json; the refusals count among the node's errors."""
    pids.alive.add(4246)
    now_ms = int(1.7e9 * 1000)  # the tracker's wall clock
    values = live_values(**{
        "replicator.pid": 4246, "replicator.heartbeat": 5, "raft.role": 3, "raft.term": 7, "raft.leader": 1,
        "node.number": 1, "raft.last_index": 1500,
        "raft.peer1.node": 2, "raft.peer1.match_index": 1480, "raft.peer1.last_contact_ms": now_ms - 12,
        "raft.peer2.node": 3, "raft.peer2.match_index": 1500, "raft.peer2.last_contact_ms": 0,
        "raft.elections": 2, "raft.step_downs": 1, "errors.peer_refused": 4, "raft.transfer.outcome": 2,
    })  # fmt: skip
    status = tracker.observe(values, now_s=0.0)
    text = render_text(status)
    assert "raft members 1, 2, 3  elections 2  step-downs 1  peer refusals 4  last transfer done" in text, text
    assert "follower 2: match 1480  lag 20  last contact 12 ms ago" in text, text
    assert "follower 3: match 1500  lag 0  last contact never" in text, text
    document = render_json(status)
    raft = document["raft"]
    assert (raft["members"], raft["elections"], raft["step_downs"], raft["peer_refused"]) == ([1, 2, 3], 2, 1, 4)
    assert raft["transfer_outcome"] == "done"
    assert [f["last_contact_ms"] for f in raft["followers"]] == [12, None]
    assert document["errors"]["peer_refused"] == 4, document["errors"]


def test_a_cluster_node_shows_its_forward_streams_dropped_resent_broken_and_refused(
    tracker: StatusTracker, pids: Pids
) -> None:
    """Issue 11: the forward stream's faults (the replicator's `raft.forward*` counters) are in the
    cluster view, in the text and in --json: an operator sees a follower's forwards dropped and
    restarted, and a leader that refuses batches."""
    pids.alive.add(4246)
    values = live_values(**{
        "replicator.pid": 4246, "replicator.heartbeat": 5, "raft.role": 0, "raft.term": 7, "raft.leader": 2,
        "node.number": 1, "raft.forwards_dropped": 17, "raft.forwards_resent": 230,
        "raft.forward_streams_broken": 3, "raft.forward_streams_refused": 1,
    })  # fmt: skip
    status = tracker.observe(values, now_s=0.0)
    text = render_text(status)
    assert "raft forwards dropped 17  resent 230  streams broken 3  refused 1" in text, text
    raft = render_json(status)["raft"]
    assert (raft["forwards_dropped"], raft["forwards_resent"]) == (17, 230)
    assert (raft["forward_streams_broken"], raft["forward_streams_refused"]) == (3, 1)


def _documented_json() -> dict[str, Any]:
    """The `seqd status --json` example of docs/operations.md."""
    from tests.test_doc_examples import read_blocks

    examples = [
        block for block in read_blocks(ROOT / "docs" / "operations.md")
        if block.language == "json" and '"liveness"' in block.code
    ]
    assert len(examples) == 1, [block.name for block in examples]
    document: dict[str, Any] = json.loads(examples[0].code)
    return document


def _shape_mismatches(documented: object, rendered: object, path: str = "$") -> list[str]:
    """Where `rendered` differs in shape from `documented`: a key missing or undocumented, an
    object where a value is documented, a value of another type (null fits any type)."""
    if isinstance(documented, dict):
        if not isinstance(rendered, dict):
            return [f"{path}: documented an object, rendered {rendered!r}"]
        if path == "$.counters":  # every counter of the segment, by name; abridged in the docs
            return [f"{path}.{name}: {value!r} is not an integer" for name, value in rendered.items() if type(value) is not int]
        if path == "$.replicas":  # one entry per replica the node runs, shaped like the documented one
            template = next(iter(documented.values()))
            return [problem for name, entry in rendered.items()
                    for problem in _shape_mismatches(template, entry, f"{path}.{name}")]  # fmt: skip
        if path == "$.roles":  # one entry per role, each shaped like the documented ones
            problems = [] if set(rendered) == {role.value for role in Role} else [f"{path}: roles {sorted(rendered)}"]
            template = next(iter(documented.values()))
            for name, entry in documented.items():
                problems += _shape_mismatches(template, entry, f"{path}.{name} (documented)")
            for name, entry in rendered.items():
                problems += _shape_mismatches(template, entry, f"{path}.{name}")
            return problems
        problems = [f"{path}.{key}: documented, not rendered" for key in documented.keys() - rendered.keys()]
        problems += [f"{path}.{key}: rendered, not documented" for key in rendered.keys() - documented.keys()]
        for key in documented.keys() & rendered.keys():
            problems += _shape_mismatches(documented[key], rendered[key], f"{path}.{key}")
        return problems
    if documented is None or rendered is None:
        return [] if not isinstance(rendered, dict | list) else [f"{path}: documented a value, rendered {rendered!r}"]
    numbers = (int, float)
    if isinstance(documented, bool) or isinstance(rendered, bool):
        same = type(documented) is type(rendered)
    elif isinstance(documented, numbers):
        same = isinstance(rendered, numbers)
    else:
        same = type(documented) is type(rendered)
    return [] if same else [f"{path}: documented {documented!r}, rendered {rendered!r}"]


def test_json_has_exactly_the_documented_shape(tracker: StatusTracker, pids: Pids) -> None:
    """Every key of `seqd status --json` is documented in docs/operations.md and every documented
    key is there, with the documented type: for a live node, for a dead one (its last values),
    and, at the top level, for a node without a counters segment (empty objects, no numbers)."""
    documented = _documented_json()
    values = {**dict.fromkeys(COUNTER_NAMES, 0), **live_values(**{"journal.free_bytes": 1 << 30})}
    tracker.observe(values, now_s=0.0)
    live = json.loads(json.dumps(render_json(tracker.observe(advanced(values), now_s=1.0))))
    assert _shape_mismatches(documented, live) == []
    assert live["liveness"] == "live"
    assert live["roles"]["sequencer"] == {
        "pid": 4243,
        "running": True,
        "cpu": 2,
        "idle": "spin",
        "heartbeat": 1010,
        "heartbeats_per_s": 10.0,
        "stuck_s": None,
        "errors": 2,
    }
    assert live["errors"] == {
        "disk_full": 0, "journal": 0, "protocol": 2, "security": 0, "slow_client": 0, "snapshot": 0, "total": 2
    }
    assert live["snapshot"] == {"last_index": 500, "snapshotter": None}
    assert live["counters"]["commands.total"] == 1090
    pids.alive.clear()
    dead = json.loads(json.dumps(render_json(tracker.observe(advanced(values), now_s=2.0))))
    assert _shape_mismatches(documented, dead) == []
    assert (dead["liveness"], dead["current"]) == ("stopped", False)
    missing = render_json(tracker.observe(None, now_s=3.0, missing_reason="node n1 is not running"))
    assert missing.keys() == documented.keys()
    for key, value in missing.items():
        if isinstance(value, dict):
            assert set(value.values()) <= {None}, (key, value)


def test_a_role_not_started_has_unknown_counters_not_zeros(tracker: StatusTracker) -> None:
    """While the blp replays, the sequencer has not started: its published index is unknown,
    so the journal and commit lags are unknown too, never a negative number."""
    recovering = live_values(
        **{
            "node.state": 1,
            "sequencer.pid": 0,
            "sequencer.heartbeat": 0,
            "log.published.index": 0,
            "log.published.position": 0,
            "commands.total": 0,
            "blp.applied.index": 0,
        }
    )
    status = tracker.observe(recovering, now_s=0.0)
    assert status.indexes["published"] is None
    assert status.indexes["durable"] == 1000
    lags = {lag.stage: lag.records for lag in status.lags}
    assert lags == {"journal": None, "commit": None, "apply": 1000, "egress": None}
    assert status.commands_total is None
    assert "sequencer.errors" in status.values  # the raw sample is kept as read
    document = render_json(status)
    assert document["roles"]["sequencer"]["errors"] is None
    assert document["errors"]["total"] == 0  # the roles that run
    assert (document["raft"]["term"], document["raft"]["leader"]) == (None, None)  # no replicator


def test_errors_are_counted_per_role_and_summed_into_the_total(tracker: StatusTracker) -> None:
    values = live_values(**{"sequencer.errors": 2, "journaller.errors": 1, "blp.errors": 4})
    tracker.observe(values, now_s=0.0)
    later = dict(values, **{"blp.errors": 6})
    status = tracker.observe(advanced(later), now_s=0.5)
    assert status.errors["total"] == 9
    assert {role.name: role.errors for role in status.roles} == {
        "sequencer": 2, "journaller": 1, "blp": 6, "replicator": None
    }
    assert status.rates["errors"] == 4.0  # two more in half a second
    text = render_text(status)
    assert "total 9" in text
    assert next(line for line in text.splitlines() if line.startswith("blp")).split()[7] == "6"


# --- sampling and --watch ---------------------------------------------------------------------


class Reads:
    """Counter samples served in order, as read_counters would."""

    def __init__(self, *samples: dict[str, int] | None) -> None:
        self.samples = list(samples)
        self.count = 0

    def __call__(self, node: str) -> tuple[dict[str, int] | None, str | None]:
        sample = self.samples[min(self.count, len(self.samples) - 1)]
        self.count += 1
        return sample, None if sample is not None else f"node {node} is not running"


class Clock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s

    def sleep(self, seconds: float) -> None:
        self.now_s += seconds


def test_one_shot_status_samples_twice_to_find_a_stale_node(pids: Pids) -> None:
    clock = Clock()
    reads = Reads(live_values(), live_values())
    tracker = StatusTracker("n1", stale_after_s=STALE_AFTER_S, pid_alive=pids)
    status = sample_status(
        "n1", read=reads, gap_s=1.0, sleep=clock.sleep, clock=clock, tracker=tracker
    )
    assert reads.count == 2
    assert status.liveness == Liveness.STALE


def test_one_shot_status_of_a_missing_node_does_not_wait() -> None:
    clock = Clock()
    reads = Reads(None)
    status = sample_status("n9", read=reads, sleep=clock.sleep, clock=clock)
    assert status.liveness == Liveness.STOPPED
    assert reads.count == 1
    assert clock.now_s == 0.0


def test_watch_redraws_each_interval(pids: Pids) -> None:
    clock = Clock()
    first = live_values()
    reads = Reads(first, advanced(first), advanced(advanced(first)))
    out = io.StringIO()
    watch("n1", read=reads, interval_s=1.0, iterations=3, out=out, sleep=clock.sleep, clock=clock)
    text = out.getvalue()
    assert text.count("seqd node n1:") == 3
    assert "\x1b[2J" not in text  # not a terminal: no screen clearing
    assert clock.now_s == 2.0


# --- reading real shared memory ---------------------------------------------------------------


@pytest.fixture
def counters_segment(unique: str) -> Iterator[tuple[str, object]]:
    counters = create_counters(unique)
    yield unique, counters
    counters.close()
    counters.unlink()


def test_read_counters_reads_a_live_segment(counters_segment: tuple[str, object]) -> None:
    node, counters = counters_segment
    counters["supervisor.pid"].set(os.getpid())  # type: ignore[index]
    counters["sequencer.pid"].set(os.getpid())  # type: ignore[index]
    counters["log.published.index"].set(77)  # type: ignore[index]
    values, reason = read_counters(node)
    assert reason is None
    assert values is not None
    assert values["log.published.index"] == 77
    status = StatusTracker(node).observe(values, now_s=0.0)
    assert status.liveness == Liveness.LIVE
    assert status.indexes["published"] == 77


def test_counters_of_another_layout_version_are_refused_not_misread(unique: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A `seqd status` of another release than the node's says so, in one line, and shows no
    numbers: the same names may mean other things, or sit in other slots."""
    from daemon.cli import main
    from daemon.exits import ExitCode
    from ipc.counters import Counters
    from ipc.segment import SegmentVersionError

    other = Counters.create(counters_name(unique), ["supervisor.pid"], layout_version=COUNTERS_LAYOUT_VERSION + 1)
    try:
        other["supervisor.pid"].set(os.getpid())
        with pytest.raises(SegmentVersionError, match=f"layout version {COUNTERS_LAYOUT_VERSION + 1}, this seqd reads version {COUNTERS_LAYOUT_VERSION}"):
            read_counters(unique)
        assert main(["status", "--node", unique]) == ExitCode.DATAERR
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.count("\n") == 1
        assert f"seqd: cannot show node {unique}:" in captured.err
        assert "made by a different seqd release" in captured.err
    finally:
        other.close()
        other.unlink()


def test_read_counters_of_an_absent_node_says_it_is_not_running(unique: str) -> None:
    pytest.importorskip("ipc.counters")
    values, reason = read_counters(unique)
    assert values is None
    assert reason is not None
    assert f"node {unique} is not running" in reason
    status = StatusTracker(unique).observe(values, now_s=0.0, missing_reason=reason)
    assert isinstance(status, NodeStatus)
    assert status.liveness == Liveness.STOPPED
