"""Versions and upcasting: v1 data (committed fixtures) under v2 code, and v2 data refused by v1."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from sequencer import snapshot as snapshots
from sequencer.egress import ReplyStatus
from sequencer.processor import Processor
from sequencer.record import iter_records
from sequencer.schema import Schema, SchemaError, VersionError
from tests.fixtures import make_v1_fixtures, tally_v1, tally_v2
from tests.fixtures.feeder import Feeder, feed, session_id_of

FIXTURES = Path(__file__).resolve().parent / "fixtures"
JOURNAL = (FIXTURES / "tally_v1.journal").read_bytes()
SESSION = session_id_of(1, 1)
EXPECTED = tally_v2.TallySnapshot(
    counts=make_v1_fixtures.EXPECTED_COUNTS,
    grand_total=sum(make_v1_fixtures.EXPECTED_COUNTS.values()),
)


def replayed_under_v2() -> Processor[tally_v2.Tally]:
    """The v1 journal fixture replayed from genesis by v2 code."""
    processor = Processor(tally_v2.Tally)
    processor.apply_records(JOURNAL)
    return processor


def v2_native_state() -> bytes:
    """The app state a v2 build makes from the same commands, written in v2 form."""
    feeder = Feeder(tally_v2.SCHEMA)
    processor = Processor(tally_v2.Tally)
    feed(processor, feeder.open_session(SESSION, client_id=1))
    for request_id, command in enumerate(
        make_v1_fixtures.BEFORE_SNAPSHOT + make_v1_fixtures.AFTER_SNAPSHOT, start=1
    ):
        as_v2 = tally_v2.SCHEMA.decode_command(1, msgspec.msgpack.encode(command))
        feed(processor, feeder.command(SESSION, request_id, as_v2))
    return tally_v2.SCHEMA.encode_snapshot(processor.app.snapshot())


def test_committed_v1_fixtures_are_what_the_generator_makes():
    records, _, _, (header, body) = make_v1_fixtures.build()
    assert b"".join(records) == JOURNAL
    stored_header, stored_body = snapshots.read_snapshot(
        snapshots.snapshot_path(FIXTURES / "tally_v1_snapshots", header.index)
    )
    # The committed snapshot was written by an older processor layout (before clients carried
    # an idle time); it must still restore to exactly the state the generator builds today.
    assert stored_header._replace(state_hash=b"") == header._replace(state_hash=b"")
    committed = Processor.restore(tally_v1.Tally, stored_body)
    regenerated = Processor.restore(tally_v1.Tally, body)
    assert committed.app.snapshot() == regenerated.app.snapshot()
    assert committed.applied_index == regenerated.applied_index
    assert committed.session_ids() == regenerated.session_ids()
    assert committed.timers() == regenerated.timers()


def test_v1_journal_replayed_under_v2_gives_the_state_v2_would_have_built():
    processor = replayed_under_v2()
    assert processor.app.snapshot() == EXPECTED
    assert tally_v2.SCHEMA.encode_snapshot(processor.app.snapshot()) == v2_native_state()


def test_v1_snapshot_plus_journal_under_v2_gives_the_same_state_as_a_full_replay():
    loaded = snapshots.newest_valid_snapshot(FIXTURES / "tally_v1_snapshots")
    assert loaded is not None and loaded.header.app_version == 1
    restored = Processor.restore(tally_v2.Tally, loaded.body)
    assert restored.app.grand_total == 3 + 5 + 4 + 1
    assert restored.apply_records(JOURNAL) == len(list(iter_records(JOURNAL))) - loaded.header.index
    full = replayed_under_v2()
    assert restored.app.snapshot() == full.app.snapshot() == EXPECTED
    # The bookkeeping matches too. The hashes do not, by design: the replies saved before the
    # snapshot were encoded by v1 (and the rolling hash covers v1 outputs up to it), while the
    # full replay encoded every output with v2. Hashes compare runs of the same app version.
    assert restored.saved_reply_ids(1) == full.saved_reply_ids(1)
    assert restored.session_ids() == full.session_ids()
    assert restored.applied_index == full.applied_index


def test_saved_v1_replies_are_read_by_v2_clients_through_the_upcasters():
    loaded = snapshots.newest_valid_snapshot(FIXTURES / "tally_v1_snapshots")
    assert loaded is not None
    restored = Processor.restore(tally_v2.Tally, loaded.body)
    feeder = Feeder(tally_v2.SCHEMA)
    feeder.index = restored.applied_index
    (reply,) = feed(restored, feeder.command(SESSION, 1, tally_v2.Add("x", 1)))
    assert reply.status == ReplyStatus.OK and reply.version == 1
    assert tally_v2.SCHEMA.decode_reply(reply.version, reply.payload) == tally_v2.Added("apples", 3)


def test_v2_journal_under_v1_code_is_refused_with_a_clear_message():
    feeder = Feeder(tally_v2.SCHEMA)
    processor = Processor(tally_v1.Tally)
    feed(processor, feeder.open_session(SESSION, client_id=1))
    with pytest.raises(VersionError) as refused:
        feed(processor, feeder.command(SESSION, 1, tally_v2.Add("x", 1, times=2)))
    assert str(refused.value) == (
        "journal record at index 2 has schema version 2 but this app build (tally v1) knows up "
        "to 1: upgrade the app before replaying this journal"
    )
    assert processor.app.totals == {}


def test_v2_snapshot_under_v1_code_is_refused():
    processor = replayed_under_v2()
    with pytest.raises(VersionError, match=r"snapshot at index 10 has schema version 2 .* knows up to 1"):
        Processor.restore(tally_v1.Tally, processor.snapshot_bytes())


def test_v2_reply_and_event_under_v1_client_are_refused():
    with pytest.raises(VersionError, match="reply has schema version 2"):
        tally_v1.SCHEMA.decode_reply(2, msgspec.msgpack.encode(tally_v2.Added("k", 1)))
    with pytest.raises(VersionError, match="event has schema version 2"):
        tally_v1.SCHEMA.decode_event(2, msgspec.msgpack.encode(tally_v2.Changed("k", 1)))


def test_old_data_that_no_upcaster_fixes_is_refused_not_misread():
    schema = Schema("tally", 2, (tally_v2.Add, tally_v2.Remove))  # no upcasters registered
    with pytest.raises(VersionError, match="does not fit tally v2 after upcasting"):
        schema.decode_command(1, msgspec.msgpack.encode(tally_v1.Add("x", 1)), index=5)


class Untagged(msgspec.Struct):
    x: int


class First(msgspec.Struct, tag="same"):
    x: int


class Second(msgspec.Struct, tag="same"):
    y: int


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (dict(commands=(Untagged,)), "is not tagged"),
        (dict(commands=(First, Second)), "share the tag"),
        (dict(commands=(int,)), "not a msgspec Struct"),
        (dict(commands=()), "declares no command types"),
        (dict(commands=(First,), version=0), "a version is 1 to 65535"),
        (dict(commands=(First,), upcasters={("First", 1): lambda d: d}), "from_version must be"),
    ],
)
def test_badly_declared_schema_is_refused_when_declared(arguments, message):
    arguments = {"name": "bad", "version": 1, **arguments}
    with pytest.raises(SchemaError, match=message):
        Schema(**arguments)


def test_encoding_a_command_of_another_schema_is_a_type_error():
    with pytest.raises(TypeError, match="is not a command of schema 'tally'"):
        tally_v2.SCHEMA.encode_command(tally_v1.Add("x", 1))
