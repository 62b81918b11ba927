"""Projections: ledger events per second into SQLite and PostgreSQL, batched, against a naive
projector that commits every event on its own (issue 14).

    python -m benches.projection [--quick] [--json] [--dsn DSN] [--min-seconds S]

Napkin math. A ledger event (`TransferMade`) is two upserts. The projector's own work per event
(the projection's call, two `Write`s, its share of an executemany) is ~5-10 us; SQLite runs an
upsert on a small table in ~5-10 us; PostgreSQL over a Unix socket ~20-50 us per statement in a
pipelined executemany. A commit costs an fsync for PostgreSQL (~0.1-1 ms on this VM) and a WAL
append for SQLite (`synchronous=NORMAL`, no fsync per commit). So batched (500 events per
transaction) SQLite should reach ~30-60k events/s and PostgreSQL ~10-30k; one transaction per
event makes PostgreSQL pay a round trip of BEGIN/SELECT FOR UPDATE/writes/UPDATE/COMMIT and one
fsync per event: ~1-3k events/s. The ratio is the point of batching.

What runs: `sequencer.projection.Projector` with the ledger's `Balances` projection, fed from a
list of `TransferMade` events between ACCOUNTS accounts (seeded), so the figure is the database
side alone (the journal source's cost is the replay speed, benches/recovery.py). Each run
projects into a new database (a new SQLite file; a new PostgreSQL database on a server this
bench starts in a temporary directory with fsync on, or `--dsn`'s server). Runs grow until one
measured MEASURE_S_MIN seconds (`sized_for`); each figure reports its seconds measured.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benches._measure import MEASURE_S_MIN, sized_for
from sequencer.apps.ledger import TransferMade
from sequencer.apps.ledger_projection import Balances
from sequencer.projection import BATCH_EVENTS_DEFAULT, Projector, SourceEvent, Store, open_store

ACCOUNTS = 1000
EVENTS_MAX = 2_000_000  # sized_for's bound: a run of this many takes minutes at the slowest rate


class ListSource:
    """Events made up front, so the measurement is the projector and the database only."""

    def __init__(self, events: int, seed: int = 14) -> None:
        rng = random.Random(seed)
        names = [f"acct{n:05d}" for n in range(ACCOUNTS)]
        self.items = [SourceEvent(index, 1_700_000_000_000_000_000 + index,
                                  TransferMade(*rng.sample(names, 2), rng.randrange(1, 100)))
                      for index in range(1, events + 1)]  # fmt: skip

    def read(self, from_index: int) -> Iterator[SourceEvent | None]:
        yield from self.items[from_index - 1 :]


def measure(make_store: Callable[[], Store], batch_events_max: int, events: int) -> tuple[float, float, int]:
    """(events/s, seconds, events) of one projection of `events` events into a new database."""
    source = ListSource(events)
    store = make_store()
    try:
        projector = Projector(Balances(), store, batch_events_max)
        projector.serving()  # tables created before the clock starts
        started = time.perf_counter()
        position = projector.run(source)
        seconds = time.perf_counter() - started
        assert position.index == events, (position, events)
        (total,) = store.execute("SELECT sum(balance) FROM balances")[0]
        assert total == 0, total
    finally:
        store.close()
    return events / seconds, seconds, events


def figure(make_store: Callable[[], Store], batch_events_max: int, count_min: int, seconds_min: float) -> tuple[float, float, int]:
    return sized_for(lambda count: measure(make_store, batch_events_max, count), lambda result: result[1],
                     count_min, EVENTS_MAX, seconds_min)  # fmt: skip


def run(dsn: str | None, seconds_min: float, directory: Path | None, events_min: int = 20_000) -> dict[str, Any]:
    from benches._postgres import start_server

    work = Path(tempfile.mkdtemp(prefix="seqd-bench-proj-", dir=directory or "/tmp"))
    server = None
    results: dict[str, Any] = {}
    try:
        files = iter(range(1 << 30))
        sqlite_per_s, sqlite_s, sqlite_events = figure(
            lambda: open_store(str(work / f"model{next(files)}.db")), BATCH_EVENTS_DEFAULT, events_min, seconds_min)
        if dsn is None:
            server = start_server(fsync=True)
            make_pg: Callable[[], Store] = lambda: open_store(server.create_database())  # noqa: E731
        else:
            make_pg = lambda: _fresh_schema(dsn)  # noqa: E731
        pg_per_s, pg_s, pg_events = figure(make_pg, BATCH_EVENTS_DEFAULT, events_min, seconds_min)
        naive_per_s, naive_s, naive_events = figure(make_pg, 1, max(1, events_min // 20), seconds_min)
        results = {
            "projection_sqlite_per_s": round(sqlite_per_s),
            "projection_pg_per_s": round(pg_per_s),
            "projection_naive_pg_per_s": round(naive_per_s),
            "projection_pg_batching_speedup": round(pg_per_s / naive_per_s, 1),
            "batch_events": BATCH_EVENTS_DEFAULT,
            "projection_sqlite_measured_s": round(sqlite_s, 2),
            "projection_pg_measured_s": round(pg_s, 2),
            "projection_naive_pg_measured_s": round(naive_s, 2),
            "events_sqlite": sqlite_events,
            "events_pg": pg_events,
            "events_naive_pg": naive_events,
            "pg_fsync": dsn is None or "given server",
        }
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return results


def _fresh_schema(dsn: str) -> Store:
    """A store on the given server with the bench's tables dropped first."""
    store = open_store(dsn)
    with store.transaction(schema=True):
        for generation in store.generations("balances"):
            for table in generation.tables:
                store.execute(f"DROP VIEW IF EXISTS {table}")
                store.execute(f"DROP TABLE IF EXISTS {table}_g{generation.generation}")
        store.execute("DELETE FROM seqd_projections WHERE name = 'balances'")
    return store


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"each figure measured for {MEASURE_S_MIN} s")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--dsn", default=None, help="a PostgreSQL server to use (default: start one, fsync on)")
    parser.add_argument("--events", type=int, default=20_000, help="events in the first run (the naive one: 1/20)")
    parser.add_argument("--dir", type=Path, default=None, help="where the SQLite files go (default /tmp)")
    parser.add_argument("--min-seconds", type=float, default=None,
                        help=f"measure each figure at least this long (default {MEASURE_S_MIN}; 10 without --quick)")
    args = parser.parse_args(argv)
    seconds_min = args.min_seconds if args.min_seconds is not None else (MEASURE_S_MIN if args.quick else 10.0)
    results = run(args.dsn, seconds_min, args.dir, args.events)
    if args.json:
        print(json.dumps(results))
    else:
        for key, value in results.items():
            print(f"{key:36} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
