"""Events reach the sessions that subscribed, and only they cost anything (docs/contracts.md,
"Events reach the sessions that subscribed"): the sequencer counts the sessions attached to its
node that subscribed (`gateway.event_subscribers`), raising the count before it sequences or
forwards anything of such a session, and the blp writes EVENT frames to egress only while the
count it reads after the records it applies is above 0. Real nodes, real shared memory, real
sockets; the egress ring is read as the blp wrote it."""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

from daemon.cluster_harness import Cluster
from daemon.harness import NodeProcess
from daemon.layout import (
    GATEWAY_EVENT_SUBSCRIBERS,
    DiskState,
    egress_name,
)
from ipc.ring import Ring
from ipc.ring_layout import FRAME_HEADER, PADDING_TYPE, data_offset, frame_bytes
from sequencer import recovery
from sequencer.apps.ledger import Ledger, Transfer, TransferMade
from sequencer.egress import EgressKind
from tests.node_fixtures import DEPOSIT, balances, node_factory, open_accounts  # noqa: F401

if TYPE_CHECKING:
    from sequencer.client import Client

ROOT = Path(__file__).resolve().parent.parent
# Bounds every wait on a real node; a healthy run meets each condition within a second or two.
WAIT_S = 60.0
POLL_S = 0.02
CLIENT_TIMEOUT_S = 30.0
TRANSFERS = 20  # per client: enough to fill several blp batches, few enough to stay quick


def _wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {WAIT_S} s: {what}")
        time.sleep(POLL_S)


def _subscribers(node: NodeProcess) -> int:
    return node.read_counters()[GATEWAY_EVENT_SUBSCRIBERS.name]


def egress_kinds(node: NodeProcess) -> collections.Counter[int]:
    """The kinds of every frame the blp wrote to the node's egress ring since it started, read
    from the ring's bytes (no reader slot is taken). The ring must not have wrapped yet."""
    ring = Ring.attach(egress_name(node.node))
    try:
        published = ring.published_position
        assert published <= ring.capacity, "the egress ring wrapped: use fewer commands"
        start = data_offset(len(ring.readers))
        kinds: collections.Counter[int] = collections.Counter()
        with ring.segment.buffer[start : start + ring.capacity] as data:
            position = 0
            while position < published:
                length, kind = FRAME_HEADER.unpack_from(data, position)
                if kind != PADDING_TYPE:
                    kinds[kind & 0xFFFF] += 1
                position += frame_bytes(length - FRAME_HEADER.size)
        assert position == published, (position, published)
        return kinds
    finally:
        ring.close()


def _stopped_hash(node: NodeProcess) -> tuple[int, int]:
    """Stop the node; (index, rolling hash) its blp logged when it stopped, read together."""
    assert node.stop() == 0
    found = re.findall(r"seqd\[blp:.*stopped at index (\d+), rolling hash ([0-9a-f]{16})", node.log_text())
    assert found, node.log_text()[-3000:]
    index, rolling_hash = found[-1]
    return int(index), int(rolling_hash, 16)


def _replayed_hash(node: NodeProcess, index: int) -> int:
    """The rolling hash of a replay of the node's journal to `index` by a processor that emits
    every event (as replicas, tools and recovery do)."""
    replayed = recovery.recover(Ledger, node.config.journal_dir, None, index).processor
    assert replayed.emit_events
    return replayed.rolling_hash


def _own_event_before_its_reply_then_the_others(subscriber: Client, other: Client) -> None:
    """The subscriber's own transfer's event is in when its reply is; then it gets the event of
    each of `other`'s TRANSFERS transfers, in order."""
    subscriber.call(Transfer("a", "b", 7))
    assert subscriber.next_event(timeout_s=0) == TransferMade("a", "b", 7)
    for request in [other.submit(Transfer("b", "a", amount)) for amount in range(1, TRANSFERS + 1)]:
        request.result()
    received = [subscriber.next_event(timeout_s=CLIENT_TIMEOUT_S) for _ in range(TRANSFERS)]
    assert received == [TransferMade("b", "a", amount) for amount in range(1, TRANSFERS + 1)]


def test_without_a_subscriber_egress_carries_no_event_and_the_hash_is_a_full_replays(node_factory) -> None:  # noqa: F811
    from sequencer.client import Client

    node = node_factory()
    open_accounts(node.socket_path, ["a", "b"])  # each deposit publishes a TransferMade
    with Client(node.socket_path, schema=Ledger.schema, timeout_s=CLIENT_TIMEOUT_S) as client:
        pending = [client.submit(Transfer("a", "b", 1)) for _ in range(TRANSFERS)]
        replies = [request.result() for request in pending]
    assert len(replies) == TRANSFERS
    assert _subscribers(node) == 0
    kinds = egress_kinds(node)
    assert kinds[EgressKind.REPLY] >= 4 + TRANSFERS, kinds
    assert kinds[EgressKind.EVENT] == 0, kinds
    assert balances(node.socket_path, ["a", "b"]) == {"a": DEPOSIT - TRANSFERS, "b": DEPOSIT + TRANSFERS}
    # The blp hashed the events it did not write (the hash covers the replies too): a replay
    # that emits every event agrees.
    index, rolling_hash = _stopped_hash(node)
    assert _replayed_hash(node, index) == rolling_hash


def test_a_subscriber_gets_its_own_events_before_their_replies_and_later_ones_of_others(node_factory) -> None:  # noqa: F811
    from sequencer.client import Client

    node = node_factory()
    open_accounts(node.socket_path, ["a", "b"])
    with (
        Client(node.socket_path, schema=Ledger.schema, subscribe_events=True, timeout_s=CLIENT_TIMEOUT_S) as subscriber,
        Client(node.socket_path, schema=Ledger.schema, timeout_s=CLIENT_TIMEOUT_S) as other,
    ):
        assert _subscribers(node) == 1
        # Its first command right after its HELLO: the event is in before the reply.
        _own_event_before_its_reply_then_the_others(subscriber, other)
    _wait_until(lambda: _subscribers(node) == 0, "the count falls back to 0 after the subscriber closed")
    kinds = egress_kinds(node)
    assert kinds[EgressKind.EVENT] == 1 + TRANSFERS, kinds
    index, rolling_hash = _stopped_hash(node)
    assert _replayed_hash(node, index) == rolling_hash


_KILLED_SUBSCRIBER = """
import sys, time
from sequencer.apps.ledger import Ledger
from sequencer.client import Client
client = Client(sys.argv[1], schema=Ledger.schema, subscribe_events=True, timeout_s=30)  # welcomed
print("subscribed", flush=True)
time.sleep(120)
"""


def test_the_count_falls_when_a_subscriber_is_killed(node_factory) -> None:  # noqa: F811
    node = node_factory()
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-c", _KILLED_SUBSCRIBER, node.socket_path],
        stdout=subprocess.PIPE, text=True, env=environment,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "subscribed"
        _wait_until(lambda: _subscribers(node) == 1, "the subscriber is counted")
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=WAIT_S)
        _wait_until(lambda: _subscribers(node) == 0, "the count falls after the subscriber was killed")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=WAIT_S)
        if process.stdout is not None:
            process.stdout.close()


def test_a_subscriber_on_a_follower_gets_its_own_and_the_leaders_events_and_only_it_pays(tmp_dir: Path, unique: str) -> None:
    from sequencer.client import Client

    with Cluster(tmp_dir, unique, proxied=False) as cluster:
        cluster.start()
        leader = cluster.wait_leader(agreeing=cluster.size).number
        follower, quiet = (n for n in cluster.nodes if n != leader)
        open_accounts(cluster[follower].socket_path, ["a", "b"])
        with (
            Client(cluster[follower].socket_path, schema=Ledger.schema, subscribe_events=True,
                   timeout_s=CLIENT_TIMEOUT_S) as subscriber,
            Client(cluster[leader].socket_path, schema=Ledger.schema, timeout_s=CLIENT_TIMEOUT_S) as other,
        ):  # fmt: skip
            assert _subscribers(cluster[follower]) == 1
            # Forwarded to the leader and back through the replicator: still before its reply.
            _own_event_before_its_reply_then_the_others(subscriber, other)
        _wait_until(lambda: _subscribers(cluster[follower]) == 0, "the follower's count falls after the close")
        cluster.wait_converged()  # the same rolling hash on every node, whatever each emitted
        assert egress_kinds(cluster[follower])[EgressKind.EVENT] == 1 + TRANSFERS
        leader_kinds = egress_kinds(cluster[leader])
        assert leader_kinds[EgressKind.REPLY] >= TRANSFERS, leader_kinds  # `other`'s
        for number in (leader, quiet):
            assert _subscribers(cluster[number]) == 0
            assert egress_kinds(cluster[number])[EgressKind.EVENT] == 0, number


class _Gauge:
    def __init__(self) -> None:
        self.value = 0

    def set(self, value: int) -> None:
        self.value = value

    def add(self, value: int) -> None:
        self.value += value

    def get(self) -> int:
        return self.value


class _Writer:
    """The log ring's writer as `Sequencer._flush` uses it; notes the count at each publish."""

    def __init__(self, subscribers: _Gauge) -> None:
        self.claim_position = 0
        self.subscribers = subscribers
        self.counts_at_publish: list[int] = []

    def publish(self) -> None:
        self.counts_at_publish.append(self.subscribers.get())


class _SubscribingGateway:
    """A gateway whose `process` opens a subscribing session and claims its records (a HELLO and
    a COMMAND in one read), unpublished until the shell's `_flush`."""

    def __init__(self, writer: _Writer) -> None:
        self.writer = writer
        self.sessions: dict[int, object] = {}
        self.subscribers: list[object] = []
        self.snapshot_pending = False
        self.waiting = False
        self.next_index = 1

    def process(self, session: SimpleNamespace, now_ns: int, disk_free_bytes: int | None) -> int:
        session.session_id = 7
        self.sessions[7] = session
        self.subscribers.append(session)
        self.writer.claim_position += 128
        self.next_index += 2
        return 1


def test_the_sequencer_stores_the_count_before_it_publishes_the_subscribers_records() -> None:
    # The half of the ordering a real node cannot show deterministically (the blp is far slower
    # than the store it races): the shell's own order of the count's store and the ring's publish.
    from daemon.roles.sequencer import Sequencer

    subscribers = _Gauge()
    writer = _Writer(subscribers)
    scheduled: list[Callable[[], None]] = []
    shell = SimpleNamespace(
        gateway=_SubscribingGateway(writer), writer=writer, published_claim=0, flush_scheduled=False,
        disk_full=SimpleNamespace(get=lambda: DiskState.ROOM), disk_free_bytes=_Gauge(), commands_total=_Gauge(),
        sessions_open=_Gauge(), sessions_total=_Gauge(), event_subscribers=subscribers, clustered=True,
        loop=SimpleNamespace(call_soon=scheduled.append), egress_reader=SimpleNamespace(ready=lambda: False),
    )  # fmt: skip
    shell._flush = lambda: Sequencer._flush(shell)  # type: ignore[arg-type]
    session = SimpleNamespace(session_id=0, out=bytearray(), closing=False, backlog=None, flush=lambda: None)
    assert Sequencer._process(shell, session) is False  # type: ignore[arg-type]
    assert writer.counts_at_publish == [] and len(scheduled) == 1  # published once per loop pass
    scheduled.pop()()
    assert writer.counts_at_publish == [1]


def test_the_blp_reads_the_count_after_the_records_it_applies() -> None:
    # The other half: a count stored before a record's publish is seen by the blp that read the
    # record, because it reads the count after its poll. The poll here is where the sequencer's
    # store lands, as it may in a real node between two cycles.
    from daemon.roles.blp import BlpAgent

    values = [0, 2]  # the counters' words the blp reads: event subscribers, the commit index
    emitting: list[bool] = []
    region = memoryview(FRAME_HEADER.pack(16, 0) + b"record\0\0")  # one frame: type 0, 8 bytes

    def poll_region(bytes_max: int, *, limit_on_frames: bool, max_frames: int) -> tuple[int, memoryview]:
        values[0] = 1  # the count, stored before the record below was published
        return 0, region

    def apply_frame(kind: int, view: memoryview, start: int, end: int) -> None:
        emitting.append(processor.emit_events)
        processor.applied_index += 1

    processor = SimpleNamespace(emit_events=False, snapshot_requested=False, applied_index=1,
                                drain_outputs=list, apply_frame=apply_frame)  # fmt: skip
    versions = SimpleNamespace(active=0, raises_refused=0)
    rules = SimpleNamespace(active=1, due=0)  # the session rules' versions (sequencer/rules_versions.py)
    shell = SimpleNamespace(
        unwritten=[], processor=processor, values=values, event_subscribers_word=0, commit_index_word=1,
        reader=SimpleNamespace(poll_region=poll_region, release_to=lambda position: None), region_bytes_max=64,
        applied_position_seen=0, snapshot_writers={}, _publish_versions=lambda: None,
        _write_outputs=lambda position: 0, fork_snapshots=False, versions=versions, rules=rules,
        versions_seen=(0, 0, 1, 0),
    )  # fmt: skip
    assert BlpAgent.do_work(shell, 0) == 1  # type: ignore[arg-type]
    assert emitting == [True]
