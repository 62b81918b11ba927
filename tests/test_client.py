"""Both clients against a fake daemon on a real Unix socket (tests/test_client_fake_daemon).

Each behavioural test runs against every shell (the `clients` fixture: the blocking `Client`, and
the `AsyncClient` under asyncio and under uvloop, through tests/client_shells.py); a test that is
about one shell's own API says so and uses that client directly.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sequencer.client import (
    Client,
    ClientError,
    CommandRejected,
    ConnectionLost,
    Duplicate,
    ProtocolViolation,
    TimedOut,
    session,
)
from sequencer.client.protocol import Reply, ReplyStatus
from tests.client_shells import SHELLS, AsyncShell, open_client
from tests.test_client_fake_daemon import FakeDaemon, running_fake_daemon

AnyClient = Client | AsyncShell
SHORT_S = 0.3  # a timeout that is meant to expire
ROOT = Path(__file__).resolve().parent.parent
NOBODY = 65534


class Clients:
    """The clients a test opens, all of one shell; closed at the end of the test, whatever happens."""

    def __init__(self, shell: str) -> None:
        self.shell = shell
        self.made: list[AnyClient] = []

    def open(self, socket_path: str, **options: object) -> AnyClient:
        options.setdefault("timeout_s", 10.0)
        options.setdefault("reconnect_timeout_s", 10.0)
        client = open_client(self.shell, socket_path, **options)
        self.made.append(client)
        return client

    def close_all(self) -> None:
        for client in self.made:
            client.close()
            if isinstance(client, AsyncShell):
                client.shutdown()


@pytest.fixture
def daemon(tmp_dir: Path) -> Iterator[FakeDaemon]:
    with running_fake_daemon(tmp_dir / "seqd.sock") as fake:
        yield fake


@pytest.fixture(params=SHELLS)
def clients(request: pytest.FixtureRequest) -> Iterator[Clients]:
    made = Clients(request.param)
    yield made
    made.close_all()


def connect(clients: Clients, daemon: FakeDaemon, **options: object) -> AnyClient:
    return clients.open(daemon.socket_path, **options)


def test_call_round_trips_a_command_and_its_reply(
    daemon: FakeDaemon, clients: Clients
) -> None:
    client = connect(clients, daemon, client_id=42)
    reply = client.call(b"echo:hello")
    assert isinstance(reply, Reply)
    assert (reply.request_id, reply.status, reply.payload) == (1, ReplyStatus.OK, b"hello")
    assert client.call(b"incr:x").payload == b"1"
    assert client.call(b"incr:x").payload == b"2"
    assert client.client_id == 42
    assert client.next_request_id == 4
    assert client.acked_request_id == 3


def test_random_client_ids_are_positive_and_distinct(
    daemon: FakeDaemon, clients: Clients
) -> None:
    ids = {connect(clients, daemon).client_id for _ in range(3)}
    assert len(ids) == 3
    assert all(0 < client_id < 1 << 63 for client_id in ids)


def test_pipelined_requests_keep_many_in_flight_and_each_reply_matches_its_request(
    daemon: FakeDaemon, clients: Clients
) -> None:
    client = connect(clients, daemon, in_flight_max=64)
    pending = [client.submit(f"echo:{i}".encode()) for i in range(1000)]
    for i, request in enumerate(pending):
        reply = request.result()
        assert reply.request_id == request.request_id == i + 1
        assert reply.payload == str(i).encode()
    assert client.in_flight == 0
    assert client.acked_request_id == 1000
    # Commands went out without waiting for replies, and never more than the window. (Driven
    # from another thread, the asyncio client reads replies between submits, so it may never
    # fill the window here; test_client_async checks its pipelining within one loop iteration.)
    assert daemon.unacked_max <= 64
    if clients.shell == "blocking":
        assert daemon.unacked_max >= 32


def test_window_bound_is_reached_and_submit_times_out_when_it_stays_full(
    daemon: FakeDaemon, clients: Clients
) -> None:
    client = connect(clients, daemon, in_flight_max=4)
    daemon.pause()
    held = [client.submit(b"incr:w") for _ in range(4)]
    assert client.in_flight == 4
    with pytest.raises(TimedOut, match="in-flight window"):
        client.submit(b"incr:w", timeout_s=SHORT_S)
    assert client.in_flight == 4
    daemon.resume()
    assert [request.result().payload for request in held] == [b"1", b"2", b"3", b"4"]


def test_acked_request_id_lets_the_daemon_forget_answered_replies(
    daemon: FakeDaemon, clients: Clients
) -> None:
    client = connect(clients, daemon, client_id=7)
    for _ in range(20):
        client.call(b"incr:k")
    # Request 20 carried acked_request_id=19: only reply 20 may still be kept.
    assert daemon.saved_replies(7) == [20]


def test_resend_after_dropped_connection_applies_every_request_exactly_once(
    daemon: FakeDaemon, clients: Clients
) -> None:
    client = connect(clients, daemon, client_id=5, in_flight_max=128)
    daemon.drop_after_commands = 150  # applied, but that batch's replies never leave
    pending = [client.submit(b"incr:counter") for _ in range(400)]
    replies = [request.result() for request in pending]
    assert client.stats["reconnects"] >= 2
    assert sorted(int(reply.payload) for reply in replies) == list(range(1, 401))
    assert [reply.request_id for reply in replies] == list(range(1, 401))
    assert daemon.values[b"counter"] == 400
    assert set(daemon.applications.values()) == {1}
    assert len(daemon.applications) == 400


def test_daemon_restart_on_the_same_path_is_survived_without_double_application(
    daemon: FakeDaemon, clients: Clients
) -> None:
    client = connect(clients, daemon, client_id=11)
    assert client.call(b"incr:r").payload == b"1"
    daemon.pause()
    pending = [client.submit(b"incr:r") for _ in range(10)]
    client.flush()
    daemon.stop()  # crash with 10 requests unanswered; the socket file is gone (ENOENT)
    daemon.paused = False
    daemon.restart_later(0.2)
    assert [int(request.result().payload) for request in pending] == list(range(2, 12))
    assert set(daemon.applications.values()) == {1}
    assert daemon.hellos >= 2


def test_timed_out_request_stays_in_flight_and_its_reply_is_delivered_later(
    daemon: FakeDaemon, clients: Clients
) -> None:
    client = connect(clients, daemon)
    daemon.pause()
    pending = client.submit(b"echo:late")
    with pytest.raises(TimedOut, match="request 1"):
        pending.result(timeout_s=SHORT_S)
    with pytest.raises(TimedOut):
        client.call(b"echo:later", timeout_s=SHORT_S)
    assert client.in_flight == 2
    daemon.resume()
    assert pending.result().payload == b"late"
    assert client.call(b"echo:now").payload == b"now"


def test_rejected_reply_raises_command_rejected_with_its_code(
    daemon: FakeDaemon, clients: Clients
) -> None:
    client = connect(clients, daemon)
    with pytest.raises(CommandRejected) as caught:
        client.call(b"reject:insufficient_funds")
    assert caught.value.code == "insufficient_funds"
    assert caught.value.request_id == 1
    assert "nothing was applied" in str(caught.value)
    assert client.call(b"echo:still-fine").payload == b"still-fine"


def test_restarted_client_reusing_old_request_ids_gets_duplicate(
    daemon: FakeDaemon, clients: Clients
) -> None:
    first = connect(clients, daemon, client_id=77)
    for _ in range(3):
        first.call(b"incr:d")
    first.call(b"echo:ack")  # acknowledges replies 1..3, so the daemon forgets them
    first.close()
    again = connect(clients, daemon, client_id=77)  # first_request_id=1 again: a mistake
    with pytest.raises(Duplicate, match="first_request_id"):
        again.call(b"incr:d")
    resumed = connect(clients, daemon, client_id=77, first_request_id=first.next_request_id)
    assert resumed.call(b"incr:d").payload == b"4"
    assert daemon.values[b"d"] == 4


def test_events_reach_subscribed_clients_only(daemon: FakeDaemon, clients: Clients) -> None:
    subscriber = connect(clients, daemon, subscribe_events=True)
    bystander = connect(clients, daemon)
    bystander.call(b"publish:news")
    event = subscriber.next_event(timeout_s=5.0)
    assert event.payload == b"news"
    assert event.index >= 1
    bystander.call(b"echo:sync")  # any event to the bystander would have arrived before this
    assert not bystander._events
    with pytest.raises(ClientError, match="subscribe"):
        bystander.next_event(timeout_s=SHORT_S)
    assert list(subscriber.events(timeout_s=SHORT_S)) == []


def test_unreachable_daemon_raises_connection_lost(tmp_dir: Path, clients: Clients) -> None:
    with pytest.raises(ConnectionLost, match="Check that seqd is running"):
        clients.open(str(tmp_dir / "nobody.sock"), reconnect_timeout_s=SHORT_S)


def test_daemon_gone_for_good_raises_connection_lost_and_keeps_requests_in_flight(
    daemon: FakeDaemon, clients: Clients
) -> None:
    client = connect(clients, daemon, reconnect_timeout_s=SHORT_S)
    daemon.pause()
    pending = client.submit(b"incr:g")
    client.flush()
    daemon.stop()
    with pytest.raises(ConnectionLost):
        pending.result(timeout_s=5.0)
    assert client.in_flight == 1
    daemon.paused = False
    daemon.start()
    assert pending.result().payload == b"1"
    assert daemon.applications.total() == 1


def test_garbage_from_the_daemon_raises_protocol_violation_and_the_next_call_reconnects(
    daemon: FakeDaemon, clients: Clients
) -> None:
    client = connect(clients, daemon)
    daemon.garbage_next_reply = True
    pending = client.submit(b"incr:z")
    with pytest.raises(ProtocolViolation) as caught:
        pending.result()
    assert caught.value.code == "bad_version"
    # The command was applied; its resend gets the saved reply, not a second application.
    assert pending.result().payload == b"1"
    assert daemon.applications.total() == 1


def test_redirect_moves_the_client_to_the_named_socket(
    daemon: FakeDaemon, clients: Clients, tmp_dir: Path
) -> None:
    leader = FakeDaemon(tmp_dir / "leader.sock", node="n2")
    leader.start()
    try:
        daemon.redirect_to = leader.socket_path
        client = connect(clients, daemon)
        assert client.socket_path == leader.socket_path
        assert client.call(b"echo:hi").payload == b"hi"
        assert leader.applications.total() == 1
        assert daemon.applications.total() == 0
    finally:
        clients.close_all()
        leader.close()


def test_ping_from_the_daemon_is_answered_and_calls_continue(
    daemon: FakeDaemon, clients: Clients
) -> None:
    daemon.ping_after_welcome = True
    client = connect(clients, daemon)
    assert client.call(b"echo:x").payload == b"x"


def test_closed_client_refuses_further_calls(daemon: FakeDaemon, clients: Clients) -> None:
    with connect(clients, daemon) as client:
        client.call(b"echo:1")
    with pytest.raises(ConnectionLost, match="closed"):
        client.call(b"echo:2")


def test_oversized_command_is_refused_before_sending(
    daemon: FakeDaemon, clients: Clients
) -> None:
    client = connect(clients, daemon)
    with pytest.raises(ValueError, match="frame_bytes_max"):
        client.submit(b"x" * (1 << 20))
    assert client.next_request_id == 1


def test_one_client_is_usable_from_a_worker_thread(daemon: FakeDaemon) -> None:
    """The blocking client's own promise (the asyncio client belongs to its event loop)."""
    results: list[bytes] = []

    def work() -> None:
        with Client(daemon.socket_path) as client:
            results.extend(client.call(f"echo:{i}".encode()).payload for i in range(5))

    worker = threading.Thread(target=work)
    worker.start()
    worker.join(30)
    assert results == [b"0", b"1", b"2", b"3", b"4"]


def test_resend_after_reconnect_is_in_request_id_order_from_the_oldest_unanswered(
    daemon: FakeDaemon, clients: Clients
) -> None:
    client = connect(clients, daemon, client_id=3)
    client.call(b"echo:first")
    daemon.pause()
    pending = [client.submit(b"incr:o") for _ in range(6)]
    client.flush()
    daemon.drop_connections()  # the held commands die with the connection, unapplied
    daemon.resume()  # (an asyncio client may have resent them already: they are held, then applied)
    assert [int(request.result().payload) for request in pending] == [1, 2, 3, 4, 5, 6]
    arrivals = [request_id for client_id, request_id in daemon.received if client_id == 3]
    assert arrivals == [1, 2, 3, 4, 5, 6, 7, 2, 3, 4, 5, 6, 7]


def test_flush_reconnects_and_writes_commands_submitted_while_disconnected(
    daemon: FakeDaemon, clients: Clients
) -> None:
    client = connect(clients, daemon)
    client.call(b"echo:up")
    daemon.drop_connections()  # returns once the daemon's end is closed
    pending = client.submit(b"echo:x")
    client.flush()  # the write fails (EPIPE), so flush reconnects and writes it again
    assert daemon.hellos == 2
    assert client.call(b"echo:y").payload == b"y"
    assert pending.result().payload == b"x"
    assert daemon.applications.total() == 3


def test_unread_events_beyond_the_bound_drop_the_oldest_and_are_counted(
    daemon: FakeDaemon, clients: Clients, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(session, "EVENTS_BUFFERED_MAX", 3)
    subscriber = connect(clients, daemon, subscribe_events=True)
    for i in range(5):
        subscriber.call(f"publish:{i}".encode())
    assert [event.payload for event in subscriber.events(timeout_s=SHORT_S)] == [b"2", b"3", b"4"]
    assert subscriber.stats["events_dropped"] == 2


def test_bad_arguments_are_refused_with_their_bounds(daemon: FakeDaemon, clients: Clients) -> None:
    with pytest.raises(ValueError, match="IN_FLIGHT_LIMIT_MAX"):
        connect(clients, daemon, in_flight_max=session.IN_FLIGHT_LIMIT_MAX + 1)
    with pytest.raises(ValueError, match="client_id"):
        connect(clients, daemon, client_id=0)
    with pytest.raises(ValueError, match="first_request_id"):
        connect(clients, daemon, first_request_id=0)
    with pytest.raises(ValueError, match="timeout_s"):
        connect(clients, daemon, timeout_s=0)
    with pytest.raises(ValueError, match="SOCKET_PATH_BYTES_MAX"):
        clients.open("/tmp/" + "x" * 200)  # uvloop alone would call this ENOENT and retry


def test_poll_sends_queued_commands_and_collects_replies_without_blocking(
    daemon: FakeDaemon,
) -> None:
    """The blocking client's own API: `poll` (the asyncio client does its I/O in callbacks)."""
    with Client(daemon.socket_path) as client:
        pending = client.submit(b"x")
        deadline = time.monotonic() + 5
        while not pending.done():
            assert time.monotonic() < deadline, "poll() never delivered the reply"
            client.poll()
            time.sleep(0.001)
        assert client.poll() == 0


def test_poll_with_a_wait_takes_a_reply_that_arrives_during_the_wait(daemon: FakeDaemon) -> None:
    """`poll(wait_s)` blocks on the socket until the daemon's bytes arrive (the open-loop
    generator's wait: a reply is timed when it arrives); `poll()` alone never waits."""
    import threading

    with Client(daemon.socket_path) as client:
        daemon.pause()
        pending = client.submit(b"x")
        client.poll()  # sent; the paused daemon holds the reply
        assert not pending.done()
        resumer = threading.Timer(0.2, daemon.resume)
        resumer.start()
        try:
            client.poll(wait_s=30.0)  # one call: returns once the reply is in, not after 30 s
            assert pending.done(), "poll(wait_s) returned without waiting for the reply"
        finally:
            resumer.cancel()
            resumer.join()


def test_submit_on_a_dead_connection_returns_the_request_and_it_is_resent_once(tmp_dir: Path) -> None:
    """A submit whose eager write meets a dead socket must not raise (the request is already in
    flight and will be resent); raising would invite the caller to submit it a second time.
    The blocking client's own path: the asyncio client notices the close in a callback first."""
    import socket
    import threading

    from sequencer.client.protocol import Connection, Hello, Side, Welcome
    from sequencer.client.protocol import Reply as ReplyFrame

    path = str(tmp_dir / "dead.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    applied: list[int] = []

    def serve() -> None:
        for number in range(2):
            connection, _ = listener.accept()
            codec = Connection(Side.SERVER)
            with connection:
                closing = False
                while not closing and (data := connection.recv(1 << 20)):
                    codec.receive_data(data)
                    for frame in codec.next_frames():
                        if isinstance(frame, Hello):
                            welcome = Welcome(session_id=number + 1, node="n1", frame_bytes_max=1 << 20)
                            connection.sendall(codec.send(welcome))
                            closing = number == 0  # the first connection dies right after WELCOME
                        else:
                            applied.append(frame.request_id)
                            connection.sendall(codec.send(ReplyFrame(frame.request_id, 1, 0, 1, b"ok")))

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    client = Client(path, client_id=42, timeout_s=5, reconnect_timeout_s=5)
    try:
        time.sleep(0.2)  # the server has closed the first connection
        pending = client.submit(b"x" * 70_000)  # over SEND_BATCH_BYTES: written at once
        assert pending.result(timeout_s=5).payload == b"ok"
    finally:
        client.close()
        listener.close()
    assert applied == [1]


def test_daemon_saying_not_now_is_retried_until_it_takes_the_session(
    daemon: FakeDaemon, clients: Clients
) -> None:
    daemon.refuse_hellos = ["unavailable", "disk_full"]  # draining, then its disk is full
    client = connect(clients, daemon)
    assert client.call(b"echo:in").payload == b"in"
    assert daemon.hellos == 3


def test_fatal_error_answering_hello_fails_at_once_with_its_code(
    daemon: FakeDaemon, clients: Clients
) -> None:
    daemon.refuse_hellos = ["permission_denied"]
    with pytest.raises(ProtocolViolation) as caught:
        connect(clients, daemon)
    assert caught.value.code == "permission_denied"
    assert daemon.hellos == 1


def test_redirect_loop_fails_with_connection_lost_after_redirects_max(
    daemon: FakeDaemon, clients: Clients
) -> None:
    daemon.redirect_to = daemon.socket_path  # a node that names itself as the leader
    with pytest.raises(ConnectionLost) as caught:
        connect(clients, daemon)
    assert str(caught.value) == (
        f"followed {session.REDIRECTS_MAX} redirects without reaching a leader (last: n2 at "
        f"{daemon.socket_path!r}): the cluster cannot agree on a leader; check `seqd status` on "
        "every node"
    )
    assert daemon.hellos == session.REDIRECTS_MAX + 1


# Run as another user, the client must meet EACCES; the child waits far longer than this to give
# up (reconnect_timeout_s), so only a shell that fails at once can answer before it is killed.
_DENIED_CHILD_WAIT_S = 60.0
_DENIED_CHILD = """
import os, sys
from tests.client_shells import open_client  # every import before dropping privileges
if os.getuid() == 0:
    os.setgroups([])
    os.setgid({nobody})
    os.setuid({nobody})
try:
    open_client(sys.argv[1], sys.argv[2], reconnect_timeout_s=10 * {wait_s})
except Exception as error:
    print(type(error).__name__, error)
else:
    print("connected")
"""


@pytest.mark.parametrize("shell", SHELLS)
def test_permission_denied_on_the_socket_fails_at_once_in_every_shell(
    shell: str, tmp_dir: Path
) -> None:
    """Both shells take EACCES as final: waiting will not fix a socket's mode. (The asyncio
    client used to retry it like a missing socket and say only ConnectionLost, 30 s later.)"""
    path = tmp_dir / "seqd.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
        listener.listen()
        os.chmod(tmp_dir, 0o755)
        os.chmod(path, 0o600 if os.getuid() == 0 else 0o000)  # root's socket; nobody may not
        child = subprocess.run(
            [sys.executable, "-c", _DENIED_CHILD.format(nobody=NOBODY, wait_s=_DENIED_CHILD_WAIT_S),
             shell, str(path)],
            cwd=ROOT, capture_output=True, text=True, timeout=_DENIED_CHILD_WAIT_S, check=False,
        )  # fmt: skip
    finally:
        listener.close()
    assert child.stdout.strip() == f"PermissionError [Errno 13] Permission denied: '{path}'", (
        child.stdout + child.stderr[-2000:]
    )
