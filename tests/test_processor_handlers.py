"""An app's `command_handlers`: the processor calls the handler itself, not through `apply`.

That is one Python call a command less (benches/RESULTS.md, "blpcycle, second session"), and it
must change nothing an app can tell: the same outputs and state as through `apply`, `apply` still
decides for an app that overrides it, and debug mode still runs every handler under the guard.
"""

from __future__ import annotations

import time

import msgspec
import pytest

from sequencer.apps.ledger import Ledger, OpenAccount
from sequencer.egress import REPLY_HEADER
from sequencer.processor import Processor
from sequencer.record import RecordType, encode_command
from sequencer.schema import Schema
from sequencer.state_machine import AppLoadError, StateMachine, load_app
from tests.fixtures.feeder import Feeder, frame_of, session_id_of
from tests.test_processor_golden import golden_log, hashes_digest

S1 = session_id_of(1, 1)


def _run(processor: Processor) -> tuple[str, list, bytes]:
    hashes, outputs = [], []
    for record in golden_log():
        processor.apply_frame(*frame_of(record))
        processor.snapshot_requested = False
        hashes.append(processor.rolling_hash)
        outputs.extend(processor.drain_outputs())
    return hashes_digest(hashes), outputs, processor.state_hash()


def test_the_ledgers_handlers_called_directly_give_what_its_apply_gives():
    """debug=True goes through `Ledger.apply` (the base dispatch, under the guard)."""
    direct, through_apply = Processor(Ledger), Processor(Ledger, debug=True)
    assert direct._handlers is Ledger.command_handlers and through_apply._handlers is None
    assert _run(direct) == _run(through_apply)


class _Ping(msgspec.Struct, tag=True):
    value: int


class _Pong(msgspec.Struct, tag=True):
    value: int


class _Nothing(msgspec.Struct):
    pass


class Table(StateMachine):
    schema = Schema("table", 1, (_Ping,), (_Pong,), (), _Nothing)

    def ping(self, ctx, command):
        return _Pong(command.value)

    def snapshot(self):
        return _Nothing()

    @classmethod
    def restore(cls, snapshot):
        return cls()


Table.command_handlers = {_Ping: Table.ping}


class OwnApply(Table):
    """Inherits the table but overrides `apply`: its `apply` decides."""

    def apply(self, ctx, command):
        return _Pong(command.value + 1000)


class ReadsTheClock(Table):
    def ping(self, ctx, command):
        return _Pong(time.time_ns())


ReadsTheClock.command_handlers = {_Ping: ReadsTheClock.ping}


def _ping(app_class: type[StateMachine], debug: bool = False) -> _Pong:
    processor = Processor(app_class, debug=debug)
    feeder = Feeder(app_class.schema)
    processor.apply_frame(*frame_of(feeder.open_session(S1, client_id=1)))
    processor.apply_frame(*frame_of(feeder.command(S1, 1, _Ping(7))))
    ((_kind, frame),) = processor.drain_outputs()
    return msgspec.msgpack.decode(frame[REPLY_HEADER.size :], type=_Pong)


def test_a_table_app_without_its_own_apply_is_answered_by_its_handler():
    assert _ping(Table) == _Pong(7)
    assert _ping(Table, debug=True) == _Pong(7)


def test_an_app_that_overrides_apply_is_called_through_it_even_with_a_table():
    assert OwnApply.direct_handlers() is None
    assert _ping(OwnApply) == _Pong(1007)


def test_debug_mode_runs_a_handler_under_the_determinism_guard():
    assert isinstance(_ping(ReadsTheClock).value, int)  # not guarded: the clock is read
    with pytest.raises(Exception, match=r"time\.time_ns"):
        _ping(ReadsTheClock, debug=True)


class _Pang(msgspec.Struct, tag=True):
    value: int


class Incomplete(StateMachine):
    schema = Schema("incomplete", 1, (_Ping, _Pang), (_Pong,), (), _Nothing)

    def ping(self, ctx, command):
        return _Pong(command.value)


Incomplete.command_handlers = {_Ping: Incomplete.ping}


def test_a_table_without_every_command_type_is_refused_when_the_app_is_loaded():
    with pytest.raises(TypeError, match=r"missing.*_Pang"):
        Processor(Incomplete)
    with pytest.raises(AppLoadError, match="_Pang"):
        load_app(f"{__name__}:Incomplete")


class Narrower(StateMachine):
    """A table with a handler for a type the schema does not have (a subclass that narrows its
    base's schema keeps the base's table): never called, and no reason to refuse the app."""

    schema = Schema("narrower", 1, (_Ping,), (_Pong,), (), _Nothing)

    def ping(self, ctx, command):
        return _Pong(command.value)

    def pang(self, ctx, command):
        raise AssertionError("not a command of this schema")


Narrower.command_handlers = {_Ping: Narrower.ping, _Pang: Narrower.pang}


def test_a_table_with_a_handler_for_no_command_of_the_schema_is_loaded():
    assert Narrower.direct_handlers() is Narrower.command_handlers
    assert _ping(Narrower) == _Pong(7)


def test_the_ledgers_table_is_read_only():
    # A subclass that wrote its handler into it would change every Ledger of the process.
    with pytest.raises(TypeError):
        Ledger.command_handlers[Ledger.schema.commands[0]] = Ledger.balance  # type: ignore[index]


def test_a_migrated_requests_first_part_forgets_the_replies_its_client_acknowledged():
    # A COMMAND_PART applied as its request's command reads the acked request id from its own
    # prefix (`_start_command_part`): the replies at or below it are forgotten, as a COMMAND's.
    processor = Processor(Ledger)
    feeder = Feeder(Ledger.schema)
    processor.apply_frame(*frame_of(feeder.open_session(S1, client_id=1)))
    for request_id in (1, 2, 3):
        processor.apply_frame(*frame_of(feeder.command(S1, request_id, OpenAccount(f"a{request_id}"))))
    assert processor.saved_reply_ids(1) == [1, 2, 3]
    version, data = Ledger.schema.encode_command(OpenAccount("a4"))
    part = feeder._record(RecordType.COMMAND_PART, version, S1, 4, encode_command(2, data))
    processor.apply_frame(*frame_of(part))
    assert processor.saved_reply_ids(1) == [3, 4]
