"""The projector: events from a source, through a projection, into a store, exactly once.

    projector = Projector(Balances(), open_store("sqlite:///var/lib/seqd/read-model.db"))
    projector.run(JournalSource(Ledger, journal_dir, follow=True))    # live, until stopped
    projector.rebuild(JournalSource(Ledger, journal_dir, follow=True))  # from 0, then switch

Theory of operation. A source yields the events after an index, in log order, as
`SourceEvent(index, timestamp_ns, event)`, and `None` whenever it has nothing more for now (a
live source then waits). The projector collects up to `batch_events_max` events, or what came
before a `None`, computes their writes (`project_batch`, no I/O), and commits writes and the
new position in one transaction (`Store.commit_batch`). Restarted, it reads the stored position
(index, events at that index), asks the source for that index again and skips the events of it
already applied: no index skipped, none applied twice, wherever the crash fell.

A projection that raises on an event: the events before it in the batch are committed, then
`ProjectionFailed` names the index; nothing from it on is written. A write the database refuses
fails the whole batch's transaction; the batch is then replayed one event per transaction to
find the event whose writes fail, with the same outcome.

A rebuild writes a new generation (new tables) from index 1 while the serving one keeps being
updated by the live projector, and switches once it has caught up (`Store.switch`): the live
projector finds its generation retired at its next batch and carries on with the new one.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Protocol

from sequencer.projection.projection import (
    Position,
    Projection,
    ProjectionError,
    ProjectionFailed,
    SourceEvent,
    advance,
    check_projection,
    project_batch,
)
from sequencer.projection.store import Generation, GenerationRetired, Store, WriteFailed

__all__ = ["BATCH_EVENTS_DEFAULT", "BATCH_EVENTS_MAX", "Projector", "Source"]

# Events per transaction. One commit costs ~0.1-1 ms (an fsync for PostgreSQL, a WAL append for
# SQLite); the writes of a ledger event ~10-50 us. A batch of 500 makes the commit a few percent
# of the work, and a crash re-applies at most one batch.
BATCH_EVENTS_DEFAULT = 500
BATCH_EVENTS_MAX = 100_000  # the batch's writes are held in memory until its commit


class Source(Protocol):
    """Where events come from: `JournalSource` (the journal, applied in-process) or a node's
    catch-up subscription."""

    def read(self, from_index: int) -> Iterable[SourceEvent | None]:
        """Every event at index >= from_index, in log order; `None`: nothing more for now."""
        ...


class Projector:
    """Runs one projection into one store; see the module docstring.

    Args:
        projection: the app's projection.
        store: the database (`open_store`).
        batch_events_max: events per transaction, 1 to BATCH_EVENTS_MAX.
        on_commit: called with the generation and position after each committed batch.
    """

    def __init__(
        self,
        projection: Projection,
        store: Store,
        batch_events_max: int = BATCH_EVENTS_DEFAULT,
        on_commit: Callable[[Generation, Position], object] | None = None,
    ) -> None:
        check_projection(projection)
        if not 1 <= batch_events_max <= BATCH_EVENTS_MAX:
            raise ProjectionError(
                f"batch_events_max={batch_events_max} must be between 1 and {BATCH_EVENTS_MAX}"
            )
        self.projection = projection
        self.store = store
        self.batch_events_max = batch_events_max
        self.on_commit = on_commit
        self.name = projection.name
        self.version = projection.version
        self.tables = {table: list(statements) for table, statements in projection.tables.items()}
        self.stopping = False  # set (e.g. from a signal handler) to end `run` after its batch

    def stop(self) -> None:
        self.stopping = True

    def serving(self) -> Generation:
        """The serving generation, created (empty, at index 0) if there is none.

        Raises:
            ProjectionError: another version of the projection built it.
        """
        found = self.store.serving(self.name)
        if found is None:
            found = self.store.create_generation(self.name, self.tables, serving=True, version=self.version)
        if found.version != self.version:
            raise ProjectionError(
                f"the serving generation {found.generation} of projection {self.name!r} was built "
                f"by version {found.version} of the projection; this is version {self.version}. "
                + ("Rebuild it with this code (seqd project --rebuild) while the old projector "
                   "keeps it up to date, then start this one" if found.version < self.version else
                   "A rebuild switched to a newer version: run the projector of that version")
            )
        return found

    def run(self, source: Source, until_caught_up: bool = False) -> Position:
        """Apply the source's events to the serving generation until `stop()` (or, with
        `until_caught_up`, until the source has nothing more for now); returns the position.

        Raises:
            ProjectionFailed: the projection raised, or its writes failed, on one event.
            ProjectionError: another projector writes this projection, or the database is not
                as this projector left it.
        """
        while True:
            generation = self.serving()
            try:
                return self._follow(source, generation, until_caught_up, switch=False)
            except GenerationRetired:
                continue  # a rebuild switched: carry on with the generation it made serving

    def rebuild(self, source: Source) -> Generation:
        """Build a new generation from index 1 (or resume an interrupted rebuild of this
        version; one of another version is dropped and started again) while the
        serving one serves, then switch to it; returns it (serving, or still building if
        `stop()` came before it caught up).

        Raises:
            ProjectionFailed, ProjectionError: as `run`; ProjectionError also when the source
                ends behind the serving generation (it was fed from another log).
        """
        generation = self.store.create_generation(self.name, self.tables, serving=False, version=self.version)
        self._follow(source, generation, until_caught_up=False, switch=True)
        found = [g for g in self.store.generations(self.name) if g.generation == generation.generation]
        assert found, generation  # only a switch retires it, and only this rebuild switches it
        return found[0]

    # -- the loop --------------------------------------------------------------------------------

    def _follow(self, source: Source, generation: Generation, until_caught_up: bool, switch: bool) -> Position:
        position = generation.position
        items = self._items(source, position)
        try:
            return self._apply(items, generation, until_caught_up, switch)
        finally:
            items.close()  # a source holding files or a connection lets them go now

    def _apply(
        self, items: Iterator[SourceEvent | None], generation: Generation, until_caught_up: bool, switch: bool
    ) -> Position:
        position = resume = generation.position
        skip = position.events  # events of index resume.index already applied
        pending: list[SourceEvent] = []
        batch_max = self.batch_events_max
        for item in items:
            if item is not None:
                if skip:
                    if item.index != resume.index:
                        raise ProjectionError(
                            f"projection {self.name!r} applied {resume.events} events at index "
                            f"{resume.index}, but the source has only {resume.events - skip} "
                            "there: the source is not the log this read model was built from"
                        )
                    skip -= 1
                    continue
                pending.append(item)
                if len(pending) < batch_max:
                    continue
            position = self._commit(generation, position, pending)
            pending = []
            if item is None or self.stopping:
                if switch and self.store.switch(generation._replace(position=position)):
                    return position
                if until_caught_up or self.stopping:
                    return position
        position = self._commit(generation, position, pending)
        if switch and not self.store.switch(generation._replace(position=position)):
            serving = self.store.serving(self.name)
            raise ProjectionError(
                f"the rebuild of projection {self.name!r} reached {tuple(position)} and its "
                f"source ended, but the serving generation is at "
                f"{tuple(serving.position) if serving else '?'}: it was fed from another log"
            )
        return position

    def _items(self, source: Source, position: Position) -> Generator[SourceEvent | None, None, None]:
        items = iter(source.read(max(1, position.index)))
        try:
            for item in items:
                yield item
                if self.stopping:
                    yield None  # commit what is pending, then stop
                    return
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    def _commit(self, generation: Generation, start: Position, events: list[SourceEvent]) -> Position:
        if not events:
            return start
        writes, failure = project_batch(self.projection, events)
        applied = events[: len(writes)]
        end = start
        for item in applied:
            end = advance(end, item.index)
        try:
            self.store.commit_batch(generation, start, writes, end)
        except WriteFailed:
            end = self._commit_one_by_one(generation, start, applied, writes)
        if self.on_commit is not None:
            self.on_commit(generation, end)
        if failure is not None:
            raise failure
        return end

    def _commit_one_by_one(
        self, generation: Generation, start: Position, events: list[SourceEvent], writes: list[list]
    ) -> Position:
        """A batch failed on a write: commit event by event up to the event that fails."""
        position = start
        for item, event_writes in zip(events, writes, strict=True):
            end = advance(position, item.index)
            try:
                self.store.commit_batch(generation, position, [event_writes], end)
            except WriteFailed as failed:
                if self.on_commit is not None:
                    self.on_commit(generation, position)
                raise ProjectionFailed(self.name, item.index, item.event, failed.cause) from failed.cause
            position = end
        return position
