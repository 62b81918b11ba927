"""The client session core driven with no socket, no clock and no event loop.

Each test plays the daemon with the codec's SERVER side: it reads what the session put in
`outgoing`, and hands the session the bytes a daemon would send, with `now` chosen by the test.
The shells' behaviour over real sockets is in tests/test_client.py.
"""

from __future__ import annotations

import errno
from typing import Any

import pytest

from sequencer.client import ConnectionLost, ProtocolViolation, TimedOut
from sequencer.client.protocol import (
    FRAME_BYTES_MAX,
    Command,
    Connection,
    Error,
    Event,
    Hello,
    Ping,
    Pong,
    Redirect,
    Reply,
    ReplyStatus,
    Side,
    Welcome,
)
from sequencer.client.session import (
    RECONNECT_BACKOFF_S_MAX,
    RECONNECT_BACKOFF_S_MIN,
    REDIRECTS_MAX,
    RETRYABLE_ERROR_CODES,
    Fail,
    Request,
    Retry,
    Session,
)

SOCKET_PATH = "/run/seqd/seqd.sock"


class Notes:
    """Stands in for the shells' logger."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def info(self, message: str, /, *args: object) -> None:
        self.lines.append(("info", message % args))

    def warning(self, message: str, /, *args: object) -> None:
        self.lines.append(("warning", message % args))


class Daemon:
    """The server's end of one connection at a time, as bytes."""

    def __init__(self) -> None:
        self.codec = Connection(Side.SERVER)

    def new_connection(self) -> None:
        self.codec = Connection(Side.SERVER)

    def read(self, session: Session) -> list[Any]:
        """Every frame the session queued for writing (and take it, as a shell's write would)."""
        data = bytes(session.outgoing)
        session.outgoing.clear()
        if not data:
            return []
        self.codec.receive_data(data)
        return self.codec.next_frames()

    def commands(self, session: Session) -> list[tuple[int, int]]:
        """(request_id, acked_request_id) of each COMMAND the session queued."""
        frames = self.read(session)
        assert all(type(frame) is Command for frame in frames), frames
        return [(frame.request_id, frame.acked_request_id) for frame in frames]

    def send(self, *frames: Any) -> bytes:
        out = bytearray()
        for frame in frames:
            self.codec.send_into(out, frame)
        return bytes(out)

    def welcome(self, session_id: int = 1) -> bytes:
        return self.send(Welcome(session_id=session_id, node="n1", frame_bytes_max=FRAME_BYTES_MAX))

    def reply(self, request_id: int, payload: bytes = b"ok") -> bytes:
        return self.send(Reply(request_id, request_id, ReplyStatus.OK, 1, payload))


def make_session(**options: Any) -> Session:
    arguments: dict[str, Any] = {
        "client_id": 7,
        "socket_path": SOCKET_PATH,
        "schema": None,
        "timeout_s": 10.0,
        "first_request_id": 1,
        "in_flight_max": 4,
        "reconnect_timeout_s": 30.0,
        "subscribe_events": False,
        "client_name": "test",
        "log": Notes(),
    }
    arguments.update(options)
    return Session(**arguments)


def handshake(session: Session, daemon: Daemon, now: float = 0.0) -> None:
    """Connect and be welcomed; whatever the session resends stays in `outgoing`."""
    assert session.begin_attempt(now) == session.socket_path
    daemon.new_connection()
    session.connection_made()
    (hello,) = daemon.read(session)
    assert isinstance(hello, Hello)
    assert session.receive_data(daemon.welcome(), now) is None
    assert session.connected


def submit(session: Session, payload: bytes = b"c") -> Request:
    request = Request(session.next_request_id, 1, payload)
    session.add(request)
    return request


@pytest.fixture
def daemon() -> Daemon:
    return Daemon()


@pytest.fixture
def welcome_limits() -> type[Welcome]:
    """The WELCOME type, which carries `in_flight_max` (with a default for older daemons)."""
    return Welcome


# -- the handshake --------------------------------------------------------------------------------


def test_hello_goes_first_and_commands_wait_for_welcome(daemon: Daemon) -> None:
    session = make_session(subscribe_events=True, client_name="billing")
    assert session.begin_attempt(0.0) == SOCKET_PATH
    session.connection_made()
    early = submit(session)  # before WELCOME: in flight, not written
    (hello,) = daemon.read(session)
    assert hello == Hello(client_id=7, subscribe_events=True, client_name="billing")
    assert not session.connected
    assert session.receive_data(daemon.send(Welcome(session_id=9, node="n3", frame_bytes_max=4096)), 0.0) is None
    assert session.connected
    assert (session.session_id, session.node, session.frame_bytes_max) == (9, "n3", 4096)
    assert daemon.commands(session) == [(early.request_id, 0)]
    later = submit(session)  # welcomed: written at once
    assert daemon.commands(session) == [(later.request_id, 0)]
    assert session.reconnects == 1


def test_ping_is_answered_with_pong_in_the_handshake_and_after(daemon: Daemon) -> None:
    session = make_session()
    session.begin_attempt(0.0)
    session.connection_made()
    daemon.read(session)
    assert session.receive_data(daemon.send(Ping(nonce=5)), 0.0) is None
    assert daemon.read(session) == [Pong(nonce=5)]
    assert session.receive_data(daemon.welcome() + daemon.send(Ping(nonce=6)), 0.0) is None
    assert daemon.read(session) == [Pong(nonce=6)]


# -- requests, replies and the acknowledged id ------------------------------------------------------


def test_acked_request_id_advances_only_over_a_contiguous_run_of_replies(daemon: Daemon) -> None:
    session = make_session()
    handshake(session, daemon)
    requests = [submit(session) for _ in range(3)]
    assert session.receive_data(daemon.reply(2), 0.0) is None
    assert requests[1].done() and not requests[0].done()
    assert session.acked_request_id == 0  # reply 1 is still missing
    assert session.receive_data(daemon.reply(1), 0.0) is None
    assert session.acked_request_id == 2
    daemon.read(session)
    submit(session)
    assert daemon.commands(session) == [(4, 2)]  # the next command carries the acked id
    assert list(session.in_flight) == [3, 4]


def test_stale_reply_is_ignored_and_counted(daemon: Daemon) -> None:
    session = make_session()
    handshake(session, daemon)
    request = submit(session)
    assert session.receive_data(daemon.reply(1) + daemon.reply(1) + daemon.reply(99), 0.0) is None
    assert request.done()
    assert session.replies_ignored == 2
    assert session.outcome(request).payload == b"ok"


def test_window_full_refuses_until_a_reply_makes_room(daemon: Daemon) -> None:
    session = make_session(in_flight_max=4)
    handshake(session, daemon)
    for _ in range(4):
        assert session.has_room()
        submit(session)
    assert not session.has_room()
    assert session.receive_data(daemon.reply(1), 0.0) is None
    assert session.has_room()


def test_window_bounds_the_span_from_the_oldest_unanswered_request_not_the_count(
    daemon: Daemon,
) -> None:
    """The daemon keeps every reply above acked_request_id; that span is what must stay bounded."""
    session = make_session(in_flight_max=4)
    handshake(session, daemon)
    for _ in range(4):
        submit(session)
    session.receive_data(daemon.reply(2) + daemon.reply(3) + daemon.reply(4), 0.0)
    assert len(session.in_flight) == 1  # only request 1 is unanswered...
    assert not session.has_room()  # ...but request 5 would make the daemon keep 5 replies


# -- reconnect and resend ---------------------------------------------------------------------------


def test_connection_lost_when_welcomed_retries_at_once_and_resends_in_request_id_order(
    daemon: Daemon,
) -> None:
    session = make_session(in_flight_max=8)
    handshake(session, daemon)
    for _ in range(5):
        submit(session)
    daemon.read(session)
    session.receive_data(daemon.reply(1) + daemon.reply(3), 0.0)
    action = session.connection_lost(ConnectionResetError(errno.ECONNRESET, "reset"), 5.0)
    assert isinstance(action, Retry)
    assert action.delay_s == 0
    assert not session.connected
    assert session.outgoing == b""
    submit(session)  # while disconnected: in flight, written after the next WELCOME
    handshake(session, daemon, now=5.0)
    assert daemon.commands(session) == [(2, 1), (4, 1), (5, 1), (6, 1)]
    assert session.reconnects == 2
    assert ("info", f"seqd client 7 connected to {SOCKET_PATH}, resending 4 requests") in (
        session.log.lines  # type: ignore[attr-defined]
    )


def test_backoff_doubles_to_its_maximum_and_gives_up_after_reconnect_timeout(daemon: Daemon) -> None:
    session = make_session(reconnect_timeout_s=5.0)
    now = 100.0
    delays = []
    while True:
        session.begin_attempt(now)
        action = session.connection_lost(ConnectionRefusedError(errno.ECONNREFUSED, "refused"), now)
        if isinstance(action, Fail):
            break
        assert 0 < action.delay_s <= RECONNECT_BACKOFF_S_MAX
        assert now + action.delay_s <= 100.0 + 5.0  # never sleeps past the give-up time
        delays.append(action.delay_s)
        now += action.delay_s
    assert delays[:4] == [RECONNECT_BACKOFF_S_MIN * 2**n for n in range(4)]
    assert max(delays) == RECONNECT_BACKOFF_S_MAX
    assert now == pytest.approx(105.0)
    assert isinstance(action.error, ConnectionLost)
    assert f"could not reach the seqd daemon at {SOCKET_PATH} for 5.0 s" in str(action.error)
    assert "ConnectionRefusedError" in str(action.error)
    # The outage is over: the next call starts a new one, from the shortest backoff.
    session.begin_attempt(500.0)
    retry = session.connection_lost(ConnectionRefusedError(errno.ECONNREFUSED, "refused"), 500.0)
    assert isinstance(retry, Retry)
    assert retry.delay_s == RECONNECT_BACKOFF_S_MIN


def test_a_welcome_ends_the_outage_and_resets_the_backoff(daemon: Daemon) -> None:
    session = make_session()
    for now in (0.0, 1.0, 2.0):
        session.begin_attempt(now)
        session.connection_lost(ConnectionRefusedError(errno.ECONNREFUSED, "refused"), now)
    assert session.backoff_s > RECONNECT_BACKOFF_S_MIN
    handshake(session, daemon, now=3.0)
    assert session.outage_started_s is None
    assert session.backoff_s == RECONNECT_BACKOFF_S_MIN
    session.connection_lost(None, 40.0)  # 37 s after the last failure: a new outage, not a lost one
    session.begin_attempt(40.0)
    assert isinstance(session.connection_lost(None, 41.0), Retry)


@pytest.mark.parametrize(
    "error",
    [
        FileNotFoundError(errno.ENOENT, "No such file or directory"),
        ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
        ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
        TimeoutError("timed out"),
        None,  # EOF
    ],
)
def test_errors_that_time_may_cure_are_retried_after_a_backoff(error: OSError | None) -> None:
    session = make_session()
    session.begin_attempt(0.0)
    action = session.connection_lost(error, 0.0)
    assert isinstance(action, Retry)
    assert action.delay_s == RECONNECT_BACKOFF_S_MIN


@pytest.mark.parametrize("handshaking", [False, True])
def test_permission_denied_fails_at_once_naming_the_socket(daemon: Daemon, handshaking: bool) -> None:
    session = make_session()
    session.begin_attempt(0.0)
    if handshaking:
        session.connection_made()
    denied = PermissionError(errno.EACCES, "Permission denied")
    action = session.connection_lost(denied, 0.0)
    assert isinstance(action, Fail)
    assert action.error is denied
    assert str(denied) == f"[Errno 13] Permission denied: '{SOCKET_PATH}'"
    assert session.outage_started_s is None  # the next call tries afresh


def test_an_oserror_without_errno_fails_at_once_with_its_own_message() -> None:
    session = make_session()
    session.begin_attempt(0.0)
    too_long = OSError("AF_UNIX path too long")
    action = session.connection_lost(too_long, 0.0)
    assert isinstance(action, Fail)
    assert str(action.error) == "AF_UNIX path too long"


# -- what the daemon says ---------------------------------------------------------------------------


def test_retryable_error_codes_include_unavailable_and_disk_full() -> None:
    assert {"unavailable", "disk_full"} <= RETRYABLE_ERROR_CODES


@pytest.mark.parametrize("code", sorted(RETRYABLE_ERROR_CODES))
def test_retryable_error_backs_off_in_the_handshake_and_reconnects_at_once_after(
    daemon: Daemon, code: str
) -> None:
    session = make_session()
    session.begin_attempt(0.0)
    session.connection_made()
    daemon.read(session)
    action = session.receive_data(daemon.send(Error(code=code, message="not now")), 0.0)
    assert isinstance(action, Retry)
    assert action.delay_s == RECONNECT_BACKOFF_S_MIN
    assert not session.connected
    handshake(session, daemon, now=1.0)
    request = submit(session)
    action = session.receive_data(daemon.send(Error(code=code, message="not now")), 2.0)
    assert isinstance(action, Retry)
    assert action.delay_s == 0
    assert session.in_flight == {1: request}


@pytest.mark.parametrize("welcomed", [False, True])
def test_fatal_error_fails_with_protocol_violation_and_keeps_requests_in_flight(
    daemon: Daemon, welcomed: bool
) -> None:
    session = make_session()
    if welcomed:
        handshake(session, daemon)
    else:
        session.begin_attempt(0.0)
        session.connection_made()
        daemon.read(session)
    request = submit(session)
    action = session.receive_data(daemon.send(Error(code="bad_version", message="speak 1")), 0.0)
    assert isinstance(action, Fail)
    assert isinstance(action.error, ProtocolViolation)
    assert (action.error.code, action.error.message) == ("bad_version", "speak 1")
    assert session.in_flight == {1: request}
    assert not session.connected


def test_non_fatal_error_is_logged_and_the_connection_carries_on(daemon: Daemon) -> None:
    session = make_session()
    handshake(session, daemon)
    assert session.receive_data(daemon.send(Error(code="slow", message="lagging", fatal=False)), 0.0) is None
    assert session.connected
    assert ("warning", "seqd daemon warns: slow: lagging") in session.log.lines  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("welcomed", "says"),
    [(False, "answered HELLO with garbage"), (True, "the next call reconnects")],
)
def test_garbage_fails_with_protocol_violation_that_says_when(
    daemon: Daemon, welcomed: bool, says: str
) -> None:
    session = make_session()
    if welcomed:
        handshake(session, daemon)
    else:
        session.begin_attempt(0.0)
        session.connection_made()
    action = session.receive_data(b"\x10\x00\x00\x00\x04\x63\x00\x00" + b"\xee" * 16, 0.0)
    assert isinstance(action, Fail)
    assert isinstance(action.error, ProtocolViolation)
    assert action.error.code == "bad_version"
    assert says in str(action.error)


def test_redirect_with_a_socket_is_followed_at_once_up_to_redirects_max(daemon: Daemon) -> None:
    session = make_session()
    for hop in range(REDIRECTS_MAX):
        session.begin_attempt(float(hop))
        daemon.new_connection()
        session.connection_made()
        daemon.read(session)
        target = f"/run/seqd/n{hop}.sock"
        action = session.receive_data(daemon.send(Redirect(leader=f"n{hop}", socket_path=target)), float(hop))
        assert isinstance(action, Retry)
        assert action.delay_s == 0
        assert session.socket_path == target
    assert session.begin_attempt(9.0) == f"/run/seqd/n{REDIRECTS_MAX - 1}.sock"
    daemon.new_connection()
    session.connection_made()
    daemon.read(session)
    action = session.receive_data(daemon.send(Redirect(leader="n9", socket_path="/x.sock")), 9.0)
    assert isinstance(action, Fail)
    assert isinstance(action.error, ConnectionLost)
    assert str(action.error) == (
        f"followed {REDIRECTS_MAX} redirects without reaching a leader (last: n9 at '/x.sock'): "
        "the cluster cannot agree on a leader; check `seqd status` on every node"
    )


def test_redirect_without_a_socket_backs_off_and_asks_the_same_node_again(daemon: Daemon) -> None:
    session = make_session()
    session.begin_attempt(0.0)
    session.connection_made()
    daemon.read(session)
    action = session.receive_data(daemon.send(Redirect(leader="n2")), 0.0)
    assert isinstance(action, Retry)
    assert action.delay_s == RECONNECT_BACKOFF_S_MIN
    assert session.begin_attempt(0.01) == SOCKET_PATH


def test_redirect_to_an_impossible_path_fails_naming_it(daemon: Daemon) -> None:
    session = make_session()
    session.begin_attempt(0.0)
    session.connection_made()
    daemon.read(session)
    action = session.receive_data(daemon.send(Redirect(leader="n2", socket_path="/" + "x" * 200)), 0.0)
    assert isinstance(action, Fail)
    assert isinstance(action.error, ProtocolViolation)
    assert action.error.code == "bad_redirect"
    assert "SOCKET_PATH_BYTES_MAX" in action.error.message
    assert session.socket_path == SOCKET_PATH


def test_redirect_after_welcome_moves_to_the_leader_at_once(daemon: Daemon) -> None:
    session = make_session()
    handshake(session, daemon)
    action = session.receive_data(daemon.send(Redirect(leader="n2", socket_path="/n2.sock")), 1.0)
    assert isinstance(action, Retry)
    assert action.delay_s == 0
    assert session.begin_attempt(1.0) == "/n2.sock"


# -- the window a node advertises -------------------------------------------------------------------


def test_window_is_capped_by_the_in_flight_max_a_node_advertises(
    daemon: Daemon, welcome_limits: type[Welcome]
) -> None:
    session = make_session(in_flight_max=8)
    session.begin_attempt(0.0)
    session.connection_made()
    daemon.read(session)
    advertised = welcome_limits(session_id=1, node="n1", frame_bytes_max=FRAME_BYTES_MAX, in_flight_max=3)  # type: ignore[call-arg]
    assert session.receive_data(daemon.send(advertised), 0.0) is None
    assert session.window == 3
    for _ in range(3):
        submit(session)
    assert not session.has_room()
    # A node that advertises more than the client's own window does not raise it.
    session.connection_lost(None, 1.0)
    session.begin_attempt(1.0)
    daemon.new_connection()
    session.connection_made()
    daemon.read(session)
    roomy = welcome_limits(session_id=2, node="n1", frame_bytes_max=FRAME_BYTES_MAX, in_flight_max=100)  # type: ignore[call-arg]
    session.receive_data(daemon.send(roomy), 1.0)
    assert session.window == 8


def test_a_welcome_without_in_flight_max_leaves_the_window_as_configured(daemon: Daemon) -> None:
    session = make_session(in_flight_max=8)
    handshake(session, daemon)
    assert session.window == 8


def test_requests_beyond_a_smaller_advertised_window_are_held_and_sent_in_order_as_replies_come(
    daemon: Daemon, welcome_limits: type[Welcome]
) -> None:
    session = make_session(in_flight_max=8)
    handshake(session, daemon)
    for _ in range(6):
        submit(session)
    daemon.read(session)
    session.connection_lost(None, 1.0)
    session.begin_attempt(1.0)
    daemon.new_connection()
    session.connection_made()
    daemon.read(session)
    smaller = welcome_limits(session_id=2, node="n2", frame_bytes_max=FRAME_BYTES_MAX, in_flight_max=2)  # type: ignore[call-arg]
    session.receive_data(daemon.send(smaller), 1.0)
    assert daemon.commands(session) == [(1, 0), (2, 0)]  # the rest are held
    assert not session.has_room()  # and no new request may pass them
    session.receive_data(daemon.reply(1), 1.0)
    assert daemon.commands(session) == [(3, 1)]
    session.receive_data(daemon.reply(2) + daemon.reply(3), 1.0)
    assert daemon.commands(session) == [(4, 3), (5, 3)]
    session.receive_data(daemon.reply(4), 1.0)
    assert daemon.commands(session) == [(6, 4)]
    assert not session.has_room()
    session.receive_data(daemon.reply(5), 1.0)
    submit(session)
    assert daemon.commands(session) == [(7, 5)]


# -- timeouts, events, encoding ---------------------------------------------------------------------


def test_timed_out_says_what_was_awaited_and_that_requests_stay_in_flight(daemon: Daemon) -> None:
    session = make_session()
    handshake(session, daemon)
    submit(session)
    error = session.timed_out("waiting for the reply to request 1")
    assert isinstance(error, TimedOut)
    assert str(error) == (
        "timed out waiting for the reply to request 1 (client 7, 1 requests in flight); requests "
        "in flight stay in flight and may still be applied: wait again or raise the timeout"
    )
    session.connection_lost(None, 1.0)
    session.begin_attempt(1.0)
    session.connection_lost(ConnectionRefusedError(errno.ECONNREFUSED, "refused"), 1.0)
    unreachable = str(session.timed_out("connecting"))
    assert unreachable.startswith(f"timed out connecting: the daemon at {SOCKET_PATH} is unreachable")
    assert "ConnectionRefusedError" in unreachable
    assert unreachable.endswith("requests in flight stay in flight")


def test_events_are_buffered_up_to_their_bound_dropping_the_oldest(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sequencer.client import session as session_module

    monkeypatch.setattr(session_module, "EVENTS_BUFFERED_MAX", 2)
    session = make_session()
    handshake(session, daemon)
    events = [Event(index, 1, b"e%d" % index) for index in (1, 2, 3)]
    assert session.receive_data(daemon.send(*events), 0.0) is None
    assert list(session.events) == events[1:]
    assert session.events_dropped == 1


def test_a_command_too_large_for_the_welcomed_frame_limit_is_refused(daemon: Daemon) -> None:
    session = make_session()
    session.begin_attempt(0.0)
    session.connection_made()
    daemon.read(session)
    session.receive_data(daemon.send(Welcome(session_id=1, node="n1", frame_bytes_max=1024)), 0.0)
    assert session.encode(b"x" * (1024 - 32)) == (1, b"x" * (1024 - 32))
    with pytest.raises(ValueError, match="frame_bytes_max=1024"):
        session.encode(b"x" * (1024 - 31))
    with pytest.raises(TypeError, match="schema"):
        session.encode("not bytes")


@pytest.mark.parametrize(
    ("option", "value", "names"),
    [
        ("client_id", 0, "client_id"),
        ("client_id", 1 << 64, "client_id"),
        ("first_request_id", 0, "first_request_id"),
        ("in_flight_max", 0, "IN_FLIGHT_LIMIT_MAX"),
        ("in_flight_max", 1025, "IN_FLIGHT_LIMIT_MAX"),
        ("timeout_s", 0, "timeout_s"),
        ("reconnect_timeout_s", -1, "reconnect_timeout_s"),
        ("socket_path", "/run/" + "x" * 103, "SOCKET_PATH_BYTES_MAX=107"),
        ("socket_path", "/run/seqd\0.sock", "NUL"),
    ],
)
def test_arguments_out_of_range_are_refused_naming_the_bound(option: str, value: Any, names: str) -> None:
    with pytest.raises(ValueError, match=names):
        make_session(**{option: value})


def test_unix_module_still_exports_the_clients() -> None:
    from sequencer.client import AsyncClient, Client, unix

    assert unix.Client is Client
    assert unix.AsyncClient is AsyncClient
    assert unix.IN_FLIGHT_LIMIT_MAX == 1024
