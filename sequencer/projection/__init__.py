"""Read models in a real database: projections of the event stream into SQLite or PostgreSQL.

    from sequencer.projection import JournalSource, Projector, open_store
    from sequencer.apps.ledger_projection import Balances

    projector = Projector(Balances(), open_store("sqlite:///var/lib/seqd/read-model.db"))
    projector.run(JournalSource(Ledger, journal_dir, follow=True))

One module per concept (docs/query-side.md, "Projections", has the long form):

    projection.py      what an app writes: `Projection.project(index, timestamp_ns, event)` ->
                       `Write`s; positions; the failure naming an index (I/O-free)
    store.py           SQLite and PostgreSQL: a batch's writes and its position in one
                       transaction, generations, the atomic switch
    projector.py       the loop: source -> batches -> store; resume, rebuild and switch
    journal_source.py  events from the journal, by applying it in-process
    subscription_source.py  events from the node's catch-up subscription (the live path)
"""

from sequencer.projection.journal_source import POLL_S_DEFAULT, JournalSource
from sequencer.projection.projection import (
    Position,
    Projection,
    ProjectionError,
    ProjectionFailed,
    SourceEvent,
    Write,
)
from sequencer.projection.projector import BATCH_EVENTS_DEFAULT, BATCH_EVENTS_MAX, Projector, Source
from sequencer.projection.store import (
    POSITIONS_TABLE,
    Generation,
    GenerationRetired,
    PostgresStore,
    SQLiteStore,
    Store,
    open_store,
    physical_table,
)
from sequencer.projection.subscription_source import SubscriptionSource

__all__ = [
    "BATCH_EVENTS_DEFAULT",
    "BATCH_EVENTS_MAX",
    "POLL_S_DEFAULT",
    "POSITIONS_TABLE",
    "Generation",
    "GenerationRetired",
    "JournalSource",
    "Position",
    "PostgresStore",
    "Projection",
    "ProjectionError",
    "ProjectionFailed",
    "Projector",
    "SQLiteStore",
    "Source",
    "SourceEvent",
    "Store",
    "SubscriptionSource",
    "Write",
    "open_store",
    "physical_table",
]
