"""Projections with planted faults, and helpers, for the projector tests.

The projector under test runs as `seqd project` in a child process, which loads its projection
by name; the faults are switched on by environment variables so the same projection, restarted
without them, carries on normally.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sequencer.apps.ledger import Ledger
from sequencer.apps.ledger_projection import Balances
from sequencer.projection import JournalSource, Position, Projector, SourceEvent, Store, Write
from sequencer.recovery import recover

RAISE_AT_ENV = "SEQD_TEST_PROJECTION_RAISE_AT"  # the projection raises on the event at this index
STALL_AT_ENV = "SEQD_TEST_PROJECTION_STALL_AT"  # a write of this index's event runs for minutes
STALL_MARKER_ENV = "SEQD_TEST_PROJECTION_STALL_MARKER"  # file created when the stall is planned
BAD_WRITE_AT_ENV = "SEQD_TEST_PROJECTION_BAD_WRITE_AT"  # a write the database refuses

# A statement that runs for a long time in both SQLite and PostgreSQL, inside the transaction:
# counting two billion rows of a recursive CTE (minutes). It changes nothing.
STALL_SQL = (
    "UPDATE {balances} SET balance = balance WHERE (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL "
    "SELECT x + 1 FROM c WHERE x < 2000000000) SELECT count(*) FROM c) < 0"
)


def _env_index(name: str) -> int:
    return int(os.environ.get(name, "0"))


class FaultyBalances(Balances):
    """`Balances` with the faults above, when their variables are set."""

    def __init__(self) -> None:
        self.raise_at = _env_index(RAISE_AT_ENV)
        self.stall_at = _env_index(STALL_AT_ENV)
        self.bad_write_at = _env_index(BAD_WRITE_AT_ENV)

    def project(self, index: int, timestamp_ns: int, event: Any) -> Iterator[Write]:
        if index == self.raise_at:
            raise ValueError(f"planted failure at index {index}")
        writes = list(super().project(index, timestamp_ns, event))
        if index == self.stall_at:
            Path(os.environ[STALL_MARKER_ENV]).touch()
            writes.insert(1, Write(STALL_SQL))
        if index == self.bad_write_at:
            writes.insert(1, Write("INSERT INTO {balances} (account, balance, movements, last_index) "
                                   "VALUES (?, NULL, 0, 0)", ("@bad",)))  # fmt: skip
        return iter(writes)


class PrefixSource:
    """The events of a source up to `last` (a position) only: what a read model holds there."""

    def __init__(self, source: JournalSource, last: Position) -> None:
        self.source = source
        self.last = last

    def read(self, from_index: int) -> Iterator[SourceEvent | None]:
        position = Position(0, 0)
        for item in self.source.read(from_index):
            if item is None:
                continue
            position = Position(item.index, position.events + 1 if item.index == position.index else 1)
            if position > self.last:
                return
            yield item


def read_model(store: Store) -> list[tuple[Any, ...]]:
    """The serving balances, as rows (through the view readers use)."""
    return [tuple(row) for row in store.execute(
        "SELECT account, balance, movements, last_index FROM balances ORDER BY account")]  # fmt: skip


def rebuilt_read_model(store: Store, journal_dir: Path, last: Position | None = None) -> list[tuple[Any, ...]]:
    """The read model projected from scratch, in-process, into `store` (an empty database)."""
    source = JournalSource(Ledger, journal_dir)
    projector = Projector(Balances(), store, batch_events_max=1000)
    projector.run(source if last is None else PrefixSource(source, last), until_caught_up=True)
    return read_model(store)


def ledger_balances(journal_dir: Path) -> dict[str, int]:
    """The ledger's own balances after the whole journal (the state machine, not a projection)."""
    app: Any = recover(Ledger, journal_dir, None).processor.app
    return {name: account.balance for name, account in app.accounts.items()}
