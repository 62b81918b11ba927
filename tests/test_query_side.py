"""Catch-up subscriptions and query replicas on real nodes (docs/query-side.md).

The oracle for a subscription is the node's own journal: its record indexes, and the events a
fresh replay of it publishes (`expected_items`), compared item for item, so a gap or a duplicate
anywhere (at the hand-over from the journal to live, across a replica killed with SIGKILL, across
a restart of the node) fails the comparison.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from daemon.harness import NodeProcess
from sequencer.apps.ledger import Deposit, Ledger, Transfer
from sequencer.client import Client
from sequencer.client.replica import ItemKind, QueryError, SubscriptionError, SubscriptionItem
from sequencer.egress import EVENT_HEADER, EgressKind
from sequencer.journal import read_records
from sequencer.processor import Processor
from sequencer.record import decode_header
from tests.node_fixtures import DEPOSIT, node_factory, open_accounts  # noqa: F401

WAIT_S = 60.0
POLL_S = 0.02
# A tiny in-memory window, so subscribers from the past are fed by followers of their own (the
# journal path) and live ones from `recent`: both paths and the hand-over between them run.
REPLICAS = {"replicas": {"count": 1, "recent_bytes_max": 4096, "poll_ms": 1.0}}

Key = tuple[int, int, int, bytes]  # index, kind, record type, payload
_ITEM_KIND = {EgressKind.EVENT: ItemKind.EVENT, EgressKind.EVENT_OMITTED: ItemKind.EVENT_OMITTED}


def expected_items(node: NodeProcess, from_index: int, to_index: int, records: bool) -> list[Key]:
    """What a subscription from `from_index` must deliver up to `to_index`: the journal's records
    applied one by one from genesis by a plain `Processor` (not `sequencer.follow`, which serves
    the subscriptions), with the events each one's application published."""
    processor = Processor(Ledger)
    items: list[Key] = []
    for record in read_records(node.config.journal_dir, 1, to_index):
        processor.apply_frame(record.type | record.version << 16, record.raw[8 : record.length])
        processor.snapshot_requested = False
        outputs = processor.drain_outputs()
        if record.index < from_index:
            continue
        if records:
            items.append((record.index, ItemKind.RECORD, record.type, bytes(record.raw[: record.length])))
        for kind, frame in outputs:
            if kind in _ITEM_KIND:
                assert EVENT_HEADER.unpack_from(frame)[0] == record.index
                items.append((record.index, _ITEM_KIND[kind], 0, bytes(frame[EVENT_HEADER.size :])))
    return items


def key(item: SubscriptionItem) -> Key:
    return (item.index, item.kind, item.record_type, item.payload)


def wait_for(condition: Any, what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(POLL_S)


def commit_index(node: NodeProcess) -> int:
    return node.read_counters()["commit.index"]


def take_until(subscription: Any, to_index: int, taken: list[SubscriptionItem]) -> None:
    """Take items until one at or past `to_index` has been taken and nothing more comes soon."""
    while not taken or taken[-1].index < to_index:
        taken.append(subscription.next(WAIT_S))
    taken.extend(subscription.items(0.3))


def transfers(client: Client, count: int, accounts: tuple[str, str] = ("a", "b")) -> int:
    """`count` transfers, pipelined; the index of the last one's reply."""
    pending = [client.submit(Transfer(accounts[0], accounts[1], 1)) for _ in range(count)]
    for request in pending:
        request.result()
    return client.last_index


@pytest.fixture
def ledger_node(node_factory: Any) -> NodeProcess:  # noqa: F811
    node = node_factory(REPLICAS)
    open_accounts(node.socket_path, ["a", "b"])
    return node


def test_subscriptions_from_the_start_the_middle_and_the_live_end_match_the_journal(ledger_node: NodeProcess) -> None:
    node = ledger_node
    with Client(node.socket_path, schema=Ledger.schema) as client:
        transfers(client, 300)
        middle = commit_index(node) // 2
        live_end = commit_index(node) + 1
        subscriptions = {
            "start": client.subscribe(from_index=0, records=True),
            "middle": client.subscribe(from_index=middle),
            "live": client.subscribe(from_index=live_end, records=True),
        }
        starts = {"start": 1, "middle": middle, "live": live_end}
        taken: dict[str, list[SubscriptionItem]] = {name: [] for name in subscriptions}
        # Each one first takes what exists, so the next records arrive live behind it.
        for name, subscription in subscriptions.items():
            if name != "live":
                take_until(subscription, live_end - 1, taken[name])
        last = transfers(client, 200)
        for name, subscription in subscriptions.items():
            take_until(subscription, last, taken[name])
            subscription.close()
    for name, items in taken.items():
        records = name != "middle"
        assert [key(item) for item in items] == expected_items(node, starts[name], last, records), name
    record = next(item for item in taken["start"] if item.kind is ItemKind.RECORD)
    assert decode_header(record.payload).index == record.index
    events = [item for item in taken["middle"] if item.kind is ItemKind.EVENT]
    assert events and all(item.event is not None and item.timestamp_ns > 0 for item in events)


def _resume_across(node: NodeProcess, disrupt: Any) -> None:
    """A subscriber takes items slowly while transfers go on; `disrupt` strikes mid-stream; at the
    end the items equal the journal's, none missing, none twice."""
    with Client(node.socket_path, schema=Ledger.schema, reconnect_timeout_s=WAIT_S) as client:
        transfers(client, 100)
        subscription = client.subscribe(from_index=1, records=True, reconnect_timeout_s=WAIT_S)
        taken: list[SubscriptionItem] = []
        for _ in range(50):
            taken.append(subscription.next(WAIT_S))
        disrupt()
        last = transfers(client, 100)
        take_until(subscription, last, taken)
        assert subscription.reconnects >= 2, "the disruption did not reach the subscription"
        subscription.close()
    assert [key(item) for item in taken] == expected_items(node, 1, last, True)


def test_a_subscription_resumes_without_gap_or_duplicate_after_the_replica_is_killed(ledger_node: NodeProcess) -> None:
    node = ledger_node
    first_pid = node.read_counters()["replica0.pid"]

    def kill_replica() -> None:
        os.kill(first_pid, signal.SIGKILL)
        wait_for(lambda: node.read_counters()["replica0.pid"] not in (0, first_pid), "the replica's restart")

    _resume_across(node, kill_replica)
    values = node.read_counters()
    assert values["replica0.restarts"] == 1
    assert values["supervisor.restarts"] == 0, "a replica's death must not restart the pipeline"


def test_a_subscription_resumes_without_gap_or_duplicate_across_a_node_restart(ledger_node: NodeProcess) -> None:
    node = ledger_node

    def restart_node() -> None:
        assert node.stop() == 0
        node.start()

    _resume_across(node, restart_node)


def test_a_stopped_subscriber_does_not_hold_the_node_back_and_catches_up_later(ledger_node: NodeProcess) -> None:
    node = ledger_node
    with Client(node.socket_path, schema=Ledger.schema) as client:
        stopped = client.subscribe(from_index=1, records=True)
        first = stopped.next(WAIT_S)  # connected and fed; from now on it reads nothing
        replica = psutil.Process(node.read_counters()["replica0.pid"])
        memory_before = replica.memory_info().rss
        committed_before = commit_index(node)
        commands = 10_000
        last = transfers(client, commands)
        # Every command was applied and acknowledged while the subscriber read nothing, and the
        # replica kept up with the node (it does not wait for its subscribers either).
        assert commit_index(node) >= committed_before + commands
        wait_for(lambda: node.read_counters()["replica0.applied.index"] >= last, "the replica to keep up")
        # The replica wrote only what the socket took (kernel buffers and 256 KiB of its own),
        # not the ~20,000 items (~3 MB) the subscriber has not read: it holds nothing for it.
        assert node.read_counters()["replica0.items_sent"] < commands
        assert replica.memory_info().rss - memory_before < 16 << 20
        taken = [first]
        take_until(stopped, last, taken)
        stopped.close()
    assert [key(item) for item in taken] == expected_items(node, 1, last, True)


def test_a_query_after_the_clients_last_reply_sees_its_own_write(ledger_node: NodeProcess) -> None:
    node = ledger_node
    with Client(node.socket_path, schema=Ledger.schema) as client:
        balance = DEPOSIT
        for amount in range(1, 41):
            client.call(Deposit("a", amount))
            balance += amount
            result = client.query("balance", {"account": "a"})  # consistency "after" by default
            assert result.index >= client.last_index
            assert result.value["balance"] == balance, (amount, result)
        # A query after an index not yet committed waits for it, and says so when it does not come.
        with pytest.raises(QueryError) as not_yet:
            client.query("balance", {"account": "a"}, after_index=client.last_index + 1000, timeout_s=0.5)
        assert not_yet.value.code == "not_applied_in_time"
        local = client.query("accounts", consistency="local")
        assert local.value == ["a", "b"]
        with pytest.raises(QueryError) as unknown:
            client.query("balance", {"account": "nobody"})
        assert unknown.value.code == "unknown_account"
        with pytest.raises(QueryError) as no_such:
            client.query("no_such_query")
        assert no_such.value.code == "unknown_query" and "balance" in no_such.value.message
        with pytest.raises(QueryError) as bad_args:
            client.query("balance", {"acount": "a"})
        assert bad_args.value.code == "bad_query_args"
        # A single node's read index is its commit index when the query arrives.
        linearizable = client.query("balance", {"account": "a"}, consistency="linearizable")
        assert linearizable.index >= client.last_index
        assert linearizable.value["balance"] == balance
    assert node.read_counters()["replica0.queries"] >= 44


# How often retention may move on after the writes stopped (a snapshot still being taken).
RETENTION_MOVES_MAX = 3


def test_a_subscription_below_what_retention_kept_gets_a_clear_error(node_factory: Any) -> None:  # noqa: F811
    node = node_factory({
        **REPLICAS,
        "journal": {"segment_bytes": 1 << 20, "batch_bytes_max": 256 << 10, "preallocate": False},
        "snapshot": {"keep": 1, "delete_journal": True, "every_records": 10000},
    })
    open_accounts(node.socket_path, [f"r{number}" for number in range(15000)])
    journal_dir: Path = node.config.journal_dir

    def first_index() -> int:
        return int(sorted(journal_dir.glob("*.seg"))[0].name.split(".")[0])

    wait_for(lambda: first_index() > 1, "retention to delete the first segment")
    with Client(node.socket_path, schema=Ledger.schema) as client:
        subscription = client.subscribe(from_index=1)
        with pytest.raises(SubscriptionError) as refused:
            subscription.next(WAIT_S)
        assert refused.value.code == "index_below_retention"
        assert "snapshot" in refused.value.message and "oldest index that can be served" in refused.value.message
        subscription.close()
        # From the oldest servable index on, it is served. A snapshot the node finishes after the
        # last write can still move retention on once (the oldest moves up, with the same clear
        # error): follow it, a bounded number of times, as a client would.
        error = refused.value
        for _ in range(RETENTION_MOVES_MAX):
            oldest = int(error.message.split("served is ")[1].split(" ")[0])
            try:
                with client.subscribe(from_index=oldest, records=True) as served:
                    assert served.next(WAIT_S).index == oldest
                break
            except SubscriptionError as moved:
                assert moved.code == "index_below_retention", moved
                error = moved
        else:
            raise AssertionError(f"retention kept moving past the oldest index it named: {error}")


def test_the_node_socket_refuses_subscribe_with_a_pointer_to_the_replicas(node_factory: Any) -> None:  # noqa: F811
    node = node_factory()
    with Client(node.socket_path, schema=Ledger.schema) as client:
        assert client.replicas == []
        with pytest.raises(ValueError, match="replicas"):
            client.subscribe()


def test_status_shows_each_replicas_applied_index_and_lag(node_factory: Any) -> None:  # noqa: F811
    from daemon.status import StatusTracker, render_json, render_text

    node = node_factory({"replicas": {"count": 2}})
    open_accounts(node.socket_path, ["a", "b"])
    commit = commit_index(node)
    wait_for(lambda: all(node.read_counters()[f"replica{n}.applied.index"] >= commit for n in (0, 1)),
             "both replicas to apply what is committed")  # fmt: skip
    status = StatusTracker(node.config.node.name).observe(node.read_counters(), now_s=time.time())
    replicas = render_json(status)["replicas"]
    assert sorted(replicas) == ["replica0", "replica1"]
    for entry in replicas.values():
        assert entry["running"] is True
        assert entry["applied_index"] >= commit and entry["lag_records"] == 0
    assert "replica1" in render_text(status)


def test_seqd_replica_serves_a_stopped_nodes_data_directory(node_factory: Any, tmp_dir: Path) -> None:  # noqa: F811
    import subprocess
    import sys

    from sequencer.client import ReplicaQueries, Subscription

    node = node_factory()
    open_accounts(node.socket_path, ["a", "b"])
    assert node.stop() == 0
    config_path = next(Path(node.directory).glob("*.toml"))
    socket_path = str(tmp_dir / "by-hand.sock")
    process = subprocess.Popen([sys.executable, "-m", "daemon.cli", "replica", "--config", str(config_path),
                                "--socket", socket_path])  # fmt: skip
    try:
        queries = ReplicaQueries(socket_path, timeout_s=WAIT_S)
        assert queries.query("balance", {"account": "b"}).value["balance"] == DEPOSIT
        queries.close()
        with Subscription(socket_path, from_index=1) as subscription:
            events = subscription.items(1.0)
        assert len(events) == 2 and {event.index for event in events} <= set(range(1, 100))
    finally:
        process.kill()
        process.wait(timeout=WAIT_S)


def test_the_asyncio_client_subscribes_resumes_and_queries_like_the_blocking_one(ledger_node: NodeProcess) -> None:
    import uvloop

    from sequencer.client import AsyncClient

    node = ledger_node

    async def main() -> tuple[list[SubscriptionItem], int]:
        async with AsyncClient(node.socket_path, schema=Ledger.schema, reconnect_timeout_s=WAIT_S) as client:
            for _ in range(50):
                await client.submit(Transfer("a", "b", 1))
            await client.call(Deposit("b", 7))
            balance = await client.query("balance", {"account": "b"})
            assert balance.index >= client.last_index
            assert balance.value["balance"] == DEPOSIT + 50 + 7
            subscription = await client.subscribe(from_index=1, records=True, reconnect_timeout_s=WAIT_S)
            taken = [await subscription.next(WAIT_S) for _ in range(40)]
            pid = node.read_counters()["replica0.pid"]
            os.kill(pid, signal.SIGKILL)
            for _ in range(50):
                await client.submit(Transfer("a", "b", 1))
            await client.call(Transfer("a", "b", 1))
            last = client.last_index
            async for item in subscription:
                taken.append(item)
                if item.index >= last:
                    break
            taken.extend(await subscription.items(0.3))
            assert subscription.reconnects >= 2
            subscription.close()
            return taken, last

    taken, last = uvloop.run(main())
    assert [key(item) for item in taken] == expected_items(node, 1, last, True)


def test_seqd_replica_beside_a_running_node_follows_it_across_a_restart(node_factory: Any, tmp_dir: Path) -> None:  # noqa: F811
    import subprocess
    import sys

    from sequencer.client import ReplicaQueries

    node = node_factory()
    open_accounts(node.socket_path, ["a", "b"])
    config_path = next(Path(node.directory).glob("*.toml"))
    socket_path = str(tmp_dir / "beside.sock")
    process = subprocess.Popen([sys.executable, "-m", "daemon.cli", "replica", "--config", str(config_path),
                                "--socket", socket_path])  # fmt: skip
    try:
        queries = ReplicaQueries(socket_path, timeout_s=WAIT_S)
        assert node.stop() == 0
        node.start()  # new counters (a new incarnation): the replica must find them
        with Client(node.socket_path, schema=Ledger.schema) as client:
            client.call(Deposit("b", 5))
            last = client.last_index
        result = queries.query("balance", {"account": "b"}, consistency="after", after_index=last)
        assert result.value["balance"] == DEPOSIT + 5 and result.index >= last
        queries.close()
    finally:
        process.kill()
        process.wait(timeout=WAIT_S)
