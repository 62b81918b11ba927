"""The app API: loading apps by name, the determinism guard, and hash-seed divergence."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from sequencer import determinism
from sequencer.apps.ledger import Ledger
from sequencer.determinism import NondeterminismError, first_divergence, guard
from sequencer.processor import Processor
from sequencer.state_machine import AppLoadError, Rejected, StateMachine, load_app
from tests.fixtures.feeder import Feeder, feed, session_id_of
from tests.fixtures.nondeterministic import ClockReading, SetIterating, Tag, Tags

ROOT = Path(__file__).resolve().parent.parent
SUBPROCESS_TIMEOUT_S = 60  # a run of 60 commands takes well under a second


def test_load_app_finds_the_embedded_ledger():
    assert load_app("sequencer.apps.ledger:Ledger") is Ledger


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("sequencer.apps.ledger", "is not of the form 'package.module:Class'"),
        ("no_such_module_xyz:App", "cannot import module 'no_such_module_xyz'"),
        ("sequencer.apps.ledger:Nope", "has no class 'Nope'"),
        ("sequencer.apps.ledger:Transfer", "not a subclass of sequencer.state_machine.StateMachine"),
        ("sequencer.state_machine:StateMachine", "has no `schema` class attribute"),
    ],
)
def test_load_app_refuses_with_a_message_that_says_what_is_wrong(spec, message):
    with pytest.raises(AppLoadError, match=message):
        load_app(spec)


def test_rejected_carries_code_and_message():
    rejected = Rejected("insufficient_funds", "needs 5")
    assert (rejected.code, rejected.message, str(rejected)) == (
        "insufficient_funds", "needs 5", "insufficient_funds: needs 5"
    )


def test_default_on_timer_says_the_app_forgot_to_implement_it():
    with pytest.raises(NotImplementedError, match="does not implement on_timer"):
        StateMachine().on_timer(None, 3)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "call",
    [
        # Looked up at call time, as an app that does `import time` does; a name bound
        # before the guard (`from time import time`) escapes it, as documented.
        lambda: time.time(), lambda: time.monotonic(), lambda: time.perf_counter(),
        lambda: time.time_ns(), lambda: random.random(), lambda: random.randint(1, 2),
        lambda: os.urandom(4), lambda: uuid.uuid4(),
        lambda: __import__("datetime").datetime.now(),
    ],
)  # fmt: skip
def test_guard_makes_clock_and_random_sources_raise_and_restores_them(call):
    with guard(), pytest.raises(NondeterminismError, match=r"ctx\.now"):
        call()
    call()  # restored


def test_guard_is_reentrant_and_restores_after_an_exception():
    original = time.time
    with pytest.raises(KeyError), guard():
        with guard():
            pass
        assert time.time is not original
        raise KeyError
    assert time.time is original


def test_debug_processor_stops_an_app_that_reads_the_clock_inside_apply():
    processor = Processor(ClockReading, debug=True)
    feeder = Feeder(ClockReading.schema)
    session = session_id_of(1, 1)
    feed(processor, feeder.open_session(session, client_id=1))
    with pytest.raises(NondeterminismError, match=r"time\.time\(\) called inside the state machine"):
        feed(processor, feeder.command(session, 1, Tag("x")))
    time.time()  # restored after the failure


class ClockInEveryCallback(StateMachine):
    """Schedules a timer on every command; reads the clock in the callback named by `where`."""

    schema = ClockReading.schema
    where = ""

    def apply(self, ctx, command):
        ctx.schedule(1, ctx.now + 1)
        return Tags([])

    def _maybe_read_clock(self, here: str) -> None:
        if self.where == here:
            time.time()

    def on_session_open(self, ctx):
        self._maybe_read_clock("on_session_open")

    def on_session_close(self, ctx):
        self._maybe_read_clock("on_session_close")

    def on_timer(self, ctx, timer_id):
        self._maybe_read_clock("on_timer")


@pytest.mark.parametrize("where", ["on_session_open", "on_timer", "on_session_close"])
def test_debug_processor_guards_every_call_into_the_app_not_only_apply(where):
    app = ClockInEveryCallback()
    app.where = where
    processor = Processor(ClockInEveryCallback, debug=True, app=app)
    feeder = Feeder(ClockInEveryCallback.schema)
    session = session_id_of(1, 1)
    records = [feeder.open_session(session, client_id=1), feeder.command(session, 1, Tag("x"))]
    deadline_ns = feeder.now + 1  # the command's timestamp + 1
    records += [feeder.timer_fired(1, deadline_ns), feeder.close_session(session)]
    with pytest.raises(NondeterminismError, match=r"time\.time\(\) called inside the state machine"):
        for record in records:
            feed(processor, record)
    time.time()  # restored after the failure


def run_hashes(app_spec: str, seed: int) -> tuple[str, list[tuple[int, int]]]:
    result = subprocess.run(
        [sys.executable, "-m", "tests.fixtures.hash_run", app_spec],
        cwd=ROOT,
        env={**os.environ, "PYTHONHASHSEED": str(seed)},
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        check=True,
    )
    state, *rolling = result.stdout.split()
    pairs = [(int(i), int(h, 16)) for i, h in (item.split(":") for item in rolling)]
    return state, pairs


def test_an_app_iterating_a_set_of_strings_diverges_under_another_hash_seed():
    state_1, rolling_1 = run_hashes("tests.fixtures.nondeterministic:SetIterating", 1)
    state_2, rolling_2 = run_hashes("tests.fixtures.nondeterministic:SetIterating", 2)
    assert state_1 != state_2
    diverging = first_divergence(rolling_1, rolling_2)
    # The first command's reply lists one name; the second lists two, in seed-dependent order.
    assert diverging is not None and diverging >= 2


def test_the_ledger_gives_the_same_hashes_under_two_hash_seeds():
    assert run_hashes("sequencer.apps.ledger:Ledger", 1) == run_hashes("sequencer.apps.ledger:Ledger", 2)


def test_set_iterating_app_is_caught_in_process_only_by_hashes_not_by_the_guard():
    # The guard cannot see set order: that is what `seqd verify` with another seed is for.
    processor = Processor(SetIterating, debug=True)
    feeder = Feeder(SetIterating.schema)
    session = session_id_of(1, 1)
    feed(processor, feeder.open_session(session, client_id=1))
    assert feed(processor, feeder.command(session, 1, Tag("x")))
    assert determinism.state_hash(b"x") == determinism.state_hash(b"x")
