"""Blue-green switch-over on one machine (daemon/standby.py, docs/evolution.md), on real nodes.

Blue serves the ledger v1; green stands by with the ledger v2 and the worked example's transform
(`FromLedgerV1`: a Transfer becomes a Debit and a Credit, a Balance is dropped), following blue's
journal. Clients keep depositing through `seqd bluegreen switch`; every deposit they saw answered
is applied exactly once, on blue or on green, and a request applied on blue and sent again to
green is answered from the dedup table the migration carried.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from daemon.config import load_config
from daemon.exits import ExitCode, FatalError
from daemon.harness import NodeProcess, write_config
from daemon.layout import NODE_STATE, ROLE_COUNTERS, NodeState, Role
from daemon.migrate import read_index_map, replay_journal
from daemon.standby import SWITCH_REQUEST_FILE, SWITCHED_FILE, Standby, SwitchError, switch
from sequencer.apps.ledger import (
    LEDGER_SCHEMA,
    Balance,
    Deposit,
    Ledger,
    OpenAccount,
    Transfer,
    Transferred,
)
from sequencer.apps.ledger_v2 import Account, Credit, Debit, LedgerV2
from sequencer.client import Client
from sequencer.client.frames import Reply
from sequencer.egress import ReplyStatus
from sequencer.journal import read_records
from sequencer.record import RecordType

WAIT_S = 60.0
CLI_TIMEOUT_S = 120.0
TRANSFORM = "sequencer.apps.ledger_v2:FromLedgerV1"
ACCOUNTS = ["alice", "bob", "carol"]
DEPOSIT_AMOUNT = 3
# How long the test holds blue in its drain: a green that took over before blue drained would
# do so within milliseconds (it polls every standby.poll_ms); this only gives it the chance.
DRAIN_WINDOW_S = 0.5


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def blue_and_green(tmp_dir: Path, unique: str) -> tuple[NodeProcess, NodeProcess]:
    (tmp_dir / "blue").mkdir()
    (tmp_dir / "green").mkdir()
    blue = NodeProcess(tmp_dir / "blue", f"{unique}b")
    green = NodeProcess(tmp_dir / "green", f"{unique}g", {
        "node": {"app": "sequencer.apps.ledger_v2:LedgerV2"},
        "socket": {"path": blue.socket_path},  # green takes over the path blue's clients use
        "standby": {"blue_config": str(blue.config_path), "transform": TRANSFORM},
    })  # fmt: skip
    return blue, green


@dataclass
class DepositDriver:
    """A thread with one client pipelining deposits (v1 bytes: a type both versions share, sent
    without a schema so the replies of either version are taken) until told to stop. The client
    never gives up, so after `stop()` every deposit it submitted has been answered."""

    socket_path: str
    account: str
    in_flight: int = 8
    acknowledged: int = 0
    reconnects: int = 0
    error: BaseException | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> DepositDriver:
        self._thread = threading.Thread(target=self._run, name=f"deposits-{self.account}", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        _version, payload = LEDGER_SCHEMA.encode_command(Deposit(self.account, DEPOSIT_AMOUNT))
        try:
            with Client(self.socket_path, timeout_s=120, reconnect_timeout_s=120,
                        in_flight_max=self.in_flight) as client:  # fmt: skip
                window: list[Any] = []
                while not self._stop.is_set() or window:
                    if not self._stop.is_set():
                        window.append(client.submit(payload))
                    if len(window) >= self.in_flight or self._stop.is_set():
                        reply = window.pop(0).result()
                        assert reply.status == ReplyStatus.OK, reply
                        self.acknowledged += 1
                self.reconnects = client.stats["reconnects"]
        except BaseException as error:
            self.error = error

    def stop(self) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(WAIT_S * 2)
        assert not self._thread.is_alive(), f"driver {self.account} did not finish"
        if self.error is not None:
            raise AssertionError(f"driver {self.account} failed: {self.error!r}") from self.error


def seqd_cli(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daemon.cli", *arguments], capture_output=True,
                          text=True, timeout=CLI_TIMEOUT_S, check=False)  # fmt: skip


def test_green_takes_over_under_load_and_every_request_is_applied_exactly_once(tmp_dir: Path, unique: str) -> None:
    """Deposits stay in flight through the switch: blue drains, green applies blue's last records
    and serves blue's socket path, the clients reconnect and resend. Each acknowledged deposit is
    in the balances once; a request blue applied, sent again to green, gets the saved reply."""
    blue, green = blue_and_green(tmp_dir, unique)
    with blue, green:
        blue.start()
        with Client(blue.socket_path, schema=Ledger.schema, timeout_s=30) as client:
            for name in ACCOUNTS:
                client.call(OpenAccount(name))
                client.call(Deposit(name, 1000))
            client.call(Transfer("alice", "bob", 100))  # split by the transform into two postings
            client.call(Balance("bob"))  # dropped by the transform
        green.start()  # catches up from blue's index 1 while blue serves
        # Standing by, its sequencer still beats (the supervisor's watchdog gate reads it).
        heartbeat = ROLE_COUNTERS[Role.SEQUENCER].heartbeat.name
        first_beat = green.read_counters()[heartbeat]
        wait_for(lambda: green.read_counters()[heartbeat] > first_beat + 10, "green's heartbeat while standing by")
        # `seqd snapshot` is refused while standing by (the journal must be blue's, transformed),
        # and does not kill the sequencer (SIGUSR1's default action).
        sequencer_pid = green.role_pid("sequencer")
        assert seqd_cli("snapshot", "--config", str(green.config_path)).returncode == 0
        wait_for(lambda: "standing by: no snapshot before the switch" in green.log_text(), "the refusal")
        assert green.role_pid("sequencer") == sequencer_pid and not list(green.config.snapshot_dir.glob("*"))
        drivers = [DepositDriver(blue.socket_path, name).start() for name in ACCOUNTS]
        try:
            wait_for(lambda: all(d.acknowledged >= 50 for d in drivers), "deposits on blue")
            # Stopped while standing by, green leaves blue's socket alone; started again, it
            # resumes following where its journal ends.
            green.stop()
            assert Path(blue.socket_path).exists()
            green.start()
            # A request applied on blue whose reply is then lost: sent again to green after the
            # switch, with the same client id and request id.
            with Client(blue.socket_path, timeout_s=30) as lost:
                _version, payload = LEDGER_SCHEMA.encode_command(Deposit("carol", 7))
                applied_on_blue = lost.call(payload)
                lost_client_id, lost_request_id = lost.client_id, lost.next_request_id - 1
            marks = [d.acknowledged for d in drivers]
            wait_for(lambda: all(d.acknowledged > m + 20 for d, m in zip(drivers, marks, strict=True)),
                     "deposits while green follows")  # fmt: skip
            # Blue's blp paused: blue's drain waits for the deposits it sequenced to be applied,
            # so they are in flight at the switch, and green must wait for the drain's end (blue
            # removes its socket path then) before it binds the path.
            blue_blp = blue.role_pid("blp")
            os.kill(blue_blp, signal.SIGSTOP)
            try:
                switching = subprocess.Popen(
                    [sys.executable, "-m", "daemon.cli", "bluegreen", "switch", "--blue", str(blue.config_path),
                     "--green", str(green.config_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
                wait_for(lambda: blue.read_counters()[NODE_STATE.name] == NodeState.DRAINING, "blue to drain")
                time.sleep(DRAIN_WINDOW_S)  # room for a green that would not wait (none may)
                assert not (green.directory / "data" / SWITCHED_FILE).exists(), "green took over before blue drained"
            finally:
                os.kill(blue_blp, signal.SIGCONT)
            output, _ = switching.communicate(timeout=CLI_TIMEOUT_S)
            assert switching.returncode == 0, output
            assert "switched:" in output
            marks = [d.acknowledged for d in drivers]
            wait_for(lambda: all(d.acknowledged > m + 20 for d, m in zip(drivers, marks, strict=True)),
                     "deposits on green")  # fmt: skip
        finally:
            for driver in drivers:
                driver.stop()
        assert blue.process is not None and blue.process.wait(WAIT_S) == 0  # blue drained and exited
        assert all(driver.reconnects >= 1 for driver in drivers)  # every client went over to green

        with Client(green.socket_path, client_id=lost_client_id, first_request_id=lost_request_id,
                    timeout_s=30) as again:  # fmt: skip
            saved = again.call(payload)
        assert isinstance(saved, Reply) and saved.status == ReplyStatus.OK
        assert LedgerV2.schema.decode_reply(saved.version, saved.payload) == Ledger.schema.decode_reply(
            applied_on_blue.version, applied_on_blue.payload
        ) and type(Ledger.schema.decode_reply(applied_on_blue.version, applied_on_blue.payload)) is Transferred

        expected = {name: 1000 + DEPOSIT_AMOUNT * driver.acknowledged for name, driver in zip(ACCOUNTS, drivers, strict=True)}
        expected["alice"] -= 100
        expected["bob"] += 100
        expected["carol"] += 7  # once: the resend to green was answered, not applied
        with Client(green.socket_path, schema=LedgerV2.schema, timeout_s=30) as client:
            assert {name: client.call(Account(name)).balance for name in ACCOUNTS} == expected
            client.call(Debit("alice", 10, "bob"))  # and green runs v2
            client.call(Credit("bob", 10, "alice"))
            assert client.call(Account("bob")).balance == expected["bob"] + 10

    # What green wrote at the takeover: the index map of blue's whole journal, and where it ended.
    switched = json.loads((green.directory / "data" / SWITCHED_FILE).read_text())
    assert not (green.directory / "data" / SWITCH_REQUEST_FILE).exists()
    blue_records = list(read_records(blue.config.journal_dir))
    assert switched["blue_last_index"] == blue_records[-1].index
    index_map = read_index_map(green.config.journal_dir)
    green_records = {record.index: record for record in read_records(green.config.journal_dir)}
    for record in blue_records:  # the carry-along rules of `seqd log migrate`
        targets = [green_records[i] for i in index_map.targets(record.index)]
        if record.type == RecordType.SNAPSHOT:
            assert not targets
        for target in targets:
            assert (target.session_id, target.request_id, target.timestamp_ns) == (
                record.session_id, record.request_id, record.timestamp_ns)  # fmt: skip
    times = [green_records[i].timestamp_ns for i in sorted(green_records)]
    assert times == sorted(times)
    # Green's journal up to the takeover is blue's, transformed: it replays under v2 to the
    # balances blue had when it stopped.
    replayed = replay_journal(green.config.journal_dir, LedgerV2, to_index=switched["green_last_index"]).app
    blue_state = replay_journal(blue.config.journal_dir, Ledger).app
    assert {name: replayed.accounts[name].balance for name in ACCOUNTS} == {
        name: blue_state.accounts[name].balance for name in ACCOUNTS
    }


def standby_configs(tmp_path: Path, green_app: str = "sequencer.apps.ledger_v2:LedgerV2",
                    green_socket: str | None = None) -> tuple[Any, Any]:  # fmt: skip
    blue_path = write_config(tmp_path / "blue.toml", {
        "node": {"name": "bgblue", "data_dir": str(tmp_path / "blue")},
        "socket": {"path": str(tmp_path / "seqd.sock")},
    })  # fmt: skip
    green_path = write_config(tmp_path / "green.toml", {
        "node": {"name": "bggreen", "data_dir": str(tmp_path / "green"), "app": green_app},
        "socket": {"path": green_socket or str(tmp_path / "seqd.sock")},
        "standby": {"blue_config": str(blue_path), "transform": TRANSFORM},
    })  # fmt: skip
    return load_config(blue_path), load_config(green_path)


def test_green_refuses_to_stand_by_for_a_blue_its_transform_or_socket_does_not_fit(tmp_path: Path) -> None:
    _blue, green = standby_configs(tmp_path, green_app="sequencer.apps.ledger:Ledger",
                                   green_socket=str(tmp_path / "other.sock"))  # fmt: skip
    with pytest.raises(FatalError) as refused:
        Standby(green, 0)
    message = str(refused.value)
    assert "the transform's target is LedgerV2, but green runs sequencer.apps.ledger:Ledger" in message
    assert "green's socket.path" in message and "set it to blue's" in message
    assert refused.value.code == ExitCode.CONFIG


def test_switch_refuses_when_green_does_not_run_and_asks_nothing_of_blue(tmp_path: Path) -> None:
    blue, green = standby_configs(tmp_path)
    with pytest.raises(SwitchError, match="does not run: start it first"):
        switch(blue, green, say=lambda line: None)
    assert not (tmp_path / "green" / SWITCH_REQUEST_FILE).exists()
