"""The peer transport's forward streams over real TCP on 127.0.0.1: gapless and in order on one
connection; a drop or a new connection starts a new stream; a receiver that refuses a batch closes
the connection it came on (sequencer/cluster/forwards.py, issue 11)."""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack

import pytest

from daemon.faultproxy import FaultNetwork, FaultProxy, free_loopback_ports
from sequencer.raft.peer_protocol import PEER_FRAME_BYTES_MAX, ForwardedRecord
from sequencer.raft.reason_kinds import QUIET_S, ReasonKinds, reason_kind
from sequencer.raft.transport import PeerTransport
from sequencer.record import RecordType, encode_record
from tests.test_peer_transport import (
    WAIT_S,
    Node,
    config,
    heartbeat,
    run_uvloop,
    start_nodes,
    through_proxy,
    until,
)

# Records forwarded into a blackholed link before its socket holds more than the bound: the
# kernel's buffers on both sides of the proxy take a few MiB, the bound one frame (4 MiB).
FILL_RECORDS_MAX = 400
FILL_PAYLOAD_BYTES = 256 << 10


_REQUEST_ID = slice(40, 48)  # in the record header (sequencer/record.py)


def record(request_id: int, payload: bytes = b"x") -> ForwardedRecord:
    return ForwardedRecord(encode_record(RecordType.COMMAND, 1, 0, 0, 0, 9, request_id, payload))


def request_ids(node: Node) -> list[int]:
    return [int.from_bytes(forwarded.record[_REQUEST_ID], "little") for _, forwarded in node.commands]


def test_records_forwarded_after_a_drop_are_dropped_until_the_stream_restarts() -> None:
    async def main() -> None:
        ports = dict(zip((1, 2), free_loopback_ports(2), strict=True))
        async with AsyncExitStack() as stack:
            nodes = await start_nodes(stack, ports)
            sender: PeerTransport = nodes[1].transport
            stream = sender.forward_stream(2)
            sender.forward(2, [record(1)], stream)
            await until(lambda: len(nodes[2].commands) == 1, "record 1")
            sender.drop_forwards(2, 1)  # record 2, dropped on the way
            sender.forward(2, [record(3)], stream)  # later, on the broken stream: dropped too
            await asyncio.sleep(0)
            sender.send([heartbeat(1, 2, term=4)])  # after anything record 3 could have sent
            await until(lambda: len(nodes[2].messages) == 1, "the message after record 3")
            assert request_ids(nodes[2]) == [1]
            assert sender.counters.records_dropped == 2
            assert sender.counters.forward_streams_broken == 1
            restarted = sender.forward_stream(2)
            assert restarted != stream and sender.is_connected(2), "same connection, new stream"
            sender.forward(2, [record(2), record(3)], restarted)  # the ordered restart
            await until(lambda: len(nodes[2].commands) == 3, "the restart")
            assert request_ids(nodes[2]) == [1, 2, 3]

    run_uvloop(main())


def test_a_new_connection_starts_a_new_stream_and_the_old_one_sends_nothing() -> None:
    async def main() -> None:
        ports = dict(zip((1, 2), free_loopback_ports(2), strict=True))
        async with AsyncExitStack() as stack:
            nodes = await start_nodes(stack, ports)
            sender = nodes[1].transport
            stream = sender.forward_stream(2)
            await nodes[2].transport.close()
            await until(lambda: not sender.is_connected(2), "node 1 to notice node 2 is gone")
            restarted = Node(config(2, ports))
            await stack.enter_async_context(restarted.transport)
            await asyncio.wait_for(sender.wait_connected([2]), WAIT_S)
            assert sender.forward_stream(2) != stream
            sender.forward(2, [record(5)], stream)  # queued for the old connection: dropped
            sender.forward(2, [record(4), record(5)], sender.forward_stream(2))
            await until(lambda: len(restarted.commands) == 2, "the new stream's records")
            await asyncio.sleep(0)
            assert request_ids(restarted) == [4, 5]

    run_uvloop(main())


def test_a_full_socket_ends_the_stream_and_the_restart_waits_until_the_link_drains() -> None:
    async def main() -> None:
        ports = dict(zip((1, 2), free_loopback_ports(2), strict=True))
        with FaultProxy() as proxy:
            network = FaultNetwork(proxy)
            via = network.add(1, 2, ports[2])
            async with AsyncExitStack() as stack:
                receiver, sender_node = await through_proxy(stack, ports, via,
                                                            send_buffer_bytes_max=PEER_FRAME_BYTES_MAX)
                sender = sender_node.transport
                network.cut(1, 2)
                stream = sender.forward_stream(2)
                payload = b"p" * FILL_PAYLOAD_BYTES
                sent = 0
                while sender.forward_stream(2) == stream:  # until the full socket drops one
                    assert sent < FILL_RECORDS_MAX, "the blackholed link never filled"
                    sent += 1
                    sender.forward(2, [record(sent, payload)], stream)
                    await asyncio.sleep(0)  # its flush
                assert not sender.forward_writable(2), "still full: no restart yet"
                sender.forward(2, [record(sent + 1, payload)], stream)  # behind the drop: dropped
                network.heal()
                await until(lambda: sender.forward_writable(2), "the link to drain")
                assert sender.counters.connects == 1, "the same connection"
                # The restart: from the dropped record on, in order, on the new stream.
                resend = [record(n, payload) for n in (sent, sent + 1)]
                sender.forward(2, resend, sender.forward_stream(2))
                await until(lambda: request_ids(receiver)[-1:] == [sent + 1], "the restart")
                assert request_ids(receiver) == list(range(1, sent + 2)), "a gap or a reorder"

    run_uvloop(main())


NOT_LEADING = "node 2 does not lead (term 3, leader 1)"


@pytest.mark.parametrize("refusal", [False, NOT_LEADING], ids=["no-reason", "a-reason"])
def test_a_receiver_that_refuses_a_batch_closes_its_connection_and_the_sender_reconnects(
    refusal: bool | str,
) -> None:
    """With a reason, the receiver sends it back in a last REFUSED frame before it closes: the
    sender counts and logs it (`forward_refusals_received`, `on_refused`), where before it saw
    only its connection close and could not tell why."""

    async def main() -> None:
        ports = dict(zip((1, 2), free_loopback_ports(2), strict=True))
        async with AsyncExitStack() as stack:
            nodes = await start_nodes(stack, ports)
            sender, receiver = nodes[1].transport, nodes[2]
            batches: list[list[int]] = []
            heard: list[tuple[int, str]] = []

            def take_after_the_first(peer: int, records: list[ForwardedRecord]) -> bool | str:
                batches.append([int.from_bytes(r.record[_REQUEST_ID], "little") for r in records])
                return len(batches) > 1 or refusal  # the first refused (not leading, inbox full)

            receiver.transport._on_records = take_after_the_first
            sender._refusals.on_refused = lambda peer, reason: heard.append((peer, reason))
            stream = sender.forward_stream(2)
            sender.forward(2, [record(1)], stream)
            await asyncio.sleep(0)
            sender.forward(2, [record(2)], stream)  # may reach the same read: never taken
            await until(lambda: sender.forward_stream(2) != stream and sender.is_connected(2),
                        "the sender to reconnect on a new stream")  # fmt: skip
            assert receiver.counters["forward_streams_refused"] == 1
            assert sender.counters.connects == 2
            assert heard == ([(2, refusal)] if refusal else [])
            assert sender.counters.forward_refusals_received == len(heard)
            assert receiver.counters["refused_total"] == sender.counters.as_dict()["refused_total"] == 0
            sender.forward(2, [record(1), record(2)], sender.forward_stream(2))
            await until(lambda: len(batches) == 2, "the restart")
            assert batches == [[1], [1, 2]], "nothing after the refused batch was read"

    run_uvloop(main())


def test_a_refusal_storm_with_changing_numbers_logs_a_bounded_number_of_lines_and_counts_all(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A leader that refuses at every resend says why in sentences whose numbers change (its term,
    its inbox's fill), two kinds alternating: each refusal is counted and handed on, but the log
    holds each kind's first and its powers of two (sequencer/raft/reason_kinds.py), not a line
    per refusal as a throttle keyed on the exact (or the last) reason did."""
    refusals = 1000
    sender = PeerTransport(config(1, {1: 1, 2: 2}), lambda peer, messages: None)
    heard: list[str] = []
    sender._refusals.on_refused = lambda peer, reason: heard.append(reason)
    with caplog.at_level(logging.WARNING, logger="seqd.peer"):
        for number in range(refusals):
            reason = (f"node 2 does not lead (term {number + 3}, leader {number % 3 + 1})" if number % 2
                      else f"node 2's inbox holds {4000 + number} forwarded records: no room for "
                           f"{number % 7 + 1} more (INBOX_RECORDS_MAX 4096) until its next pass")  # fmt: skip
            sender._forwards_refused(2, reason)
    assert sender.counters.forward_refusals_received == refusals
    assert len(heard) == refusals
    lines = [record.getMessage() for record in caplog.records]
    per_kind = refusals // 2
    assert len(lines) == 2 * (per_kind.bit_length())  # each kind: 1, 2, 4, ... 256 of 500
    assert sum("does not lead" in line for line in lines) == len(lines) // 2
    assert lines[-1].endswith("(512 refusals so far, 256 of this kind)")


def test_reason_kinds_mask_numbers_and_pool_kinds_past_their_bound() -> None:
    kinds = ReasonKinds(kinds_max=2)
    assert reason_kind("term 12, leader 3") == reason_kind("term 7, leader 1") == "term #, leader #"
    assert [kinds.count(f"term {term}", 0.0) for term in range(1, 9)] == [1, 2, 0, 4, 0, 0, 0, 8]
    assert kinds.count("inbox full at 9", 0.0) == 1  # a second kind: its own first line
    assert kinds.count("a third kind", 0.0) == 1  # past the bound: the pooled kind's first
    assert kinds.count("a fourth kind", 0.0) == 2  # the same pooled kind


def test_a_reason_kind_quiet_for_a_while_is_logged_again_at_its_next_storm() -> None:
    kinds = ReasonKinds()
    assert [kinds.count(f"term {term}", term * 0.01) for term in range(1, 601)].count(0) == 600 - 10
    assert kinds.count("term 700", 6.0 + QUIET_S / 2) == 0  # the same episode: 601st, not logged
    assert kinds.count("term 701", 6.0 + QUIET_S * 2) == 1  # a new one: its first is logged again
    assert kinds.count("term 702", 6.0 + QUIET_S * 2) == 2
