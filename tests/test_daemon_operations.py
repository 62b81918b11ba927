"""Operating a real node: sd_notify, the watchdog gate, `seqd status|log|verify|snapshot`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from daemon.exits import ExitCode
from sequencer.client import Client
from tests.fixtures.nondeterministic import Tag
from tests.node_fixtures import node_factory, open_accounts  # noqa: F401


def seqd(*argv: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", *argv], capture_output=True, text=True, timeout=timeout_s, check=False
    )


class FakeNotifySocket:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []

    def collect(self, seconds: float) -> list[str]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                self.messages.append((time.monotonic(), self.sock.recv(4096).decode()))
            except TimeoutError:
                pass
        return [text for _, text in self.messages]

    def close(self) -> None:
        self.sock.close()


def test_ready_is_sent_only_after_recovery_and_watchdog_pings_stop_when_a_role_hangs(
    node_factory, tmp_dir: Path  # noqa: F811
) -> None:
    first = node_factory()
    open_accounts(first.socket_path, [f"r{number}" for number in range(200)])
    assert first.stop() == 0
    notify = FakeNotifySocket(tmp_dir / "notify.sock")
    try:
        node = node_factory(start=False)  # the same directory, so the same journal: recovery has work
        node.start(wait=False, environment={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"})
        messages = notify.collect(5.0)
        ready = [text for text in messages if "READY=1" in text]
        assert len(ready) == 1, messages
        # READY=1 came after the blp replayed the whole journal: the node serves at once.
        values = node.read_counters()
        assert values["blp.applied.index"] >= values["recovery.last.index"] > 400
        assert values["recovery.last.index"] > 0
        before_ready = [text for _, text in notify.messages[: messages.index(ready[0])]]
        assert any("recovering" in text for text in before_ready), before_ready
        assert sum("WATCHDOG=1" in text for text in messages) >= 3
        # A stopped blp stops the pings (systemd would restart the node at WatchdogSec).
        blp = node.role_pid("blp")
        os.kill(blp, signal.SIGSTOP)
        try:
            # A ping already sent, and one for beats made just before the stop, may still come.
            notify.collect(0.6)
            notify.messages.clear()
            silent = notify.collect(1.2)
            assert not any("WATCHDOG=1" in text for text in silent), silent
        finally:
            os.kill(blp, signal.SIGCONT)
        notify.messages.clear()
        assert any("WATCHDOG=1" in text for text in notify.collect(2.0))
    finally:
        notify.close()


def test_status_reads_a_live_node_from_shared_memory_and_reports_a_stopped_one(node_factory) -> None:  # noqa: F811
    node = node_factory()
    open_accounts(node.socket_path, ["a", "b"])
    result = seqd("status", "--config", str(node.config_path), "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    text = json.dumps(status)
    assert "live" in text
    assert str(node.role_pid("blp")) in text
    node.stop()
    result = seqd("status", "--config", str(node.config_path), "--json")
    assert result.returncode != 0
    assert "stopped" in result.stdout


def test_log_dump_decodes_commands_and_log_check_reports_damage(node_factory) -> None:  # noqa: F811
    node = node_factory()
    open_accounts(node.socket_path, ["alice"])
    assert node.stop() == 0
    config = str(node.config_path)
    dumped = seqd("log", "dump", "--config", config, "--decode", "--type", "command", "--json")
    assert dumped.returncode == 0, dumped.stderr
    records = [json.loads(line) for line in dumped.stdout.splitlines()]
    assert len(records) == 2
    assert "alice" in dumped.stdout
    assert "OpenAccount" in dumped.stdout
    check = seqd("log", "check", "--config", config)
    assert check.returncode == 0, check.stdout
    segment = sorted(node.config.journal_dir.glob("*.seg"))[0]
    data = bytearray(segment.read_bytes())
    first_batch = data.index(b"alice") - 60
    data[first_batch] ^= 0x01
    segment.write_bytes(bytes(data))
    check = seqd("log", "check", "--config", config)
    assert check.returncode == 1
    assert str(segment) in check.stdout


def test_verify_agrees_for_the_ledger_and_snapshot_verify_rebuilds_each_snapshot(node_factory) -> None:  # noqa: F811
    node = node_factory()
    open_accounts(node.socket_path, [f"v{number}" for number in range(30)])
    assert seqd("snapshot", "--config", str(node.config_path)).returncode == 0
    deadline = time.monotonic() + 20
    while node.read_counters()["snapshot.writes"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    open_accounts(node.socket_path, ["late"])
    assert node.stop() == 0
    verified = seqd("verify", "--config", str(node.config_path))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "ok:" in verified.stdout
    listed = seqd("snapshot", "list", "--config", str(node.config_path))
    assert listed.returncode == 0
    assert "ledger" in listed.stdout
    checked = seqd("snapshot", "verify", "--config", str(node.config_path))
    assert checked.returncode == 0, checked.stdout
    assert "ok (rebuilt from the start of the journal)" in checked.stdout


def test_verify_finds_the_first_diverging_index_of_a_nondeterministic_app(node_factory) -> None:  # noqa: F811
    node = node_factory({"node": {"app": "tests.fixtures.nondeterministic:SetIterating"}})
    from tests.fixtures.nondeterministic import SetIterating

    with Client(node.socket_path, schema=SetIterating.schema, timeout_s=10) as client:
        for number in range(40):
            client.call(Tag(f"name-{number}"))
    assert node.stop() == 0
    verified = seqd("verify", "--config", str(node.config_path))
    assert verified.returncode == 1, verified.stdout + verified.stderr
    assert "MISMATCH: first diverging output at index" in verified.stdout


def test_config_errors_are_reported_before_anything_starts(tmp_dir: Path) -> None:
    path = tmp_dir / "bad.toml"
    path.write_text('[ring]\nlog_capacity_bytes = 12345\n')
    result = seqd("run", "--config", str(path))
    assert result.returncode == ExitCode.CONFIG
    assert "ring.log_capacity_bytes=12345" in result.stderr
    assert not list(Path("/dev/shm").glob("seqd.n1.*"))


def test_demo_runs_end_to_end_and_cleans_up() -> None:
    before = set(os.listdir("/dev/shm"))
    result = seqd("demo", "--clients", "2", "--transfers", "300", "--accounts", "10", timeout_s=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "money conserved" in result.stdout
    assert "transfers/s" in result.stdout
    assert "balances equal to the ledger's" in result.stdout  # the live read model (seqd project)
    leftovers = {name for name in set(os.listdir("/dev/shm")) - before if "demo" in name}
    assert not leftovers
