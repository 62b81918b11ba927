"""The replicator's side of linearizable queries (`daemon.read_rounds.ReadRounds`), without
processes: replica rounds in, the core's ReadIndex requests out, its ReadStates back as answers."""

from __future__ import annotations

from typing import Any

import pytest

from daemon.read_rounds import ReadRounds
from sequencer.raft.core import NotLeaderError
from sequencer.raft.messages import ReadState

RETRY_S = 0.3


class FakeCounter:
    def __init__(self) -> None:
        self.value = 0

    def get(self) -> int:
        return self.value

    def set(self, value: int) -> None:
        self.value = value


class FakeCore:
    """Records the read requests; raises NotLeaderError while `leaderless`."""

    def __init__(self) -> None:
        self.requests: list[int] = []
        self.leaderless = False

    def read_index(self, request_id: int) -> None:
        if self.leaderless:
            raise NotLeaderError(2, 0, 5)
        self.requests.append(request_id)


def _rounds(slots: int = 2) -> tuple[ReadRounds, list[FakeCounter], list[FakeCounter], list[FakeCounter]]:
    asked = [FakeCounter() for _ in range(slots)]
    index = [FakeCounter() for _ in range(slots)]
    answered = [FakeCounter() for _ in range(slots)]
    rounds = ReadRounds(asked, index, answered, RETRY_S)  # type: ignore[arg-type]
    return rounds, asked, index, answered


def test_a_round_asked_becomes_one_read_request_and_its_read_index_the_answer() -> None:
    rounds, asked, index, answered = _rounds()
    core: Any = FakeCore()
    assert not rounds.due()
    asked[1].set(1)
    assert rounds.due()
    rounds.ask(core, 0.0)
    rounds.ask(core, 0.01)  # in flight: not asked twice
    assert len(core.requests) == 1 and not rounds.due()
    rounds.answer([ReadState(core.requests[0], 42)])
    assert (index[1].get(), answered[1].get()) == (42, 1)
    assert (index[0].get(), answered[0].get()) == (0, 0)


def test_rounds_asked_while_one_is_in_flight_are_served_by_the_next_request() -> None:
    # A steady stream of queries must still be answered: a new round never voids the one in
    # flight (its answer serves the rounds asked before it was issued); the rounds asked
    # meanwhile share the next request.
    rounds, asked, index, answered = _rounds(1)
    core: Any = FakeCore()
    asked[0].set(1)
    rounds.ask(core, 0.0)
    for round_ in range(2, 6):
        asked[0].set(round_)
        rounds.ask(core, round_ * 0.001)
    assert len(core.requests) == 1
    rounds.answer([ReadState(core.requests[0], 101)])
    assert (answered[0].get(), index[0].get()) == (1, 101)
    rounds.ask(core, 0.01)
    assert len(core.requests) == 2
    rounds.answer([ReadState(core.requests[1], 105)])
    assert (answered[0].get(), index[0].get()) == (5, 105)


def test_a_request_unanswered_for_retry_s_is_asked_again_and_its_late_answer_ignored() -> None:
    rounds, asked, index, answered = _rounds(1)
    core: Any = FakeCore()
    asked[0].set(1)
    rounds.ask(core, 0.0)
    rounds.ask(core, RETRY_S / 2)
    assert len(core.requests) == 1
    rounds.ask(core, RETRY_S)  # lost with a leader, we take it: asked again
    first, second = core.requests
    rounds.answer([ReadState(first, 7)])  # the late answer of the replaced request
    assert answered[0].get() == 0
    rounds.answer([ReadState(second, 9)])
    assert (answered[0].get(), index[0].get()) == (1, 9)


def test_with_no_leader_known_the_round_waits_and_is_asked_on_a_later_pass() -> None:
    rounds, asked, _index, _answered = _rounds(1)
    core: Any = FakeCore()
    core.leaderless = True
    asked[0].set(1)
    rounds.ask(core, 0.0)
    assert core.requests == [] and rounds.due()
    core.leaderless = False
    rounds.ask(core, 0.01)
    assert len(core.requests) == 1


@pytest.mark.parametrize("rounds_asked", [1, 3])
def test_the_index_is_published_before_the_round(rounds_asked: int) -> None:
    order: list[str] = []
    rounds, asked, index, answered = _rounds(1)
    index[0].set = lambda value: order.append("index")  # type: ignore[method-assign]
    answered[0].set = lambda value: order.append("answered")  # type: ignore[method-assign]
    core: Any = FakeCore()
    asked[0].set(rounds_asked)
    rounds.ask(core, 0.0)
    rounds.answer([ReadState(core.requests[0], 5)])
    assert order == ["index", "answered"]
