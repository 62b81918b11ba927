"""Outputs no client frame can carry: replaced deterministically by the blp, and never able to cost
another output in the sequencer's egress drain (issue 9, "A bug that loses other clients' replies").
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable

import msgspec
import pytest

from daemon.config import COMMAND_BYTES_MAX
from daemon.harness import NodeProcess
from sequencer import snapshot as snapshots
from sequencer.apps.ledger import (
    LEDGER_SCHEMA,
    MINT,
    AccountBalance,
    Balance,
    Deposit,
    Ledger,
    ReservationExpired,
    Reserve,
    Reserved,
    TransferMade,
    Transferred,
)
from sequencer.client import Client, CommandRejected, PendingRequest
from sequencer.client.protocol import (
    FRAME_BYTES_MAX,
    Connection,
    Error,
    Hello,
    LocalProtocolError,
    Side,
    Welcome,
    decode_rejection,
    encode_rejection,
)
from sequencer.client.protocol import Event as ProtocolEvent
from sequencer.determinism import state_hash
from sequencer.egress import (
    EVENT_PAYLOAD_BYTES_MAX,
    REPLY_PAYLOAD_BYTES_MAX,
    Event,
    EventOmitted,
    Reply,
    ReplyStatus,
)
from sequencer.processor import Processor, ProcessorState
from tests.fixtures.bulky import Bulky, Count, Counted, Fill, Filled, Filler, data_bytes_for
from tests.fixtures.feeder import Feeder, feed, session_id_of
from tests.node_fixtures import DEPOSIT, node_factory, open_accounts  # noqa: F401

S1 = session_id_of(1, 1)
S2 = session_id_of(1, 2)
CLIENT_ID = 7


def largest_account_name() -> str:
    """The longest account name whose `Balance` command fits socket.command_bytes_max (about
    1 MiB): the ledger's rejection of an unknown account quotes it, so that reply cannot."""
    def command_bytes(name_bytes: int) -> int:
        return len(LEDGER_SCHEMA.encode_command(Balance("x" * name_bytes))[1])

    overhead = command_bytes(COMMAND_BYTES_MAX) - COMMAND_BYTES_MAX
    name = "x" * (COMMAND_BYTES_MAX - overhead)
    assert command_bytes(len(name)) == COMMAND_BYTES_MAX
    return name


def unknown_account_rejection_bytes(name: str) -> int:
    """The size of the REJECTED payload the ledger makes for `Balance(name)` of no account."""
    return len(encode_rejection("unknown_account", f"no account {name!r}"))


def replies(outputs: list[object]) -> list[Reply]:
    return [output for output in outputs if isinstance(output, Reply)]


def bulky_processor() -> tuple[Processor[Bulky], Feeder]:
    processor = Processor(Bulky)
    feeder = Feeder(Bulky.schema)
    feed(processor, feeder.open_session(S1, client_id=CLIENT_ID))
    return processor, feeder


# -- the limits are what a client frame carries ---------------------------------------------------


def test_the_payload_limits_are_exactly_what_a_client_reply_and_event_frame_carry() -> None:
    server = Connection(Side.SERVER)
    client = Connection(Side.CLIENT)
    server.receive_data(client.send(Hello(client_id=1)))
    server.next_frames()
    server.send(Welcome(session_id=1, node="n1", frame_bytes_max=FRAME_BYTES_MAX))
    out = bytearray()
    server.send_reply_into(out, 1, 1, ReplyStatus.OK, 1, b"r" * REPLY_PAYLOAD_BYTES_MAX)
    assert len(out) == FRAME_BYTES_MAX
    out.clear()
    server.send_event_into(out, 1, 1, b"e" * EVENT_PAYLOAD_BYTES_MAX)
    assert len(out) == FRAME_BYTES_MAX
    with pytest.raises(LocalProtocolError, match="frame_too_large"):
        server.send_reply_into(bytearray(), 1, 1, ReplyStatus.OK, 1, b"r" * (REPLY_PAYLOAD_BYTES_MAX + 1))
    with pytest.raises(LocalProtocolError, match="frame_too_large"):
        server.send_event_into(bytearray(), 1, 1, b"e" * (EVENT_PAYLOAD_BYTES_MAX + 1))


# -- the blp decides, the same on every replica -------------------------------------------------


def test_reply_too_large_becomes_a_saved_rejection_and_a_resend_gets_the_same_answer() -> None:
    processor = Processor(Ledger)
    replica = Processor(Ledger, node="n2")  # its sessions are remote: it emits no replies
    feeder = Feeder(LEDGER_SCHEMA)
    name = largest_account_name()
    records = [feeder.open_session(S1, client_id=CLIENT_ID), feeder.command(S1, 1, Balance(name))]
    for record in records:
        outputs = feed(processor, record)
        feed(replica, record)
    (reply,) = replies(outputs)
    assert (reply.request_id, reply.index, reply.status) == (1, feeder.index, ReplyStatus.REJECTED)
    code, message = decode_rejection(reply.payload)
    assert code == "reply_too_large"
    replaced_bytes = unknown_account_rejection_bytes(name)
    assert replaced_bytes > REPLY_PAYLOAD_BYTES_MAX
    assert f"the reply was {replaced_bytes} bytes, over the limit of {REPLY_PAYLOAD_BYTES_MAX}" in message
    assert "rejected the command, which changed nothing" in message
    assert processor.saved_reply_ids(CLIENT_ID) == [1]
    assert processor.replies_too_large == 1
    # Every replica replaced it the same way: the rolling hashes (over every output) and the
    # states (dedup table included) agree.
    assert replica.rolling_hash == processor.rolling_hash
    assert replica.state_hash() == processor.state_hash()

    # A resend on a new session, and one after a restore from a snapshot, get the same answer.
    restored = Processor.restore(Ledger, processor.snapshot_bytes())
    resend = [feeder.open_session(S2, client_id=CLIENT_ID), feeder.command(S2, 1, Balance(name))]
    for target in (processor, restored):
        for record in resend:
            outputs = feed(target, record)
        (again,) = replies(outputs)
        assert (again.request_id, again.index, again.status, again.payload) == (
            1, reply.index, ReplyStatus.REJECTED, reply.payload,
        )
    assert processor.replies_too_large == 1  # a resend is not applied again


def test_a_reply_at_the_frame_limit_is_sent_and_one_byte_more_is_replaced_but_the_command_stays_applied() -> None:
    processor, feeder = bulky_processor()
    encode = Bulky.schema.encode_reply
    at_limit = data_bytes_for(REPLY_PAYLOAD_BYTES_MAX, encode, Filled)
    (reply,) = replies(feed(processor, feeder.command(S1, 1, Fill(reply_bytes=at_limit))))
    assert reply.status == ReplyStatus.OK
    assert len(reply.payload) == REPLY_PAYLOAD_BYTES_MAX
    (reply,) = replies(feed(processor, feeder.command(S1, 2, Fill(reply_bytes=at_limit + 1))))
    assert reply.status == ReplyStatus.REJECTED
    code, message = decode_rejection(reply.payload)
    assert code == "reply_too_large"
    assert f"the reply was {REPLY_PAYLOAD_BYTES_MAX + 1} bytes" in message
    assert "the command was applied and its effects stand" in message
    (count,) = replies(feed(processor, feeder.command(S1, 3, Count())))
    assert Bulky.schema.decode_reply(count.version, count.payload) == Counted(2)


def test_an_event_too_large_is_replaced_in_place_by_a_marker_naming_its_index() -> None:
    processor, feeder = bulky_processor()
    at_limit = data_bytes_for(EVENT_PAYLOAD_BYTES_MAX, Bulky.schema.encode_event, Filler)
    outputs = feed(processor, feeder.command(S1, 1, Fill(event_bytes=at_limit)))
    (event,) = [output for output in outputs if isinstance(output, Event)]
    assert len(event.payload) == EVENT_PAYLOAD_BYTES_MAX
    outputs = feed(processor, feeder.command(S1, 2, Fill(event_bytes=at_limit + 1)))
    assert [type(output) for output in outputs] == [EventOmitted, Reply]
    omitted = outputs[0]
    assert isinstance(omitted, EventOmitted)
    assert (omitted.index, omitted.version, omitted.code) == (feeder.index, 1, "event_too_large")
    assert (
        f"the event published at index {feeder.index} was {EVENT_PAYLOAD_BYTES_MAX + 1} bytes, "
        f"over the limit of {EVENT_PAYLOAD_BYTES_MAX}"
    ) in omitted.message
    assert outputs[1].status == ReplyStatus.OK  # the command itself went through
    assert processor.events_too_large == 1


# -- the sequencer's egress drain: one output never costs another --------------------------------


def wait_for(predicate: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# Commands of about 1 MiB: the largest command_bytes_max, and rings and journal batches that hold it.
LARGE_COMMANDS = {
    "socket": {"command_bytes_max": COMMAND_BYTES_MAX},
    "ring": {"log_capacity_bytes": 4 << 20, "egress_capacity_bytes": 2 << 20},
    "journal": {"batch_bytes_max": 2 << 20, "segment_bytes": 8 << 20},
}


class OneEgressBatch:
    """Makes every output of the commands sequenced inside it reach the sequencer in one egress
    batch, deterministically: the blp is stopped while they are sequenced, then the sequencer is
    stopped while the blp writes all their outputs to the egress ring, then it runs again."""

    def __init__(self, node: NodeProcess) -> None:
        self.node = node
        self.blp = node.role_pid("blp")
        self.sequencer = node.role_pid("sequencer")
        self.published = 0
        self.stopped: list[int] = []

    def __enter__(self) -> OneEgressBatch:
        self.published = self.node.read_counters()["log.published.index"]
        self._stop(self.blp)
        return self

    def sequenced(self, client: Client, commands: list[object]) -> list[PendingRequest]:
        """Pipeline `commands` in one write and wait until they are in the log, so the
        sessions' commands, and so their outputs, interleave in the order of these calls."""
        pending = [client.submit(command) for command in commands]
        client.flush()
        self.published += len(commands)
        wait_for(lambda: self.node.read_counters()["log.published.index"] >= self.published, "sequencing")
        return pending

    def __exit__(self, *exc_info: object) -> None:
        try:
            if exc_info[0] is None:
                self._stop(self.sequencer)
                self._resume(self.blp)
                wait_for(
                    lambda: self.node.read_counters()["blp.applied.index"] >= self.published,
                    "the blp to apply every command",
                )
        finally:
            for pid in list(self.stopped):
                self._resume(pid)

    def _stop(self, pid: int) -> None:
        os.kill(pid, signal.SIGSTOP)
        self.stopped.append(pid)

    def _resume(self, pid: int) -> None:
        os.kill(pid, signal.SIGCONT)
        self.stopped.remove(pid)


def test_reply_too_large_in_one_egress_batch_costs_no_other_reply_or_timer(node_factory) -> None:  # noqa: F811
    """The oversized reply sits in one egress batch between replies to other pipelined requests
    on its connection, another session's replies and a timer request; all of them arrive, the
    timer fires, and the requester gets reply_too_large, again after resending."""
    node = node_factory(LARGE_COMMANDS)
    open_accounts(node.socket_path, ["a", "b"])
    name = largest_account_name()
    with (
        Client(node.socket_path, schema=Ledger.schema, timeout_s=30) as requester,
        Client(node.socket_path, schema=Ledger.schema, timeout_s=30, subscribe_events=True) as other,
    ):
        requester.call(Balance("a"))  # both sessions are open before the blp stops
        other.call(Balance("b"))
        with OneEgressBatch(node) as batch:
            before = batch.sequenced(requester, [Balance("a"), Balance("b"), Balance("a")])
            other_before = batch.sequenced(other, [Balance("b")])
            reserve = batch.sequenced(other, [Reserve(reservation_id=9, source="a", target="b", amount=500, timeout_ms=200)])
            too_large, *after = batch.sequenced(requester, [Balance(name), Balance("b"), Balance("a"), Balance("b")])
            other_after = batch.sequenced(other, [Balance("a")])

        expected = [("a", 0), ("b", 0), ("a", 0), ("b", 0), ("a", 500), ("b", 0)]  # after the Reserve: held
        for pending, (account, held) in zip([*before, *after], expected, strict=True):
            assert pending.result() == AccountBalance(account, DEPOSIT, held)
        with pytest.raises(CommandRejected) as rejected:
            too_large.result()
        assert rejected.value.code == "reply_too_large"
        replaced_bytes = unknown_account_rejection_bytes(name)
        assert f"the reply was {replaced_bytes} bytes, over the limit of {REPLY_PAYLOAD_BYTES_MAX}" in rejected.value.message
        assert other_before[0].result() == AccountBalance("b", DEPOSIT, 0)
        assert isinstance(reserve[0].result(), Reserved)
        assert other_after[0].result() == AccountBalance("a", DEPOSIT, 500)
        # The timer request in the batch was armed: the reservation expires.
        event = other.next_event(timeout_s=30)
        while not isinstance(event, ReservationExpired):
            event = other.next_event(timeout_s=30)
        assert event == ReservationExpired(reservation_id=9, source="a", amount=500)
        assert other.call(Balance("a")) == AccountBalance("a", DEPOSIT, 0)
        request_id = requester.next_request_id - len(after) - 1
        client_id = requester.client_id

    # The resend (a new connection, the same client id and request id) gets the same answer.
    with Client(node.socket_path, schema=Ledger.schema, timeout_s=30, client_id=client_id,
                first_request_id=request_id) as resender:
        with pytest.raises(CommandRejected) as again:
            resender.call(Balance(name))
    assert (again.value.code, again.value.message) == (rejected.value.code, rejected.value.message)
    assert node.read_counters()["outputs.too_large"] == 1  # the resend was answered from the dedup table
    assert "Exception in callback" not in node.log_text()
    assert node.stop() == 0


def test_an_unframeable_reply_saved_by_an_older_seqd_costs_no_other_output_in_its_batch(node_factory) -> None:  # noqa: F811
    """A snapshot written before the blp replaced large replies may hold a saved reply no frame
    can carry; its resend reaches the sequencer's drain, which answers reply_too_large and still
    sends everything else in the batch: other replies, another session's event, a timer."""
    node = node_factory()
    open_accounts(node.socket_path, ["a", "b"])
    client_id = 4242
    with Client(node.socket_path, schema=Ledger.schema, timeout_s=30, client_id=client_id) as client:
        client.call(Balance("a"))  # request 1, never acknowledged: its reply stays saved
    os.kill(node.role_pid("sequencer"), signal.SIGUSR1)  # what `seqd snapshot` does
    wait_for(lambda: node.read_counters()["snapshot.last.index"] > 0, "a snapshot")
    assert node.stop() == 0
    # What an older seqd would have saved: an OK reply over the frame limit.
    newest = snapshots.list_snapshots(node.config.snapshot_dir)[0]
    header, body = snapshots.read_snapshot(newest.path)
    state = msgspec.msgpack.decode(body, type=ProcessorState)
    (saved,) = next(c for c in state.clients if c.client_id == client_id).replies
    saved.payload = b"r" * (REPLY_PAYLOAD_BYTES_MAX + 1)
    body = msgspec.msgpack.encode(state)
    snapshots.write_snapshot(node.config.snapshot_dir, header._replace(state_hash=state_hash(body)), body)
    node.start()

    with (
        Client(node.socket_path, schema=Ledger.schema, timeout_s=30, client_id=client_id,
               first_request_id=1) as resender,
        Client(node.socket_path, schema=Ledger.schema, timeout_s=30, subscribe_events=True) as other,
    ):
        resender.flush()  # both sessions are open before the blp stops
        other.call(Balance("b"))
        with OneEgressBatch(node) as batch:
            other_before = batch.sequenced(other, [Balance("b")])
            resent, *after = batch.sequenced(resender, [Balance("a"), Balance("b")])
            reserve = batch.sequenced(other, [Reserve(reservation_id=5, source="a", target="b", amount=7, timeout_ms=200),
                                              Deposit("b", 3)])
        assert other_before[0].result() == AccountBalance("b", DEPOSIT, 0)
        with pytest.raises(CommandRejected) as rejected:
            resent.result()
        assert rejected.value.code == "reply_too_large"
        assert (
            f"the reply was {REPLY_PAYLOAD_BYTES_MAX + 1} bytes, over the limit of {REPLY_PAYLOAD_BYTES_MAX}"
            in rejected.value.message
        )
        assert "the command was applied and its effects stand" in rejected.value.message
        assert after[0].result() == AccountBalance("b", DEPOSIT, 0)
        assert isinstance(reserve[0].result(), Reserved)
        assert reserve[1].result() == Transferred(MINT, "b", 3, -2 * DEPOSIT - 3)
        # The event published in the batch, then the timer armed in it firing.
        assert other.next_event(timeout_s=30) == TransferMade(MINT, "b", 3)
        assert other.next_event(timeout_s=30) == ReservationExpired(reservation_id=5, source="a", amount=7)
    assert "egress.reply_too_large" in node.log_text()
    assert node.read_counters()["sequencer.errors"] >= 1  # the sequencer met it, draining egress
    assert node.stop() == 0


def test_an_event_too_large_reaches_every_subscriber_as_a_non_fatal_error_in_its_place(node_factory) -> None:  # noqa: F811
    node = node_factory({"node": {"app": "tests.fixtures.bulky:Bulky"}})
    subscriber = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    subscriber.settimeout(30)
    connection = Connection(Side.CLIENT)
    frames: list[object] = []

    def receive_until(predicate: Callable[[], bool]) -> None:
        while not predicate():
            data = subscriber.recv(1 << 20)
            assert data, f"the daemon closed the subscriber's connection after {frames}"
            connection.receive_data(data)
            while batch := connection.next_frames():
                frames.extend(batch)

    with subscriber, Client(node.socket_path, schema=Bulky.schema, timeout_s=30) as client:
        subscriber.connect(node.socket_path)
        subscriber.sendall(connection.send(Hello(client_id=99, subscribe_events=True)))
        receive_until(lambda: len(frames) >= 1)
        assert isinstance(frames.pop(), Welcome)
        too_large = data_bytes_for(EVENT_PAYLOAD_BYTES_MAX, Bulky.schema.encode_event, Filler) + 1
        client.call(Fill(event_bytes=too_large))
        client.call(Fill(event_bytes=3))
        receive_until(lambda: len(frames) >= 2)
        notice, event = frames
        assert isinstance(notice, Error)
        assert (notice.code, notice.fatal) == ("event_too_large", False)
        assert isinstance(event, ProtocolEvent)
        # In order, in the place of the event of the command just before (nothing came between).
        assert f"the event published at index {event.index - 1} was {EVENT_PAYLOAD_BYTES_MAX + 1} bytes" in notice.message
        assert Bulky.schema.decode_event(event.version, event.payload) == Filler(b"e" * 3)
        assert client.call(Count()) == Counted(2)  # the command that published it was applied
    assert node.read_counters()["outputs.too_large"] == 1
    assert "egress.event_too_large" in node.log_text()
    assert node.stop() == 0
