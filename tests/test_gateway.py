"""The gateway core (`sequencer.gateway`) without processes: frames in, records and bytes out.

A `FakeRing` stands in for the log ring (a bytearray per claimed record, and a room bound for
backpressure) and a client-side codec speaks to each session. The daemon-level behaviour of the
same rules is checked over real sockets by tests/test_conformance*.py and tests/test_daemon_*.py.
"""

from __future__ import annotations

import itertools
from typing import Any, NamedTuple

import msgspec
import pytest

from daemon import config as daemon_config
from daemon.roles.sequencer import RULES_ASK_AGAIN_S
from sequencer import egress
from sequencer.client import protocol
from sequencer.gateway import (
    IN_FLIGHT_MAX,
    NODE_NUMBER_MAX,
    SESSION_ID_COUNTER_BITS,
    SESSION_ID_INCARNATION_BITS,
    Gateway,
    GatewayConfig,
    GatewaySession,
    Report,
    SingleNodeStamping,
    Stamp,
    StampingPolicy,
    admission_refusal,
    next_session_id,
    session_id_base,
)
from sequencer.processor import SAVED_REPLIES_MAX
from sequencer.record import (
    ADMIN_RULES_VERSION,
    COMMAND_PREFIX,
    DAEMON_RECORD_VERSION,
    RECORD_TAIL,
    RecordType,
    decode_admin,
    decode_session_open,
    split_frame_type,
)
from sequencer.rules_versions import RULES_VERSION, RulesAsks
from sequencer.timers import decode_timer_fired, encode_timer_cancel, encode_timer_schedule

NODE = "n1"
INCARNATION = 0xABCDEF
COMMAND_BYTES_MAX = 100
VERSION_MAX = 2


class Record(NamedTuple):
    type: int
    version: int
    index: int
    term: int
    timestamp_ns: int
    session_id: int
    request_id: int
    payload: bytes


class FakeRing:
    """The log ring as the gateway sees it: `claim` gives a view to fill, or None when full."""

    def __init__(self, room: int | None = None) -> None:
        self.room = room  # records that still fit; None: no bound
        self.claims: list[tuple[int, bytearray]] = []

    def claim(self, length: int, frame_type: int) -> memoryview | None:
        if self.room is not None:
            if self.room == 0:
                return None
            self.room -= 1
        buffer = bytearray(length)
        self.claims.append((frame_type, buffer))
        return memoryview(buffer)

    def records(self) -> list[Record]:
        found = []
        for frame_type, buffer in self.claims:
            record_type, version = split_frame_type(frame_type)
            tail = RECORD_TAIL.unpack_from(buffer, 0)
            found.append(Record(record_type, version, *tail, bytes(buffer[RECORD_TAIL.size :])))
        return found

    def of_type(self, record_type: RecordType) -> list[Record]:
        return [record for record in self.records() if record.type == record_type]


class Client:
    """A client's end of one session: its own codec, bytes straight into the gateway's session."""

    def __init__(self) -> None:
        self.codec = protocol.Connection(protocol.Side.CLIENT)
        self.session = GatewaySession()

    def send(self, *frames: protocol.Frame) -> None:
        self.session.connection.receive_data(b"".join(self.codec.send(frame) for frame in frames))

    def send_bytes(self, data: bytes) -> None:
        self.session.connection.receive_data(data)

    def received(self) -> list[protocol.Frame]:
        out = self.session.out
        if out:
            self.codec.receive_data(bytes(out))
            out.clear()
        return self.codec.next_frames()


def make_gateway(
    ring: FakeRing,
    reports: list[tuple[Report, str, str, Any]] | None = None,
    *,
    stamping: StampingPolicy | None = None,
    last_index: int = 10,
    last_timestamp_ns: int = 0,
    **config: Any,
) -> Gateway[GatewaySession]:
    settings: dict[str, Any] = {
        "node_name": NODE, "node_number": 1, "incarnation": INCARNATION,
        "command_bytes_max": COMMAND_BYTES_MAX, "command_version_max": VERSION_MAX,
        "sessions_max": 8,
    }  # fmt: skip
    settings.update(config)
    sink = reports if reports is not None else []
    return Gateway(
        GatewayConfig(**settings),
        stamping or SingleNodeStamping(3, NODE),
        ring.claim,
        lambda kind, key, message, error: sink.append((kind, key, message, error)),
        last_index=last_index,
        last_timestamp_ns=last_timestamp_ns,
    )


def open_session(gateway: Gateway[GatewaySession], now_ns: int = 1_000, **hello: Any) -> Client:
    client = Client()
    client.send(protocol.Hello(client_id=hello.pop("client_id", 77), **hello))
    gateway.process(client.session, now_ns)
    welcome = client.received()
    assert len(welcome) == 1 and isinstance(welcome[0], protocol.Welcome), welcome
    return client


def command(request_id: int, payload: bytes = b"cmd", acked_request_id: int = 0, version: int = 1) -> protocol.Command:
    return protocol.Command(request_id, acked_request_id, version, payload)


def rejection(frame: protocol.Frame) -> tuple[str, str]:
    assert isinstance(frame, protocol.Reply), frame
    assert frame.status == protocol.ReplyStatus.REJECTED and frame.index == 0, frame
    return protocol.decode_rejection(frame.payload)


# -- stamping ----------------------------------------------------------------------------------


def test_records_are_stamped_gapless_from_the_recovered_index_with_the_recovered_term():
    ring = FakeRing()
    gateway = make_gateway(ring, last_index=41, stamping=SingleNodeStamping(7, NODE))
    client = open_session(gateway)
    client.send(command(1, b"a"), command(2, b"bb"))
    assert gateway.process(client.session, 2_000) == 2
    records = ring.records()
    assert [record.index for record in records] == [42, 43, 44]
    assert {record.term for record in records} == {7}
    assert [record.type for record in records] == [RecordType.SESSION_OPEN, RecordType.COMMAND, RecordType.COMMAND]
    assert records[0].version == DAEMON_RECORD_VERSION
    opened = decode_session_open(records[0].payload)
    assert (opened.client_id, opened.node) == (77, NODE)
    first = records[1]
    assert (first.session_id, first.request_id) == (client.session.session_id, 1)
    assert COMMAND_PREFIX.unpack_from(first.payload)[0] == 0  # acked_request_id
    assert first.payload[COMMAND_PREFIX.size :] == b"a"
    assert gateway.next_index == 45


def test_a_new_node_stamps_term_one():
    ring = FakeRing()
    gateway = make_gateway(ring, stamping=SingleNodeStamping(0, NODE))
    open_session(gateway)
    assert ring.records()[0].term == 1


def test_timestamps_never_go_backwards_when_the_clock_does():
    ring = FakeRing()
    gateway = make_gateway(ring, last_timestamp_ns=500)
    client = open_session(gateway, now_ns=400)  # the clock is behind the journal's last stamp
    for request_id, now_ns in enumerate([1_000, 900, 1_100, 50], start=1):
        client.send(command(request_id))
        gateway.process(client.session, now_ns)
    assert [record.timestamp_ns for record in ring.records()] == [500, 1_000, 1_000, 1_100, 1_100]
    assert gateway.last_timestamp_ns == 1_100


def test_a_timer_fire_is_stamped_at_or_after_its_deadline_even_with_a_clock_behind():
    ring = FakeRing()
    gateway = make_gateway(ring, last_timestamp_ns=5_000)
    gateway.route_egress([(egress.EgressKind.TIMER_SCHEDULE, memoryview(encode_timer_schedule(1, 4_000)))], [])
    assert gateway.fire_due_timers(4_500)
    (fired,) = ring.records()
    assert fired.timestamp_ns == 5_000 >= 4_000


class TermStartingPolicy(StampingPolicy):
    """A leader-like policy (the seam cluster mode fills): a new term starts at a Raft index."""

    def __init__(self, term: int, term_start_index: int) -> None:
        self.stamp = Stamp(term, term_start_index)
        self.started: list[Stamp] = []

    @property
    def leader(self) -> str:
        return "n2"

    def begin(self, next_index: int) -> Stamp:
        return self.stamp

    def term_started(self, stamp: Stamp) -> None:
        self.started.append(stamp)
        self.stamp = Stamp(stamp.term)


def test_a_policy_starting_a_term_gets_a_term_start_record_before_anything_else():
    ring = FakeRing()
    policy = TermStartingPolicy(term=5, term_start_index=11)
    gateway = make_gateway(ring, stamping=policy, last_index=10)
    client = Client()
    client.send(protocol.Hello(client_id=1))
    gateway.process(client.session, 1_000)
    (welcome,) = client.received()
    assert isinstance(welcome, protocol.Welcome) and welcome.leader == "n2"
    records = ring.records()
    assert [(record.type, record.index, record.term) for record in records] == [
        (RecordType.TERM_START, 11, 5), (RecordType.SESSION_OPEN, 12, 5),
    ]  # fmt: skip
    assert policy.started == [Stamp(5, 11)]


def test_a_term_start_that_finds_the_ring_full_holds_the_whole_batch():
    ring = FakeRing(room=0)
    policy = TermStartingPolicy(term=2, term_start_index=11)
    gateway = make_gateway(ring, stamping=policy, last_index=10)
    client = Client()
    client.send(protocol.Hello(client_id=1))
    gateway.process(client.session, 1_000)
    assert client.session.backlog is not None and ring.records() == [] and policy.started == []
    ring.room = None
    gateway.process(client.session, 1_000)
    assert [record.type for record in ring.records()] == [RecordType.TERM_START, RecordType.SESSION_OPEN]


# -- admission -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (command(0), protocol.RejectionCode.BAD_REQUEST_ID),
        (command(1, b"x" * (COMMAND_BYTES_MAX + 1)), protocol.RejectionCode.COMMAND_TOO_LARGE),
        (command(1, version=0), protocol.RejectionCode.UNKNOWN_VERSION),
        (command(1, version=VERSION_MAX + 1), protocol.RejectionCode.UNKNOWN_VERSION),
        (command(IN_FLIGHT_MAX + 1), protocol.RejectionCode.WINDOW_EXCEEDED),
        # The documented order: the first failed check names the code.
        (command(0, b"x" * (COMMAND_BYTES_MAX + 1), version=0), protocol.RejectionCode.BAD_REQUEST_ID),
        (command(IN_FLIGHT_MAX + 1, b"x" * (COMMAND_BYTES_MAX + 1)), protocol.RejectionCode.COMMAND_TOO_LARGE),
    ],
)
def test_a_command_refused_at_the_gateway_gets_its_code_at_index_zero_and_never_enters_the_log(frame, code):
    ring = FakeRing()
    reports: list[tuple[Report, str, str, Any]] = []
    gateway = make_gateway(ring, reports)
    client = open_session(gateway)
    records_before = len(ring.records())
    client.send(frame, command(1, b"ok"))
    assert gateway.process(client.session, 2_000) == 1  # the refusal costs only its command
    refused, = [frame for frame in client.received()]
    assert rejection(refused)[0] == code
    assert refused.request_id == frame.request_id
    assert [record.payload[COMMAND_PREFIX.size :] for record in ring.records()[records_before:]] == [b"ok"]
    assert (Report.CLIENT_ERROR, f"client.{code}") in [(kind, key) for kind, key, _, _ in reports]
    assert not client.session.closing  # a refusal is not a protocol error: the session goes on


def test_the_window_admits_exactly_acked_plus_in_flight_max():
    ring = FakeRing()
    gateway = make_gateway(ring)
    client = open_session(gateway)
    client.send(command(100 + IN_FLIGHT_MAX, acked_request_id=100), command(101 + IN_FLIGHT_MAX, acked_request_id=100))
    assert gateway.process(client.session, 2_000) == 1
    (refused,) = client.received()
    assert rejection(refused)[0] == protocol.RejectionCode.WINDOW_EXCEEDED
    assert refused.request_id == 101 + IN_FLIGHT_MAX
    assert IN_FLIGHT_MAX <= SAVED_REPLIES_MAX  # every reply in the window is kept for a resend


def test_admission_refusal_admits_what_the_inline_check_admits():
    assert admission_refusal(command(1, b"x" * COMMAND_BYTES_MAX, version=VERSION_MAX), COMMAND_BYTES_MAX, VERSION_MAX) is None
    assert admission_refusal(command(IN_FLIGHT_MAX), COMMAND_BYTES_MAX, VERSION_MAX) is None


def test_a_full_disk_refuses_a_new_session_with_the_retryable_disk_full_error():
    ring = FakeRing()
    reports: list[tuple[Report, str, str, Any]] = []
    gateway = make_gateway(ring, reports)
    client = Client()
    client.send(protocol.Hello(client_id=1))
    gateway.process(client.session, 1_000, disk_free_bytes=4096)
    (error,) = client.received()
    assert isinstance(error, protocol.Error) and error.fatal
    assert error.code == protocol.ErrorCode.DISK_FULL and "4096 bytes free" in error.message
    assert client.session.closing and ring.records() == [] and not gateway.sessions
    assert [kind for kind, *_ in reports] == [Report.DISK_FULL]


def test_a_full_disk_refuses_commands_of_an_open_session_and_closes_it():
    ring = FakeRing()
    gateway = make_gateway(ring)
    client = open_session(gateway)
    records_before = len(ring.records())
    client.send(command(1))
    assert gateway.process(client.session, 2_000, disk_free_bytes=0) == 0
    (error,) = client.received()
    assert isinstance(error, protocol.Error) and error.code == protocol.ErrorCode.DISK_FULL
    assert len(ring.records()) == records_before and client.session.closing


def test_a_protocol_error_gets_an_error_frame_and_closes_only_that_session():
    ring = FakeRing()
    reports: list[tuple[Report, str, str, Any]] = []
    gateway = make_gateway(ring, reports)
    client = open_session(gateway)
    client.send_bytes(protocol.FRAME_HEADER.pack(0, 99, protocol.PROTOCOL_VERSION, 0))  # unknown kind
    gateway.process(client.session, 2_000)
    (error,) = client.received()
    assert isinstance(error, protocol.Error) and error.code == protocol.ErrorCode.UNKNOWN_KIND
    assert client.session.closing
    assert [(kind, key) for kind, key, _, _ in reports] == [(Report.PROTOCOL_ERROR, "protocol.unknown_kind")]
    assert gateway.process(client.session, 3_000) == 0  # nothing more from it counts


def test_ping_is_answered_and_a_clients_fatal_error_closes_the_session():
    ring = FakeRing()
    reports: list[tuple[Report, str, str, Any]] = []
    gateway = make_gateway(ring, reports)
    client = open_session(gateway)
    after = protocol.Connection(protocol.Side.CLIENT)  # our codec sends nothing after a fatal ERROR
    after.send(protocol.Hello(client_id=77))
    client.send(protocol.Ping(nonce=9), protocol.Error(code="bye", message="x" * 1000))
    client.send_bytes(after.send(command(1)))
    assert gateway.process(client.session, 2_000) == 0  # nothing after its fatal ERROR counts
    reader = protocol.Connection(protocol.Side.CLIENT)  # the client's codec is closed for good
    reader.receive_data(bytes(client.session.out))
    assert reader.next_frames() == [protocol.Pong(nonce=9)]
    assert client.session.closing
    ((kind, key, message, _),) = reports
    assert (kind, key) == (Report.CLIENT_ERROR, "client.error_frame") and len(message) < 400


def test_a_session_that_was_failed_gets_no_second_error_and_codec_misuse_is_not_hidden():
    ring = FakeRing()
    gateway = make_gateway(ring)
    client = Client()
    gateway.fail(client.session, protocol.ErrorCode.UNAVAILABLE, "full")
    gateway.fail(client.session, protocol.ErrorCode.UNAVAILABLE, "again")  # closing: nothing more
    assert [frame.message for frame in client.received()] == ["full"]  # type: ignore[union-attr]
    # A fatal ERROR sent around the gateway (so it does not know the session is closing) makes
    # the codec refuse the next one: the misuse surfaces instead of being swallowed.
    other = Client()
    other.session.connection.send(protocol.Error(code="unavailable", message="x", fatal=True))
    with pytest.raises(protocol.LocalProtocolError):
        gateway.fail(other.session, protocol.ErrorCode.UNAVAILABLE, "twice")


def test_connections_are_refused_when_draining_or_at_sessions_max():
    ring = FakeRing()
    gateway = make_gateway(ring, sessions_max=2)
    assert gateway.connection_refusal() is None
    open_session(gateway)
    open_session(gateway)
    assert "sessions_max=2" in (gateway.connection_refusal() or "")
    gateway.accepting = False
    assert "draining" in (gateway.connection_refusal() or "")


# -- backpressure ---------------------------------------------------------------------------------


def test_a_full_ring_holds_the_rest_of_the_batch_in_order_and_loses_no_index():
    ring = FakeRing(room=2)  # SESSION_OPEN and one command
    gateway = make_gateway(ring)
    client = open_session(gateway)
    client.send(*(command(request_id) for request_id in range(1, 6)))
    assert gateway.process(client.session, 2_000) == 1
    assert client.session.backlog is not None and len(client.session.backlog) == 4
    ring.room = None
    assert gateway.process(client.session, 3_000) == 4
    assert client.session.backlog is None
    commands = ring.of_type(RecordType.COMMAND)
    assert [record.request_id for record in commands] == [1, 2, 3, 4, 5]
    assert [record.index for record in ring.records()] == list(range(11, 17))


def test_a_hello_that_finds_the_ring_full_opens_the_session_later_with_the_next_id():
    ring = FakeRing(room=0)
    gateway = make_gateway(ring)
    client = Client()
    client.send(protocol.Hello(client_id=1), command(1))
    gateway.process(client.session, 1_000)
    assert client.session.session_id == 0 and client.received() == []
    ring.room = None
    assert gateway.process(client.session, 2_000) == 1
    assert [type(frame) for frame in client.received()] == [protocol.Welcome]
    assert client.session.session_id == session_id_base(1, INCARNATION)  # counter 0: not consumed


def test_a_close_that_finds_the_ring_full_waits_and_closes_in_order():
    ring = FakeRing()
    gateway = make_gateway(ring)
    first, second = open_session(gateway), open_session(gateway)
    ring.room = 0
    gateway.close_session(first.session, 5_000)
    gateway.close_session(second.session, 5_000)
    assert gateway.waiting and not gateway.sessions
    assert not gateway.retry(6_000)
    ring.room = None
    assert gateway.retry(7_000) and not gateway.waiting
    closes = ring.of_type(RecordType.SESSION_CLOSE)
    assert [record.session_id for record in closes] == [first.session.session_id, second.session.session_id]


# -- sessions ------------------------------------------------------------------------------------


def test_session_ids_carry_node_number_and_incarnation_above_a_counter():
    base = session_id_base(NODE_NUMBER_MAX, 0x12_ABCDEF)  # only the incarnation's low 24 bits
    assert base >> (SESSION_ID_INCARNATION_BITS + SESSION_ID_COUNTER_BITS) == NODE_NUMBER_MAX
    assert (base >> SESSION_ID_COUNTER_BITS) & ((1 << SESSION_ID_INCARNATION_BITS) - 1) == 0xABCDEF
    assert base & ((1 << SESSION_ID_COUNTER_BITS) - 1) == 0
    assert base < 1 << 64
    assert NODE_NUMBER_MAX == daemon_config.NODE_NUMBER_MAX  # the config's bound is the id's


def test_sessions_get_consecutive_ids_from_the_counter():
    ring = FakeRing()
    gateway = make_gateway(ring, node_number=3)
    ids = [open_session(gateway).session.session_id for _ in range(3)]
    base = session_id_base(3, INCARNATION)
    assert ids == [base, base + 1, base + 2]
    assert [record.session_id for record in ring.of_type(RecordType.SESSION_OPEN)] == ids


def test_the_session_counter_wraps_within_its_bits_and_skips_ids_still_open():
    base = session_id_base(1, INCARNATION)
    counter_max = (1 << SESSION_ID_COUNTER_BITS) - 1
    assert next_session_id(base, counter_max, set()) == (base | counter_max, counter_max)
    wrapped, counter = next_session_id(base, counter_max + 1, set())
    assert wrapped == base and counter == counter_max + 1  # node and incarnation bits untouched
    assert next_session_id(base, 0, {base, base + 1}) == (base + 2, 2)


def test_welcome_carries_the_limits_the_gateway_enforces():
    ring = FakeRing()
    gateway = make_gateway(ring)
    client = Client()
    client.send(protocol.Hello(client_id=5))
    gateway.process(client.session, 1_000)
    (welcome,) = client.received()
    assert isinstance(welcome, protocol.Welcome)
    assert (welcome.session_id, welcome.node, welcome.leader) == (client.session.session_id, NODE, NODE)
    assert welcome.command_bytes_max == COMMAND_BYTES_MAX
    assert (welcome.in_flight_max, welcome.saved_replies_max) == (IN_FLIGHT_MAX, SAVED_REPLIES_MAX)
    assert welcome.frame_bytes_max == protocol.FRAME_BYTES_MAX


def test_node_start_closes_the_previous_incarnations_sessions_by_a_record():
    ring = FakeRing()
    gateway = make_gateway(ring, node_number=4)
    assert gateway.sequence_node_start(1_000)
    (record,) = ring.records()
    assert record.type == RecordType.ADMIN and record.index == 11
    assert decode_admin(record.payload) == {
        "op": "node_start", "node": NODE, "number": 4, "incarnation": INCARNATION,
        "app_version": 2, "members": [4],  # what its code knows, its cluster (itself alone)
        "rules_version": RULES_VERSION,  # the session rules its seqd applies
    }  # fmt: skip


def test_the_rules_version_ask_is_one_admin_record_and_a_full_ring_consumes_no_index():
    ring = FakeRing(room=0)
    gateway = make_gateway(ring)
    assert not gateway.sequence_rules_version(1_000, 2)  # the ring is full: asked again later
    ring.room = None
    assert gateway.sequence_rules_version(2_000, 2)
    (record,) = ring.records()
    assert (record.type, record.index, record.timestamp_ns) == (RecordType.ADMIN, 11, 2_000)
    assert decode_admin(record.payload) == {"op": ADMIN_RULES_VERSION, "version": 2}


def test_a_due_rules_version_is_asked_for_at_once_then_at_most_once_per_ask_again_interval():
    asks = RulesAsks(RULES_ASK_AGAIN_S)
    assert not asks.should_ask(0, 100.0)  # none due
    now_s, asked_at = 100.0, []
    while now_s < 100.0 + 5 * RULES_ASK_AGAIN_S:  # the sequencer's duty cycle, a fake clock
        if asks.should_ask(2, now_s):
            asks.asked_for(2, now_s)
            asked_at.append(now_s)
        now_s += 0.25
    assert asked_at[0] == 100.0  # at once
    assert len(asked_at) == 5  # then again while still due, never sooner than the interval
    assert all(later - earlier > RULES_ASK_AGAIN_S for earlier, later in itertools.pairwise(asked_at))
    assert asks.should_ask(3, now_s)  # another version due: asked for at once


# -- snapshot policy -----------------------------------------------------------------------------


def _commands_between_snapshots(ring: FakeRing) -> list[int]:
    runs, count = [], 0
    for record in ring.records():
        if record.type == RecordType.COMMAND:
            count += 1
        elif record.type == RecordType.SNAPSHOT:
            runs.append(count)
            count = 0
    return runs


def test_a_snapshot_is_sequenced_after_every_n_commands():
    ring = FakeRing()
    reports: list[tuple[Report, str, str, Any]] = []
    gateway = make_gateway(ring, reports, snapshot_every_records=3)
    client = open_session(gateway)
    for request_id in range(1, 11):
        client.send(command(request_id))
        gateway.process(client.session, 2_000)
    assert _commands_between_snapshots(ring) == [3, 3, 3]
    snapshots = ring.of_type(RecordType.SNAPSHOT)
    assert all(ring.records()[record.index - 12].type == RecordType.COMMAND for record in snapshots)
    assert [kind for kind, *_ in reports] == [Report.SNAPSHOT_REQUESTED] * 3


def test_a_snapshot_is_sequenced_after_every_n_payload_bytes():
    ring = FakeRing()
    gateway = make_gateway(ring, snapshot_every_bytes=25)
    client = open_session(gateway)
    client.send(*(command(request_id, b"x" * 10) for request_id in range(1, 8)))
    gateway.process(client.session, 2_000)
    assert _commands_between_snapshots(ring) == [3, 3]  # 30 bytes reach 25 after the third


def test_no_automatic_snapshot_when_the_policy_is_off():
    ring = FakeRing()
    gateway = make_gateway(ring)
    client = open_session(gateway)
    client.send(*(command(request_id, b"x" * 90) for request_id in range(1, 200)))
    gateway.process(client.session, 2_000)
    assert ring.of_type(RecordType.SNAPSHOT) == []


def test_a_snapshot_request_that_finds_the_ring_full_waits_for_retry():
    ring = FakeRing(room=0)
    reports: list[tuple[Report, str, str, Any]] = []
    gateway = make_gateway(ring, reports)
    assert not gateway.request_snapshot(1_000)
    assert not gateway.retry(2_000)
    assert gateway.waiting
    ring.room = None
    assert gateway.retry(3_000) and not gateway.waiting
    assert [record.type for record in ring.records()] == [RecordType.SNAPSHOT]
    assert [kind for kind, *_ in reports] == [Report.SNAPSHOT_DEFERRED, Report.SNAPSHOT_REQUESTED]


# -- timers --------------------------------------------------------------------------------------


def _timer_frames(*requests: tuple[int, int] | int) -> list[tuple[int, memoryview]]:
    frames = []
    for request in requests:
        if isinstance(request, tuple):
            frames.append((int(egress.EgressKind.TIMER_SCHEDULE), memoryview(encode_timer_schedule(*request))))
        else:
            frames.append((int(egress.EgressKind.TIMER_CANCEL), memoryview(encode_timer_cancel(request))))
    return frames


def test_due_timers_are_sequenced_in_deadline_order_and_cancelled_ones_never():
    ring = FakeRing()
    gateway = make_gateway(ring)
    assert gateway.route_egress(_timer_frames((1, 3_000), (2, 1_000), (3, 2_000), (4, 1_500), 3, (4, 2_500)), [])
    assert gateway.timers.next_deadline_ns() == 1_000
    assert gateway.fire_due_timers(2_600)
    fired = [decode_timer_fired(record.payload) for record in ring.records()]
    assert fired == [(2, 1_000), (4, 2_500)]
    assert [record.request_id for record in ring.records()] == [2, 4]  # the timer id, as before
    assert gateway.fire_due_timers(3_000)
    assert decode_timer_fired(ring.records()[-1].payload) == (1, 3_000)
    assert len(gateway.timers) == 0


def test_a_timer_fire_that_finds_the_ring_full_stays_due():
    ring = FakeRing(room=1)
    gateway = make_gateway(ring)
    gateway.route_egress(_timer_frames((1, 100), (2, 200)), [])
    assert not gateway.fire_due_timers(300)
    ring.room = None
    assert gateway.fire_due_timers(300)
    assert [decode_timer_fired(record.payload) for record in ring.records()] == [(1, 100), (2, 200)]


# -- egress fan-out -------------------------------------------------------------------------------


def _reply(session_id: int, request_id: int, payload: bytes = b"r", status: int = 0) -> tuple[int, memoryview]:
    frame = egress.encode_reply(session_id, request_id, 50 + request_id, status, 1, payload)
    return int(egress.EgressKind.REPLY), memoryview(frame)


def test_replies_go_to_their_session_and_events_to_subscribers_only():
    ring = FakeRing()
    gateway = make_gateway(ring)
    plain, subscriber = open_session(gateway, client_id=1), open_session(gateway, client_id=2, subscribe_events=True)
    event = (int(egress.EgressKind.EVENT), memoryview(egress.encode_event(60, 1, b"e")))
    dirty: list[GatewaySession] = []
    gateway.route_egress([_reply(plain.session.session_id, 1), event, _reply(subscriber.session.session_id, 2), _reply(999, 3)], dirty)
    assert dirty == [plain.session, subscriber.session]
    assert plain.received() == [protocol.Reply(1, 51, 0, 1, b"r")]
    assert subscriber.received() == [protocol.Event(60, 1, b"e"), protocol.Reply(2, 52, 0, 1, b"r")]


def test_one_output_that_cannot_be_sent_costs_only_itself():
    ring = FakeRing()
    reports: list[tuple[Report, str, str, Any]] = []
    gateway = make_gateway(ring, reports)
    client = open_session(gateway, subscribe_events=True)
    session_id = client.session.session_id
    unknown = (99, memoryview(b"\0" * 8))  # a kind this sequencer does not know
    short_event = (int(egress.EgressKind.EVENT), memoryview(b"\0" * 3))  # too short to decode
    gateway.route_egress([_reply(session_id, 1), unknown, short_event, _reply(session_id, 2)], [])
    assert [frame.request_id for frame in client.received()] == [1, 2]  # type: ignore[union-attr]
    failures = [(kind, key, type(error).__name__) for kind, key, _, error in reports]
    assert failures == [(Report.OUTPUT_ERROR, "egress.output_failed", "EgressError")] * 2


def test_a_reply_too_large_saved_by_an_older_seqd_becomes_a_reply_too_large_rejection():
    ring = FakeRing()
    reports: list[tuple[Report, str, str, Any]] = []
    gateway = make_gateway(ring, reports)
    client = open_session(gateway)
    huge = b"x" * (egress.REPLY_PAYLOAD_BYTES_MAX + 1)
    gateway.route_egress([_reply(client.session.session_id, 1, huge), _reply(client.session.session_id, 2)], [])
    replaced, following = client.received()
    assert isinstance(replaced, protocol.Reply) and replaced.status == protocol.ReplyStatus.REJECTED
    assert replaced.index == 51 and protocol.decode_rejection(replaced.payload)[0] == egress.REPLY_TOO_LARGE
    assert following == protocol.Reply(2, 52, 0, 1, b"r")
    assert [key for _, key, _, _ in reports] == ["egress.reply_too_large"]


def test_outputs_for_a_session_that_was_failed_are_dropped_quietly():
    ring = FakeRing()
    reports: list[tuple[Report, str, str, Any]] = []
    gateway = make_gateway(ring, reports)
    failed, other = open_session(gateway), open_session(gateway)
    gateway.fail(failed.session, protocol.ErrorCode.UNAVAILABLE, "going")
    failed.received()
    gateway.route_egress([_reply(failed.session.session_id, 1), _reply(other.session.session_id, 1)], [])
    assert failed.session.out == bytearray() and reports == []
    assert [frame.request_id for frame in other.received()] == [1]  # type: ignore[union-attr]


def test_an_event_omitted_reaches_every_subscriber_as_a_non_fatal_error():
    ring = FakeRing()
    gateway = make_gateway(ring)
    subscriber = open_session(gateway, subscribe_events=True)
    omitted = egress.encode_event_omitted(70, 1, egress.EVENT_PAYLOAD_BYTES_MAX + 1)
    gateway.route_egress([(int(egress.EgressKind.EVENT_OMITTED), memoryview(omitted))], [])
    (notice,) = subscriber.received()
    assert isinstance(notice, protocol.Error) and not notice.fatal and notice.code == egress.EVENT_TOO_LARGE


# -- one definition of the reply status and the rejection encoding ---------------------------------


def test_egress_and_the_protocol_share_reply_status_and_rejection_codes():
    assert egress.ReplyStatus is protocol.ReplyStatus
    assert set(egress.REJECTION_CODES) <= {code.value for code in protocol.RejectionCode}
    assert egress.reply_too_large_payload(egress.REPLY_PAYLOAD_BYTES_MAX + 1, applied=True) == protocol.encode_rejection(
        egress.REPLY_TOO_LARGE, msgspec.msgpack.decode(egress.reply_too_large_payload(egress.REPLY_PAYLOAD_BYTES_MAX + 1, applied=True))["message"]
    )


def test_in_a_cluster_a_version_the_app_knows_is_refused_until_the_log_makes_it_active():
    """Issue 16 part 3: the gateway admits commands up to the log's active app version (the
    blp's `app.version.active`), saying how to activate a newer one the app knows; the raise
    record it sequences names the cluster's members."""
    ring = FakeRing()
    gateway = make_gateway(ring, command_version_max=2, members=(1, 2, 3))
    gateway.limit_command_version(1)
    client = open_session(gateway)
    records_before = len(ring.records())
    client.send(command(1, b"new", version=2), command(2, b"old", version=1))
    assert gateway.process(client.session, 2_000) == 1
    (refused,) = client.received()
    code, message = rejection(refused)
    assert code == protocol.RejectionCode.UNKNOWN_VERSION
    assert "not made active yet (active: 1)" in message and "seqd cluster raise-version --to 2" in message
    assert gateway.sequence_raise_version(3_000, 2)
    assert decode_admin(ring.records()[-1].payload) == {"op": "raise_version", "version": 2, "members": [1, 2, 3]}
    gateway.limit_command_version(2)  # the blp applied the raise
    client.send(command(3, b"new", version=2))
    assert gateway.process(client.session, 4_000) == 1
    assert [record.payload[COMMAND_PREFIX.size :] for record in ring.records()[records_before:]
            if record.type == RecordType.COMMAND] == [b"old", b"new"]  # fmt: skip
    gateway.limit_command_version(0)  # nothing reported yet (a wiped node replaying): version 1 only
    assert gateway.command_version_max == 1
