"""The integration gateway with real processes (docs/integration.md): a node on the withdrawals
ledger with a query replica, the payment service over HTTP on 127.0.0.1, and `seqd integration`,
each killed with SIGKILL at seeded random points. Afterwards every withdrawal is either paid
exactly once and debited, or not paid and refunded, and the service's records agree with the
ledger.

SEQD_INTEGRATION_LONG=1 runs the fault test for longer (more rounds, more withdrawals, three seeds).
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sequencer.apps.ledger import Balance, Deposit, OpenAccount
from sequencer.apps.withdrawals import WITHDRAWALS_SCHEMA, Withdraw
from sequencer.client import Client
from tests.integration_fixtures import WITHDRAWAL_APP, GatewayProcess, PaymentServiceProcess
from tests.node_fixtures import node_factory  # noqa: F401 (a fixture)

NODE_SETTINGS = {"node": {"app": WITHDRAWAL_APP}, "replicas": {"count": 1, "poll_ms": 1.0}}
LONG = os.environ.get("SEQD_INTEGRATION_LONG") == "1"
ACCOUNTS = ["alice", "bob", "carol"]
DEPOSIT = 1_000_000
QUIESCE_TIMEOUT_S = 90.0


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.05)


def summary(client: Client) -> dict[str, int]:
    return client.query("withdrawals_summary", consistency="local").value  # type: ignore[no-any-return]


def finished_withdrawals(client: Client) -> dict[int, str]:
    finished: dict[int, str] = {}
    while True:
        after_key = max(finished, default=0)
        page = client.query("finished_withdrawals", {"after_key": after_key}, consistency="local").value
        if not page:
            return finished
        finished.update({int(key): end for key, end in page.items()})


def open_accounts(client: Client) -> None:
    for name in ACCOUNTS:
        client.call(OpenAccount(name))
        client.call(Deposit(name, DEPOSIT))


def test_a_gateway_killed_between_the_call_and_the_command_neither_calls_again_nor_loses_the_answer(
    node_factory: Any, tmp_dir: Path,  # noqa: F811
) -> None:
    node = node_factory(NODE_SETTINGS)
    service = PaymentServiceProcess(tmp_dir).start()
    gateway = GatewayProcess(tmp_dir, node.config_path, service)
    try:
        with Client(node.socket_path, schema=WITHDRAWALS_SCHEMA, timeout_s=30) as client:
            open_accounts(client)
            called = client.call(Withdraw("alice", 100, "acct-1", 60_000)).key
            uncalled = client.call(Withdraw("alice", 200, "acct-2", 60_000)).key
            # The gateway's previous run made this call, then was killed before its command:
            # the service paid, the ledger still holds the money and waits (a minute) for an answer.
            assert service.post("/payouts", {"key": called, "account": "alice", "amount": 100,
                                             "destination": "acct-1"})["outcome"] == "paid"  # fmt: skip
            gateway.start()
            wait_until(lambda: summary(client)["settled"] == 2, 30, "both withdrawals to settle")
            account = client.call(Balance("alice"))
            assert (account.balance, account.held) == (DEPOSIT - 300, 0)
        assert service.get("/calls")["pay"] == {str(called): 1, str(uncalled): 1}, "a payout was called twice"
        assert gateway.stop() == 0, gateway.log_text()[-3000:]
    finally:
        gateway.kill()
        service.kill()


class WithdrawalDriver:
    """A thread submitting withdrawals until stopped; records each accepted one's key."""

    def __init__(self, socket_path: str, seed: int) -> None:
        self.socket_path = socket_path
        self.random = random.Random(seed)
        self.accepted: dict[int, tuple[str, int]] = {}  # key -> (account, amount)
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="withdrawals", daemon=True)

    def start(self) -> WithdrawalDriver:
        self._thread.start()
        return self

    def _run(self) -> None:
        rng = self.random
        try:
            with Client(self.socket_path, schema=WITHDRAWALS_SCHEMA, timeout_s=120,
                        reconnect_timeout_s=120) as client:  # fmt: skip
                while not self._stop.is_set():
                    account, amount = rng.choice(ACCOUNTS), rng.randrange(1, 1000)
                    destination = f"declined-{amount}" if rng.random() < 0.1 else f"acct-{amount}"
                    accepted = client.call(Withdraw(account, amount, destination, rng.choice([500, 1500])))
                    self.accepted[accepted.key] = (account, amount)
                    self._stop.wait(rng.uniform(0.0, 0.05))
        except BaseException as error:
            self.error = error

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(150)
        assert not self._thread.is_alive(), "the withdrawal driver did not finish"
        if self.error is not None:
            raise AssertionError(f"the withdrawal driver failed: {self.error!r}") from self.error


@pytest.mark.parametrize("seed", [11, 12, 13] if LONG else [11])
def test_after_kill_9_of_gateway_node_and_service_every_withdrawal_is_paid_once_or_refunded(
    node_factory: Any, tmp_dir: Path, seed: int,  # noqa: F811
) -> None:
    rng = random.Random(seed)
    node = node_factory(NODE_SETTINGS)
    # The service is slow at times, fails before acting (503) and loses answers after acting.
    service = PaymentServiceProcess(tmp_dir, seed=seed, faults={
        "slow_ms_max": 50, "fail_before_rate": 0.1, "fail_after_rate": 0.1}).start()  # fmt: skip
    gateway = GatewayProcess(tmp_dir, node.config_path, service).start()
    driver: WithdrawalDriver | None = None
    try:
        with Client(node.socket_path, schema=WITHDRAWALS_SCHEMA, timeout_s=60, reconnect_timeout_s=60) as client:
            open_accounts(client)
        gateway.wait_following()
        driver = WithdrawalDriver(node.socket_path, seed).start()
        targets = ["gateway", "node", "service"] * (4 if LONG else 1)
        rng.shuffle(targets)
        for target in targets:
            time.sleep(rng.uniform(0.2, 0.8))
            process = {"gateway": gateway, "node": node, "service": service}[target]
            process.kill()
            time.sleep(rng.uniform(0.0, 0.6))  # down for a while: timers fire, retries, cancels
            process.start()
        gateway.wait_following()  # then withdrawals that may settle before their timers fire
        time.sleep(rng.uniform(0.5, 1.0))
        driver.stop()
        assert len(driver.accepted) >= 10, f"only {len(driver.accepted)} withdrawals were made"
        with Client(node.socket_path, schema=WITHDRAWALS_SCHEMA, timeout_s=60, reconnect_timeout_s=60) as client:
            wait_until(lambda: summary(client)["pending"] == 0, QUIESCE_TIMEOUT_S,
                       f"every withdrawal to be answered ({summary(client)})")  # fmt: skip
            check_books(client, service, driver.accepted)
    except BaseException:
        print(f"seed {seed}; gateway log:\n{gateway.log_text()[-3000:]}\nnode log:\n{node.log_text()[-2000:]}")
        raise
    finally:
        if driver is not None and driver._thread.is_alive():
            driver._stop.set()
        gateway.kill()
        service.kill()


def check_books(client: Client, service: PaymentServiceProcess, accepted: dict[int, tuple[str, int]]) -> None:
    """Every accepted withdrawal finished; paid at the service <=> settled in the ledger, with
    the same amount; refunded <=> the service recorded it declined or cancelled; balances
    debited by exactly the settled amounts, nothing left held; no anomaly."""
    finished = finished_withdrawals(client)
    assert set(accepted) <= set(finished), f"unfinished: {sorted(set(accepted) - set(finished))}"
    payouts = {int(key): record for key, record in service.get("/payouts")["payouts"].items()}
    paid = {key for key, record in payouts.items() if record["outcome"] == "paid"}
    settled = {key for key, end in finished.items() if end == "settled"}
    assert paid == settled, f"paid but not settled: {sorted(paid - settled)}; settled but not paid: {sorted(settled - paid)}"
    for key, end in finished.items():
        if end == "refunded":
            assert payouts[key]["outcome"] in ("declined", "cancelled"), (key, payouts[key])
    for key in paid:
        account, amount = accepted[key]
        assert (payouts[key]["account"], payouts[key]["amount"]) == (account, amount), (key, payouts[key])
    assert summary(client)["anomalies"] == 0
    for name in ACCOUNTS:
        debited = sum(amount for key, (account, amount) in accepted.items() if account == name and key in settled)
        balance = client.call(Balance(name))
        assert (balance.balance, balance.held) == (DEPOSIT - debited, 0), (name, balance, debited)
    # Both ends of the flow happened under the faults (else the test proved less than it says).
    assert settled and set(finished) - settled, (len(settled), len(finished))
