"""Where read models live: SQLite (embedded default) or PostgreSQL, with the projector's position
in the same database.

Theory of operation. Every projection has rows in `seqd_projections`, one per generation: its
state (`building`, `serving`, `retired`), its position (last index applied, events applied at
that index) and its tables. A generation's tables are `<table>_g<generation>`; readers read
the view `<table>`, which points at the serving generation.

- `commit_batch` runs a batch's writes and stores the new position in ONE transaction, after
  checking (row locked) that the stored position is the one the projector started the batch
  from and that its generation is not retired. A crash at any moment leaves either the batch
  and its position or neither, so a restart resumes exactly once; a second projector writing
  the same generation is refused instead of applying events twice.
- `switch` makes a rebuilt generation the serving one in one transaction: only once it has
  reached the serving generation's position (readers never see the read model go back in
  time), it drops and recreates the views and the old generation's tables. A projector still
  writing the old generation finds it retired at its next batch and moves to the new one.

SQLite: one file, WAL mode (readers never block the projector, nor it them), `BEGIN IMMEDIATE`
serialises writers. `synchronous=NORMAL`: a power loss may lose the last transactions, but
a batch and its position always go together, so the projector re-applies them: exactly once
holds, durability is the journal's. PostgreSQL (psycopg 3, the `postgres` extra): a row lock
(`FOR UPDATE`) on the generation's row orders the projector, a rebuild's switch and a second
projector; an advisory lock serialises the creation of generations.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from sequencer.projection.projection import IDENTIFIER, Position, ProjectionError, Write

__all__ = [
    "POSITIONS_TABLE",
    "SQL_CACHE_ENTRIES_MAX",
    "Generation",
    "GenerationRetired",
    "PostgresStore",
    "SQLiteStore",
    "Store",
    "WriteFailed",
    "open_store",
    "physical_table",
]

POSITIONS_TABLE = "seqd_projections"
# Formatted statements kept per generation. A projection's SQL strings are constants in its
# code, so a few dozen is the usual; the bound keeps an app that builds SQL per event (values
# inlined, which it should not do) from growing the cache without end.
SQL_CACHE_ENTRIES_MAX = 1024
# An arbitrary constant key for PostgreSQL's advisory lock that serialises schema changes
# (creating the positions table, a generation, a switch) between projectors.
_PG_SCHEMA_LOCK_KEY = 0x73657164_70726F6A  # "seqdproj"
SQLITE_BUSY_TIMEOUT_S = 30.0  # how long a writer waits for another's transaction to end

_CREATE_POSITIONS = f"""CREATE TABLE IF NOT EXISTS {POSITIONS_TABLE} (
    name TEXT NOT NULL,
    generation INTEGER NOT NULL,
    state TEXT NOT NULL,
    last_index BIGINT NOT NULL,
    events_at_index BIGINT NOT NULL,
    tables TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (name, generation))"""


class Generation(NamedTuple):
    """One generation of a projection, as stored."""

    name: str
    generation: int
    state: str  # "building", "serving" or "retired"
    position: Position
    tables: tuple[str, ...]
    version: int  # the projection's version that builds it


class GenerationRetired(ProjectionError):
    """The generation a projector writes was switched away from (a rebuild finished)."""


class WriteFailed(Exception):
    """A projection's write was refused by the database (constraint, bad SQL, bad value)."""

    def __init__(self, cause: BaseException) -> None:
        self.cause = cause
        super().__init__(str(cause))


def physical_table(table: str, generation: int) -> str:
    return f"{table}_g{generation}"


_QUESTION_OR_QUOTED = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|\?|%")


def _to_format_style(sql: str) -> str:
    """`?` parameters to psycopg's `%s` (and a literal `%` to `%%`), outside quoted text."""

    def replace(match: re.Match[str]) -> str:
        text = match.group(0)
        return "%s" if text == "?" else "%%" if text == "%" else text

    return _QUESTION_OR_QUOTED.sub(replace, sql)


class Store:
    """The dialect-independent half: positions, batches, generations, the switch."""

    dialect = ""
    write_errors: tuple[type[BaseException], ...] = ()

    def __init__(self) -> None:
        self._sql: dict[tuple[int, str], str] = {}

    # -- the dialect's ----------------------------------------------------------------------

    def close(self) -> None:
        raise NotImplementedError

    def transaction(self, schema: bool = False) -> contextlib.AbstractContextManager[None]:
        """A write transaction; `schema`: also exclude other schema changes."""
        raise NotImplementedError

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def executemany(self, sql: str, params: list[Sequence[Any]]) -> None:
        raise NotImplementedError

    def _param(self, sql: str) -> str:
        """`sql` with `?` parameters in this dialect's style."""
        return sql

    def is_write_error(self, error: Exception) -> bool:
        """The database refused a write for what it is (the projection's fault, so an event is
        to blame), rather than failing (busy, disk, connection: retry the same batch later)."""
        return isinstance(error, self.write_errors)

    def _lock_suffix(self) -> str:
        return ""

    # -- positions ----------------------------------------------------------------------------

    def ensure_schema(self) -> None:
        with self.transaction(schema=True):
            self.execute(_CREATE_POSITIONS)

    def generations(self, name: str) -> list[Generation]:
        rows = self.execute(
            self._param(f"SELECT name, generation, state, last_index, events_at_index, tables, version "
                        f"FROM {POSITIONS_TABLE} WHERE name = ? ORDER BY generation"), (name,))  # fmt: skip
        return [_generation(row) for row in rows]

    def serving(self, name: str) -> Generation | None:
        found = [g for g in self.generations(name) if g.state == "serving"]
        assert len(found) <= 1, found
        return found[0] if found else None

    def building(self, name: str) -> Generation | None:
        found = [g for g in self.generations(name) if g.state == "building"]
        assert len(found) <= 1, found
        return found[0] if found else None

    def position(self, name: str) -> Position | None:
        """The serving generation's position: the index the read model reflects."""
        serving = self.serving(name)
        return None if serving is None else serving.position

    def create_generation(
        self, name: str, tables: Mapping[str, Sequence[str]], serving: bool, version: int = 1
    ) -> Generation:
        """A new generation with empty tables, built by `version` of the projection: serving
        (the views point at it) only when asked and no generation serves yet; else building.

        An existing generation in the wanted state is returned instead (a concurrent creator's,
        or an interrupted rebuild's to resume), except a building one of another version: an
        interrupted rebuild by other code is dropped and started again.
        """
        assert IDENTIFIER.fullmatch(name), name
        state = "serving" if serving else "building"
        with self.transaction(schema=True):
            existing = self._locked_generations(name)
            for generation in existing:
                if generation.state == state and (serving or generation.version == version):
                    return generation
                if generation.state == state:
                    self._drop(generation)
            number = max((g.generation for g in existing), default=0) + 1
            physical = {table: physical_table(table, number) for table in tables}
            for statements in tables.values():
                for statement in statements:
                    self.execute(statement.format(**physical))
            self.execute(self._param(
                f"INSERT INTO {POSITIONS_TABLE} (name, generation, state, last_index, "
                "events_at_index, tables, version) VALUES (?, ?, ?, 0, 0, ?, ?)"),
                (name, number, state, " ".join(tables), version))  # fmt: skip
            if serving:
                for table in tables:
                    self._create_view(table, number)
        return Generation(name, number, state, Position(0, 0), tuple(tables), version)

    def _drop(self, generation: Generation) -> None:
        """Drops a generation that does not serve: its tables and its row (in a transaction)."""
        assert generation.state != "serving", generation
        for table in generation.tables:
            self.execute(f"DROP TABLE IF EXISTS {physical_table(table, generation.generation)}")
        self.execute(self._param(f"DELETE FROM {POSITIONS_TABLE} WHERE name = ? AND generation = ?"),
                     (generation.name, generation.generation))  # fmt: skip

    def _locked_generations(self, name: str) -> list[Generation]:
        rows = self.execute(self._param(
            f"SELECT name, generation, state, last_index, events_at_index, tables, version FROM "
            f"{POSITIONS_TABLE} WHERE name = ? ORDER BY generation{self._lock_suffix()}"), (name,))  # fmt: skip
        return [_generation(row) for row in rows]

    def _create_view(self, table: str, generation: int) -> None:
        self.execute(f"CREATE VIEW {table} AS SELECT * FROM {physical_table(table, generation)}")

    # -- batches ------------------------------------------------------------------------------

    def statement(self, generation: Generation, sql: str) -> str:
        """A projection's `sql` for this generation's tables, in this dialect."""
        key = (generation.generation, sql)
        found = self._sql.get(key)
        if found is None:
            if len(self._sql) >= SQL_CACHE_ENTRIES_MAX:
                self._sql.clear()
            physical = {table: physical_table(table, generation.generation) for table in generation.tables}
            try:
                formatted = sql.format(**physical)
            except (KeyError, IndexError, ValueError) as error:
                raise ProjectionError(
                    f"projection {generation.name!r}: cannot fill in the table names of {sql!r} "
                    f"({type(error).__name__}: {error}); name tables as {{table}} with a table "
                    f"the projection declares ({', '.join(generation.tables)}), and write {{{{ "
                    "for a literal brace"
                ) from None
            found = self._sql[key] = self._param(formatted)
        return found

    def commit_batch(
        self, generation: Generation, start: Position, writes: Sequence[Sequence[Write]], end: Position
    ) -> None:
        """Runs `writes` (the events' writes, in order) and moves the position from `start` to
        `end`, in one transaction.

        Raises:
            GenerationRetired: the generation was switched away from; nothing written.
            ProjectionError: the stored position is not `start` (another projector writes
                this generation); nothing written.
            WriteFailed: the database refused a write; nothing written.
        """
        with self.transaction():
            rows = self.execute(self._param(
                f"SELECT state, last_index, events_at_index FROM {POSITIONS_TABLE} "
                f"WHERE name = ? AND generation = ?{self._lock_suffix()}"),
                (generation.name, generation.generation))  # fmt: skip
            if not rows or rows[0][0] == "retired":
                raise GenerationRetired(
                    f"generation {generation.generation} of projection {generation.name!r} was "
                    "retired (a rebuild switched to a newer one)"
                )
            stored = Position(int(rows[0][1]), int(rows[0][2]))
            if stored != start:
                raise ProjectionError(
                    f"projection {generation.name!r} generation {generation.generation} is at "
                    f"{tuple(stored)} in the database, but this projector resumed from "
                    f"{tuple(start)}: another projector is writing it. Run one projector per "
                    "projection and database"
                )
            try:
                self._run_writes(generation, writes)
            except Exception as error:
                if self.is_write_error(error):
                    raise WriteFailed(error) from error
                raise
            self.execute(self._param(
                f"UPDATE {POSITIONS_TABLE} SET last_index = ?, events_at_index = ? "
                "WHERE name = ? AND generation = ?"),
                (end.index, end.events, generation.name, generation.generation))  # fmt: skip

    def _run_writes(self, generation: Generation, writes: Sequence[Sequence[Write]]) -> None:
        """The writes in order; consecutive ones with the same SQL go as one executemany."""
        run_sql = ""
        run_params: list[Sequence[Any]] = []
        for event_writes in writes:
            for write in event_writes:
                if write.sql != run_sql:
                    if run_params:
                        self.executemany(self.statement(generation, run_sql), run_params)
                    run_sql, run_params = write.sql, []
                run_params.append(write.params)
        if run_params:
            self.executemany(self.statement(generation, run_sql), run_params)

    # -- the switch ---------------------------------------------------------------------------

    def switch(self, building: Generation) -> bool:
        """Make `building` the serving generation if it has reached the serving one's position;
        False (nothing changed) while it is behind.

        In one transaction: the views are recreated on its tables, the old generation is
        retired and its tables dropped.
        """
        with self.transaction(schema=True):
            generations = {g.generation: g for g in self._locked_generations(building.name)}
            current = generations.get(building.generation)
            if current is None or current.state != "building":
                raise ProjectionError(
                    f"generation {building.generation} of projection {building.name!r} is "
                    f"{'gone' if current is None else current.state}, not building: another "
                    "rebuild switched or removed it"
                )
            serving = [g for g in generations.values() if g.state == "serving"]
            if serving and current.position < serving[0].position:
                return False
            for old in serving:
                for table in old.tables:
                    self.execute(f"DROP VIEW IF EXISTS {table}")
                    self.execute(f"DROP TABLE IF EXISTS {physical_table(table, old.generation)}")
                self.execute(self._param(
                    f"UPDATE {POSITIONS_TABLE} SET state = 'retired' WHERE name = ? AND "
                    "generation = ?"), (old.name, old.generation))  # fmt: skip
            for table in current.tables:
                self.execute(f"DROP VIEW IF EXISTS {table}")
                self._create_view(table, current.generation)
            self.execute(self._param(
                f"UPDATE {POSITIONS_TABLE} SET state = 'serving' WHERE name = ? AND "
                "generation = ?"), (current.name, current.generation))  # fmt: skip
        return True


def _generation(row: Sequence[Any]) -> Generation:
    name, number, state, last_index, events, tables, version = row
    return Generation(name, int(number), state, Position(int(last_index), int(events)),
                      tuple(tables.split()), int(version))  # fmt: skip


class SQLiteStore(Store):
    """A read model in one SQLite file (created if missing)."""

    dialect = "sqlite"
    write_errors = (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.DataError,
                    sqlite3.OperationalError, sqlite3.InterfaceError)  # fmt: skip

    def __init__(self, path: Path | str) -> None:
        super().__init__()
        self.path = Path(path)
        self.connection = sqlite3.connect(
            self.path, isolation_level=None, timeout=SQLITE_BUSY_TIMEOUT_S, check_same_thread=False
        )
        self.connection.execute("PRAGMA journal_mode=WAL")
        self.connection.execute("PRAGMA synchronous=NORMAL")
        self.ensure_schema()

    def close(self) -> None:
        self.connection.close()

    def is_write_error(self, error: Exception) -> bool:
        # OperationalError is both a bad statement ("no such table", a syntax error) and the
        # database failing ("database is locked", "disk I/O error"): only the first is a write's.
        if isinstance(error, sqlite3.OperationalError):
            text = str(error).lower()
            return not any(word in text for word in ("locked", "busy", "disk", "i/o", "full", "readonly"))
        return isinstance(error, self.write_errors)

    @contextlib.contextmanager
    def transaction(self, schema: bool = False) -> Iterator[None]:
        # BEGIN IMMEDIATE takes the write lock now: a read-then-write transaction never has to
        # upgrade (which could fail with SQLITE_BUSY after the reads).
        self.connection.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.connection.execute("ROLLBACK")
            raise
        self.connection.execute("COMMIT")

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self.connection.execute(sql, params).fetchall()

    def executemany(self, sql: str, params: list[Sequence[Any]]) -> None:
        self.connection.executemany(sql, params)


class PostgresStore(Store):
    """A read model in a PostgreSQL database, through psycopg 3 (`pip install seqd[postgres]`)."""

    dialect = "postgresql"

    def __init__(self, dsn: str) -> None:
        super().__init__()
        try:
            import psycopg
        except ImportError:
            raise ProjectionError(
                "a PostgreSQL read model needs psycopg 3: pip install 'seqd[postgres]'"
            ) from None
        self._psycopg = psycopg
        self.write_errors = (psycopg.errors.IntegrityError, psycopg.errors.DataError,
                             psycopg.errors.ProgrammingError)  # fmt: skip
        self.connection = psycopg.connect(dsn, autocommit=True)
        self.ensure_schema()

    def close(self) -> None:
        self.connection.close()

    @contextlib.contextmanager
    def transaction(self, schema: bool = False) -> Iterator[None]:
        with self.connection.transaction():
            if schema:
                self.connection.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_SCHEMA_LOCK_KEY,))
            yield

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        cursor = self.connection.execute(sql, params)  # type: ignore[arg-type]
        return cursor.fetchall() if cursor.description is not None else []

    def executemany(self, sql: str, params: list[Sequence[Any]]) -> None:
        with self.connection.cursor() as cursor:
            cursor.executemany(sql, params)  # type: ignore[arg-type]

    def _param(self, sql: str) -> str:
        return _to_format_style(sql)

    def _lock_suffix(self) -> str:
        return " FOR UPDATE"


def open_store(database: str) -> Store:
    """A store from a database string: `postgresql://...` or `postgres://...` (a libpq DSN or
    URI), `sqlite:///path/to/file.db`, or a plain file path (SQLite).

    Raises:
        ProjectionError: psycopg is missing for a PostgreSQL database.
    """
    if database.startswith(("postgresql://", "postgres://")) or "dbname=" in database:
        return PostgresStore(database)
    if database.startswith("sqlite://"):
        database = database[len("sqlite://"):]
    return SQLiteStore(database)
