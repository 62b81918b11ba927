"""A query replica's side of the protocol, checked with the documented bytes alone
(tests/raw_wire.py; docs/client.md, "Catch-up subscriptions and queries")."""

from __future__ import annotations

import socket
import struct
import time
from typing import Any

import msgspec

from daemon.harness import NodeProcess
from tests import raw_wire as wire
from tests.node_fixtures import node_factory, open_accounts  # noqa: F401

WAIT_S = 60.0
RECORD_INDEX = struct.Struct("<8xQ")  # a record's index, at offset 8 of its 48-byte header


def _wait(condition: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _replica(node: NodeProcess) -> str:
    """Replica 0's socket, once it accepts connections (it binds after its recovery)."""
    socket_path = node.config.replica_socket_path(0)

    def accepting() -> bool:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(socket_path)
        except OSError:
            return False
        finally:
            probe.close()
        return True

    _wait(accepting, "the replica's socket")
    return socket_path


def test_subscribe_and_query_follow_the_documented_frames(node_factory: Any) -> None:  # noqa: F811
    node = node_factory({"replicas": {"count": 1}})
    open_accounts(node.socket_path, ["a", "b"])
    commit = node.read_counters()["commit.index"]
    _wait(lambda: node.read_counters()["replica0.applied.index"] >= commit, "the replica")
    with wire.Raw(node.socket_path) as raw:
        welcome = raw.open(client_id=5)
        assert welcome["replicas"] == [node.config.replica_socket_path(0)]
    with wire.Raw(_replica(node)) as raw:
        welcome = raw.open(client_id=5)
        assert welcome["applied_index"] >= commit
        raw.send(wire.control(wire.QUERY, query_id=9, name="balance", args={"account": "b"},
                              consistency="after", after_index=commit))  # fmt: skip
        answer = raw.next()
        assert answer is not None and answer.kind == wire.ANSWER
        assert (answer.fields["query_id"], answer.fields["code"]) == (9, "")
        assert answer.fields["index"] >= commit
        assert answer.fields["result"]["balance"] > 0  # a msgpack map in the ANSWER's map
        raw.send(wire.control(wire.SUBSCRIBE, from_index=1, records=True))
        items = [raw.next() for _ in range(commit)]  # at least one record per index
    assert all(item is not None and item.kind == wire.ITEM_KIND for item in items)
    indexes = [item.fields["index"] for item in items if item is not None]
    assert indexes == sorted(indexes) and indexes[0] == 1
    for item in items:
        assert item is not None
        if item.fields["kind"] == wire.ITEM_RECORD:
            assert RECORD_INDEX.unpack_from(item.payload)[0] == item.fields["index"]
            assert item.fields["record_type"] == struct.unpack_from("<H", item.payload, 4)[0]
        else:
            assert item.fields["kind"] == wire.ITEM_EVENT and item.fields["record_type"] == 0
            assert msgspec.msgpack.decode(item.payload)["type"] == "TransferMade"


def test_a_command_sent_to_a_replica_is_refused_naming_the_nodes_socket(node_factory: Any) -> None:  # noqa: F811
    node = node_factory({"replicas": {"count": 1}})
    with wire.Raw(_replica(node)) as raw:
        raw.open(client_id=5)
        raw.send(wire.command(1, wire.app("OpenAccount", account="x")))
        (error,) = raw.until_eof()
    assert (error.kind, error.fields["code"]) == (wire.ERROR, "unexpected_kind")
    assert "node's socket" in error.fields["message"]


def test_a_stopping_replica_tells_its_subscribers_replica_stopping(node_factory: Any) -> None:  # noqa: F811
    node = node_factory({"replicas": {"count": 1}})
    with wire.Raw(_replica(node)) as raw:
        raw.open(client_id=5)
        raw.send(wire.control(wire.SUBSCRIBE, from_index=1))
        _wait(lambda: node.read_counters()["replica0.subscribers"] == 1, "the subscription")
        assert node.stop() == 0
        frames = raw.until_eof()
    assert frames and frames[-1].kind == wire.ERROR
    assert frames[-1].fields["code"] == "replica_stopping" and frames[-1].fields["fatal"] is True


def test_a_subscriber_that_stalls_while_fed_from_the_journal_gets_subscriber_too_slow(node_factory: Any) -> None:  # noqa: F811
    node = node_factory({"replicas": {"count": 1, "recent_bytes_max": 4096, "catchup_stall_s": 0.5}})
    open_accounts(node.socket_path, [f"r{number}" for number in range(3000)])  # ~600 KB of items
    with wire.Raw(_replica(node)) as raw:
        raw.open(client_id=5)
        raw.sock.setsockopt(wire.socket.SOL_SOCKET, wire.socket.SO_RCVBUF, 4096)
        raw.send(wire.control(wire.SUBSCRIBE, from_index=1, records=True))
        # It reads nothing until the replica has given up on it (a count, not a time).
        _wait(lambda: node.read_counters()["replica0.errors"] >= 1, "the replica to drop the subscriber")
        frames = raw.until_eof()
    assert frames[-1].kind == wire.ERROR and frames[-1].fields["code"] == "subscriber_too_slow"
    assert node.read_counters()["replica0.restarts"] == 0
    assert "resume" in frames[-1].fields["message"]
    items = frames[:-1]
    assert [item.fields["index"] for item in items] == sorted(item.fields["index"] for item in items)


def test_a_subscribe_below_retention_gets_index_below_retention(node_factory: Any) -> None:  # noqa: F811
    node = node_factory({
        "replicas": {"count": 1},
        "journal": {"segment_bytes": 1 << 20, "batch_bytes_max": 256 << 10, "preallocate": False},
        "snapshot": {"keep": 1, "delete_journal": True, "every_records": 10000},
    })
    open_accounts(node.socket_path, [f"r{number}" for number in range(15000)])
    journal_dir = node.config.journal_dir
    _wait(lambda: int(sorted(journal_dir.glob("*.seg"))[0].name.split(".")[0]) > 1, "retention")
    with wire.Raw(_replica(node)) as raw:
        raw.open(client_id=5)
        raw.send(wire.control(wire.SUBSCRIBE, from_index=1))
        (error,) = raw.until_eof()
    assert (error.kind, error.fields["code"], error.fields["fatal"]) == (wire.ERROR, "index_below_retention", True)
    assert "snapshot" in error.fields["message"]
