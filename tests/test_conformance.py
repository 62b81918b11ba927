"""Protocol conformance, part 1: frames, the handshake, WELCOME's limits and every error code.

A real node (`node_factory`), raw bytes over its socket (`tests/raw_wire.py`: struct and
msgspec.msgpack, never `sequencer.client`), checked against docs/client.md. Part 2
(`test_conformance_sessions.py`) covers request ids, resends, acks and events; part 3
(`test_conformance_docs.py`) holds the documented code tables equal to the code.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from daemon.harness import NodeProcess
from sequencer.journal import read_records
from sequencer.processor import SAVED_REPLIES_MAX
from sequencer.record import ADMIN_NODE_START, RecordType, decode_admin
from tests import raw_wire as wire
from tests.node_fixtures import node_factory  # noqa: F401 (fixture)
from tests.small_fs import SmallFilesystem, small_filesystem  # noqa: F401

NOBODY = 65534


def _open_accounts(raw: wire.Raw, names: list[str], first_request_id: int = 1) -> int:
    """Open and fund accounts on an open connection; returns the next request id."""
    request_id = first_request_id
    for name in names:
        raw.send(wire.command(request_id, wire.app("OpenAccount", account=name)))
        raw.send(wire.command(request_id + 1, wire.app("Deposit", account=name, amount=1000)))
        request_id += 2
    for reply in raw.replies(request_id - first_request_id):
        assert reply.fields["status"] == wire.OK, reply
    return request_id


# -- the handshake and WELCOME ---------------------------------------------------------------


def test_welcome_advertises_every_limit_and_each_equals_the_config_in_force(node_factory) -> None:  # noqa: F811
    node = node_factory({"socket": {"command_bytes_max": 4321}})
    with wire.Raw(node.socket_path) as raw:
        welcome = raw.open(client_id=11)
    assert welcome["session_id"] > 0
    assert welcome["node"] == node.node
    # A single node sequences its own commands: it names itself as the leader.
    assert welcome["leader"] == node.node
    assert welcome["frame_bytes_max"] == wire.FRAME_BYTES_MAX
    assert welcome["command_bytes_max"] == node.config.socket.command_bytes_max == 4321
    assert welcome["saved_replies_max"] == SAVED_REPLIES_MAX
    # The window never exceeds the replies the daemon keeps for resends.
    assert welcome["in_flight_max"] == SAVED_REPLIES_MAX


def test_each_session_gets_its_own_session_id(node_factory) -> None:  # noqa: F811
    node = node_factory()
    with wire.Raw(node.socket_path) as first, wire.Raw(node.socket_path) as second:
        assert first.open(client_id=1)["session_id"] != second.open(client_id=2)["session_id"]


def test_the_documented_command_example_bytes_get_their_reply(node_factory) -> None:  # noqa: F811
    """docs/client.md's example frame layout, byte by byte, and the REPLY layout back."""
    node = node_factory()
    with wire.Raw(node.socket_path) as raw:
        raw.open(client_id=5)
        payload = wire.app("Balance", account="@mint")
        body = (7).to_bytes(8, "little") + (6).to_bytes(8, "little") + b"\x01\x00" + bytes(6) + payload
        raw.send(len(body).to_bytes(4, "little") + b"\x03\x01\x00\x00" + body)
        (reply,) = raw.replies(1)
    assert reply.fields["request_id"] == 7
    assert reply.fields["status"] == wire.OK
    assert reply.fields["index"] > 0
    assert reply.fields["version"] == 1
    assert reply.app() == {"type": "AccountBalance", "account": "@mint", "balance": 0, "held": 0}


def test_tag_key_may_come_anywhere_and_unknown_keys_are_ignored(node_factory) -> None:  # noqa: F811
    node = node_factory()
    with wire.Raw(node.socket_path) as raw:
        raw.open(client_id=5)
        payload = msgspec.msgpack.encode({"account": "@mint", "comment": "ignored", "type": "Balance"})
        (reply,) = raw.send(wire.command(1, payload)).replies(1)
    assert reply.fields["status"] == wire.OK
    assert reply.app()["type"] == "AccountBalance"


def test_ping_gets_pong_with_its_nonce_and_a_client_pong_is_ignored(node_factory) -> None:  # noqa: F811
    node = node_factory()
    with wire.Raw(node.socket_path) as raw:
        raw.open(client_id=5)
        raw.send(wire.control(wire.PING, nonce=424242))
        pong = raw.next()
        assert pong is not None and pong.kind == wire.PONG and pong.fields == {"nonce": 424242}
        # PONG is "sent by both": the daemon never pings, so a client's PONG answers nothing and
        # the session carries on.
        raw.send(wire.control(wire.PONG, nonce=1))
        (reply,) = raw.send(wire.command(1, wire.app("Balance", account="@mint"))).replies(1)
        assert reply.fields["status"] == wire.OK


def test_a_clients_nonfatal_error_is_accepted_and_a_fatal_one_ends_the_session(node_factory) -> None:  # noqa: F811
    node = node_factory()
    with wire.Raw(node.socket_path) as raw:
        raw.open(client_id=5)
        raw.send(wire.control(wire.ERROR, code="client_says", message="just so you know", fatal=False))
        (reply,) = raw.send(wire.command(1, wire.app("Balance", account="@mint"))).replies(1)
        assert reply.fields["status"] == wire.OK
        # Nothing after a fatal ERROR counts: the command behind it is not sequenced, and the
        # daemon closes without an ERROR of its own.
        raw.send(wire.control(wire.ERROR, code="client_quits", message="bye", fatal=True)
                 + wire.command(2, wire.app("OpenAccount", account="after_fatal")))
        assert raw.until_eof() == []
    assert node.read_counters()["errors.protocol"] == 0
    with wire.Raw(node.socket_path) as raw:
        raw.open(client_id=6)
        (reply,) = raw.send(wire.command(1, wire.app("OpenAccount", account="after_fatal"))).replies(1)
        assert reply.fields["status"] == wire.OK, reply.app()


# -- ERROR codes -------------------------------------------------------------------------------


def _bytes_case(data: bytes, half_close: bool = False) -> Callable[[NodeProcess], list[wire.Frame]]:
    def run(node: NodeProcess) -> list[wire.Frame]:
        with wire.Raw(node.socket_path) as raw:
            raw.send(data)
            if half_close:
                raw.sock.shutdown(socket.SHUT_WR)
            return raw.until_eof()

    return run


def _unavailable(node: NodeProcess) -> list[wire.Frame]:
    with wire.Raw(node.socket_path) as holder:
        holder.open(client_id=1)
        with wire.Raw(node.socket_path) as raw:
            return raw.until_eof()  # refused on connect: no HELLO needed


def _permission_denied(node: NodeProcess) -> list[wire.Frame]:
    if os.getuid() != 0:
        pytest.skip("needs root to connect as another uid")
    os.chmod(os.path.dirname(node.socket_path), 0o755)
    os.chmod(node.socket_path, 0o666)
    script = f"""
import os, socket, sys
os.setgid({NOBODY}); os.setuid({NOBODY})
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect({node.socket_path!r})
data = b""
while True:
    try:
        chunk = s.recv(65536)
    except ConnectionResetError:
        chunk = b""
    if not chunk:
        break
    data += chunk
sys.stdout.buffer.write(data)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=30, check=True)
    frames, rest = wire.parse(result.stdout)
    assert not rest
    return frames


_HELLO = wire.hello(99)
_PARTIAL_COMMAND = wire.HEADER.pack(100, wire.COMMAND_KIND, 1, 0) + bytes(10)
Run = Callable[[NodeProcess], list[wire.Frame]]
# documented code -> (node settings, {cause: what the client does}). Each cause follows the docs'
# description; the causes of one code run one after another against one node.
ERROR_CASES: dict[str, tuple[dict[str, Any], dict[str, Run]]] = {
    "frame_too_large": ({}, {"declared_size_over_the_limit": _bytes_case(
        wire.HEADER.pack(wire.FRAME_BYTES_MAX - wire.HEADER.size + 1, wire.HELLO, 1, 0))}),
    "bad_version": ({}, {
        "in_the_header": _bytes_case(wire.HEADER.pack(0, wire.HELLO, 2, 0)),
        "in_hello": _bytes_case(wire.hello(99, protocol_version=2)),
    }),
    "bad_flags": ({}, {"flags_not_0": _bytes_case(wire.HEADER.pack(0, wire.HELLO, 1, 1))}),
    "unknown_kind": ({}, {
        "kind_0": _bytes_case(wire.HEADER.pack(0, 0, 1, 0)),
        "kind_14": _bytes_case(_HELLO + wire.HEADER.pack(0, 14, 1, 0)),
    }),
    "unexpected_kind": ({}, {
        "reply_from_a_client": _bytes_case(_HELLO + wire.frame(wire.REPLY_KIND, bytes(24))),
        "welcome_from_a_client": _bytes_case(
            _HELLO + wire.control(wire.WELCOME, session_id=1, node="x", frame_bytes_max=1 << 20)),
        "second_hello": _bytes_case(_HELLO + _HELLO),
        # A query replica's kinds, sent to the node's socket (docs/client.md).
        "subscribe_to_the_node": _bytes_case(_HELLO + wire.control(10, from_index=1)),
        "query_to_the_node": _bytes_case(_HELLO + wire.control(12, query_id=1, name="balance")),
    }),
    "hello_required": ({}, {
        "command_first": _bytes_case(wire.command(1, b"")),
        "ping_first": _bytes_case(wire.control(wire.PING, nonce=1)),
    }),
    "malformed_frame": ({}, {
        "hello_not_msgpack": _bytes_case(wire.frame(wire.HELLO, b"\xc1")),
        "hello_without_client_id": _bytes_case(wire.control(wire.HELLO, client_name="x")),
        "client_id_0": _bytes_case(wire.hello(0)),
        "command_shorter_than_its_header": _bytes_case(_HELLO + wire.frame(wire.COMMAND_KIND, bytes(23))),
    }),
    "truncated_frame": ({}, {"half_close_mid_frame": _bytes_case(_HELLO + _PARTIAL_COMMAND, half_close=True)}),
    "unavailable": ({"socket": {"sessions_max": 1}}, {"sessions_max_reached": _unavailable}),
    "permission_denied": ({}, {"uid_not_allowed": _permission_denied}),
}  # fmt: skip


# Codes whose cause is a state of the node rather than a client's bytes, each with its own test
# (in this module, or "module:test" for the query replicas' codes).
ERROR_STATE_CASES = {
    "disk_full": "test_disk_full_refuses_hello_and_command_and_the_node_serves_on_when_space_returns",
    "index_below_retention": "tests.test_conformance_replica:test_a_subscribe_below_retention_gets_index_below_retention",
    "subscriber_too_slow": "tests.test_conformance_replica:test_a_subscriber_that_stalls_while_fed_from_the_journal_gets_subscriber_too_slow",
    "replica_stopping": "tests.test_conformance_replica:test_a_stopping_replica_tells_its_subscribers_replica_stopping",
}


def test_every_documented_error_code_has_a_conformance_case() -> None:
    import importlib

    documented = wire.doc_codes(wire.ERROR_CODES_HEADING)
    assert sorted([*ERROR_CASES, *ERROR_STATE_CASES]) == sorted(documented)
    for test_name in ERROR_STATE_CASES.values():
        module, _, name = test_name.rpartition(":")
        scope = vars(importlib.import_module(module)) if module else globals()
        assert callable(scope.get(name)), test_name


@pytest.mark.parametrize("small_filesystem", ["limit"], indirect=True)
def test_disk_full_refuses_hello_and_command_and_the_node_serves_on_when_space_returns(
    node_factory, small_filesystem: SmallFilesystem  # noqa: F811
) -> None:
    """docs/client.md: while the disk is short, HELLO and COMMAND get the fatal ERROR `disk_full`
    and nothing of them enters the log; once space returns the same client is served."""
    filesystem = small_filesystem
    settings = {
        "node": {"data_dir": str(filesystem.data_dir)},
        "socket": {"command_bytes_max": 4096},
        "ring": {"log_capacity_bytes": 256 << 10, "egress_capacity_bytes": 2 << 20},
        "journal": {"segment_bytes": 1 << 20, "batch_bytes_max": 64 << 10, "preallocate": False},
    }
    node = node_factory(settings, start=False)
    node.start(environment=dict(filesystem.environment))
    with wire.Raw(node.socket_path) as early, wire.Raw(node.socket_path) as trigger:
        early.open(client_id=7)  # sessions opened while there is room
        trigger.open(client_id=9)
        filesystem.fill(leave_bytes=0)
        # A parked journaller checks the space when it has work: give it some, on another
        # session (that command may be written later, or refused: either is documented).
        trigger.send(wire.command(1, wire.app("OpenAccount", account="trigger")))
        deadline = time.monotonic() + 30
        while node.read_counters()["journal.disk_full"] == 0:
            assert time.monotonic() < deadline, "the journal did not notice the full disk"
            time.sleep(0.01)
        with wire.Raw(node.socket_path) as raw:
            raw.send(wire.hello(8))
            (error,) = raw.until_eof()
        assert (error.kind, error.fields["code"], error.fields["fatal"]) == (wire.ERROR, "disk_full", True)
        assert "disk" in error.fields["message"]
        early.send(wire.command(1, wire.app("OpenAccount", account="a")))
        frames = early.until_eof()
        assert frames and frames[-1].kind == wire.ERROR and frames[-1].fields["code"] == "disk_full", frames
    filesystem.free_space()
    deadline = time.monotonic() + 30
    while node.read_counters()["journal.disk_full"] != 0:
        assert time.monotonic() < deadline, "the node did not notice the freed space"
        time.sleep(0.01)
    with wire.Raw(node.socket_path) as raw:
        raw.open(client_id=7)
        # The refused command never entered the log: request 1 was never applied, so a new
        # command may use its id, and the account does not exist.
        (refused,) = raw.send(wire.command(1, wire.app("Balance", account="a"))).replies(1)
        assert wire.rejection(refused) == "unknown_account"
        (opened,) = raw.send(wire.command(2, wire.app("OpenAccount", account="a"), 1)).replies(1)
        assert opened.fields["status"] == wire.OK, opened.app()


@pytest.mark.parametrize("code", sorted(ERROR_CASES))
def test_documented_cause_gets_its_fatal_error_and_the_node_serves_on(node_factory, code: str) -> None:  # noqa: F811
    settings, causes = ERROR_CASES[code]
    node = node_factory(settings)
    for cause, run in causes.items():
        frames = run(node)
        assert frames, f"{cause}: the daemon closed without a frame"
        error = frames[-1]
        assert error.kind == wire.ERROR, (cause, frames)
        assert error.fields["code"] == code, (cause, error.fields)
        assert error.fields["fatal"] is True
        assert error.fields["message"]
        # Before the ERROR, at most the WELCOME of a HELLO that came first.
        assert [frame.kind for frame in frames[:-1]] in ([], [wire.WELCOME]), (cause, frames)
        # Only that connection was closed; the node takes new sessions once it has seen it go.
        _wait_sessions_closed(node)
        with wire.Raw(node.socket_path) as raw:
            raw.open(client_id=12345)
            (reply,) = raw.send(wire.command(1, wire.app("Balance", account="@mint"))).replies(1)
            assert reply.fields["status"] == wire.OK
        _wait_sessions_closed(node)
    if code not in ("unavailable", "permission_denied"):
        assert node.read_counters()["errors.protocol"] == len(causes)


def _wait_sessions_closed(node: NodeProcess, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while node.read_counters()["sessions.open"]:
        assert time.monotonic() < deadline, "sessions stayed open after their clients left"
        time.sleep(0.01)


def test_truncated_frame_after_a_full_close_is_counted(node_factory) -> None:  # noqa: F811
    """The ERROR cannot reach a client that closed both directions, but the daemon counts it."""
    node = node_factory()
    with wire.Raw(node.socket_path) as raw:
        raw.open(client_id=5)
        raw.send(_PARTIAL_COMMAND)
    deadline = time.monotonic() + 10
    while node.read_counters()["errors.protocol"] < 1:
        assert time.monotonic() < deadline, "the truncated frame was not counted"
        time.sleep(0.01)


def test_frames_complete_before_bad_bytes_are_processed_first(node_factory) -> None:  # noqa: F811
    node = node_factory()
    with wire.Raw(node.socket_path) as raw:
        raw.send(wire.hello(77) + wire.command(1, wire.app("OpenAccount", account="early"))
                 + wire.HEADER.pack(0, 200, 1, 0))
        frames = raw.until_eof()
    assert frames[0].kind == wire.WELCOME
    assert frames[-1].kind == wire.ERROR and frames[-1].fields["code"] == "unknown_kind"
    # The command before the garbage was applied: a resend on a new session gets its saved reply.
    with wire.Raw(node.socket_path) as raw:
        raw.open(client_id=77)
        (reply,) = raw.send(wire.command(1, wire.app("OpenAccount", account="early"))).replies(1)
    assert reply.fields["status"] == wire.OK
    assert reply.app() == {"type": "AccountOpened", "account": "early"}


# -- REJECTED codes from seqd ----------------------------------------------------------------


_DEPOSIT = wire.app("Deposit", account="a", amount=1)
Refused = Callable[[int, int], bytes]  # (request_id, acked_request_id) -> the COMMAND frame


def _refused(payload: bytes, version: int = 1) -> Refused:
    return lambda request_id, acked_request_id: wire.command(request_id, payload, acked_request_id, version)


# documented code -> (node settings, {cause: the refused command}). The causes of one code run on
# one node, each between two good commands.
REJECTION_CASES: dict[str, tuple[dict[str, Any], dict[str, Refused]]] = {
    "bad_request_id": ({}, {"request_id_0": lambda _request_id, acked: wire.command(0, _DEPOSIT, acked)}),
    "command_too_large": ({"socket": {"command_bytes_max": 1024}}, {
        "over_command_bytes_max": _refused(wire.app("Deposit", account="a" * 1100, amount=1))}),
    "unknown_version": ({}, {"version_0": _refused(_DEPOSIT, version=0),
                             "version_newer_than_the_app": _refused(_DEPOSIT, version=2)}),
    "window_exceeded": ({}, {"beyond_acked_plus_in_flight_max": lambda _request_id, acked: wire.command(
        acked + SAVED_REPLIES_MAX + 1, _DEPOSIT, acked)}),
    "bad_command": ({}, {"not_msgpack": _refused(b"\xc1\xc1"),
                         "unknown_type": _refused(wire.app("Withdraw", account="a", amount=1)),
                         "field_missing": _refused(wire.app("Deposit", account="a")),
                         "field_of_the_wrong_type": _refused(wire.app("Deposit", account="a", amount="1"))}),
    "reply_too_large": ({"socket": {"command_bytes_max": (1 << 20) - 32}}, {
        # The largest command a frame carries (27 bytes of map around the name); the ledger's
        # unknown_account refusal quotes the name, so its reply cannot fit a frame.
        "reply_quoting_a_1_mib_name": _refused(wire.app("Balance", account="x" * ((1 << 20) - 32 - 27)))}),
}  # fmt: skip
GATEWAY_CODES = {"bad_request_id", "command_too_large", "unknown_version", "window_exceeded"}


def test_every_documented_seqd_rejection_code_has_a_conformance_case() -> None:
    assert sorted(REJECTION_CASES) == sorted(wire.doc_codes(wire.SEQD_REJECTION_CODES_HEADING))


@pytest.mark.parametrize(
    "code", sorted(REJECTION_CASES)
)
def test_documented_cause_gets_its_rejection_and_the_connection_stays_open(node_factory, code: str) -> None:  # noqa: F811
    settings, causes = REJECTION_CASES[code]
    settings = {**settings, "ring": {"log_capacity_bytes": 8 << 20, "egress_capacity_bytes": 8 << 20},
                "journal": {"batch_bytes_max": 4 << 20, "segment_bytes": 16 << 20}}  # fmt: skip
    node = node_factory(settings)
    with wire.Raw(node.socket_path, timeout_s=10) as raw:
        raw.open(client_id=5)
        raw.send(wire.command(1, wire.app("OpenAccount", account="a")))
        raw.send(wire.command(2, _DEPOSIT, acked_request_id=0))
        before = raw.replies(2)[1]
        request_id = 3
        between: dict[str, tuple[int, int]] = {}  # cause -> the good commands' indexes around it
        for cause, refused in causes.items():
            frame = refused(request_id, request_id - 1)
            raw.send(frame)
            (reply,) = raw.replies(1)
            assert wire.rejection(reply) == code, cause
            assert reply.fields["request_id"] == wire.COMMAND.unpack_from(frame, wire.HEADER.size)[0], cause
            raw.send(wire.command(request_id + 1, wire.app("Balance", account="a"), request_id))
            (after,) = raw.replies(1)
            assert after.fields["status"] == wire.OK
            assert after.app()["balance"] == 1, f"{cause}: the refused command was applied"
            if code in GATEWAY_CODES:
                assert reply.fields["index"] == 0, cause  # refused before the log
                between[cause] = (before.fields["index"], after.fields["index"])
            else:
                assert before.fields["index"] < reply.fields["index"] < after.fields["index"], cause
            before = after
            request_id += 2
    # Refused before the log: no record of this session between the two good commands around
    # it. Other records may be (the node's own, sequenced whenever it chooses: the session rules'
    # ADMIN record a fresh node asks for lands within its first ~100 ms, anywhere in this test).
    records = {record.index: record for record in read_records(node.config.journal_dir, 1, before.fields["index"])}
    session_id = records[before.fields["index"]].session_id
    for cause, (first, last) in between.items():
        ours = [(index, records[index].type) for index in range(first + 1, last) if records[index].session_id == session_id]
        assert not ours, f"{cause}: refused at the gateway, yet in the log (index, type): {ours}"
        # Nor any other client's: the only other records are the node's own ADMIN records.
        others = [(index, records[index].type) for index in range(first + 1, last)
                  if records[index].session_id != session_id and records[index].type != RecordType.ADMIN]  # fmt: skip
        assert not others, f"{cause}: records neither this session's nor the node's ADMIN: {others}"


# -- the ledger's REJECTED codes ---------------------------------------------------------------


def test_every_documented_ledger_rejection_code_is_given_for_its_documented_cause(node_factory) -> None:  # noqa: F811
    """Each code of the ledger's table, from commands built as msgpack maps per docs/client.md."""
    node = node_factory()
    produced: dict[str, str] = {}
    with wire.Raw(node.socket_path) as raw:
        raw.open(client_id=9)
        request_id = _open_accounts(raw, ["a", "b"])
        raw.send(wire.command(request_id, wire.app("OpenAccount", account="empty")))
        raw.replies(1)
        request_id += 1
        causes = {
            "account_exists": ("OpenAccount", {"account": "a"}),
            "bad_account_name": ("OpenAccount", {"account": "@reserved"}),
            "unknown_account": ("Balance", {"account": "nobody"}),
            "same_account": ("Transfer", {"source": "a", "target": "a", "amount": 1}),
            "system_account": ("Deposit", {"account": "@mint", "amount": 1}),
            "bad_amount": ("Deposit", {"account": "a", "amount": 0}),
            "insufficient_funds": ("Transfer", {"source": "empty", "target": "a", "amount": 1}),
            "bad_reservation_id": ("Reserve", {"reservation_id": 0, "source": "a", "target": "b",
                                               "amount": 1, "timeout_ms": 1000}),
            "bad_timeout": ("Reserve", {"reservation_id": 1, "source": "a", "target": "b",
                                        "amount": 1, "timeout_ms": 0}),
            "unknown_reservation": ("VoidReservation", {"reservation_id": 999}),
        }  # fmt: skip
        good_reserve = {"reservation_id": 5, "source": "a", "target": "b", "amount": 1, "timeout_ms": 600_000}
        sent: list[tuple[str | None, bytes]] = [(code, wire.app(t, **f)) for code, (t, f) in causes.items()]
        sent += [(None, wire.app("Reserve", **good_reserve)), ("reservation_exists", wire.app("Reserve", **good_reserve))]
        for expected, payload in sent:
            raw.send(wire.command(request_id, payload, acked_request_id=request_id - 1))
            (reply,) = raw.replies(1)
            if expected is None:
                assert reply.fields["status"] == wire.OK, reply.app()
            else:
                produced[expected] = wire.rejection(reply)
            request_id += 1
        request_id = _balance_overflow(raw, request_id, produced)
    _reservation_expired(node, produced)
    assert all(code == produced[code] for code in produced), produced
    assert set(produced) == set(wire.doc_codes(wire.LEDGER_REJECTION_CODES_HEADING))


def _balance_overflow(raw: wire.Raw, request_id: int, produced: dict[str, str]) -> int:
    """Deposit the largest amount until a balance would pass 2**62 (about 4,612 deposits)."""
    raw.send(wire.command(request_id, wire.app("OpenAccount", account="big"), request_id - 1))
    raw.replies(1)
    request_id += 1
    batch = 1000  # within the window
    while "balance_overflow" not in produced:
        for offset in range(batch):
            raw.send(wire.command(request_id + offset, wire.app("Deposit", account="big", amount=10**15),
                                  acked_request_id=request_id - 1))  # fmt: skip
        for reply in raw.replies(batch):
            if reply.fields["status"] == wire.REJECTED:
                produced.setdefault("balance_overflow", wire.rejection(reply))
        request_id += batch
        assert request_id < 10_000, "no balance_overflow after 10,000 maximal deposits"
    return request_id


def _reservation_expired(node: NodeProcess, produced: dict[str, str]) -> None:
    """A commit stamped after the deadline, before the timer could fire: with the blp stopped,
    the reservation's timer cannot be scheduled, so the commit is sequenced first."""
    blp = node.role_pid("blp")
    with wire.Raw(node.socket_path, timeout_s=30) as raw:
        raw.open(client_id=10)
        os.kill(blp, signal.SIGSTOP)
        try:
            published = node.read_counters()["log.published.index"]
            reserve = {"reservation_id": 77, "source": "a", "target": "b", "amount": 1, "timeout_ms": 1}
            raw.send(wire.command(1, wire.app("Reserve", **reserve)))
            deadline = time.monotonic() + 10
            while node.read_counters()["log.published.index"] <= published:
                assert time.monotonic() < deadline, "the Reserve was not sequenced"
                time.sleep(0.005)
            stamped_before_ns = time.time_ns()
            while time.time_ns() < stamped_before_ns + 2_000_000:  # past the 1 ms deadline
                time.sleep(0.001)
            raw.send(wire.command(2, wire.app("CommitReservation", reservation_id=77)))
            published += 1
            while node.read_counters()["log.published.index"] <= published:
                assert time.monotonic() < deadline, "the commit was not sequenced"
                time.sleep(0.005)
        finally:
            os.kill(blp, signal.SIGCONT)
        reserved, committed = raw.replies(2)
        assert reserved.fields["status"] == wire.OK
        produced["reservation_expired"] = wire.rejection(committed)


# -- logs --------------------------------------------------------------------------------------


def test_sequencer_and_supervisor_log_the_serving_index(node_factory) -> None:  # noqa: F811
    node = node_factory()
    deadline = time.monotonic() + 10
    pattern = re.compile(r"(node \S+ )?serving \S+ from index (\d+)")
    while len(lines := pattern.findall(node.log_text())) < 2:
        assert time.monotonic() < deadline, node.log_text()[-2000:]
        time.sleep(0.01)
    (serving,) = [int(index) for source, index in lines if not source]  # the sequencer's
    (reported,) = [int(index) for source, index in lines if source]  # the supervisor's
    # Exact: the supervisor reports the index the sequencer published before it ran
    # (`sequencer.serving.index`), not the log's last index when it reports, which the node's own
    # ADMIN records (a session rules version) can have moved past it.
    assert reported == serving, lines
    assert node.read_counters()["sequencer.serving.index"] == serving
    # And it is this start's node_start: the first record of a fresh node's log.
    while not (found := [(record.type, bytes(record.payload)) for record in read_records(node.config.journal_dir)
                         if record.index == serving]):  # fmt: skip
        assert time.monotonic() < deadline, f"index {serving} not in the journal"
        time.sleep(0.01)
    ((kind, payload),) = found
    assert (serving, kind) == (1, RecordType.ADMIN), found
    admin = decode_admin(payload)
    assert (admin["op"], admin["node"]) == (ADMIN_NODE_START, node.config.node.name), admin
    # A restart serves from its own node_start, past the first start's records (a session rules
    # version among them): the same three figures, exact again.
    node.stop()
    node.start()
    deadline = time.monotonic() + 10
    while len(lines := pattern.findall(node.log_text())) < 4:
        assert time.monotonic() < deadline, node.log_text()[-2000:]
        time.sleep(0.01)
    restarted = [int(index) for source, index in lines[2:] if not source]
    reported_again = [int(index) for source, index in lines[2:] if source]
    assert len(restarted) == len(reported_again) == 1 and restarted == reported_again, lines
    (serving_again,) = restarted
    assert serving_again > serving and node.read_counters()["sequencer.serving.index"] == serving_again, lines
    while not (found := [(record.type, bytes(record.payload)) for record in read_records(node.config.journal_dir)
                         if record.index == serving_again]):  # fmt: skip
        assert time.monotonic() < deadline, f"index {serving_again} not in the journal"
        time.sleep(0.01)
    ((kind, payload),) = found
    again = decode_admin(payload)
    assert kind == RecordType.ADMIN and (again["op"], again["node"]) == (ADMIN_NODE_START, node.config.node.name), again
    assert again != admin, (admin, again)  # this start's record, not the first one's
