"""The Prometheus text format of the counters, and the endpoint that serves it over real HTTP."""

from __future__ import annotations

import http.client
import re
import socket
from collections.abc import Iterator, Mapping

import pytest

from daemon.metrics import CONTENT_TYPE, MetricsServer, metric_kind, render_prometheus

# A local HTTP request answers in milliseconds; this only bounds a broken server.
HTTP_TIMEOUT_S = 10.0
# Short, so each test's stop() returns quickly.
SHUTDOWN_POLL_S = 0.02

SNAPSHOT = {
    "supervisor.pid": 4242,
    "supervisor.heartbeat": 17,
    "node.state": 2,
    "blp.pid": 4250,
    "blp.cpu": 3,
    "blp.idle": 0,
    "blp.heartbeat": 99,
    "journaller.heartbeat": 98,
    "log.published.position": 8192,
    "blp.applied.position": 4096,
    "commands.total": 128,
    "sequencer.errors": 2,
    "blp.errors": 1,
    "errors.protocol": 2,
    "raft.term": 5,
}

# One sample line: name, optional {labels}, a value (text format 0.0.4).
SAMPLE_LINE = re.compile(
    r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*\})? -?\d+$'
)


def parse_exposition(text: str) -> dict[str, tuple[str, list[str]]]:
    """A strict reader of what render_prometheus must produce: family -> (type, sample lines).
    Fails on a sample before its TYPE, a family split in two, or a malformed line."""
    families: dict[str, tuple[str, list[str]]] = {}
    current: str | None = None
    assert text.endswith("\n")
    for line in text.rstrip("\n").split("\n"):
        if line.startswith("# HELP "):
            name = line.split(" ")[2]
            assert name not in families, f"family {name} appears twice"
            current = name
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name == current, (name, current)
            assert kind in ("counter", "gauge"), kind
            families[name] = (kind, [])
        else:
            match = SAMPLE_LINE.match(line)
            assert match, f"malformed sample line: {line!r}"
            assert current is not None and match.group(1) == current, (line, current)
            families[current][1].append(line)
    return families


def test_rendering_is_valid_exposition_with_help_and_type_per_family() -> None:
    families = parse_exposition(render_prometheus(SNAPSHOT, labels={"node": "n1"}))
    assert families["seqd_log_published_position"] == (
        "gauge",
        ['seqd_log_published_position{node="n1"} 8192'],
    )
    assert families["seqd_commands_total"] == ("counter", ['seqd_commands_total{node="n1"} 128'])
    assert families["seqd_errors_protocol_total"][0] == "counter"
    assert families["seqd_errors_total"] == ("counter", ['seqd_errors_total{node="n1"} 3'])


def test_each_role_counts_its_errors_and_the_total_is_their_sum() -> None:
    text = render_prometheus(SNAPSHOT)
    families = parse_exposition(text)
    kind, samples = families["seqd_role_errors_total"]
    assert kind == "counter"
    assert sorted(samples) == ['seqd_role_errors_total{role="blp"} 1', 'seqd_role_errors_total{role="sequencer"} 2']
    assert families["seqd_errors_total"][1] == ["seqd_errors_total 3"]
    assert "# HELP seqd_errors_total Errors of every kind since start, summed over the roles." in text
    # No role errors in the snapshot (an older layout, say): no made-up total of 0 either.
    assert "seqd_errors_total" not in render_prometheus({"errors.protocol": 1})


def test_kinds_and_help_come_from_the_counter_table() -> None:
    from daemon.layout import COUNTERS, Kind

    text = render_prometheus(dict.fromkeys((spec.name for spec in COUNTERS), 0))
    families = parse_exposition(text)
    for spec in COUNTERS:
        role, _, field = spec.name.partition(".")
        per_role = role in {"supervisor", "sequencer", "journaller", "blp", "replicator"} and "." not in field
        family = "seqd_" + (f"role_{field}" if per_role else spec.name.replace(".", "_"))
        if spec.kind is Kind.COUNTER and not family.endswith("_total"):
            family += "_total"
        assert families[family][0] == ("counter" if spec.kind is Kind.COUNTER else "gauge"), spec.name
        if not per_role:
            assert f"# HELP {family} {spec.help}" in text, spec.name


def test_per_role_counters_form_one_family_with_a_role_label() -> None:
    families = parse_exposition(render_prometheus(SNAPSHOT))
    kind, samples = families["seqd_role_heartbeat_total"]
    assert kind == "counter"
    assert sorted(samples) == [
        'seqd_role_heartbeat_total{role="blp"} 99',
        'seqd_role_heartbeat_total{role="journaller"} 98',
        'seqd_role_heartbeat_total{role="supervisor"} 17',
    ]
    assert families["seqd_role_cpu"] == ("gauge", ['seqd_role_cpu{role="blp"} 3'])
    # A node-wide position that starts with a role name is not a per-role counter.
    assert "seqd_blp_applied_position" in families


def test_a_leader_serves_each_followers_match_lag_and_window_peak_labelled_by_its_node_number() -> None:
    leader = {
        **SNAPSHOT, "raft.role": 3, "raft.leader": 1, "raft.last_index": 1500,
        "raft.peer1.node": 2, "raft.peer1.match_index": 1480, "raft.peer1.inflight_bytes_peak": 108416,
        "raft.peer2.node": 3, "raft.peer2.match_index": 1500, "raft.peer2.inflight_bytes_peak": 3392,
        "raft.peer3.node": 0, "raft.peer3.match_index": 0,  # an empty slot
    }  # fmt: skip
    families = parse_exposition(render_prometheus(leader, labels={"node": "n1"}))
    assert families["seqd_raft_follower_match_index"] == (
        "gauge",
        ['seqd_raft_follower_match_index{node="n1",follower="2"} 1480',
         'seqd_raft_follower_match_index{node="n1",follower="3"} 1500'],
    )  # fmt: skip
    assert families["seqd_raft_follower_lag"][1] == [
        'seqd_raft_follower_lag{node="n1",follower="2"} 20', 'seqd_raft_follower_lag{node="n1",follower="3"} 0',
    ]  # fmt: skip
    assert families["seqd_raft_peer1_node"][1] == ['seqd_raft_peer1_node{node="n1"} 2']  # the slots too
    assert families["seqd_raft_role"][1] == ['seqd_raft_role{node="n1"} 3']
    assert families["seqd_raft_follower_inflight_bytes_peak"] == (
        "gauge",
        ['seqd_raft_follower_inflight_bytes_peak{node="n1",follower="2"} 108416',
         'seqd_raft_follower_inflight_bytes_peak{node="n1",follower="3"} 3392'],
    )  # fmt: skip
    assert "seqd_raft_follower_lag" not in parse_exposition(render_prometheus(SNAPSHOT))
    # A follower's replicator fills the same slots with the other members and tracks no match
    # (0 in each): served as they are by slot, never as a follower's match of 0 and a lag of the
    # whole log. Its last contacts are served.
    follower = {**leader, "raft.role": 0, "raft.leader": 2, "raft.peer1.node": 2, "raft.peer1.match_index": 0,
                "raft.peer2.match_index": 0, "raft.peer1.inflight_bytes_peak": 0, "raft.peer2.inflight_bytes_peak": 0,
                "raft.peer1.last_contact_ms": 1_700_000_000_000, "raft.peer2.last_contact_ms": 0}  # fmt: skip
    families = parse_exposition(render_prometheus(follower, labels={"node": "n1"}))
    for family in ("seqd_raft_follower_match_index", "seqd_raft_follower_lag", "seqd_raft_follower_inflight_bytes_peak"):
        assert family not in families, families[family]
    assert len(families["seqd_raft_follower_last_contact_ms"][1]) == 2
    assert families["seqd_raft_peer1_match_index"][1] == ['seqd_raft_peer1_match_index{node="n1"} 0']


def test_names_and_label_values_are_sanitised_and_escaped() -> None:
    text = render_prometheus({"odd-name.x/y": 1, "9lives": 2}, labels={"node": 'a"b\\c\nd'})
    families = parse_exposition(text)
    assert "seqd_odd_name_x_y" in families
    assert "seqd_9lives" in families
    assert 'node="a\\"b\\\\c\\nd"' in text


def test_counters_and_gauges_are_typed_by_the_table() -> None:
    assert metric_kind("errors.journal") == "counter"
    assert metric_kind("blp.heartbeat") == "counter"
    assert metric_kind("sessions.total") == "counter"
    assert metric_kind("sessions.open") == "gauge"
    assert metric_kind("commit.index") == "gauge"
    assert metric_kind("raft.role") == "gauge"
    assert metric_kind("blp.errors") == "counter"
    assert metric_kind("no.such.counter") == "gauge"


def test_explicit_kinds_override_the_name_rule() -> None:
    families = parse_exposition(
        render_prometheus({"commit.index": 5}, kinds={"commit.index": "counter"})
    )
    assert families["seqd_commit_index_total"][0] == "counter"


def test_empty_snapshot_renders_a_newline() -> None:
    assert render_prometheus({}) == "\n"


# --- the HTTP endpoint -----------------------------------------------------------------------


class Snapshots:
    def __init__(self) -> None:
        self.calls = 0
        self.fail = False

    def __call__(self) -> Mapping[str, int]:
        self.calls += 1
        if self.fail:
            raise RuntimeError("counters segment is gone")
        return {**SNAPSHOT, "commands.total": 128 + self.calls}


@pytest.fixture
def server() -> Iterator[tuple[MetricsServer, Snapshots]]:
    snapshots = Snapshots()
    metrics = MetricsServer(
        snapshots, host="127.0.0.1", port=0, labels={"node": "n1"}, shutdown_poll_s=SHUTDOWN_POLL_S
    )
    metrics.start()
    yield metrics, snapshots
    metrics.stop()


def get(metrics: MetricsServer, path: str, method: str = "GET") -> tuple[int, str, str]:
    connection = http.client.HTTPConnection("127.0.0.1", metrics.port, timeout=HTTP_TIMEOUT_S)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read().decode()
    finally:
        connection.close()


def test_get_metrics_serves_a_fresh_snapshot_each_scrape(
    server: tuple[MetricsServer, Snapshots],
) -> None:
    metrics, _ = server
    status, content_type, body = get(metrics, "/metrics")
    assert status == 200
    assert content_type == CONTENT_TYPE
    families = parse_exposition(body)
    assert families["seqd_commands_total"][1] == ['seqd_commands_total{node="n1"} 129']
    _, _, body = get(metrics, "/metrics")
    assert 'seqd_commands_total{node="n1"} 130' in body
    assert metrics.scrapes == 2


def test_head_metrics_sends_headers_only(server: tuple[MetricsServer, Snapshots]) -> None:
    metrics, _ = server
    status, content_type, body = get(metrics, "/metrics", method="HEAD")
    assert (status, content_type, body) == (200, CONTENT_TYPE, "")


@pytest.mark.parametrize("path", ["/", "/metrics/extra", "/status", "/metricsx"])
def test_other_paths_are_not_found(server: tuple[MetricsServer, Snapshots], path: str) -> None:
    metrics, snapshots = server
    status, _, _ = get(metrics, path)
    assert status == 404
    assert snapshots.calls == 0


def test_a_failing_snapshot_answers_500_and_the_server_carries_on(
    server: tuple[MetricsServer, Snapshots],
) -> None:
    metrics, snapshots = server
    snapshots.fail = True
    status, _, body = get(metrics, "/metrics")
    assert status == 500
    assert "counters segment is gone" in body
    assert metrics.render_failures == 1
    snapshots.fail = False
    status, _, _ = get(metrics, "/metrics")
    assert status == 200


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.1", "", "::", "example.com"])
def test_non_loopback_bind_is_refused_without_allow_remote(host: str) -> None:
    with pytest.raises(ValueError, match="not a loopback address"):
        MetricsServer(dict, host=host, port=0)


def test_allow_remote_permits_a_wildcard_bind() -> None:
    # Binds the wildcard address on an ephemeral port only to learn it works; talks to loopback.
    metrics = MetricsServer(
        lambda: {"node.state": 2},
        host="0.0.0.0",
        port=0,
        allow_remote=True,
        shutdown_poll_s=SHUTDOWN_POLL_S,
    )
    with metrics:
        status, _, body = get(metrics, "/metrics")
    assert status == 200
    assert "seqd_node_state 2" in body


def test_ipv6_loopback_is_served() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this Python")
    metrics = MetricsServer(
        lambda: {"node.state": 2}, host="::1", port=0, shutdown_poll_s=SHUTDOWN_POLL_S
    )
    try:
        metrics.start()
    except OSError as error:
        pytest.skip(f"cannot bind ::1 here: {error}")
    try:
        connection = http.client.HTTPConnection("::1", metrics.port, timeout=HTTP_TIMEOUT_S)
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        assert response.status == 200
        assert "seqd_node_state 2" in response.read().decode()
        connection.close()
    finally:
        metrics.stop()


def test_port_in_use_is_reported_with_what_to_do(server: tuple[MetricsServer, Snapshots]) -> None:
    metrics, _ = server
    second = MetricsServer(dict, host="127.0.0.1", port=metrics.port)
    with pytest.raises(OSError, match="metrics port"):
        second.start()


def test_stop_closes_the_port_and_is_idempotent() -> None:
    metrics = MetricsServer(dict, host="127.0.0.1", port=0, shutdown_poll_s=SHUTDOWN_POLL_S)
    metrics.start()
    port = metrics.port
    metrics.stop()
    metrics.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=HTTP_TIMEOUT_S).close()


def test_full_disk_state_is_a_documented_gauge_and_its_refusals_a_counter() -> None:
    text = render_prometheus({"journal.disk_full": 1, "journal.free_bytes": 4096, "errors.disk_full": 7})
    families = parse_exposition(text)
    assert families["seqd_journal_disk_full"] == ("gauge", ["seqd_journal_disk_full 1"])
    assert families["seqd_journal_free_bytes"][0] == "gauge"
    assert families["seqd_errors_disk_full_total"][0] == "counter"
    assert "# HELP seqd_journal_disk_full Journal disk: 0 room, 1 short, 2 full (short: new commands refused with disk_full" in text


def test_a_cluster_node_serves_last_contacts_elections_step_downs_and_peer_refusals() -> None:
    """Issue 12: what the error log counts (elections, step-downs, peer refusals) and when each
    member was last heard from are served, the contacts labelled by the member's node number."""
    node = {
        **SNAPSHOT, "raft.role": 0, "raft.leader": 2,
        "raft.peer1.node": 2, "raft.peer1.last_contact_ms": 1_700_000_000_000,
        "raft.peer2.node": 3, "raft.peer2.last_contact_ms": 0,
        "raft.elections": 3, "raft.step_downs": 1, "errors.peer_refused": 5,
    }  # fmt: skip
    families = parse_exposition(render_prometheus(node, labels={"node": "n1"}))
    assert families["seqd_raft_follower_last_contact_ms"][1] == [
        'seqd_raft_follower_last_contact_ms{node="n1",follower="2"} 1700000000000',
        'seqd_raft_follower_last_contact_ms{node="n1",follower="3"} 0',
    ]  # fmt: skip
    assert families["seqd_raft_elections_total"] == ("counter", ['seqd_raft_elections_total{node="n1"} 3'])
    assert families["seqd_raft_step_downs_total"][1] == ['seqd_raft_step_downs_total{node="n1"} 1']
    assert families["seqd_errors_peer_refused_total"][1] == ['seqd_errors_peer_refused_total{node="n1"} 5']


def test_a_cluster_node_serves_its_forward_streams_dropped_resent_broken_and_refused() -> None:
    """Issue 11: the forward stream's faults are served as counters (they only grow), so an
    operator can alert on a follower's forwards dropped and restarted or a leader's refusals."""
    node = {
        **SNAPSHOT, "raft.role": 0, "raft.forwards_dropped": 17, "raft.forwards_resent": 230,
        "raft.forward_streams_broken": 3, "raft.forward_streams_refused": 1,
    }  # fmt: skip
    families = parse_exposition(render_prometheus(node, labels={"node": "n1"}))
    assert families["seqd_raft_forwards_dropped_total"] == ("counter", ['seqd_raft_forwards_dropped_total{node="n1"} 17'])
    assert families["seqd_raft_forwards_resent_total"] == ("counter", ['seqd_raft_forwards_resent_total{node="n1"} 230'])
    assert families["seqd_raft_forward_streams_broken_total"] == (
        "counter", ['seqd_raft_forward_streams_broken_total{node="n1"} 3']
    )  # fmt: skip
    assert families["seqd_raft_forward_streams_refused_total"] == (
        "counter", ['seqd_raft_forward_streams_refused_total{node="n1"} 1']
    )  # fmt: skip
