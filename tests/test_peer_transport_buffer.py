"""The peer transport's send buffer toward a peer that does not drain its socket (issue 11): a
slow follower that answers heartbeats but falls behind reading AppendEntries frees one message of
the leader's window per heartbeat answer (sequencer/raft/tracker.py), so the leader keeps writing;
what the socket does not take piles up in this process. It must stay within
`send_buffer_bytes_max` (the daemon sets it to the byte window plus one frame) plus one pass's
batch, however many passes, and the other links must keep flowing."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from dataclasses import replace

from daemon.faultproxy import FaultNetwork, FaultProxy, free_loopback_ports
from sequencer.raft.messages import AppendEntries
from sequencer.raft.peer_protocol import PEER_FRAME_BYTES_MAX, ForwardedRecord
from sequencer.record import RecordType, encode_record
from tests.test_peer_transport import CLUSTER, Node, config, heartbeat, run_uvloop, until

# Large enough that one loop pass's batch to the stalled peer is most of the bound: before the
# bound was checked against the batch, the buffer took the whole batch past it.
ENTRY_BYTES = 1 << 20
ENTRIES_PER_PASS = 3
# Passes until the kernel's socket buffers (the sender's and the proxy's, a few MiB each on
# loopback) are full and the transport drops; bounded, so a transport that never drops fails.
PASSES_MAX = 64
PASS_FRAMING_BYTES = 4096  # a frame's header, MAC and msgpack around the entries, and a heartbeat
PASSES_AFTER_FULL = 4


def test_a_peer_that_does_not_drain_holds_at_most_the_send_buffer_bound_and_stalls_no_other_peer() -> None:
    async def main() -> None:
        ports = dict(zip((1, 2, 3), free_loopback_ports(3), strict=True))
        bound = PEER_FRAME_BYTES_MAX  # the least a transport takes: one largest frame
        with FaultProxy() as proxy:
            network = FaultNetwork(proxy)
            via = network.add(1, 2, ports[2])
            async with AsyncExitStack() as stack:
                stalled, healthy = Node(config(2, ports)), Node(config(3, ports))
                sender = Node(replace(config(1, ports, send_buffer_bytes_max=bound),
                                      peers={2: ("127.0.0.1", via), 3: ("127.0.0.1", ports[3])}))  # fmt: skip
                for node in (stalled, healthy, sender):
                    await stack.enter_async_context(node.transport)
                await asyncio.wait_for(sender.transport.wait_connected([2, 3]), 20.0)
                network.cut(1, 2)  # node 2 reads nothing more: its socket and the proxy fill up
                unsent_peak = 0
                passes = passes_full = 0
                while passes_full < PASSES_AFTER_FULL:
                    passes += 1
                    assert passes <= PASSES_MAX, f"nothing dropped after {passes} passes: {sender.counters}"
                    entries = AppendEntries(CLUSTER, 1, 2, 1, 0, 0, 0, [1] * ENTRIES_PER_PASS,
                                            [bytes([passes % 256]) * ENTRY_BYTES] * ENTRIES_PER_PASS)  # fmt: skip
                    sender.transport.send([entries, heartbeat(1, 3, term=passes)])
                    await asyncio.sleep(0)  # the flush runs at the end of this pass
                    await asyncio.sleep(0)
                    unsent_peak = max(unsent_peak, sender.transport.unsent_bytes(2))
                    if sender.counters["messages_dropped"]:
                        passes_full += 1
                # The bound is checked before each batch, which then goes whole (a catch-up's
                # batches dropped for the room left cost a Raft repair each: docs/peer-transport.md).
                batch_bytes = ENTRIES_PER_PASS * ENTRY_BYTES + PASS_FRAMING_BYTES
                assert unsent_peak <= bound + batch_bytes, (unsent_peak, bound, batch_bytes)
                assert sender.transport.unsent_bytes(3) == 0
                # The other peer got every message, in order, while node 2 was stalled.
                await until(lambda: len(healthy.messages) == passes, "every heartbeat to node 3")
                assert [m.term for _, m in healthy.messages] == list(range(1, passes + 1))
                # A dropped batch used no sequence number: the stalled link carries on once healed.
                network.heal()

                def heard() -> bool:  # a heartbeat each poll, as a leader's ticks would: one sent
                    # while the socket still holds the stall's bytes is dropped like the others
                    sender.transport.send([heartbeat(1, 2, term=10_000)])
                    return any(m.term == 10_000 for _, m in stalled.messages)

                await until(heard, "a heartbeat after the heal")
                assert stalled.counters["refused_total"] == 0
                assert sender.counters["connects"] == 2  # the first connection to each peer, kept

    run_uvloop(main())


# A follower's whole pending set, resent at once after a leader change (sequencer/cluster/
# forwards.py holds up to PENDING_BYTES_MAX): here several times the send buffer's bound.
RESEND_RECORDS = 3_000
RESEND_PAYLOAD_BYTES = 4_000


def test_a_resend_larger_than_the_send_buffer_goes_whole_and_in_order() -> None:
    """Only a socket already past the bound drops; a forward stream's resend must leave whole,
    or it is dropped again at every restart and its clients wait for good."""

    async def main() -> None:
        ports = dict(zip((1, 2), free_loopback_ports(2), strict=True))
        bound = PEER_FRAME_BYTES_MAX  # the least a transport takes; the resend below is ~3x this
        async with AsyncExitStack() as stack:
            leader = Node(config(1, ports))
            follower = Node(config(2, ports, send_buffer_bytes_max=bound))
            for node in (leader, follower):
                await stack.enter_async_context(node.transport)
            await asyncio.wait_for(follower.transport.wait_connected([1]), 20.0)
            records = [ForwardedRecord(encode_record(RecordType.COMMAND, 1, 0, 0, 2, i + 1, 1, bytes(RESEND_PAYLOAD_BYTES)))
                       for i in range(RESEND_RECORDS)]  # fmt: skip
            assert sum(len(r.record) for r in records) > 2 * bound
            stream = follower.transport.forward_stream(1)
            follower.transport.forward(1, records, stream)
            await until(lambda: len(leader.commands) == RESEND_RECORDS, "the whole resend at the leader")
            assert [r.record for _, r in leader.commands] == [r.record for r in records]
            assert follower.transport.forward_stream(1) == stream  # not broken
            assert follower.counters["records_dropped"] == 0

    run_uvloop(main())
