"""Messages per second through the peer transport: two nodes on loopback, one process, uvloop.

    python -m benches.peer_transport [--quick] [--json]

Napkin math: a MESSAGES frame costs the sender one msgpack encode, one HMAC-SHA256 (~2 us plus
~0.7 ns/byte) and one write; the receiver one MAC check, one decode and one callback. With 256
heartbeats (~15 bytes each) per frame the per-frame costs vanish and msgspec's ~0.1-0.15 us per
small struct each way dominates: ~3-4 M heartbeats/s on one core if nothing else does. A
64-entry AppendEntries of 100-byte records is ~7 KB: the MAC on both sides (~10 us at 1.4 GB/s)
and 64 bytes objects made by the decoder (~3 us) give ~70-100 k messages/s, ~5 M entries/s.
Whatever the figure, Raft needs far less: at 500 k records/s and 1024 entries per AppendEntries,
~500 messages/s per follower.

What it runs: node 1 sends to node 2 through `PeerTransport` on 127.0.0.1 (both on one uvloop
loop, so one core does the sender's and the receiver's work), `batch` messages per loop pass,
with a window of unacknowledged messages so nothing is dropped. Each figure is the median of
`runs` runs, after a warm-up run, of messages received divided by the wall time.
Also reported: the codec alone (encode, MAC, verify, decode, no socket) for the same batches, the
ceiling the shell is measured against.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import uvloop

from benches._measure import MEASURE_S_MIN, repeat_for, timed
from daemon.faultproxy import free_loopback_ports
from sequencer.raft.messages import AppendEntries, Heartbeat, Message
from sequencer.raft.peer_protocol import ClusterIdentity, MessageBatch, PeerConnection, Side
from sequencer.raft.transport import PeerTransport, TransportConfig

CLUSTER = 1
SECRET = os.urandom(32)
MEASURED_S: list[float] = []  # seconds measured per figure, for the JSON
WINDOW_PASSES = 8  # passes in flight before the sender waits: keeps the socket buffer short


def heartbeat(term: int) -> Message:
    return Heartbeat(CLUSTER, 1, 2, term, term, 0)


ENTRY = b"r" * 100


def append_entries(term: int) -> Message:
    return AppendEntries(CLUSTER, 1, 2, term, term, term, term, [term] * 64, [ENTRY] * 64)


async def through_transport(make: Callable[[int], Message], batch: int, total: int) -> float:
    ports = dict(zip((1, 2), free_loopback_ports(2), strict=True))
    received = 0
    wanted = 0
    progressed = asyncio.Event()

    def on_messages(peer: int, messages: list[Message]) -> None:
        nonlocal received
        received += len(messages)
        if received >= wanted:
            progressed.set()

    def config(node: int) -> TransportConfig:
        return TransportConfig(
            cluster_id=CLUSTER, node_id=node, secret=SECRET, listen_host="127.0.0.1",
            listen_port=ports[node],
            peers={p: ("127.0.0.1", port) for p, port in ports.items() if p != node},
        )  # fmt: skip

    async with (
        PeerTransport(config(2), on_messages) as receiver,
        PeerTransport(config(1), lambda peer, messages: None) as sender,
    ):
        await asyncio.wait_for(sender.wait_connected([2]), 30)
        messages = [make(term) for term in range(1, batch + 1)]
        started = time.perf_counter()
        sent = 0
        while sent < total:
            sender.send(messages)
            sent += batch
            if sent - received > WINDOW_PASSES * batch:
                wanted = sent - WINDOW_PASSES * batch // 2
                progressed.clear()
                await progressed.wait()
            else:
                await asyncio.sleep(0)
        wanted = sent
        progressed.clear()
        if received < sent:
            await asyncio.wait_for(progressed.wait(), 60)
        elapsed = time.perf_counter() - started
        assert sender.counters.messages_dropped == 0, sender.counters
        assert receiver.counters.messages_in == sent
    return sent / elapsed


def codec_alone(make: Callable[[int], Message], batch: int, total: int) -> float:
    identity_1 = ClusterIdentity(CLUSTER, 1, frozenset({1, 2}), SECRET)
    identity_2 = ClusterIdentity(CLUSTER, 2, frozenset({1, 2}), SECRET)
    dialler = PeerConnection(identity_1, Side.DIALLER, os.urandom(32), 2)
    acceptor = PeerConnection(identity_2, Side.ACCEPTOR, os.urandom(32))
    acceptor.receive_data(dialler.data_to_send())
    acceptor.next_event()
    dialler.receive_data(acceptor.data_to_send())
    dialler.next_event()
    acceptor.receive_data(dialler.data_to_send())
    acceptor.next_event()
    messages = [make(term) for term in range(1, batch + 1)]
    count = 0
    started = time.perf_counter()
    while count < total:
        acceptor.receive_data(dialler.send_messages(messages))
        event = acceptor.next_event()
        assert isinstance(event, MessageBatch)
        count += len(event.messages)
    return count / (time.perf_counter() - started)


def median_of(runs: int, measure: Callable[[], float]) -> float:
    """Median of at least `runs` runs and MEASURE_S_MIN seconds of them (call wall time)."""
    measure()  # warm-up, discarded
    figures, measured_s = repeat_for(timed(measure), runs, MEASURE_S_MIN)
    MEASURED_S.append(measured_s)
    return statistics.median(figures)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer messages and runs")
    parser.add_argument("--json", action="store_true", help="print one JSON line of results")
    parser.add_argument("--batch", type=int, default=256, help="messages per loop pass")
    arguments = parser.parse_args()
    # Each node dials the other at once; the first dial of the one that starts first is refused.
    logging.getLogger("seqd.peer").setLevel(logging.ERROR)
    runs = 3 if arguments.quick else 7
    heartbeats = 200_000 if arguments.quick else 1_000_000
    appends = 20_000 if arguments.quick else 100_000
    batch = arguments.batch

    def transport(make: Callable[[int], Message], total: int) -> float:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(through_transport(make, batch, total))

    results = {
        "heartbeats_per_s": median_of(runs, lambda: transport(heartbeat, heartbeats)),
        "append_entries_per_s": median_of(runs, lambda: transport(append_entries, appends)),
        "codec_heartbeats_per_s": median_of(
            runs, lambda: codec_alone(heartbeat, batch, heartbeats)
        ),
        "codec_append_entries_per_s": median_of(
            runs, lambda: codec_alone(append_entries, batch, appends)
        ),
    }
    results["measured_s_min_per_figure"] = min(MEASURED_S)
    results["append_entries_records_per_s"] = results["append_entries_per_s"] * 64
    results.update(
        batch=batch, runs=runs, python=sys.version.split()[0], machine=platform.machine(),
        cpus=os.cpu_count(),
    )  # fmt: skip
    if arguments.json:
        print(json.dumps(results))
        return
    for key, value in results.items():
        print(f"{key:30} {value:,.0f}" if isinstance(value, float) else f"{key:30} {value}")


if __name__ == "__main__":
    main()
