"""What an app writes to make a read model, and the projector's bookkeeping (I/O-free).

A projection is a function from each event (with its log index and timestamp) to database
writes. It returns the writes instead of running them, so it can be tested without a database
and so the projector decides the transactions: a batch of events, their writes and the position
reached go into one transaction (`sequencer.projection.store`).

    class Balances(Projection):
        name = "balances"
        tables = {"balances": ["CREATE TABLE {balances} (account TEXT PRIMARY KEY, balance BIGINT)"]}

        def project(self, index, timestamp_ns, event):
            if isinstance(event, TransferMade):
                yield Write("UPDATE {balances} SET balance = balance + ? WHERE account = ?", ...)

SQL uses `?` for parameters (translated to `%s` for PostgreSQL) and `{table}` for each of the
projection's tables: each rebuild writes into its own physical tables (`balances_g2`), and
readers read a view named after the table (`balances`) that the switch repoints.

Position. One command may publish several events, so an index alone does not say how far a
projector got: the position is (index, events), the last index applied and how many of its
events were. Events of one index are deterministic (same order on every replay), so resuming
from (index, events) skips exactly what was applied.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

__all__ = [
    "IDENTIFIER",
    "Position",
    "Projection",
    "ProjectionError",
    "ProjectionFailed",
    "SourceEvent",
    "Write",
    "advance",
    "check_projection",
    "project_batch",
]

# Projection and table names become SQL identifiers (and, with a generation suffix, table
# names): plain lower-case ones need no quoting in SQLite or PostgreSQL.
IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,47}")


class Write(NamedTuple):
    """One SQL statement: `?` parameters, `{table}` for the projection's tables."""

    sql: str
    params: Sequence[Any] = ()


class SourceEvent(NamedTuple):
    """An event as a source hands it to the projector."""

    index: int  # type: ignore[assignment]  # shadows tuple.index: the log word wins
    timestamp_ns: int
    event: Any


class Position(NamedTuple):
    """How far a projection got: the last index applied and how many of its events."""

    index: int  # type: ignore[assignment]  # shadows tuple.index: the log word wins
    events: int


def advance(position: Position, index: int) -> Position:
    """The position after applying the next event, which is at `index`."""
    assert index >= position.index, (index, position)
    if index == position.index:
        return Position(index, position.events + 1)
    return Position(index, 1)


class ProjectionError(Exception):
    """The projector cannot go on: a bad projection, a database in an unexpected state, or
    another projector writing the same projection."""


class ProjectionFailed(ProjectionError):
    """The projection raised (or its writes failed) on the event at `index`; everything before
    it is committed, nothing from it on is written."""

    def __init__(self, name: str, index: int, event: Any, cause: BaseException) -> None:
        self.name = name
        self.index = index
        self.event = event
        self.cause = cause
        super().__init__(
            f"projection {name!r} failed on the event at index {index} ({event!r}): "
            f"{type(cause).__name__}: {cause}. The read model holds every event before it and "
            f"nothing from index {index} on; fix the projection and start the projector again: "
            f"it resumes at index {index}"
        )


class Projection:
    """Subclass with `name`, `tables` and `project`; see the module docstring.

    Attributes:
        name: the projection's name in the database (one row per generation in
            `seqd_projections`), an IDENTIFIER.
        tables: table name -> the statements that create it and its indexes, with `{name}` for
            each table (`{balances}`); every table is created anew for each rebuild.
        version: bump it when `project` or `tables` change what the read model holds: a
            projector refuses to write a generation another version built, so the new code is
            deployed by a rebuild (`seqd project --rebuild`) while the old projector serves.
    """

    name: ClassVar[str]
    tables: ClassVar[Mapping[str, Sequence[str]]]
    version: ClassVar[int] = 1

    def project(self, index: int, timestamp_ns: int, event: Any) -> Iterable[Write]:
        """The writes for one event (none for an event the read model ignores).

        Must not touch the database itself, nor keep state between calls that the database
        does not hold: a restart calls it again only for events after the stored position.
        """
        raise NotImplementedError


def check_projection(projection: Projection) -> None:
    """Raises ProjectionError if the projection's names cannot be used."""
    name = getattr(projection, "name", None)
    if not isinstance(name, str) or not IDENTIFIER.fullmatch(name):
        raise ProjectionError(
            f"{type(projection).__name__}.name is {name!r}: a projection needs a name of lower-"
            "case letters, digits and underscores (at most 48), e.g. 'balances'"
        )
    tables = getattr(projection, "tables", None)
    if not tables:
        raise ProjectionError(
            f"projection {name!r} declares no tables: set tables = {{'name': ['CREATE TABLE "
            "{name} (...)']}"
        )
    version = getattr(projection, "version", None)
    if not isinstance(version, int) or version < 1:
        raise ProjectionError(f"projection {name!r}: version = {version!r} must be an integer >= 1")
    for table in tables:
        if not IDENTIFIER.fullmatch(table):
            raise ProjectionError(
                f"projection {name!r}: table name {table!r} must be lower-case letters, digits "
                "and underscores (at most 48)"
            )


def project_batch(
    projection: Projection, events: Sequence[SourceEvent]
) -> tuple[list[list[Write]], ProjectionFailed | None]:
    """The writes of each event, in order, up to the first event the projection raises on.

    Returns (writes per event applied, failure): `failure` names the event that raised, and the
    list holds the writes of the events before it only.
    """
    planned: list[list[Write]] = []
    project = projection.project
    for item in events:
        try:
            planned.append(list(project(item.index, item.timestamp_ns, item.event)))
        except Exception as error:
            return planned, ProjectionFailed(projection.name, item.index, item.event, error)
    return planned, None
