"""The query side's sans-I/O parts: the replica frames in the codec, the subscription's resume
point (`sequencer.client.replica`), query handlers and `run_query` (`sequencer.follow`)."""

from __future__ import annotations

import msgspec
import pytest

from sequencer.apps.ledger import Ledger
from sequencer.client.protocol import (
    Answer,
    Command,
    Connection,
    Error,
    Hello,
    Item,
    ProtocolError,
    Query,
    Service,
    Side,
    Subscribe,
    Welcome,
)
from sequencer.client.replica import ItemKind, ReplicaSession, SubscriptionError
from sequencer.follow import QueryFailure, run_query
from sequencer.state_machine import Rejected, StateMachine, query


class Replica:
    """The server end of one connection, driven by hand."""

    def __init__(self, client: ReplicaSession) -> None:
        self.client = client
        self.connection = Connection(Side.SERVER, Service.REPLICA)
        client.begin_attempt()
        client.connection_made()
        self.received = self.take()
        self.send(Welcome(session_id=0, node="n1", frame_bytes_max=1 << 20, applied_index=9))
        self.received += self.take()

    def take(self) -> list[object]:
        self.connection.receive_data(bytes(self.client.outgoing))
        self.client.outgoing.clear()
        return list(self.connection.next_frames())

    def send(self, *frames: object) -> None:
        out = bytearray()
        for frame in frames:
            self.connection.send_into(out, frame)  # type: ignore[arg-type]
        self.client.receive_data(bytes(out))


def event(index: int, payload: bytes) -> Item:
    return Item(index, 1000 + index, ItemKind.EVENT, 0, 1, payload)


def test_a_resumed_subscription_drops_exactly_the_items_of_its_index_already_taken() -> None:
    client = ReplicaSession(7, ["/r0", "/r1"], subscribe=(5, False))
    first = Replica(client)
    assert first.received[1] == Subscribe(from_index=5, records=False)
    first.send(event(5, b"a"), event(6, b"b"), event(6, b"c"), event(7, b"d"))
    taken = [client.take_item() for _ in range(2)]  # index 5, and the first of index 6
    assert [item.payload for item in taken] == [b"a", b"b"]
    assert (client.resume_index, client.taken_at_resume_index) == (6, 1)
    client.connection_lost()  # "c" and "d" were received, not taken: they come again
    second = Replica(client)
    assert second.received[1] == Subscribe(from_index=6, records=False)
    second.send(event(6, b"b"), event(6, b"c"), event(7, b"d"), event(8, b"e"))
    rest = [client.take_item().payload for _ in range(3)]
    assert rest == [b"c", b"d", b"e"], "no item lost, none twice"


def test_replicas_are_tried_in_turn_starting_from_the_clients_own() -> None:
    client = ReplicaSession(3, ["/r0", "/r1", "/r2"], subscribe=(1, False))
    assert [client.begin_attempt() for _ in range(4)] == ["/r0", "/r1", "/r2", "/r0"]
    other = ReplicaSession(4, ["/r0", "/r1", "/r2"])
    assert other.begin_attempt() == "/r1"


def test_a_retryable_error_reconnects_and_a_retention_error_ends_the_subscription() -> None:
    client = ReplicaSession(1, ["/r0"], subscribe=(1, False))
    replica = Replica(client)
    with pytest.raises(ConnectionResetError, match="subscriber_too_slow"):
        replica.send(Error(code="subscriber_too_slow", message="read faster"))
    client.connection_lost()
    replica = Replica(client)
    with pytest.raises(SubscriptionError) as ended:
        replica.send(Error(code="index_below_retention", message="the oldest index that can be served is 40"))
    assert ended.value.code == "index_below_retention"


def test_each_socket_refuses_the_other_services_frames_naming_where_they_go() -> None:
    node = Connection(Side.SERVER)
    client = Connection(Side.CLIENT, Service.REPLICA)
    node.receive_data(client.send(Hello(client_id=1)) + client.send(Query(query_id=1, name="balance")))
    assert isinstance(node.next_frames()[0], Hello)
    with pytest.raises(ProtocolError, match="query replica's socket") as refused:
        node.next_frames()
    assert refused.value.code == "unexpected_kind"
    replica = Connection(Side.SERVER, Service.REPLICA)
    node_client = Connection(Side.CLIENT)
    replica.receive_data(node_client.send(Hello(client_id=1)) + node_client.send(Command(1, 0, 1, b"x")))
    replica.next_frames()
    with pytest.raises(ProtocolError, match="node's socket"):
        replica.next_frames()


def test_item_and_answer_frames_round_trip() -> None:
    server = Connection(Side.SERVER, Service.REPLICA)
    client = Connection(Side.CLIENT, Service.REPLICA)
    server.receive_data(client.send(Hello(client_id=1)))
    server.next_frames()
    out = bytearray()
    server.send_into(out, Welcome(session_id=0, node="n1", frame_bytes_max=1 << 20))
    item = Item(2**63 - 1, 2**62, ItemKind.RECORD, 8, 65535, b"\x01" * 100)
    server.send_into(out, item)
    answer = Answer(query_id=3, index=4, result=msgspec.Raw(msgspec.msgpack.encode([1, "x"])))
    server.send_into(out, answer)
    client.receive_data(bytes(out))
    _welcome, got_item, got_answer = client.next_frames()
    assert got_item == item
    assert isinstance(got_answer, Answer) and msgspec.msgpack.decode(got_answer.result) == [1, "x"]


def test_run_query_calls_the_handler_and_names_every_refusal() -> None:
    ledger = Ledger()
    handlers = Ledger.query_handlers()
    assert msgspec.msgpack.decode(run_query(ledger, handlers, "accounts", {})) == []
    cases = {
        ("no_such", ()): "unknown_query",
        ("balance", ("acount",)): "bad_query_args",
        ("balance", ("account",)): "unknown_account",  # the app's Rejected code
    }
    for (name, keys), code in cases.items():
        with pytest.raises(QueryFailure) as failure:
            run_query(ledger, handlers, name, dict.fromkeys(keys, "x"))
        assert failure.value.code == code, (name, failure.value)

    class Broken(Ledger):
        @query("crash")
        def crash(self) -> int:
            raise KeyError("oops")

    with pytest.raises(QueryFailure) as crashed:
        run_query(Broken(), Broken.query_handlers(), "crash", {})
    assert crashed.value.code == "query_failed" and "KeyError" in crashed.value.message


def test_two_handlers_may_not_declare_one_query_name() -> None:
    class Twice(StateMachine):
        @query("x")
        def first(self) -> int:
            return 1

        @query("x")
        def second(self) -> int:
            raise Rejected("never")

    with pytest.raises(TypeError, match="query 'x' is declared by both"):
        Twice.query_handlers()
