"""A query replica: follows the committed journal, answers queries, serves catch-up subscriptions.

Theory of operation
-------------------

A replica is a process beside the pipeline, never in it: it reads no ring and writes nothing the
pipeline reads, so a slow or stopped replica (or subscriber) can never hold the sequencer, the
journaller or the blp back, nor grow the daemon's memory. The supervisor starts `[replicas]
count` of them (`python -m daemon.roles.replica`, slot `SEQD_REPLICA_NUMBER`) after the pipeline
runs and restarts one that dies, alone; `seqd replica --config ...` runs one by hand against a
node's data directory.

It restores the newest snapshot and applies the journal after it with the app's own processor
(`sequencer.follow.LogFollower`, the blp's code), up to the commit index: on a single node the
journal's durable index, read from the node's counters (`commit.index`), so it never applies a
record the node could still lose. It follows the journal as it grows (the batches are in the
page cache) by reading the commit counter every `replicas.poll_ms` while nothing is new.

What it applied stays in memory for a while (`recent`: the records and the events each published,
at most `replicas.recent_bytes_max`), and every connection is served from there:

- a **subscription** from index i keeps its own cursor. While i is within `recent`, its items are
  copied from there; beyond the applied index it waits for the next records; below `recent` (a
  subscriber from long ago, or one that stopped reading while `recent` moved on) it gets a
  follower of its own (`start_follower`: a snapshot at or before i - 1, a silent replay to i - 1),
  applies the journal with it and sends what it publishes, until its cursor reaches `recent`;
  the hand-over is by index, so nothing is missed or sent twice. A subscriber that does not read
  costs a socket buffer (writes wait for `drain`), never more; one that stalls while holding a
  follower of its own (at most `CATCHUPS_MAX` exist) for `replicas.catchup_stall_s` is dropped with
  `subscriber_too_slow` (the client library resumes it from where it was).
- a **query** runs the app's `@query` handler on the replica's state between two batches, after
  waiting (at most its `wait_ms`) until the replica has applied `after_index` (`after`), or a read
  index it asked for (`linearizable`: `daemon/read_rounds.py`); the answer carries the index it
  reflects.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import sys
import time
from pathlib import Path
from typing import Final, Protocol

import msgspec

from daemon.config import Config
from daemon.layout import (
    READ_ROUND_COUNTERS,
    REPLICA_COUNTERS,
    CounterView,
    ReplicaCounters,
    attach_counters,
    commit_index_counter,
    replica_owner,
)
from daemon.parent_death import EXIT_ORPHANED, die_with_parent
from daemon.read_rounds import (
    ClusterReadPoint,
    CommitReadPoint,
    ReadIndexUnavailable,
    ReadPoint,
)
from daemon.replicas import REPLICA_NUMBER_ENV
from daemon.roles.common import EPOCH_ENV, SUPERVISOR_PID_ENV
from daemon.unix_socket import bind_unix_socket, peer_allowed, peer_credentials
from ipc.counters import Counter
from ipc.segment import SegmentError
from sequencer import snapshot as snapshots
from sequencer.client.protocol import (
    FRAME_BYTES_MAX,
    READ_BYTES_MAX,
    Answer,
    Connection,
    Error,
    ErrorCode,
    Hello,
    ItemKind,
    Ping,
    Pong,
    ProtocolError,
    Query,
    Service,
    Side,
    Subscribe,
    Welcome,
)
from sequencer.egress import EgressKind
from sequencer.follow import (
    BelowRetention,
    FollowedRecord,
    LogFollower,
    QueryFailure,
    run_query,
    start_follower,
)
from sequencer.journal import JournalError
from sequencer.recovery import recover
from sequencer.state_machine import StateMachine, load_app

log = logging.getLogger("seqd.replica")

# Followers of their own (subscribers behind `recent`) at one time: each holds a copy of the
# state, and two already keep a 2-core machine busy replaying; more wait their turn.
CATCHUPS_MAX: Final = 2
# A dropped subscriber's connection is closed (its ERROR queued behind what it has not read) and
# aborted this long after if it still has not read it: its socket buffer is freed either way.
DROPPED_CLOSE_GRACE_S: Final = 10.0
# Records a subscriber is sent per turn before the event loop serves others (and per write).
ITEMS_PER_TURN_MAX: Final = 1024
# Records applied per turn of the apply loop before the loop serves sockets.
APPLY_RECORDS_PER_TURN_MAX: Final = 2048
# Asyncio's write buffer per connection before `drain` waits: what a stopped subscriber costs.
WRITE_BUFFER_BYTES_HIGH: Final = 256 * 1024
HEARTBEAT_INTERVAL_S: Final = 0.1
LISTEN_BACKLOG: Final = 128
# The item kind of each event output of the processor.
_EVENT_KINDS: Final = {int(EgressKind.EVENT): ItemKind.EVENT, int(EgressKind.EVENT_OMITTED): ItemKind.EVENT_OMITTED}


class CommitSource(Protocol):
    def commit_index(self) -> int: ...


class CountersCommit:
    """The node's commit index from its counters (a replica started by the supervisor)."""

    def __init__(self, commit: Counter) -> None:
        self.commit = commit

    def commit_index(self) -> int:
        return self.commit.get()


class NodeCommit:
    """`seqd replica` beside a running node: its commit index, from whichever incarnation of the
    node's counters exists (a pipeline restart makes new ones); while none does, the last index
    seen (the node is down: nothing new is committed)."""

    REATTACH_S: Final = 1.0  # how often the counters' incarnation is checked

    def __init__(self, node: str, clustered: bool = False) -> None:
        self.node = node
        self.commit_spec = commit_index_counter(clustered)
        self.view: CounterView | None = None
        self.commit: Counter | None = None
        self.last = 0
        self.checked_at = 0.0
        self._attach()

    def _attach(self) -> None:
        self.checked_at = time.monotonic()
        try:
            counters = attach_counters(self.node)
        except SegmentError:
            return
        if self.view is not None and self.view.counters.segment.epoch == counters.segment.epoch:
            counters.close()
            return
        if self.view is not None:
            self.view.close()
        self.view = CounterView(counters, None)
        self.commit = self.view[self.commit_spec]

    @property
    def attached(self) -> bool:
        return self.view is not None

    def commit_index(self) -> int:
        if time.monotonic() - self.checked_at >= self.REATTACH_S:
            self._attach()
        if self.commit is not None:
            # A new incarnation's counters start at 0 until its journaller publishes.
            self.last = max(self.last, self.commit.get())
        return self.last

    def close(self) -> None:
        if self.view is not None:
            self.view.close()


class JournalEnd:
    """No node runs: every complete batch of the journal is taken as committed (`seqd replica`
    against a stopped node's data directory; docs/query-side.md says what that means)."""

    def commit_index(self) -> int:
        return (1 << 63) - 1


class ReplicaServer:
    """The replica's state and its connections (see the module docstring)."""

    def __init__(
        self,
        app_class: type[StateMachine],
        config: Config,
        socket_path: str,
        commit: CommitSource,
        counters: ReplicaCounters | None,
        view: CounterView | None,
        stop: Counter | None,
        read_point: ReadPoint | None = None,
    ) -> None:
        self.app_class = app_class
        # Where a linearizable query's read index comes from (daemon/read_rounds.py); None: a
        # replica run by hand beside a cluster node, or on a stopped node's journal.
        self.read_point = read_point
        self.config = config
        self.socket_path = socket_path
        self.commit = commit
        self.stop = stop
        self.handlers = app_class.query_handlers()
        self.follower: LogFollower | None = None
        self.recent: collections.deque[FollowedRecord] = collections.deque()
        self.recent_bytes = 0
        self.changed = asyncio.Event()  # set (and replaced) when records are applied
        self.catchups = asyncio.Semaphore(CATCHUPS_MAX)
        self.connections = 0
        self.writers: set[asyncio.StreamWriter] = set()
        self.stopping = False
        self._counter: dict[str, Counter] = {}
        if counters is not None and view is not None:
            for name in ("heartbeat", "applied_index", "subscribers", "queries", "items_sent", "errors"):
                self._counter[name] = view[getattr(counters, name)]

    # -- counters -----------------------------------------------------------------------------

    def _add(self, name: str, amount: int = 1) -> None:
        counter = self._counter.get(name)
        if counter is not None:
            counter.add(amount)

    def _set(self, name: str, value: int) -> None:
        counter = self._counter.get(name)
        if counter is not None:
            counter.set(value)

    @property
    def applied_index(self) -> int:
        assert self.follower is not None
        return self.follower.applied_index

    # -- applying -----------------------------------------------------------------------------

    def recover(self) -> None:
        """The newest valid snapshot, then the journal after it up to the commit index."""
        config = self.config
        found = snapshots.newest_valid_snapshot(config.snapshot_dir)
        commit = self.commit.commit_index()
        recovered = recover(self.app_class, config.journal_dir, found,
                            None if commit >= (1 << 63) - 1 else commit,
                            node="\0replica", client_expiry_ns=config.client_expiry_ns)  # fmt: skip
        recovered.processor.drain_outputs()
        self.follower = LogFollower(recovered.processor, config.journal_dir)
        self._set("applied_index", self.applied_index)
        log.info("recovered to index %d (%d records replayed)", self.applied_index, recovered.replayed)

    async def apply_loop(self) -> None:
        """Follow the commit index; keep what was applied in `recent` for the subscribers."""
        follower = self.follower
        assert follower is not None
        poll_s = self.config.replicas.poll_ms / 1000
        recent_bytes_max = self.config.replicas.recent_bytes_max
        next_beat = 0.0
        while not self.stopping:
            if self.stop is not None and self.stop.get():
                self.stopping = True
                break
            now = time.monotonic()
            if now >= next_beat:
                self._add("heartbeat")
                next_beat = now + HEARTBEAT_INTERVAL_S
            commit = self.commit.commit_index()
            followed = (
                follower.follow(commit, APPLY_RECORDS_PER_TURN_MAX)
                if commit > follower.applied_index
                else []
            )
            if not followed:
                await asyncio.sleep(poll_s)
                continue
            recent = self.recent
            for record in followed:
                recent.append(record)
                self.recent_bytes += _record_bytes(record)
            while self.recent_bytes > recent_bytes_max and len(recent) > 1:
                self.recent_bytes -= _record_bytes(recent.popleft())
            self._set("applied_index", follower.applied_index)
            changed, self.changed = self.changed, asyncio.Event()
            changed.set()
            await asyncio.sleep(0)

    async def wait_applied(self, index: int, timeout_s: float) -> bool:
        """Wait until `index` is applied (True), at most `timeout_s` (False)."""
        deadline = time.monotonic() + timeout_s
        while self.applied_index < index:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.stopping:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)
        return True

    # -- connections --------------------------------------------------------------------------

    async def serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.transport.set_write_buffer_limits(high=WRITE_BUFFER_BYTES_HIGH)
        connection = Connection(Side.SERVER, Service.REPLICA)
        subscription: asyncio.Task[None] | None = None
        self.connections += 1
        self.writers.add(writer)
        try:
            if not self._admit(connection, writer):
                return
            while not self.stopping:
                data = await reader.read(READ_BYTES_MAX)
                if not data:
                    return
                connection.receive_data(data)
                while True:
                    try:
                        frames = connection.next_frames()
                    except ProtocolError as error:
                        self._add("errors")
                        writer.write(connection.send(error.to_frame()))
                        return
                    if not frames:
                        break
                    for frame in frames:
                        if type(frame) is Hello:
                            writer.write(connection.send(Welcome(
                                session_id=0, node=self.config.node.name, frame_bytes_max=FRAME_BYTES_MAX,
                                replicas=[self.socket_path], applied_index=self.applied_index,
                            )))  # fmt: skip
                        elif type(frame) is Subscribe:
                            if subscription is not None:
                                self._fail(connection, writer, ErrorCode.UNEXPECTED_KIND,
                                           "a second SUBSCRIBE on one connection: open another "
                                           "connection for another subscription")  # fmt: skip
                                return
                            subscription = asyncio.ensure_future(
                                self.serve_subscription(connection, writer, frame)
                            )
                        elif type(frame) is Query:
                            await self.answer(connection, writer, frame)
                        elif type(frame) is Ping:
                            writer.write(connection.send(Pong(nonce=frame.nonce)))
                        elif type(frame) is Error and frame.fatal:
                            return
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        finally:
            self.connections -= 1
            self.writers.discard(writer)
            if subscription is not None:
                subscription.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await subscription
            writer.close()

    def _admit(self, connection: Connection, writer: asyncio.StreamWriter) -> bool:
        sock = writer.get_extra_info("socket")
        pid, uid, gid = peer_credentials(sock)
        if not peer_allowed(uid, gid, self.config.socket):
            self._add("errors")
            self._fail(connection, writer, ErrorCode.PERMISSION_DENIED,
                       f"uid {uid} gid {gid} is not allowed to use this socket")  # fmt: skip
            log.warning("refused a connection from pid %d uid %d gid %d", pid, uid, gid)
            return False
        if self.connections > self.config.replicas.subscribers_max:
            self._fail(connection, writer, ErrorCode.UNAVAILABLE,
                       f"the replica serves replicas.subscribers_max={self.config.replicas.subscribers_max} "
                       "connections; retry later or use another replica")  # fmt: skip
            return False
        return True

    def _fail(self, connection: Connection, writer: asyncio.StreamWriter, code: str, message: str) -> None:
        with contextlib.suppress(ProtocolError):
            writer.write(connection.send(Error(code=code, message=message, fatal=True)))

    async def answer(self, connection: Connection, writer: asyncio.StreamWriter, query: Query) -> None:
        reply = await self._wait_for_consistency(query)
        if reply is None:
            assert self.follower is not None
            index = self.applied_index
            try:
                result = run_query(self.follower.processor.app, self.handlers, query.name, query.args)
                reply = Answer(query_id=query.query_id, index=index, result=msgspec.Raw(result))
            except QueryFailure as failure:
                self._add("errors")
                reply = Answer(query_id=query.query_id, index=index, code=failure.code, message=failure.message)
        self._add("queries")
        writer.write(connection.send(reply))
        await writer.drain()

    async def _wait_for_consistency(self, query: Query) -> Answer | None:
        """Wait until the replica may answer `query` at its consistency; an Answer refusing it
        when it cannot (None: run it now)."""
        consistency = query.consistency
        if consistency == "local":
            return None
        if consistency not in ("after", "linearizable"):
            return Answer(query_id=query.query_id, index=self.applied_index, code="bad_consistency",
                          message=f"consistency {consistency!r} is not one of local, after, linearizable")  # fmt: skip
        deadline = time.monotonic() + query.wait_ms / 1000
        after_index = query.after_index
        if consistency == "linearizable":
            if self.read_point is None:
                return Answer(query_id=query.query_id, index=self.applied_index, code="consistency_unavailable",
                              message="this replica was started by hand (seqd replica) beside a cluster node, or "
                              "on a stopped node's journal: it cannot ask the leader for a read index. Ask "
                              "a replica the node runs ([replicas] count), or use 'after' or 'local'")  # fmt: skip
            try:
                after_index = await self.read_point.read_index(query.wait_ms / 1000)
            except ReadIndexUnavailable as unavailable:
                self._add("errors")
                return Answer(query_id=query.query_id, index=self.applied_index, code=unavailable.code,
                              message=unavailable.message)  # fmt: skip
        if not await self.wait_applied(after_index, max(0.0, deadline - time.monotonic())):
            return Answer(query_id=query.query_id, index=self.applied_index, code="not_applied_in_time",
                          message=f"the replica had applied index {self.applied_index}, not yet "
                          f"{after_index}, after {query.wait_ms} ms: it is behind (seqd status shows "
                          "its lag); wait and ask again, or ask for 'local'")  # fmt: skip
        return None

    async def serve_subscription(
        self, connection: Connection, writer: asyncio.StreamWriter, subscribe: Subscribe
    ) -> None:
        self._add("subscribers")
        try:
            await self._stream(connection, writer, max(subscribe.from_index, 1), subscribe.records)
        except BelowRetention as below:
            self._add("errors")
            self._fail(connection, writer, ErrorCode.INDEX_BELOW_RETENTION, str(below))
            writer.close()
        except JournalError as error:
            self._add("errors")
            self._fail(connection, writer, ErrorCode.INDEX_BELOW_RETENTION,
                       f"the journal no longer holds what this subscription needs ({error}); "
                       "start again from a snapshot")  # fmt: skip
            writer.close()
        except (ConnectionError, OSError):
            pass
        except Exception:  # a bug (or an app that fails replaying): this subscriber only
            self._add("errors")
            log.exception("subscription from index %d failed; closing its connection (the client "
                          "resumes, and meets it again if the cause stays)", subscribe.from_index)  # fmt: skip
            writer.close()
        finally:
            self._add("subscribers", -1)

    async def _stream(self, connection: Connection, writer: asyncio.StreamWriter, next_index: int, records: bool) -> None:
        """Send every item from `next_index` on: from `recent`, from a follower of its own while
        below `recent`, waiting for new records at the applied index."""
        while not self.stopping:
            recent = self.recent
            first_recent = recent[0].index if recent else self.applied_index + 1
            if next_index > self.applied_index:
                await self.changed.wait()
            elif next_index >= first_recent:
                start = next_index - first_recent  # `recent` holds consecutive indexes
                # islice walks the deque once (indexing one would walk it per item).
                batch = list(itertools.islice(recent, start, start + ITEMS_PER_TURN_MAX))
                next_index = await self._send(connection, writer, batch, records, None)
            else:
                next_index = await self._catch_up(connection, writer, next_index, records)

    async def _catch_up(self, connection: Connection, writer: asyncio.StreamWriter, next_index: int, records: bool) -> int:
        """Feed the subscriber from a follower of its own until its cursor reaches `recent`."""
        async with self.catchups:
            follower = await asyncio.to_thread(
                start_follower, self.app_class, self.config.journal_dir, self.config.snapshot_dir,
                next_index, client_expiry_ns=self.config.client_expiry_ns,
            )  # fmt: skip
            try:
                while not self.stopping:
                    first_recent = self.recent[0].index if self.recent else self.applied_index + 1
                    if next_index >= first_recent:
                        return next_index  # hand over to `recent`, by index
                    batch = follower.follow(min(first_recent - 1, self.applied_index), ITEMS_PER_TURN_MAX)
                    if not batch:
                        return next_index
                    assert batch[0].index == next_index, (batch[0].index, next_index)
                    next_index = await self._send(connection, writer, batch, records, self.config.replicas.catchup_stall_s)
            finally:
                follower.close()
        return next_index

    async def _send(
        self, connection: Connection, writer: asyncio.StreamWriter, batch: list[FollowedRecord],
        records: bool, stall_s: float | None,
    ) -> int:  # fmt: skip
        """Write the items of `batch`, then wait until the socket takes them; the index after."""
        out = bytearray()
        items = 0
        send_item = connection.send_item_into
        for record in batch:
            if records:
                send_item(out, record.index, record.timestamp_ns, ItemKind.RECORD, record.record_type,
                          record.version, record.record)  # fmt: skip
                items += 1
            for kind, version, payload in record.events:
                send_item(out, record.index, record.timestamp_ns, _EVENT_KINDS[kind], 0, version, payload)
                items += 1
        if out:
            writer.write(out)
            self._add("items_sent", items)
            try:
                await asyncio.wait_for(writer.drain(), stall_s)
            except TimeoutError:
                self._add("errors")
                self._fail(connection, writer, ErrorCode.SUBSCRIBER_TOO_SLOW,
                           f"this subscriber read nothing for {stall_s} s while the replica fed it "
                           f"from the journal (up to index {batch[-1].index}); resume from your last index")  # fmt: skip
                transport = writer.transport
                transport.close()  # the ERROR goes out once the subscriber reads what is before it
                asyncio.get_running_loop().call_later(DROPPED_CLOSE_GRACE_S, transport.abort)
                raise ConnectionResetError("subscriber too slow") from None
        return batch[-1].index + 1

    async def serve(self) -> None:
        sock = bind_unix_socket(Path(self.socket_path), "replicas.socket_dir", LISTEN_BACKLOG)
        server = await asyncio.start_unix_server(self.serve_connection, sock=sock)
        log.info("serving queries and subscriptions on %s from index %d", self.socket_path, self.applied_index)
        try:
            await self.apply_loop()
        finally:
            self.stopping = True
            self.changed.set()
            server.close()
            Path(self.socket_path).unlink(missing_ok=True)
            stopping = Error(
                code=ErrorCode.REPLICA_STOPPING,
                message="the query replica is stopping; reconnect (to it once restarted, or another)",
            )
            for writer in list(self.writers):
                with contextlib.suppress(Exception):
                    # A frame of its own, whatever the codec state of the connection: sent last.
                    writer.write(Connection(Side.SERVER, Service.REPLICA).send(stopping))
                    writer.close()
            await asyncio.sleep(0.05)  # the transports write it


def _record_bytes(record: FollowedRecord) -> int:
    return len(record.record) + sum(len(payload) for _, _, payload in record.events) + 64


def _run(server: ReplicaServer) -> None:
    server.recover()
    try:
        import uvloop

        uvloop.run(server.serve())
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(server.serve())


def main_supervised() -> int:
    """Started by the supervisor: slot `SEQD_REPLICA_NUMBER`, the node's counters."""
    number = int(os.environ[REPLICA_NUMBER_ENV])
    logging.basicConfig(
        level=os.environ.get("SEQD_LOG_LEVEL", "INFO"),
        format=f"%(asctime)s seqd[replica{number}:%(process)d] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    supervisor_pid, epoch = int(os.environ[SUPERVISOR_PID_ENV]), int(os.environ[EPOCH_ENV])
    if not die_with_parent(supervisor_pid):
        return EXIT_ORPHANED
    config = Config.from_json(os.environ["SEQD_CONFIG_JSON"])
    try:
        view = CounterView(attach_counters(config.node.name, epoch=epoch), replica_owner(number))
    except SegmentError as error:
        log.error("not starting replica %d: %s", number, error)
        return EXIT_ORPHANED
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if config.replicas.cpu >= 0:
        from ipc.affinity import pin

        pin(config.replicas.cpu)
    block = REPLICA_COUNTERS[number]
    commit = CountersCommit(view[commit_index_counter(config.cluster is not None)])
    read_point: ReadPoint = CommitReadPoint(commit)
    if config.cluster is not None:
        rounds = READ_ROUND_COUNTERS[number]
        read_point = ClusterReadPoint(view[rounds.asked], view[rounds.index], view[rounds.answered])
    server = ReplicaServer(
        load_app(config.node.app), config, config.replica_socket_path(number),
        commit, block, view, view[block.stop], read_point,
    )  # fmt: skip
    try:
        _run(server)
    finally:
        view.close()
    return 0


def run_standalone(config: Config, socket_path: str | None = None, number: int = 0) -> int:
    """`seqd replica --config FILE [--socket PATH]`: a replica of a node's data directory, run by
    hand. It follows the node's commit index while the node runs, else the journal's end."""
    logging.basicConfig(level=os.environ.get("SEQD_LOG_LEVEL", "INFO"),
                        format="%(asctime)s seqd[replica:%(process)d] %(levelname)s %(message)s")  # fmt: skip
    node_commit = NodeCommit(config.node.name, config.cluster is not None)
    commit: CommitSource = node_commit
    if node_commit.attached:
        log.info("following node %s's commit index", config.node.name)
    else:
        commit = JournalEnd()
        log.info("node %s is not running: following the journal's end", config.node.name)
    path = socket_path or config.replica_socket_path(number)
    # A single node's commit index is its read index; a cluster's needs the node's replicator.
    read_point = CommitReadPoint(node_commit) if node_commit.attached and config.cluster is None else None
    server = ReplicaServer(load_app(config.node.app), config, path, commit, None, None, None, read_point)
    try:
        _run(server)
    finally:
        node_commit.close()
    return 0


def main() -> int:
    if REPLICA_NUMBER_ENV not in os.environ:
        raise SystemExit("daemon.roles.replica is started by `seqd run` ([replicas] count); by hand, run `seqd replica --config FILE`")
    return main_supervised()


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["CATCHUPS_MAX", "ReplicaServer", "main", "run_standalone"]
