"""A full disk is a state of a running node, not a crash loop (issue 17, part 2).

Every test runs a real node with its data directory on a small file system the test creates
(`tests/small_fs.py`: a tmpfs as root, the journal's `SEQD_FAULT_DISK_BYTES` hook otherwise),
drives it full with deposits or a ballast file, and checks what an operator and a client see:
the retryable `disk_full` refusal, the node still up with no restart counted, `seqd status`, the
log and systemd's STATUS= saying so, committed work still served, and, once space is freed, the
node taking commands again by itself with every acknowledged deposit there and every resent one
applied once.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from daemon.harness import NodeProcess
from daemon.layout import DiskState, NodeState
from sequencer import logtools
from sequencer.apps.ledger import Balance, Deposit, Ledger, OpenAccount, TransferMade
from sequencer.client import Client, ConnectionLost, protocol
from sequencer.journal import list_segments, scan_segment
from tests.node_fixtures import node_factory  # noqa: F401
from tests.small_fs import SMALL_FS_BYTES, SmallFilesystem, small_filesystem  # noqa: F401

SEGMENT_BYTES = 1 << 20  # the smallest the config allows: the disk fills after ~10k deposits
SETTINGS: dict[str, dict[str, Any]] = {
    "socket": {"command_bytes_max": 4096},
    # A log ring smaller than half a segment: when the journal reports the disk short, the
    # room it has left (half a segment) holds everything the ring can hold.
    "ring": {"log_capacity_bytes": 256 << 10, "egress_capacity_bytes": 2 << 20},
    "journal": {"segment_bytes": SEGMENT_BYTES, "batch_bytes_max": 64 << 10},
}
WINDOW = 64  # deposits in flight: enough to keep the journaller's batches full
# A refused client gives up waiting after this long (ConnectionLost); its requests stay in flight.
REFUSED_RECONNECT_S = 2.0
FILL_TIMEOUT_S = 180.0  # bounds the deposits it takes to fill the disk (about 15k)
STATE_TIMEOUT_S = 30.0  # bounds every wait for the node to notice a change
RECEIVE_TIMEOUT_S = 10.0


def _node(
    node_factory: Any,  # noqa: F811
    filesystem: SmallFilesystem,
    preallocate: bool,
    notify_path: Path | None = None,
    segment_bytes: int = SEGMENT_BYTES,
    wait: bool = True,
) -> NodeProcess:
    settings = {section: dict(values) for section, values in SETTINGS.items()}
    settings["node"] = {"data_dir": str(filesystem.data_dir)}
    settings["journal"].update({"preallocate": preallocate, "segment_bytes": segment_bytes})
    node: NodeProcess = node_factory(settings, start=False)
    environment = dict(filesystem.environment)
    if notify_path is not None:
        environment["NOTIFY_SOCKET"] = str(notify_path)
    node.start(wait=wait, environment=environment)
    return node


def _wait_for(predicate: Any, what: str, node: NodeProcess, timeout_s: float = STATE_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert node.process is not None and node.process.poll() is None, node.log_text()[-4000:]
        assert time.monotonic() < deadline, f"{what} within {timeout_s} s; log:\n{node.log_text()[-4000:]}"
        time.sleep(0.02)


def _disk_state(node: NodeProcess) -> int:
    return node.read_counters()["journal.disk_full"]


def _hello_answer(socket_path: str) -> tuple[str, str]:
    """Say HELLO on a raw socket: ("welcome", "") or ("error", code)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(RECEIVE_TIMEOUT_S)
    try:
        sock.connect(socket_path)
        sock.sendall(protocol.Connection(protocol.Side.CLIENT).send(protocol.Hello(client_id=4242)))
        data = b""
        while len(data) < protocol.FRAME_HEADER_BYTES or len(data) < protocol.FRAME_HEADER_BYTES + protocol.FRAME_HEADER.unpack_from(data)[0]:
            chunk = sock.recv(65536)
            assert chunk, f"the daemon closed without answering HELLO (got {data!r})"
            data += chunk
    finally:
        sock.close()
    length, kind, _, _ = protocol.FRAME_HEADER.unpack_from(data)
    body = data[protocol.FRAME_HEADER_BYTES : protocol.FRAME_HEADER_BYTES + length]
    if kind == protocol.FrameKind.ERROR:
        return "error", msgspec.msgpack.decode(body, type=protocol.Error).code
    return protocol.FrameKind(kind).name.lower(), ""


class FakeSystemd:
    """systemd's notification socket: collects every STATUS= the supervisor sends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(str(path))
        self.socket.setblocking(False)
        self.statuses: list[str] = []

    def poll(self) -> list[str]:
        try:
            while True:
                for line in self.socket.recv(4096).decode().split("\n"):
                    if line.startswith("STATUS="):
                        self.statuses.append(line.removeprefix("STATUS="))
        except BlockingIOError:
            pass
        return self.statuses

    def close(self) -> None:
        self.socket.close()


@pytest.fixture
def fake_systemd(tmp_dir: Path) -> Iterator[FakeSystemd]:
    fake = FakeSystemd(tmp_dir / "notify")
    yield fake
    fake.close()


def _status(node: NodeProcess, *options: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "status", "--node", node.node, *options],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def _deposit_until_refused(client: Client, pending: deque[Any], node: NodeProcess) -> int:
    """Pipelined deposits until the node refuses them; returns how many were acknowledged.
    `pending` keeps the unacknowledged ones (still in flight in the client)."""
    acknowledged = 0
    deadline = time.monotonic() + FILL_TIMEOUT_S
    try:
        while True:
            assert time.monotonic() < deadline, f"the disk did not fill; log:\n{node.log_text()[-4000:]}"
            while len(pending) < WINDOW:
                pending.append(client.submit(Deposit("a", 1)))
            pending[0].result()
            pending.popleft()
            acknowledged += 1
    except ConnectionLost:
        return acknowledged


# As root the first two run on a real tmpfs; the third uses the journal's hook either way.
@pytest.mark.parametrize(
    ("preallocate", "small_filesystem"),
    [(True, "tmpfs"), (False, "tmpfs"), (True, "limit")],
    indirect=["small_filesystem"],
    ids=["preallocate-tmpfs", "no-preallocate-tmpfs", "preallocate-hook"],
)
def test_full_disk_refuses_new_commands_with_disk_full_serves_what_is_committed_and_resumes(
    small_filesystem: SmallFilesystem, node_factory: Any, fake_systemd: FakeSystemd, preallocate: bool  # noqa: F811
) -> None:
    filesystem = small_filesystem
    node = _node(node_factory, filesystem, preallocate, fake_systemd.path)
    with (
        Client(node.socket_path, schema=Ledger.schema, timeout_s=60, reconnect_timeout_s=REFUSED_RECONNECT_S,
               in_flight_max=WINDOW) as client,
        Client(node.socket_path, schema=Ledger.schema, timeout_s=60, subscribe_events=True) as subscriber,
    ):
        client.call(OpenAccount("a"))
        assert subscriber.call(Balance("a")).balance == 0  # its session is open before the disk fills
        # Leave room for about one segment and a quarter: the node must notice while it can write.
        filesystem.fill(leave_bytes=SEGMENT_BYTES + SEGMENT_BYTES // 4)
        pending: deque[Any] = deque()
        acknowledged = _deposit_until_refused(client, pending, node)
        assert acknowledged > 0

        # Refused, not crashed: the same supervisor, no restart, and the refusal is disk_full.
        values = node.read_counters()
        assert node.process is not None and node.process.poll() is None
        assert values["supervisor.restarts"] == 0
        assert values["node.state"] == NodeState.SERVING
        assert values["journal.disk_full"] == DiskState.SHORT
        assert values["errors.disk_full"] >= 1
        assert _hello_answer(node.socket_path) == ("error", "disk_full")

        # Committed work is still served: the subscriber, which sends nothing, gets an event for
        # every acknowledged deposit.
        deposited = 0
        while deposited < acknowledged:
            event = subscriber.next_event(timeout_s=RECEIVE_TIMEOUT_S)
            assert isinstance(event, TransferMade)
            deposited += event.amount

        # The operator sees it: seqd status (text and JSON), the log, systemd's STATUS=.
        status = json.loads(_status(node, "--json"))
        assert status["disk"]["full"] is True and status["disk"]["state"] == "short"
        assert status["disk"]["refused"] >= 1
        assert status["liveness"] == "live"
        assert "DISK FULL" in _status(node)
        text = node.log_text()
        assert "disk short of space" in text
        assert "node.disk_full" in text
        _wait_for(lambda: any(s.startswith("DISK FULL") for s in fake_systemd.poll()), "STATUS= says DISK FULL", node)

        # Space returns: the node resumes by itself, the refused client's requests are resent
        # and each is applied once, and new commands are taken.
        filesystem.free_space()
        _wait_for(lambda: _disk_state(node) == DiskState.ROOM, "the node noticed the freed space", node)
        resent = len(pending)
        while pending:
            pending.popleft().result()
        client.call(Deposit("a", 1))
        total = acknowledged + resent + 1
        assert client.call(Balance("a")).balance == total
        _wait_for(lambda: "disk space is back" in fake_systemd.poll()[-1], "STATUS= says the space is back", node)
        assert "disk space is back" in node.log_text()
    assert node.read_counters()["supervisor.restarts"] == 0

    # Every acknowledged deposit is in the journal: a restart replays to the same balance.
    node.stop()
    node.remove_shared_memory()
    node.start(environment=dict(filesystem.environment))
    with Client(node.socket_path, schema=Ledger.schema, timeout_s=60) as client:
        assert client.call(Balance("a")).balance == total


def test_batch_that_does_not_fit_waits_in_the_ring_and_is_written_when_space_returns(
    small_filesystem: SmallFilesystem, node_factory: Any  # noqa: F811
) -> None:
    """Without preallocation and with no room at all, the next batch does not fit: nothing of it
    is written (no torn write), its records wait in the ring unacknowledged, new sessions are
    refused, and the batch is written, and its commands answered, once space is freed."""
    filesystem = small_filesystem
    node = _node(node_factory, filesystem, preallocate=False)
    with Client(node.socket_path, schema=Ledger.schema, timeout_s=60, in_flight_max=WINDOW) as client:
        client.call(OpenAccount("a"))
        segment = list_segments(filesystem.journal_dir)[-1][1]
        filesystem.fill(leave_bytes=0)
        size_before = segment.stat().st_size
        pending = [client.submit(Deposit("a", 1)) for _ in range(WINDOW)]
        client.flush()
        _wait_for(lambda: _disk_state(node) == DiskState.FULL, "the journal found no room for the batch", node)
        values = node.read_counters()
        assert values["log.published.index"] > values["journal.durable.index"]  # waiting in the ring
        assert values["supervisor.restarts"] == 0
        assert not any(request.done() for request in pending)  # nothing durable, nothing answered
        assert segment.stat().st_size == size_before  # not a byte of it was written
        assert _hello_answer(node.socket_path) == ("error", "disk_full")
        assert "a batch does not fit" in node.log_text()

        filesystem.free_space()
        for request in pending:
            request.result()
        assert _disk_state(node) == DiskState.ROOM
        assert client.call(Balance("a")).balance == WINDOW
    assert node.read_counters()["supervisor.restarts"] == 0
    report = logtools.check(filesystem.journal_dir)
    assert report.ok, report


def test_node_stopped_on_a_full_disk_drains_cleanly_and_clients_resend_what_was_not_written(
    small_filesystem: SmallFilesystem, node_factory: Any  # noqa: F811
) -> None:
    """`systemctl stop` on a full disk: the drain does not wait for records that cannot be
    written (they were never acknowledged); after a restart with room the client resends them
    and each is applied once."""
    filesystem = small_filesystem
    node = _node(node_factory, filesystem, preallocate=False)
    with Client(node.socket_path, schema=Ledger.schema, timeout_s=120, reconnect_timeout_s=120) as client:
        client.call(OpenAccount("a"))
        filesystem.fill(leave_bytes=0)
        pending = [client.submit(Deposit("a", 1)) for _ in range(8)]
        client.flush()
        _wait_for(lambda: _disk_state(node) == DiskState.FULL, "the journal found no room for the batch", node)
        assert node.stop() == 0  # a clean drain
        text = node.log_text()
        assert "draining on a full disk" in text
        assert "stopping with records after index" in text

        filesystem.free_space()
        node.remove_shared_memory()
        node.start(environment=dict(filesystem.environment))
        for request in pending:
            request.result()
        assert client.call(Balance("a")).balance == len(pending)


def test_torn_tail_on_a_full_disk_is_cut_without_a_copy_and_leaves_no_empty_evidence(
    small_filesystem: SmallFilesystem, node_factory: Any  # noqa: F811
) -> None:
    """Recovery never needs free space: with no room for the copy of a torn tail it says so, cuts
    anyway, leaves no `.broken` file behind, and the node serves."""
    filesystem = small_filesystem
    node = _node(node_factory, filesystem, preallocate=False)
    with Client(node.socket_path, schema=Ledger.schema, timeout_s=60) as client:
        client.call(OpenAccount("a"))
        for _ in range(20):
            client.call(Deposit("a", 1))
    node.stop()
    node.remove_shared_memory()
    segment = list_segments(filesystem.journal_dir)[-1][1]
    end = scan_segment(segment).end_offset
    with segment.open("r+b") as file:  # a crash mid-append left half a batch
        file.seek(end)
        file.write(b"SQBT" + b"\xab" * 4092)
    filesystem.fill(leave_bytes=0)

    node.start(environment=dict(filesystem.environment))
    text = node.log_text()
    assert "WITHOUT a copy: no room on the disk" in text
    assert not list(filesystem.journal_dir.glob("*.broken*"))
    report = logtools.check(filesystem.journal_dir)
    assert report.ok and not report.broken_copies and not report.empty_leftovers, report
    values = node.read_counters()
    assert values["supervisor.restarts"] == 0
    # It serves, and says the disk is full (FULL: even its start record waits in the ring).
    assert values["journal.disk_full"] != DiskState.ROOM
    filesystem.free_space()
    _wait_for(lambda: _disk_state(node) == DiskState.ROOM, "the node noticed the freed space", node)
    with Client(node.socket_path, schema=Ledger.schema, timeout_s=60) as client:
        assert client.call(Balance("a")).balance == 20


def test_default_segment_on_a_smaller_filesystem_is_refused_naming_both_sizes_and_the_setting(
    small_filesystem: SmallFilesystem, node_factory: Any  # noqa: F811
) -> None:
    default_segment_bytes = 64 << 20
    node = _node(node_factory, small_filesystem, preallocate=True, segment_bytes=default_segment_bytes, wait=False)
    assert node.process is not None
    code = node.process.wait(timeout=60)
    assert code != 0
    text = node.log_text()
    assert "cannot create its first segment" in text, text
    assert f"journal.segment_bytes={default_segment_bytes}" in text
    assert f"(of {SMALL_FS_BYTES})" in text
    assert "lower journal.segment_bytes" in text
    assert not any(small_filesystem.journal_dir.glob("*.seg*"))  # nothing half-made left behind
