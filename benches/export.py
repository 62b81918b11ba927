"""Export: ledger events per second into NATS JetStream, with async publish acks against one
publish at a time (issue 15, part 4).

    python -m benches.export [--quick] [--json] [--events N] [--min-seconds S]

Napkin math. A JetStream publish from nats-py that asks for an ack costs the client ~30-60 us of
Python (the headers encoded, a reply subject, a future and its callback, the ack parsed) and the
server a file-store append (~2-5 us, no fsync: JetStream syncs every 2 minutes by default). One
publish at a time adds a round trip through two processes' event loops per event, ~100-300 us on
this VM: ~3-10k events/s. The exporter asks an ack of a batch's last message only (256 by
default), so the others cost a header encoding and a buffer append, ~10-20 us, and the round
trips overlap (1024 messages in flight): ~30-50k events/s if each process has a core.

What runs: `sequencer.export.JetStreamExporter` with its defaults (1024 in flight, batches of 256,
one ack per batch) and with `in_flight_max=1` (the same code awaiting each ack), fed from a list of `TransferMade`
events made up front (the exporter and JetStream alone; the journal source costs the replay rate,
see "Recovery" in RESULTS.md), into a new file-storage stream per run on a nats-server the bench
starts in /tmp (the Debian package's). Each figure is one run that measured at least
MEASURE_S_MIN seconds (`sized_for`), with the CPU per event of the exporter's process and of
nats-server beside it (the figures that hold under the machine's load: on 2 shared cores the two
processes' CPU, not the round trip, bounds the batched rate).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Iterator
from typing import Any

import psutil

from benches._measure import MEASURE_S_MIN, sized_for
from benches._nats import NatsServer
from sequencer.apps.ledger import TransferMade
from sequencer.export import BATCH_EVENTS_DEFAULT, IN_FLIGHT_DEFAULT, JetStreamExporter
from sequencer.projection import Position, SourceEvent

ACCOUNTS = 1000
EVENTS_MAX = 2_000_000  # sized_for's bound: minutes at the slowest rate


class ListSource:
    """Events made up front, so the measurement is the exporter and JetStream only."""

    def __init__(self, events: int, seed: int = 15) -> None:
        rng = random.Random(seed)
        names = [f"acct{n:05d}" for n in range(ACCOUNTS)]
        self.items = [SourceEvent(index, 1_700_000_000_000_000_000 + index,
                                  TransferMade(*rng.sample(names, 2), rng.randrange(1, 100)))
                      for index in range(1, events + 1)]  # fmt: skip

    def read(self, from_index: int) -> Iterator[SourceEvent | None]:
        yield from self.items[from_index - 1 :]


class Bench:
    def __init__(self, server: NatsServer) -> None:
        self.server = server
        self.streams = 0

    def server_cpu_s(self) -> float:
        assert self.server.process is not None
        times = psutil.Process(self.server.process.pid).cpu_times()
        return float(times.user + times.system)

    def measure(self, in_flight_max: int, events: int) -> tuple[float, float, int, float, float]:
        """(events/s, seconds, events, exporter CPU us per event, nats-server CPU us per event)
        of one export into a new stream."""
        source = ListSource(events)
        self.streams += 1
        exporter = JetStreamExporter([self.server.url], f"BENCH{self.streams}", f"bench{self.streams}", "bench",
                                     in_flight_max=in_flight_max,
                                     batch_events_max=min(BATCH_EVENTS_DEFAULT, in_flight_max))  # fmt: skip
        cpu_started = time.process_time()
        server_cpu_started = self.server_cpu_s()
        started = time.perf_counter()
        position = exporter.run(source, until_caught_up=True)
        seconds = time.perf_counter() - started
        cpu_s = time.process_time() - cpu_started
        server_cpu_s = self.server_cpu_s() - server_cpu_started
        assert position == Position(events, 1), (position, events)
        assert exporter.published == events and exporter.duplicates == 0, exporter.__dict__
        return events / seconds, seconds, events, cpu_s / events * 1e6, server_cpu_s / events * 1e6

    def figure(self, in_flight_max: int, count_min: int, seconds_min: float) -> tuple[float, float, int, float, float]:
        return sized_for(lambda count: self.measure(in_flight_max, count), lambda result: result[1],
                         count_min, EVENTS_MAX, seconds_min)  # fmt: skip


def run(seconds_min: float, events_min: int = 20_000) -> dict[str, Any]:
    server = NatsServer.create()
    try:
        bench = Bench(server)
        bench.measure(IN_FLIGHT_DEFAULT, 1000)  # warm-up: imports, the first connection
        async_per_s, async_s, async_events, async_cpu_us, async_server_us = bench.figure(
            IN_FLIGHT_DEFAULT, events_min, seconds_min)
        sync_per_s, sync_s, sync_events, sync_cpu_us, sync_server_us = bench.figure(
            1, max(1, events_min // 10), seconds_min)
        version = server.version()
    finally:
        server.stop()
    return {
        "export_events_per_s": round(async_per_s),
        "export_one_at_a_time_events_per_s": round(sync_per_s),
        "export_async_acks_speedup": round(async_per_s / sync_per_s, 1),
        "export_cpu_us_per_event": round(async_cpu_us, 1),
        "export_one_at_a_time_cpu_us_per_event": round(sync_cpu_us, 1),
        "nats_server_cpu_us_per_event": round(async_server_us, 1),
        "nats_server_one_at_a_time_cpu_us_per_event": round(sync_server_us, 1),
        "export_measured_s": round(async_s, 2),
        "export_one_at_a_time_measured_s": round(sync_s, 2),
        "events": async_events,
        "events_one_at_a_time": sync_events,
        "in_flight_max": IN_FLIGHT_DEFAULT,
        "batch_events_max": BATCH_EVENTS_DEFAULT,
        "nats_server": version,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"each figure measured for {MEASURE_S_MIN} s")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--events", type=int, default=20_000, help="events in the first run (one at a time: 1/10)")
    parser.add_argument("--min-seconds", type=float, default=None,
                        help=f"measure each figure at least this long (default {MEASURE_S_MIN}; 10 without --quick)")
    args = parser.parse_args(argv)
    seconds_min = args.min_seconds if args.min_seconds is not None else (MEASURE_S_MIN if args.quick else 10.0)
    results = run(seconds_min, args.events)
    if args.json:
        print(json.dumps(results))
    else:
        for key, value in results.items():
            print(f"{key:40} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
