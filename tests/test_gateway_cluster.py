"""The gateway core in cluster mode (`ClusterStamping`): it proposes, the leader's replicator stamps.

The same `FakeRing` as tests/test_gateway.py stands in for the proposal ring. The Raft standing is
two plain callables here (the replicator's `raft.role` and `raft.leader` counters in the daemon).
"""

from __future__ import annotations

from sequencer import egress
from sequencer.client import protocol
from sequencer.gateway import ClusterStamping
from sequencer.record import RecordType, decode_admin
from sequencer.timers import decode_timer_fired, encode_timer_schedule
from tests.test_gateway import (
    INCARNATION,
    NODE,
    Client,
    FakeRing,
    command,
    make_gateway,
    open_session,
)


class Standing:
    """What the replicator's counters say: this node's Raft standing and the leader's number."""

    def __init__(self, leading: bool, leader_number: int) -> None:
        self.is_leading = leading
        self.leader_number = leader_number

    def policy(self, names: dict[int, str] | None = None) -> ClusterStamping:
        return ClusterStamping(
            lambda: self.leader_number, lambda: self.is_leading, names if names is not None else {1: NODE}
        )


def test_cluster_records_carry_index_zero_and_term_zero_for_the_leaders_replicator_to_stamp():
    ring = FakeRing()
    gateway = make_gateway(ring, last_index=41, stamping=Standing(True, 1).policy())
    assert gateway.sequence_node_start(1_000)
    client = open_session(gateway, now_ns=2_000)
    client.send(command(1, b"a"), command(2, b"bb"))
    assert gateway.process(client.session, 3_000) == 2
    assert gateway.request_snapshot(4_000)
    gateway.close_session(client.session, 5_000)
    records = ring.records()
    assert [record.type for record in records] == [
        RecordType.ADMIN, RecordType.SESSION_OPEN, RecordType.COMMAND, RecordType.COMMAND,
        RecordType.SNAPSHOT, RecordType.SESSION_CLOSE,
    ]  # fmt: skip
    assert {(record.index, record.term) for record in records} == {(0, 0)}
    assert gateway.next_index == 0
    # The sequencer's clock still stamps the time (never backwards): the replicator keeps it
    # unless the log's last timestamp is later.
    assert [record.timestamp_ns for record in records] == [1_000, 2_000, 3_000, 3_000, 4_000, 5_000]
    assert decode_admin(records[0].payload)["incarnation"] == INCARNATION


def test_a_follower_keeps_due_timers_and_fires_them_once_it_leads():
    ring = FakeRing()
    standing = Standing(False, 2)
    gateway = make_gateway(ring, stamping=standing.policy())
    gateway.route_egress([(int(egress.EgressKind.TIMER_SCHEDULE), memoryview(encode_timer_schedule(9, 500)))], [])
    assert gateway.fire_due_timers(1_000)  # nothing to retry: a follower does not fire
    assert ring.records() == []
    assert gateway.timers.next_deadline_ns() == 500  # still armed, for the moment it leads
    standing.is_leading = True
    assert gateway.fire_due_timers(1_001)
    (fired,) = ring.records()
    assert fired.type == RecordType.TIMER_FIRED and (fired.index, fired.term) == (0, 0)
    assert decode_timer_fired(fired.payload) == (9, 500)
    assert gateway.timers.next_deadline_ns() is None


def test_only_the_leader_requests_automatic_snapshots_counting_the_log_its_blp_applied():
    ring = FakeRing()
    standing = Standing(False, 2)
    gateway = make_gateway(ring, stamping=standing.policy(), snapshot_every_records=100, snapshot_every_bytes=10_000)
    client = open_session(gateway)
    client.send(*(command(request_id) for request_id in range(1, 150)))
    gateway.process(client.session, 2_000)  # this node's own commands do not count in a cluster
    assert ring.of_type(RecordType.SNAPSHOT) == []

    def snapshots() -> int:
        return len(ring.of_type(RecordType.SNAPSHOT))

    # A follower requests none, however much it applies (other nodes' commands included).
    assert not gateway.log_applied(3_000, applied_index=500, applied_position=5_000, snapshot_index=0)
    standing.is_leading = True  # elected: it counts from here
    assert not gateway.log_applied(3_001, applied_index=599, applied_position=5_500, snapshot_index=0)
    assert gateway.log_applied(3_002, applied_index=600, applied_position=5_600, snapshot_index=0)
    assert snapshots() == 1
    assert not gateway.log_applied(3_003, applied_index=650, applied_position=6_000, snapshot_index=0)
    # A snapshot written at 660 (another leader's request, say) restarts the count there.
    assert not gateway.log_applied(3_004, applied_index=740, applied_position=6_500, snapshot_index=660)
    assert gateway.log_applied(3_005, applied_index=760, applied_position=6_600, snapshot_index=660)
    # Bytes count too: ring bytes applied since the last request.
    assert gateway.log_applied(3_006, applied_index=770, applied_position=16_600, snapshot_index=660)
    assert snapshots() == 3
    standing.is_leading = False
    assert gateway.request_snapshot(4_000)  # `seqd snapshot` on a follower: forwarded like any record
    assert snapshots() == 4


def test_welcome_names_the_leader_the_replicator_reports():
    standing = Standing(False, 2)
    gateway = make_gateway(FakeRing(), stamping=standing.policy({1: NODE, 2: "east"}))
    client = Client()
    client.send(protocol.Hello(client_id=5))
    gateway.process(client.session, 1_000)
    (welcome,) = client.received()
    assert isinstance(welcome, protocol.Welcome)
    assert (welcome.node, welcome.leader) == (NODE, "east")
    standing.leader_number = 0  # an election is under way
    assert gateway.stamping.leader is None
    standing.leader_number = 3  # a member whose name this node's config does not give
    assert gateway.stamping.leader == "3"
