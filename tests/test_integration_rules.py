"""The integration gateway's rules in-process, with a fake external system, stream and client:
which requests it calls, which it answers from the external system's record, and which it
leaves to the state machine's timers. The same rules run against real processes in
tests/test_integration_gateway.py."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from sequencer.apps.withdrawals import (
    WITHDRAWALS_SCHEMA,
    PayoutAnswer,
    PayoutCancelRequested,
    PayoutRequested,
    WithdrawalSettled,
)
from sequencer.client import TimedOut
from sequencer.client.replica import ItemKind, SubscriptionItem
from sequencer.integration import ExternalSystem, IntegrationGateway


class FakeSystem(ExternalSystem):
    request_types: ClassVar[tuple[type[Any], ...]] = (PayoutRequested, PayoutCancelRequested)
    pending_query: ClassVar[str] = "pending_payouts"

    def __init__(self, seen: dict[int, Any] | None = None, reachable: bool = True) -> None:
        self.seen = dict(seen or {})
        self.reachable = reachable
        self.called: list[Any] = []

    def recall(self, keys: list[int]) -> dict[int, Any]:
        if not self.reachable:
            raise ConnectionRefusedError("down")
        return {key: self.seen[key] for key in keys if key in self.seen}

    def call(self, request: Any) -> Any | None:
        self.called.append(request)
        outcome = "paid" if isinstance(request, PayoutRequested) else "cancelled"
        return {"outcome": outcome, "reference": f"po-{request.key}"}

    def answer_command(self, request: Any, answer: Any) -> PayoutAnswer:
        return PayoutAnswer(request.key, answer["outcome"], answer["reference"])


class FakeStream:
    def __init__(self, events: list[Any]) -> None:
        self.items = [SubscriptionItem(index, 0, ItemKind.EVENT, 1, b"", event, 0)
                      for index, event in enumerate(events, start=10)]  # fmt: skip

    def next(self, timeout_s: float | None = None) -> SubscriptionItem:
        if not self.items:
            raise TimedOut("no item")
        return self.items.pop(0)


class Submitted:
    def __init__(self, command: Any) -> None:
        self.command = command

    def result(self) -> Any:
        return None


class FakeClient:
    def __init__(self) -> None:
        self.commands: list[Any] = []

    def submit(self, command: Any) -> Submitted:
        self.commands.append(command)
        return Submitted(command)


def pay(key: int, attempt: int = 1) -> PayoutRequested:
    return PayoutRequested(key, "alice", 10, "acct", attempt)


def handle(system: FakeSystem, requests: list[Any]) -> FakeClient:
    gateway = IntegrationGateway("/nowhere.sock", WITHDRAWALS_SCHEMA, system)
    client = FakeClient()
    gateway._handle(client, requests)  # type: ignore[arg-type]
    return client


def test_a_batch_keeps_only_the_latest_request_of_each_key_and_only_requests() -> None:
    gateway = IntegrationGateway("/nowhere.sock", WITHDRAWALS_SCHEMA, FakeSystem())
    stream = FakeStream([pay(1), pay(2), WithdrawalSettled(9, "bob", 5, "x"), pay(1, 2),
                         PayoutCancelRequested(2, 1)])  # fmt: skip
    gateway.stop_requested.clear()
    assert gateway._next_batch(stream) == [pay(1, 2), PayoutCancelRequested(2, 1)]


def test_a_key_the_external_system_has_seen_is_answered_from_its_record_without_a_call() -> None:
    system = FakeSystem(seen={1: {"outcome": "paid", "reference": "po-1"}})
    client = handle(system, [pay(1, 2), pay(2)])
    assert [request.key for request in system.called] == [2]
    assert sorted(client.commands, key=lambda command: command.key) == [
        PayoutAnswer(1, "paid", "po-1"), PayoutAnswer(2, "paid", "po-2")]


def test_a_key_seen_but_not_final_is_neither_called_nor_answered() -> None:
    system = FakeSystem(seen={1: None})
    client = handle(system, [pay(1)])
    assert (system.called, client.commands) == ([], [])


def test_when_the_external_system_cannot_say_what_it_has_seen_nothing_is_called() -> None:
    system = FakeSystem(reachable=False)
    client = handle(system, [pay(1), PayoutCancelRequested(2, 1)])
    assert (system.called, client.commands) == ([], [])


def test_an_external_system_without_request_types_is_refused_with_what_to_name() -> None:
    class Unnamed(ExternalSystem):
        pass

    with pytest.raises(ValueError, match="request_types and pending_query"):
        IntegrationGateway("/nowhere.sock", WITHDRAWALS_SCHEMA, Unnamed())
