"""Projections into SQLite and a real PostgreSQL: exactly once across SIGKILL, failures that
name their index, rebuild and switch while readers read (docs/query-side.md, "Projections").

The events come from a journal written by a real node (the ledger, a few thousand transfers),
applied in-process by `JournalSource`; the projector under test runs as `seqd project` in a
child process, so SIGKILL lands in a real process holding a real transaction.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.harness import NodeProcess, write_config
from sequencer.apps.ledger import Ledger
from sequencer.apps.ledger_projection import Balances
from sequencer.projection import (
    JournalSource,
    Position,
    Projection,
    ProjectionError,
    ProjectionFailed,
    Projector,
    SourceEvent,
    Store,
    Write,
    open_store,
)
from tests.node_fixtures import DEPOSIT, TransferDriver, open_accounts
from tests.pg_server import postgres_server  # noqa: F401  (the fixture)
from tests.projection_apps import (
    BAD_WRITE_AT_ENV,
    RAISE_AT_ENV,
    STALL_AT_ENV,
    STALL_MARKER_ENV,
    ledger_balances,
    read_model,
    rebuilt_read_model,
)

ROOT = Path(__file__).resolve().parent.parent
ACCOUNTS = [f"acct{number}" for number in range(20)]
TRANSFERS = 2500  # ~5000 events: a projector with small batches takes about a second
PROJECTOR_TIMEOUT_S = 120.0
KILLS = 6  # SIGKILLs at seeded random points in the random-points test


@pytest.fixture(scope="module")
def journal_dir() -> Iterator[Path]:
    """A ledger journal written by a real node: accounts, deposits, transfers, a snapshot every
    1000 records; node stopped."""
    directory = Path(tempfile.mkdtemp(prefix="seqd-pj-", dir="/tmp"))
    node = NodeProcess(directory, f"t{uuid.uuid4().hex[:10]}", {"snapshot": {"every_records": 1000}})
    try:
        node.start()
        open_accounts(node.socket_path, ACCOUNTS)
        driver = TransferDriver(node.socket_path, ACCOUNTS, seed=14).start()
        driver.wait_acknowledged(TRANSFERS)
        driver.stop()
        assert node.stop() == 0
        yield node.config.journal_dir
    finally:
        node.stop()
        node.remove_shared_memory()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_dir: Path) -> Callable[[], str]:
    """Makes new empty databases of the parametrised kind (each call one); PostgreSQL's on the
    session's server (tests/pg_server.py)."""
    if request.param == "sqlite":
        return lambda: f"sqlite://{tmp_dir / f'{uuid.uuid4().hex[:8]}.db'}"
    server = request.getfixturevalue("postgres_server")
    return server.create_database  # type: ignore[no-any-return]


def _projector_config(directory: Path, database: str, journal_dir: Path, batch_events_max: int,
                      projection: str = "tests.projection_apps:FaultyBalances") -> Path:  # fmt: skip
    node_config = write_config(directory / f"node-{uuid.uuid4().hex[:6]}.toml",
                               {"node": {"data_dir": str(journal_dir.parent), "name": "stopped"}})  # fmt: skip
    return write_config(directory / f"projector-{uuid.uuid4().hex[:6]}.toml", {"": {
        "projection": projection, "database": database, "node_config": str(node_config),
        "batch_events_max": batch_events_max}})  # fmt: skip


def _start_projector(config: Path, *flags: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    for name in (RAISE_AT_ENV, STALL_AT_ENV, BAD_WRITE_AT_ENV):
        if env is None or name not in env:
            environment.pop(name, None)
    return subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "project", "--config", str(config), *flags],
        cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def _finish(process: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        output, _ = process.communicate(timeout=PROJECTOR_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        raise AssertionError(f"the projector did not finish in {PROJECTOR_TIMEOUT_S} s:\n{output}") from None
    return process.returncode, output


def _kill(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)


def _store(database: str) -> Store:
    return open_store(database)


def _expected(database: Callable[[], str], journal_dir: Path, last: Position | None = None) -> list[tuple[Any, ...]]:
    store = _store(database())
    try:
        return rebuilt_read_model(store, journal_dir, last)
    finally:
        store.close()


def _wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# -- the read model -------------------------------------------------------------------------


def test_read_model_holds_the_ledgers_balances(journal_dir: Path, tmp_dir: Path) -> None:
    store = open_store(f"sqlite://{tmp_dir / 'model.db'}")
    try:
        projector = Projector(Balances(), store, batch_events_max=100)
        position = projector.run(JournalSource(Ledger, journal_dir), until_caught_up=True)
        balances = {account: balance for account, balance, _movements, _index in read_model(store)}
        assert position == store.position("balances")
    finally:
        store.close()
    ledger = ledger_balances(journal_dir)
    assert balances == {name: balance for name, balance in ledger.items() if name in balances}
    assert set(ACCOUNTS) <= set(balances)
    assert sum(balances.values()) == 0
    assert balances["@mint"] == -DEPOSIT * len(ACCOUNTS)


class _Ordinals(Projection):
    """One row per event, keyed by (index, ordinal within the index): an event applied twice
    breaks the key, an event skipped leaves a hole."""

    name = "ordinals"
    tables = {"ordinals": ["CREATE TABLE {ordinals} (idx BIGINT, ordinal BIGINT, PRIMARY KEY (idx, ordinal))"]}

    def project(self, index: int, timestamp_ns: int, event: Any) -> Iterator[Write]:
        yield Write("INSERT INTO {ordinals} (idx, ordinal) VALUES (?, ?)", (index, event))


class _ListSource:
    """Several events per index, as a command that publishes several events makes."""

    def __init__(self, per_index: list[int]) -> None:
        self.items = [SourceEvent(index, index * 1000, ordinal)
                      for index, count in enumerate(per_index, start=1) for ordinal in range(count)]  # fmt: skip

    def read(self, from_index: int) -> Iterator[SourceEvent | None]:
        yield from (item for item in self.items if item.index >= from_index)


@pytest.mark.parametrize("batch_events_max", [1, 2, 3])
def test_resuming_inside_an_index_skips_exactly_the_events_applied(tmp_dir: Path, batch_events_max: int) -> None:
    """A batch may end between two events of one index; stopped after every batch and resumed,
    the projector applies every event once (position = index and events applied there)."""
    source = _ListSource([3, 0, 1, 4, 2, 5, 1])
    store = open_store(f"sqlite://{tmp_dir / 'ordinals.db'}")
    try:
        projector = Projector(_Ordinals(), store, batch_events_max=batch_events_max)
        projector.on_commit = lambda _generation, _position: projector.stop()
        positions = []
        for _run in range(len(source.items) + 1):  # one batch per run, and a last empty run
            projector.stopping = False
            positions.append(projector.run(source))
            assert positions[-1] == store.position("ordinals")
            if positions[-1] == Position(7, 1):
                break
        rows = store.execute("SELECT idx, ordinal FROM ordinals ORDER BY idx, ordinal")
        assert [tuple(row) for row in rows] == [(item.index, item.event) for item in source.items]
        assert Position(4, 2) in positions or batch_events_max != 2, positions  # a stop inside index 4
    finally:
        store.close()


# -- exactly once across SIGKILL ---------------------------------------------------------------


def test_sigkill_mid_batch_writes_nothing_of_the_batch_and_the_restart_applies_it_once(
    journal_dir: Path, database: Callable[[], str], tmp_dir: Path
) -> None:
    expected = _expected(database, journal_dir)
    target = database()
    config = _projector_config(tmp_dir, target, journal_dir, batch_events_max=50)
    stall_at, marker = 1500, tmp_dir / "stalled"
    process = _start_projector(config, "--until-caught-up",
                               env={STALL_AT_ENV: str(stall_at), STALL_MARKER_ENV: str(marker)})  # fmt: skip
    store = _store(target)
    try:
        _wait_for(lambda: marker.exists() or process.poll() is not None, "the stalled batch")
        assert process.poll() is None, _finish(process)
        _wait_for(lambda: _in_transaction(store), "the projector's transaction")
        _kill(process)
        position = store.position("balances")
        assert position is not None and position.index < stall_at, position
        # The batch that held the stall, and its earlier events' writes, are all gone.
        assert read_model(store) == _expected(database, journal_dir, position)
        code, output = _finish(_start_projector(config, "--until-caught-up"))
        assert code == 0, output
        assert read_model(store) == expected
    finally:
        store.close()


def _in_transaction(store: Store) -> bool:
    """The projector holds its write transaction (it is past the start of the batch)."""
    if store.dialect == "sqlite":
        import sqlite3

        probe = sqlite3.connect(store.path, timeout=0, isolation_level=None)
        try:
            probe.execute("BEGIN IMMEDIATE")
            probe.execute("ROLLBACK")
            return False
        except sqlite3.OperationalError:
            return True
        finally:
            probe.close()
    rows = store.execute("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND "
                         "position('RECURSIVE' in query) > 0 AND pid <> pg_backend_pid()")  # fmt: skip
    return bool(rows[0][0])


def test_sigkill_at_random_points_then_restart_equals_a_rebuild_from_scratch(
    journal_dir: Path, database: Callable[[], str], tmp_dir: Path
) -> None:
    seed = int(os.environ.get("SEQD_TEST_SEED", random.randrange(1 << 32)))
    rng = random.Random(seed)
    expected = _expected(database, journal_dir)
    target = database()
    config = _projector_config(tmp_dir, target, journal_dir, batch_events_max=rng.choice([3, 7, 20]))
    last = _journal_events(journal_dir)
    # In the first 80% of the log, so the projector is still busy when the kill comes.
    targets = sorted(rng.sample(range(1, last.index * 4 // 5), KILLS))
    store = _store(target)
    try:
        positions = []
        for kill, target_index in enumerate(targets):
            process = _start_projector(config, "--until-caught-up")
            # Kill once it has passed a random index, a random moment later: between batches,
            # inside a transaction, during the commit, wherever that falls.
            _wait_for(lambda: process.poll() is not None or (store.position("balances") or Position(0, 0)).index >= target_index,  # noqa: B023
                      f"seed {seed}: the projector to pass index {target_index}")  # fmt: skip
            time.sleep(rng.uniform(0.0, 0.05))
            if process.poll() is not None:  # a loaded machine stalled the test, not the projector
                code, output = _finish(process)
                assert code == 0 and kill > 0, f"seed {seed}: finished before kill {kill}: {output}"
                break
            _kill(process)
            positions.append(store.position("balances"))
            assert read_model(store) == _expected(database, journal_dir, positions[-1]), (
                f"seed {seed}: after kill {kill} the read model is not the projection of the "
                f"events up to its position {positions[-1]}")  # fmt: skip
        code, output = _finish(_start_projector(config, "--until-caught-up"))
        assert code == 0, output
        assert read_model(store) == expected, f"seed {seed}; positions at the kills: {positions}"
    finally:
        store.close()


# -- failures name their index ---------------------------------------------------------------------


def test_a_projection_that_raises_stops_naming_the_index_and_writes_nothing_past_it(
    journal_dir: Path, database: Callable[[], str], tmp_dir: Path
) -> None:
    raise_at = 1000
    target = database()
    config = _projector_config(tmp_dir, target, journal_dir, batch_events_max=64)
    code, output = _finish(_start_projector(config, "--until-caught-up", env={RAISE_AT_ENV: str(raise_at)}))
    assert code == 1, output
    assert f"failed on the event at index {raise_at}" in output, output
    assert "planted failure" in output, output
    store = _store(target)
    try:
        position = store.position("balances")
        assert position is not None and position.index == raise_at - 1, position  # one event per index
        assert read_model(store) == _expected(database, journal_dir, position)
        code, output = _finish(_start_projector(config, "--until-caught-up"))  # fixed: resumes
        assert code == 0, output
        assert read_model(store) == _expected(database, journal_dir)
    finally:
        store.close()


def test_a_write_the_database_refuses_stops_naming_its_index(
    journal_dir: Path, database: Callable[[], str]
) -> None:
    from tests.projection_apps import FaultyBalances

    bad_at = 800
    store = _store(database())
    try:
        projection = FaultyBalances()
        projection.bad_write_at = bad_at
        with pytest.raises(ProjectionFailed) as failed:
            Projector(projection, store, batch_events_max=100).run(JournalSource(Ledger, journal_dir))
        assert failed.value.index == bad_at
        assert f"index {bad_at}" in str(failed.value)
        position = store.position("balances")
        assert position == Position(bad_at - 1, 1)
        assert read_model(store) == _expected(database, journal_dir, position)
    finally:
        store.close()


def test_a_second_projector_on_the_same_generation_is_refused(journal_dir: Path, tmp_dir: Path) -> None:
    """Two projectors resumed from the same position: the second's batch starts from a position
    that is no longer the database's, so it is refused instead of applying events twice."""
    path = f"sqlite://{tmp_dir / 'model.db'}"
    first, second = open_store(path), open_store(path)
    try:
        one, two = Projector(Balances(), first), Projector(Balances(), second)
        generation = one.serving()
        assert two.serving() == generation
        event = next(_events(journal_dir))
        one._commit(generation, generation.position, [event])
        with pytest.raises(ProjectionError, match="another projector is writing it"):
            two._commit(generation, generation.position, [event])
        assert read_model(first) == _expected(lambda: f"sqlite://{tmp_dir / 'check.db'}", journal_dir, Position(event.index, 1))
    finally:
        first.close()
        second.close()


def _events(journal_dir: Path) -> Iterator[Any]:
    for item in JournalSource(Ledger, journal_dir).read(1):
        if item is not None:
            yield item


# -- rebuild and switch -------------------------------------------------------------------------------


def test_rebuild_switches_atomically_while_a_live_projector_and_readers_run(
    database: Callable[[], str], tmp_dir: Path, unique: str
) -> None:
    """A live node takes transfers; a live projector follows its journal into generation 1;
    readers read the balances all along; a rebuild builds generation 2 from index 1 and
    switches. Every read sees balances that sum to zero, at a position that never goes back;
    afterwards generation 2 serves, generation 1's tables are gone, and the live projector
    carries on into generation 2 up to the end of the log."""
    node = NodeProcess(tmp_dir, unique)
    target = database()
    node_config = node.config_path
    config = write_config(tmp_dir / "projector.toml", {"": {
        "projection": "sequencer.apps.ledger_projection:Balances", "database": target,
        "node_config": str(node_config), "batch_events_max": 50}})  # fmt: skip
    live = rebuild = None
    readers: list[_Reader] = []
    try:
        node.start()
        open_accounts(node.socket_path, ACCOUNTS)
        driver = TransferDriver(node.socket_path, ACCOUNTS, seed=7, in_flight=1).start()
        driver.wait_acknowledged(300)
        live = _start_projector(config)
        store = _store(target)
        _wait_for(lambda: (store.position("balances") or Position(0, 0)).index > 100, "the live projector")
        readers = [_Reader(target).start() for _ in range(2)]
        _wait_for(lambda: all(reader.reads > 20 for reader in readers), "the readers")
        rebuild = _start_projector(config, "--rebuild")
        reads_before = [reader.reads for reader in readers]
        code, output = _finish(rebuild)
        assert code == 0, output
        # The readers read on while the rebuild ran (the old generation served them).
        assert all(reader.reads > before for reader, before in zip(readers, reads_before, strict=True))
        generations = {g.generation: g.state for g in store.generations("balances")}
        assert generations == {1: "retired", 2: "serving"}, generations
        reads_at_switch = [reader.reads for reader in readers]
        driver.wait_acknowledged(len(driver.acknowledged) + 200)
        _wait_for(lambda: all(r.reads > at + 20 for r, at in zip(readers, reads_at_switch, strict=True)),
                  "reads after the switch")  # fmt: skip
        driver.stop()
        # The live projector moved to generation 2 and follows the log to its end.
        last = _journal_events(node.config.journal_dir)
        _wait_for(lambda: store.position("balances") == last, "the live projector to reach the end")
        for reader in readers:
            reader.stop()
        assert read_model(store) == _expected(database, node.config.journal_dir)
        tables = _tables(store)
        assert "balances_g1" not in tables and "balances_g2" in tables, tables
        for reader in readers:
            assert reader.sums == {0}, reader.sums
            assert reader.positions == sorted(reader.positions), "a reader saw the read model go back"
        store.close()
    finally:
        for reader in readers:
            reader.stop()
        for process in (live, rebuild):
            if process is not None and process.poll() is None:
                process.terminate()
                _finish(process)
        node.stop()
        node.remove_shared_memory()
    for reader in readers:
        assert reader.error is None, reader.error


def _journal_events(journal_dir: Path) -> Position:
    position = Position(0, 0)
    for item in _events(journal_dir):
        position = Position(item.index, position.events + 1 if item.index == position.index else 1)
    return position


def _tables(store: Store) -> set[str]:
    if store.dialect == "sqlite":
        rows = store.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    else:
        rows = store.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {row[0] for row in rows}


class _Reader:
    """A thread reading the balances and the position they reflect, in one statement."""

    QUERY = ("SELECT (SELECT coalesce(sum(balance), 0) FROM balances), (SELECT last_index FROM "
             "seqd_projections WHERE name = 'balances' AND state = 'serving')")  # fmt: skip

    def __init__(self, database: str) -> None:
        self.database = database
        self.reads = 0
        self.sums: set[int] = set()
        self.positions: list[int] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> _Reader:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        store = open_store(self.database)
        try:
            while not self._stop.is_set():
                total, index = store.execute(self.QUERY)[0]
                self.sums.add(int(total))
                self.positions.append(int(index))
                self.reads += 1
        except BaseException as error:
            self.error = error
        finally:
            store.close()


# -- the live path: a catch-up subscription ----------------------------------------------------------


def test_journal_source_started_from_a_snapshot_yields_what_a_replay_from_index_1_does(journal_dir: Path) -> None:
    from sequencer.snapshot import list_snapshots

    snapshot_dir = journal_dir.parent / "snapshots"
    snapshots = [info.index for info in list_snapshots(snapshot_dir) if info.valid]
    assert snapshots, "the node wrote no snapshot"
    everything = list(_events(journal_dir))
    for from_index in (snapshots[0] + 1, snapshots[-1], snapshots[-1] + 7):
        source = JournalSource(Ledger, journal_dir, snapshot_dir)
        assert source._start(from_index).applied_index == from_index - 1
        started = [item for item in source.read(from_index) if item is not None]
        assert started == [item for item in everything if item.index >= from_index]


def test_sqlite_busy_or_failing_is_not_blamed_on_an_event(tmp_dir: Path) -> None:
    import sqlite3

    store = open_store(f"sqlite://{tmp_dir / 'model.db'}")
    try:
        assert store.is_write_error(sqlite3.OperationalError("no such table: balances_g1"))
        assert store.is_write_error(sqlite3.IntegrityError("NOT NULL constraint failed"))
        assert not store.is_write_error(sqlite3.OperationalError("database is locked"))
        assert not store.is_write_error(sqlite3.OperationalError("disk I/O error"))
    finally:
        store.close()


class _BalancesV2(Balances):
    """The next version of the read model: the same balances, and when each account first moved."""

    version = 2
    tables = {"balances": ["CREATE TABLE {balances} (account TEXT PRIMARY KEY, balance BIGINT NOT NULL, "
                           "movements BIGINT NOT NULL, last_index BIGINT NOT NULL, first_index BIGINT)"]}  # fmt: skip

    def project(self, index: int, timestamp_ns: int, event: Any) -> Iterator[Write]:
        for write in super().project(index, timestamp_ns, event):
            yield write
            yield Write("UPDATE {balances} SET first_index = coalesce(first_index, ?) WHERE account = ?",
                        (index, write.params[0]))  # fmt: skip


def test_a_new_version_is_deployed_by_a_rebuild_and_the_old_code_refuses_to_write_it(
    journal_dir: Path, database: Callable[[], str]
) -> None:
    store = _store(database())
    try:
        Projector(Balances(), store).run(JournalSource(Ledger, journal_dir), until_caught_up=True)
        with pytest.raises(ProjectionError, match=r"built by version 1 .* this is version 2\. Rebuild it"):
            Projector(_BalancesV2(), store).run(JournalSource(Ledger, journal_dir))
        generation = Projector(_BalancesV2(), store).rebuild(JournalSource(Ledger, journal_dir))
        assert (generation.generation, generation.state, generation.version) == (2, "serving", 2)
        with pytest.raises(ProjectionError, match="A rebuild switched to a newer version"):
            Projector(Balances(), store).run(JournalSource(Ledger, journal_dir))
        rows = store.execute("SELECT account, balance, first_index FROM balances ORDER BY account")
        assert [(a, b) for a, b, _first in rows] == [(a, b) for a, b, _m, _i in _expected(database, journal_dir)]
        assert all(first is not None for _a, _b, first in rows)
    finally:
        store.close()


def _has_subscriptions() -> bool:
    from sequencer.client import Client

    return hasattr(Client, "subscribe")


@pytest.mark.skipif(not _has_subscriptions(), reason="catch-up subscriptions (issue 14 part 1) are not on this branch yet")
def test_projector_on_the_subscription_resumes_exactly_once_after_sigkill(
    database: Callable[[], str], tmp_dir: Path, unique: str
) -> None:
    """`source = "subscription"`: the projector follows a live node through its query replica;
    killed with SIGKILL while transfers go on and restarted, it ends equal to a rebuild of the
    node's journal from scratch."""
    node = NodeProcess(tmp_dir, unique, {"replicas": {"count": 1}})
    target = database()
    config = write_config(tmp_dir / "projector.toml", {"": {
        "projection": "sequencer.apps.ledger_projection:Balances", "database": target,
        "node_config": str(node.config_path), "batch_events_max": 20, "source": "subscription"}})  # fmt: skip
    live = None
    try:
        node.start()
        open_accounts(node.socket_path, ACCOUNTS)
        driver = TransferDriver(node.socket_path, ACCOUNTS, seed=3, in_flight=2).start()
        driver.wait_acknowledged(200)
        store = _store(target)
        for kill in range(3):
            live = _start_projector(config)
            reached = (store.position("balances") or Position(0, 0)).index + 100
            _wait_for(lambda: live.poll() is not None or (store.position("balances") or Position(0, 0)).index >= reached,  # noqa: B023
                      f"the projector to pass index {reached} (run {kill})")  # fmt: skip
            assert live.poll() is None, _finish(live)
            _kill(live)
        live = _start_projector(config)
        driver.stop()
        last = _journal_events(node.config.journal_dir)
        _wait_for(lambda: store.position("balances") == last, "the projector to reach the end of the log")
        assert read_model(store) == _expected(database, node.config.journal_dir)
        store.close()
    finally:
        if live is not None and live.poll() is None:
            live.terminate()
            _finish(live)
        node.stop()
        node.remove_shared_memory()


def test_seqd_project_says_what_is_wrong_with_its_config_or_database(tmp_dir: Path) -> None:
    bad_projection = write_config(tmp_dir / "bad.toml", {"": {"projection": "nope:Missing", "database": str(tmp_dir / "m.db")}})
    code, output = _finish(_start_projector(bad_projection))
    assert code == 78, output
    assert "projection = 'nope:Missing' cannot be loaded" in output, output
    no_server = write_config(tmp_dir / "down.toml", {"": {
        "projection": "sequencer.apps.ledger_projection:Balances",
        "database": f"host={tmp_dir / 'no-server'} dbname=x user=x"}})  # fmt: skip
    code, output = _finish(_start_projector(no_server, "--until-caught-up"))
    assert code == 1, output
    assert "cannot open the read model's database" in output, output


def test_a_rebuild_stopped_before_it_caught_up_does_not_switch_and_resumes_later(journal_dir: Path, tmp_dir: Path) -> None:
    store = open_store(f"sqlite://{tmp_dir / 'model.db'}")
    try:
        Projector(Balances(), store).run(JournalSource(Ledger, journal_dir), until_caught_up=True)
        served = read_model(store)
        rebuilder = Projector(Balances(), store, batch_events_max=100)
        rebuilder.on_commit = lambda _generation, _position: rebuilder.stop()
        stopped = rebuilder.rebuild(JournalSource(Ledger, journal_dir))
        assert (stopped.generation, stopped.state) == (2, "building")
        assert Position(0, 0) < stopped.position < _journal_events(journal_dir)
        assert read_model(store) == served  # generation 1 still serves
        finished = Projector(Balances(), store, batch_events_max=100).rebuild(JournalSource(Ledger, journal_dir))
        assert (finished.generation, finished.state) == (2, "serving")
        assert read_model(store) == served
    finally:
        store.close()
