"""The exporter to NATS JetStream: every committed event in the stream once, in index order, with
its headers, across kill -9 of the exporter and of nats-server (docs/integration.md).

A real node (the ledger under a transfer workload), a real nats-server with JetStream (the
Debian package; tests/nats_server.py), and `seqd export` in a child process, killed with SIGKILL
at seeded random points, as nats-server is. The stream is then compared, message by message,
with the events the journal yields when applied from scratch.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from benches._nats import NatsServer
from daemon.harness import NodeProcess, write_config
from sequencer.apps.ledger import Ledger, TransferMade
from sequencer.export import (
    DUPLICATE_WINDOW_S_MIN,
    HEADER_INDEX,
    HEADER_LOG,
    HEADER_MSG_ID,
    HEADER_ORDINAL,
    HEADER_TIMESTAMP_NS,
    HEADER_TYPE,
    ExportError,
    JetStreamExporter,
    encode_message,
    resume_position,
)
from sequencer.projection import JournalSource, Position, SourceEvent
from tests.nats_server import nats_server  # noqa: F401  (the fixture)
from tests.node_fixtures import TransferDriver, node_factory, open_accounts  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
ACCOUNTS = [f"acct{number}" for number in range(10)]
STREAM = "LEDGER"
PREFIX = "seqd.ledger"
GROWTH = 150  # messages the stream gains between two faults: each lands while events flow
# kill -9s, of the exporter or of nats-server, at seeded points of the workload; SEQD_EXPORT_LONG=1
# runs more (the CI budget allows ~6 here), SEQD_EXPORT_SEED=N another schedule.
FAULTS = 30 if os.environ.get("SEQD_EXPORT_LONG") == "1" else 6
SEED = int(os.environ.get("SEQD_EXPORT_SEED", "15"))
EXPORTER_TIMEOUT_S = 60.0
NATS_TIMEOUT_S = 5.0


# -- reading the stream ------------------------------------------------------------------------


class Stored(msgspec.Struct, frozen=True):
    sequence: int
    subject: str
    headers: dict[str, str]
    payload: bytes


async def _read_stream(url: str, stream: str = STREAM) -> list[Stored]:
    import nats

    connection = await nats.connect(url, allow_reconnect=False, connect_timeout=2)
    try:
        js = connection.jetstream(timeout=NATS_TIMEOUT_S)
        last = (await js.stream_info(stream)).state.last_seq
        found: list[Stored] = []
        if last == 0:
            return found
        subscription = await js.subscribe(f"{PREFIX}.>", stream=stream, ordered_consumer=True)
        while not found or found[-1].sequence < last:
            message = await subscription.next_msg(timeout=NATS_TIMEOUT_S)
            headers = {key: value for key, value in (message.headers or {}).items()
                       if not key.startswith("Nats-Expected")}  # fmt: skip
            found.append(Stored(message.metadata.sequence.stream, message.subject, headers, message.data))
        await subscription.unsubscribe()
        return found
    finally:
        await connection.close()


def read_stream(url: str, stream: str = STREAM) -> list[Stored]:
    return asyncio.run(_read_stream(url, stream))


def last_stored(url: str) -> tuple[int, int]:
    """(the stream's last sequence, the index in its last message); (0, 0) while unreadable."""

    async def look() -> tuple[int, int]:
        import nats

        connection = await nats.connect(url, allow_reconnect=False, connect_timeout=2)
        try:
            js = connection.jetstream(timeout=NATS_TIMEOUT_S)
            last = (await js.stream_info(STREAM)).state.last_seq
            if last == 0:
                return 0, 0
            message = await js.get_msg(STREAM, seq=last)
            return last, int(message.headers[HEADER_INDEX])
        finally:
            await connection.close()

    try:
        return asyncio.run(look())
    except Exception:  # server restarting, stream not yet created: not there yet
        return 0, 0


def expected_messages(journal_dir: Path, log_id: str) -> list[Stored]:
    """The messages the stream must hold: the journal applied from scratch, each event encoded."""
    position = Position(0, 0)
    expected = []
    for item in JournalSource(Ledger, journal_dir).read(1):
        assert item is not None
        message = encode_message(log_id, PREFIX, position, item.index, item.timestamp_ns, item.event)
        position = message.position
        expected.append(Stored(len(expected) + 1, message.subject, message.headers, message.payload))
    return expected


def _wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 60.0,
              exporter: subprocess.Popen[str] | None = None) -> None:  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while not condition():
        if exporter is not None and exporter.poll() is not None:
            raise AssertionError(f"the exporter exited with {exporter.returncode} while waiting for "
                                 f"{what}:\n{exporter.communicate()[0]}")  # fmt: skip
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# -- the exporter as `seqd export` -----------------------------------------------------------


def exporter_config(directory: Path, node: NodeProcess, url: str, **settings: Any) -> Path:
    values = {"node_config": str(node.config_path), "servers": [url], "stream": STREAM,
              "subject_prefix": PREFIX, "in_flight_max": 256, "batch_events_max": 64, **settings}  # fmt: skip
    return write_config(directory / "exporter.toml", {"": values})


def start_exporter(config: Path, *flags: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "export", "--config", str(config), *flags],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def finish(process: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        output, _ = process.communicate(timeout=EXPORTER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        raise AssertionError(f"the exporter did not finish in {EXPORTER_TIMEOUT_S} s:\n{output}") from None
    return process.returncode, output


@pytest.fixture
def exporters() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=30)


# -- the property ------------------------------------------------------------------------------


def test_stream_holds_each_committed_event_once_in_index_order_across_kill_9_of_exporter_and_nats(
    node_factory: Callable[..., NodeProcess],  # noqa: F811
    nats_server: NatsServer,  # noqa: F811
    exporters: list[subprocess.Popen[str]],
    tmp_dir: Path,
) -> None:
    rng = random.Random(SEED)
    node = node_factory()
    open_accounts(node.socket_path, ACCOUNTS)
    config = exporter_config(tmp_dir, node, nats_server.url)
    exporters.append(start_exporter(config))
    # Two transfers in flight: a few hundred a second, so the faults come among a few thousand
    # events rather than tens of thousands (the test's time goes on checking them).
    driver = TransferDriver(node.socket_path, ACCOUNTS, seed=SEED, in_flight=2).start()
    faults = []
    try:
        for fault in range(FAULTS):
            # Each fault lands while the exporter publishes: the stream has grown since the last.
            before = last_stored(nats_server.url)[0]
            _wait_for(lambda before=before: last_stored(nats_server.url)[0] > before + GROWTH,
                      f"the stream to grow past {before} before fault {fault} (faults so far: {faults})",
                      exporter=exporters[-1])  # fmt: skip
            time.sleep(rng.uniform(0.0, 0.3))
            if rng.random() < 0.5:
                faults.append("exporter")
                exporters[-1].send_signal(signal.SIGKILL)
                exporters[-1].communicate(timeout=30)
                exporters.append(start_exporter(config))
            else:
                faults.append("nats-server")
                nats_server.kill()
                time.sleep(rng.uniform(0.0, 0.5))
                nats_server.start()
    finally:
        driver.stop()
    assert len(driver.acknowledged) > 0
    # Every transfer acknowledged is durable: the journal's events are what the stream must hold.
    expected = expected_messages(node.config.journal_dir, node.node)
    last_index = int(expected[-1].headers[HEADER_INDEX])
    _wait_for(lambda: last_stored(nats_server.url)[1] >= last_index, f"the export to reach index {last_index}",
              exporter=exporters[-1])
    exporters[-1].send_signal(signal.SIGTERM)
    code, output = finish(exporters[-1])
    assert code == 0, output

    stored = read_stream(nats_server.url)
    context = f"seed {SEED}, faults {faults}"
    assert len(stored) == len(expected), (context, len(stored), len(expected))
    ids = [message.headers[HEADER_MSG_ID] for message in stored]
    assert len(set(ids)) == len(ids), f"{context}: a message stored twice"
    for got, want in zip(stored, expected, strict=True):
        assert got == want, (context, got, want)
    indexes = [int(message.headers[HEADER_INDEX]) for message in stored]
    assert indexes == sorted(indexes)
    assert "exporter" in faults or "nats-server" in faults


# -- the library API ---------------------------------------------------------------------------


class _ListSource:
    """Several events per index, as a command that publishes several events makes."""

    def __init__(self, per_index: list[int]) -> None:
        self.items = [SourceEvent(index, 1000 * index, TransferMade(f"a{index}", f"b{ordinal}", ordinal))
                      for index, count in enumerate(per_index, start=1) for ordinal in range(count)]  # fmt: skip

    def read(self, from_index: int) -> Iterator[SourceEvent | None]:
        yield from (item for item in self.items if item.index >= from_index)


def test_exporter_stopped_after_any_ack_resumes_inside_an_index_without_gap_or_duplicate(
    nats_server: NatsServer,  # noqa: F811
) -> None:
    """The resume rule alone: stopped after each ack (which may fall between two events of one
    index) and started again, the exporter reads from the stream where to go on."""
    source = _ListSource([3, 0, 1, 4, 2, 5, 1])
    runs = 0
    while True:
        runs += 1
        assert runs <= len(source.items) + 1
        exporter = JetStreamExporter([nats_server.url], STREAM, PREFIX, "n1", in_flight_max=1, batch_events_max=1)
        exporter.on_ack = lambda _position, exporter=exporter: exporter.stop()
        exporter.run(source, until_caught_up=True)
        if exporter.published == 0:
            break
        assert exporter.published == 1 and exporter.duplicates == 0
    stored = read_stream(nats_server.url)
    assert [(int(m.headers[HEADER_INDEX]), int(m.headers[HEADER_ORDINAL])) for m in stored] == [
        (item.index, item.event.amount) for item in source.items
    ]
    first = stored[0]
    assert first.subject == f"{PREFIX}.TransferMade"
    assert first.headers == {HEADER_MSG_ID: "n1:1:0", HEADER_LOG: "n1", HEADER_INDEX: "1", HEADER_ORDINAL: "0",
                             HEADER_TIMESTAMP_NS: "1000", HEADER_TYPE: "TransferMade"}  # fmt: skip
    assert json.loads(first.payload) == {"type": "TransferMade", "source": "a1", "target": "b0", "amount": 0}


def test_a_resend_of_what_the_stream_holds_is_dropped_as_a_duplicate(nats_server: NatsServer) -> None:  # noqa: F811
    """The overlap the duplicate window covers: a session that resumed from a position older
    than the stream's (it read the stream before the dead session's last messages landed)
    sends them again; JetStream drops each as a duplicate and the stream is unchanged."""
    source = _ListSource([2, 3, 1, 2])
    JetStreamExporter([nats_server.url], STREAM, PREFIX, "n1").run(source, until_caught_up=True)
    before = read_stream(nats_server.url)
    stale = JetStreamExporter([nats_server.url], STREAM, PREFIX, "n1", batch_events_max=1)  # an ack each
    real_resume = stale._resume

    async def resume_as_if_read_too_early(js: Any) -> tuple[Position, int]:
        _position, sequence = await real_resume(js)
        return Position(2, 1), sequence - 5  # the 5 messages after (2, 1) were "not yet" in

    stale._resume = resume_as_if_read_too_early  # type: ignore[method-assign]
    # Bounded: without the dedup id each resend would be refused and the session restarted.
    position = asyncio.run(asyncio.wait_for(stale.run_async(source, until_caught_up=True), EXPORTER_TIMEOUT_S))
    assert position == Position(4, 2)
    assert (stale.published, stale.duplicates) == (5, 5)
    assert read_stream(nats_server.url) == before


def _stream_problem(url: str, **config: Any) -> Callable[[], None]:
    async def make() -> None:
        import nats

        connection = await nats.connect(url)
        try:
            js = connection.jetstream()
            await js.add_stream(name=STREAM, **config)
        finally:
            await connection.close()

    return lambda: asyncio.run(make())


@pytest.mark.parametrize(
    ("stream_config", "expected"),
    [
        ({"subjects": [f"{PREFIX}.>"], "duplicate_window": 10.0}, "duplicate window of 10 s"),
        ({"subjects": ["other.>"], "duplicate_window": 120.0}, "takes the subjects ['other.>']"),
    ],
)
def test_a_stream_that_cannot_hold_the_export_exactly_once_is_refused(
    nats_server: NatsServer, stream_config: dict[str, Any], expected: str,  # noqa: F811
) -> None:  # fmt: skip
    _stream_problem(nats_server.url, **stream_config)()
    with pytest.raises(ExportError, match=re.escape(expected)):
        JetStreamExporter([nats_server.url], STREAM, PREFIX, "n1").run(_ListSource([1]), until_caught_up=True)


def test_an_event_too_large_for_the_stream_stops_the_export_before_it_not_after(
    nats_server: NatsServer,  # noqa: F811
) -> None:
    """A message the stream would refuse is never skipped: the exporter stops with an error naming
    the event, and the stream holds exactly the events before it."""
    _stream_problem(nats_server.url, subjects=[f"{PREFIX}.>"], duplicate_window=120.0, max_msg_size=2048)()
    source = _ListSource([1, 2, 1])
    source.items.insert(3, SourceEvent(3, 3000, TransferMade("x" * 4000, "y", 7)))
    exporter = JetStreamExporter([nats_server.url], STREAM, PREFIX, "n1")
    with pytest.raises(ExportError, match=r"the event at index 3 .* over the 2048 bytes"):  # not a retry for ever
        asyncio.run(asyncio.wait_for(exporter.run_async(source, until_caught_up=True), EXPORTER_TIMEOUT_S))
    stored = read_stream(nats_server.url)
    assert [(m.headers[HEADER_INDEX], m.headers[HEADER_ORDINAL]) for m in stored] == [("1", "0"), ("2", "0"), ("2", "1")]


def test_a_stream_of_another_log_or_with_its_last_message_gone_is_refused(nats_server: NatsServer) -> None:  # noqa: F811
    source = _ListSource([1, 2])
    JetStreamExporter([nats_server.url], STREAM, PREFIX, "n1").run(source, until_caught_up=True)
    with pytest.raises(ExportError, match="was not exported from log 'n2'"):
        JetStreamExporter([nats_server.url], STREAM, PREFIX, "n2").run(source, until_caught_up=True)

    async def purge() -> None:
        import nats

        connection = await nats.connect(nats_server.url)
        try:
            await connection.jetstream().purge_stream(STREAM)
        finally:
            await connection.close()

    asyncio.run(purge())
    with pytest.raises(ExportError, match="holds no message, but its last sequence is 3"):
        JetStreamExporter([nats_server.url], STREAM, PREFIX, "n1").run(source, until_caught_up=True)


# -- I/O-free parts and configuration ------------------------------------------------------------


def test_message_ids_name_log_index_and_ordinal_and_the_last_one_says_where_to_resume() -> None:
    first = encode_message("n1", PREFIX, Position(0, 0), 7, 99, TransferMade("a", "b", 1))
    second = encode_message("n1", PREFIX, first.position, 7, 99, TransferMade("a", "c", 1))
    third = encode_message("n1", PREFIX, second.position, 9, 120, TransferMade("b", "c", 1))
    assert [m.headers[HEADER_MSG_ID] for m in (first, second, third)] == ["n1:7:0", "n1:7:1", "n1:9:0"]
    assert (first.position, second.position, third.position) == (Position(7, 1), Position(7, 2), Position(9, 1))
    assert resume_position(second.headers, "n1", STREAM, 2) == Position(7, 2)
    with pytest.raises(ExportError, match="Seqd-Log header is 'n1'"):
        resume_position(second.headers, "cluster-1", STREAM, 2)
    with pytest.raises(ExportError, match="no valid Seqd-Index"):
        resume_position({HEADER_LOG: "n1"}, "n1", STREAM, 2)


def test_bad_exporter_settings_are_refused_with_what_to_do(tmp_dir: Path) -> None:
    with pytest.raises(ExportError, match=f"DUPLICATE_WINDOW_S_MIN = {DUPLICATE_WINDOW_S_MIN}"):
        JetStreamExporter(["nats://127.0.0.1:1"], STREAM, PREFIX, "n1", duplicate_window_s=5)
    with pytest.raises(ExportError, match=re.escape("subject_prefix = 'seqd.>'")):
        JetStreamExporter(["nats://127.0.0.1:1"], STREAM, "seqd.>", "n1")
    config = write_config(tmp_dir / "exporter.toml", {"": {"stream": STREAM, "subject_prefix": PREFIX,
                                                           "log_id": "a:b"}})  # fmt: skip
    code, output = finish(start_exporter(config))
    assert code == 78, output
    assert "log_id = 'a:b'" in output
