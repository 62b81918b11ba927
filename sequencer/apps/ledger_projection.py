"""A read model of the ledger: every account's balance, in SQLite or PostgreSQL.

    seqd project --config projector.toml     # projection = "sequencer.apps.ledger_projection:Balances"

    SELECT account, balance FROM balances ORDER BY balance DESC LIMIT 10;

Each `TransferMade` (a deposit comes from the mint `@mint`) moves `amount` from `source` to
`target`: two upserts. As in the ledger, the balances, the mint's included, sum to zero at every
committed position, which is what readers and the tests check.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sequencer.apps.ledger import TransferMade
from sequencer.projection import Projection, Write

__all__ = ["Balances"]

# One statement for both sides of a transfer: consecutive writes with the same SQL go to the
# database as one executemany.
_MOVE = (
    "INSERT INTO {balances} (account, balance, movements, last_index) VALUES (?, ?, 1, ?) "
    "ON CONFLICT (account) DO UPDATE SET balance = {balances}.balance + excluded.balance, "
    "movements = {balances}.movements + 1, last_index = excluded.last_index"
)


class Balances(Projection):
    name = "balances"
    tables = {
        "balances": [
            "CREATE TABLE {balances} (account TEXT PRIMARY KEY, balance BIGINT NOT NULL, "
            "movements BIGINT NOT NULL, last_index BIGINT NOT NULL)",
            "CREATE INDEX {balances}_by_balance ON {balances} (balance)",
        ],
    }

    def project(self, index: int, timestamp_ns: int, event: Any) -> Iterator[Write]:
        if isinstance(event, TransferMade):
            yield Write(_MOVE, (event.source, -event.amount, index))
            yield Write(_MOVE, (event.target, event.amount, index))
