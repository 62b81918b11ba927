"""Protocol conformance, part 2: request ids, the window, resends, acks and events, in raw bytes.

Each test follows a rule of docs/client.md, "Sessions and requests", against a real node with
`tests/raw_wire.py` (no `sequencer.client`).
"""

from __future__ import annotations

import socket

from sequencer.processor import SAVED_REPLIES_MAX
from tests import raw_wire as wire
from tests.node_fixtures import node_factory  # noqa: F401 (fixture)


def _deposit(request_id: int, account: str = "a", amount: int = 1, acked_request_id: int = 0) -> bytes:
    return wire.command(request_id, wire.app("Deposit", account=account, amount=amount), acked_request_id)


def _balance(raw: wire.Raw, request_id: int, account: str = "a", acked_request_id: int = 0) -> int:
    raw.send(wire.command(request_id, wire.app("Balance", account=account), acked_request_id))
    (reply,) = raw.replies(1)
    assert reply.fields["status"] == wire.OK, reply.app()
    return int(reply.app()["balance"])


def _open(raw: wire.Raw, request_id: int, account: str = "a") -> None:
    raw.send(wire.command(request_id, wire.app("OpenAccount", account=account)))
    (reply,) = raw.replies(1)
    assert reply.fields["status"] == wire.OK, reply.app()


def test_resend_after_reconnect_gets_the_saved_replies_and_applies_each_request_once(node_factory) -> None:  # noqa: F811
    node = node_factory()
    with wire.Raw(node.socket_path) as raw:
        raw.open(client_id=21)
        _open(raw, 1)
        raw.send(b"".join(_deposit(request_id, amount=request_id) for request_id in (2, 3, 4)))
        first = raw.replies(3)
    # A new connection, the same client id: resend everything not acknowledged (1 was, in effect,
    # but resending it too is harmless), in request-id order.
    with wire.Raw(node.socket_path) as raw:
        raw.open(client_id=21)
        raw.send(wire.command(1, wire.app("OpenAccount", account="a")))
        raw.send(b"".join(_deposit(request_id, amount=request_id) for request_id in (2, 3, 4)))
        opened, *again = raw.replies(4)
        assert opened.fields["status"] == wire.OK  # the saved reply, not account_exists
        for original, resent in zip(first, again, strict=True):
            assert resent.fields == original.fields  # same request, status, version and index
            assert resent.payload == original.payload
        assert _balance(raw, 5) == 2 + 3 + 4


def test_acknowledged_reply_is_forgotten_and_its_resend_is_answered_duplicate(node_factory) -> None:  # noqa: F811
    node = node_factory()
    with wire.Raw(node.socket_path) as raw:
        raw.open(client_id=22)
        _open(raw, 1)
        raw.send(_deposit(2, acked_request_id=1))
        (deposited,) = raw.replies(1)
        raw.send(_deposit(3, acked_request_id=2))  # acknowledges 2: its reply may be forgotten
        raw.replies(1)
        raw.send(_deposit(2, acked_request_id=3))
        (duplicate,) = raw.replies(1)
        assert duplicate.fields["status"] == wire.DUPLICATE
        assert duplicate.payload == b""
        # The index of the resend's own record, after the original's.
        assert duplicate.fields["index"] > deposited.fields["index"]
        assert _balance(raw, 4, acked_request_id=3) == 2


def test_lower_request_id_after_a_higher_one_is_never_applied_and_answered_duplicate(node_factory) -> None:  # noqa: F811
    """The documented rule for ids out of order (3 then 2): 2 is never applied."""
    node = node_factory()
    with wire.Raw(node.socket_path) as raw:
        raw.open(client_id=23)
        _open(raw, 1)
        raw.send(_deposit(3, amount=10, acked_request_id=1))
        (third,) = raw.replies(1)
        assert third.fields["status"] == wire.OK
        raw.send(_deposit(2, amount=100, acked_request_id=1))
        (second,) = raw.replies(1)
        assert second.fields["status"] == wire.DUPLICATE
        assert _balance(raw, 4, acked_request_id=3) == 10


def test_every_reply_in_the_window_survives_a_reconnect_and_a_request_beyond_it_is_refused(node_factory) -> None:  # noqa: F811
    """The issue's case: more requests in flight than the daemon keeps replies for. The request
    beyond the window is refused (not applied), so every reply in it is still there to resend."""
    node = node_factory()
    in_flight_max = SAVED_REPLIES_MAX
    with wire.Raw(node.socket_path) as raw:
        assert raw.open(client_id=24)["in_flight_max"] == in_flight_max
        _open(raw, 1)
        # Nothing acknowledged beyond 1: requests 2 .. 1 + in_flight_max fit, the next does not.
        ids = range(2, 2 + in_flight_max + 1)
        raw.send(b"".join(_deposit(request_id, acked_request_id=1) for request_id in ids))
        replies = {reply.fields["request_id"]: reply for reply in raw.replies(len(ids))}
        beyond = replies.pop(ids[-1])
        assert wire.rejection(beyond) == "window_exceeded"
        assert beyond.fields["index"] == 0
        assert all(reply.fields["status"] == wire.OK for reply in replies.values())
    with wire.Raw(node.socket_path) as raw:
        raw.open(client_id=24)
        raw.send(b"".join(_deposit(request_id, acked_request_id=1) for request_id in ids[:-1]))
        for resent in raw.replies(len(ids) - 1):
            original = replies[resent.fields["request_id"]]
            assert resent.fields == original.fields, "a reply inside the window was forgotten"
        # Acknowledging them makes room: the refused request may now be sent again, and applies.
        raw.send(_deposit(ids[-1], acked_request_id=ids[-2]))
        (late,) = raw.replies(1)
        assert late.fields["status"] == wire.OK
        assert _balance(raw, ids[-1] + 1, acked_request_id=ids[-1]) == in_flight_max + 1


def test_two_sessions_with_one_client_id_share_its_saved_replies(node_factory) -> None:  # noqa: F811
    """Intended: the reconnect race (old connection not yet noticed dead) opens a second session
    with the same client id; a resend on it gets the reply saved for the first."""
    node = node_factory()
    with wire.Raw(node.socket_path) as old, wire.Raw(node.socket_path) as new:
        old.open(client_id=25)
        new.open(client_id=25)
        _open(old, 1)
        old.send(_deposit(2, amount=7, acked_request_id=1))
        (original,) = old.replies(1)
        new.send(_deposit(2, amount=7, acked_request_id=1))
        (resent,) = new.replies(1)
        assert resent.fields == original.fields
        assert _balance(new, 3, acked_request_id=2) == 7


def test_events_reach_subscribed_sessions_only_with_the_publishing_index(node_factory) -> None:  # noqa: F811
    node = node_factory()
    with wire.Raw(node.socket_path) as subscriber, wire.Raw(node.socket_path) as sender:
        subscriber.open(client_id=26, subscribe_events=True)
        sender.open(client_id=27)
        _open(sender, 1)
        sender.send(_deposit(2, amount=5, acked_request_id=1))
        # Not subscribed: the sender's next frame is its reply, no event before it.
        reply = sender.next()
        assert reply is not None and reply.kind == wire.REPLY_KIND and reply.fields["request_id"] == 2
        event = subscriber.next()
        assert event is not None and event.kind == wire.EVENT_KIND
        assert event.fields == {"index": reply.fields["index"], "version": 1}
        assert event.app() == {"type": "TransferMade", "source": "@mint", "target": "a", "amount": 5}
        # A subscriber's own command: its event arrives before its reply.
        subscriber.send(_deposit(1, amount=1))
        event = subscriber.next()
        own = subscriber.next()
        assert event is not None and event.kind == wire.EVENT_KIND
        assert own is not None and own.kind == wire.REPLY_KIND
        assert event.fields["index"] == own.fields["index"]


def test_a_timer_publishes_its_event_at_the_timer_fired_index(node_factory) -> None:  # noqa: F811
    node = node_factory()
    with wire.Raw(node.socket_path, timeout_s=30) as raw:
        raw.open(client_id=28, subscribe_events=True)
        for request_id, account in ((1, "a"), (2, "b")):
            raw.send(wire.command(request_id, wire.app("OpenAccount", account=account)))
        raw.send(_deposit(3, amount=10))
        raw.send(wire.command(4, wire.app("Reserve", reservation_id=9, source="a", target="b", amount=4,
                                          timeout_ms=50)))  # fmt: skip
        replies = raw.replies(4)
        assert all(reply.fields["status"] == wire.OK for reply in replies)
        events = raw.events
        while not any(event.app()["type"] == "ReservationExpired" for event in events):
            got = raw.next()
            assert got is not None
            events.append(got)
    expired = events[-1]
    assert expired.app() == {"type": "ReservationExpired", "reservation_id": 9, "source": "a", "amount": 4}
    assert expired.fields["index"] > replies[-1].fields["index"]


def test_eof_between_frames_ends_the_session_without_an_error(node_factory) -> None:  # noqa: F811
    node = node_factory()
    with wire.Raw(node.socket_path) as raw:
        raw.open(client_id=29)
        raw.sock.shutdown(socket.SHUT_WR)
        assert raw.until_eof() == []
    assert node.read_counters()["errors.protocol"] == 0
