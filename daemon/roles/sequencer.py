"""The sequencer role: a thin uvloop shell around the gateway core (`sequencer.gateway`).

Theory of operation
-------------------
What the role decides (sessions and their ids, admission, stamping, the snapshot policy, timers,
the fan-out of egress to sessions) is decided by `sequencer.gateway.Gateway`, a sans-I/O core.
This module does the I/O around it, on one uvloop thread:

- the socket: it binds it (directory 0750, socket 0660), accepts connections and checks each
  peer's `SO_PEERCRED` against the config before the gateway sees a byte of it;
- the clock: read once per batch (a session's read, a timer pass, a retry) and passed in;
- the log ring: it is the ring's only writer. The gateway claims through `writer.try_claim` and
  stamps records in place; the claims are published once per event-loop pass (`_flush`), so
  everything that arrived in one pass costs one cursor store: batching without waiting;
- cluster mode (`[cluster]`): the same records go unstamped (`ClusterStamping`) into the
  proposal ring, whose one reader, the replicator, stamps them (leader) or forwards them. This
  shell reads the Raft standing (`raft.role`, `raft.leader`): only the leader fires due timers
  (a follower looks again every LEADERSHIP_POLL_S) and requests automatic snapshots, by the log
  its blp applied, every heartbeat (`Gateway.log_applied`); WELCOME names the leader;
- backpressure: when the ring is full (the journaller or the blp is behind) the gateway leaves
  the rest of a session's batch in `session.backlog`; the shell stops reading that session
  (`pause_reading`) and retries on the next egress drain or after BLOCKED_RETRY_S, then resumes
  it. Nothing is buffered without bound: the codec holds at most one read plus one frame;
- egress: the loop itself watches the egress doorbell, a FIFO the blp's publish rings
  (`ipc.doorbell_fifo.LoopWaiter`: no thread, no hand-off), and after each pass that published
  it polls egress anyway; `_drain_egress` polls the ring in bounded batches, lets the
  gateway frame each output for its sessions and writes each session's bytes once. A session
  whose unsent output passes `client_write_buffer_bytes_max` is a slow client: it is
  disconnected, so it cannot stall anyone else;
- a full disk: the journaller's `journal.disk_full` (DiskState) is read once per batch and
  passed in; while it is not ROOM the gateway refuses new sessions and commands with the
  retryable ERROR `disk_full`, and the node resumes by itself when the counter drops back;
- SIGTERM (through the `sequencer.stop` counter) drains: stop accepting and reading, wait until
  everything sequenced is applied and replied, close;
- `[standby]` (green of a blue-green switch-over, `daemon.standby`): no socket; it writes blue's
  transformed records into the log ring until the switch, then serves blue's socket path.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import struct
import sys
import time
import traceback
from collections import deque
from pathlib import Path

import uvloop

from daemon.errorlog import DistinctErrorLog, exception_key
from daemon.fault_hooks import wall_clock_ns
from daemon.incarnation import previous_incarnation
from daemon.layout import (
    APP_VERSION_ACTIVE,
    APP_VERSION_RAISE_HANDLED,
    APP_VERSION_RAISE_REQUEST,
    BLP_APPLIED_INDEX,
    BLP_APPLIED_POSITION,
    COMMANDS_TOTAL,
    EGRESS_CONSUMED_POSITION,
    EGRESS_PUBLISHED_POSITION,
    ERRORS_DISK_FULL,
    ERRORS_PROTOCOL,
    ERRORS_SECURITY,
    ERRORS_SLOW_CLIENT,
    GATEWAY_EVENT_SUBSCRIBERS,
    INCARNATION_BITS,
    JOURNAL_DISK_FULL,
    JOURNAL_DURABLE_INDEX,
    JOURNAL_FREE_BYTES,
    LOG_PUBLISHED_INDEX,
    LOG_PUBLISHED_POSITION,
    NODE_INCARNATION,
    RAFT_COMMIT_INDEX,
    RAFT_LEADER,
    RAFT_PENDING_FORWARDS,
    RAFT_ROLE,
    RECOVERY_LAST_INDEX,
    RECOVERY_LAST_TERM,
    RECOVERY_LAST_TIMESTAMP_NS,
    RULES_VERSION_DUE,
    SEQUENCER_SERVING_INDEX,
    SESSIONS_OPEN,
    SESSIONS_TOTAL,
    SNAPSHOT_LAST_INDEX,
    SNAPSHOTTER_COUNTERS,
    TIMERS_PENDING,
    DiskState,
    Role,
    RoleState,
    egress_name,
    log_name,
    proposal_name,
)
from daemon.roles.common import RoleContext, loop_waiter, report_start_failure, start_role
from daemon.roles.sequencer_session import PEER_UNKNOWN, Session
from daemon.standby import GreenPipeline, Standby, stand_by, switched
from daemon.unix_socket import bind_unix_socket
from ipc.ring import Ring
from sequencer import egress
from sequencer.client import protocol
from sequencer.gateway import (
    ClusterStamping,
    Gateway,
    GatewayConfig,
    Report,
    SingleNodeStamping,
    StampingPolicy,
)
from sequencer.gateway.sessions import SESSION_ID_INCARNATION_BITS
from sequencer.raft import RaftRole
from sequencer.rules_versions import RulesAsks
from sequencer.state_machine import load_app

log = logging.getLogger("seqd.sequencer")

HEARTBEAT_INTERVAL_S = 0.1
BLOCKED_RETRY_S = 0.001  # how soon records that found the log ring full try again
# Cluster mode: while a timer is due and this node does not lead, how often it looks whether it
# leads now. A new leader fires what is due within this of taking office, which is small next to
# an election (hundreds of ms); a follower wakes this often only while a timer is due and the
# leader's fire has not yet reached its own blp (which then drops it from the schedule).
LEADERSHIP_POLL_S = 0.01
# A session rules version every member reported but the log has not made active yet is asked for
# again after this long: the record this node sequenced may have been cut with its leader's term
# (a second one changes nothing). Far above a commit's round trip, so a slow blp seldom asks twice.
RULES_ASK_AGAIN_S = 10.0
DRAIN_TIMEOUT_S = 10.0  # SIGTERM: how long to wait for committed work to be replied
# SIGTERM: how often the drain looks at the blp's progress: short against DRAIN_TIMEOUT_S, long
# enough that the wait costs nothing next to the blp it waits for.
DRAIN_POLL_INTERVAL_S = 0.005
# SIGTERM: after closing every session, how long the loop keeps running so the transports can
# write what they hold (a close flushes on later loop iterations) before the process exits.
TRANSPORT_CLOSE_GRACE_S = 0.05
EGRESS_FRAMES_PER_DRAIN_MAX = 4096  # bound one drain so sessions' reads interleave with replies
# Connections the kernel queues before the loop accepts them: the default sessions_max, so every
# client of a full node reconnecting at once after a restart queues instead of being refused
# (the kernel caps it at net.core.somaxconn).
LISTEN_BACKLOG = 1024
# The supervisor writes the incarnation already cut to the bits a session id holds for it.
assert INCARNATION_BITS == SESSION_ID_INCARNATION_BITS, (INCARNATION_BITS, SESSION_ID_INCARNATION_BITS)
_PEER_CREDENTIALS = struct.Struct("3i")  # SO_PEERCRED's struct ucred: pid, uid, gid
_EGRESS_REPLY = int(egress.EgressKind.REPLY)


class Sequencer:
    def __init__(self, context: RoleContext, loop: asyncio.AbstractEventLoop) -> None:
        self.context = context
        self.loop = loop
        config = context.config
        self.config = config
        counters = context.counters
        self.counters = counters
        # The ring this sequencer writes: the log ring on a single node; in cluster mode the
        # proposal ring (the replicator writes the log ring and stamps what it takes from here).
        self.clustered = config.cluster is not None
        ring_name = proposal_name(config.node.name) if self.clustered else log_name(config.node.name)
        self.log_ring = Ring.attach(ring_name, epoch=context.epoch)
        self.egress_ring = Ring.attach(egress_name(config.node.name), epoch=context.epoch)
        self.writer = self.log_ring.writer()
        self.egress_reader = self.egress_ring.reader(Role.SEQUENCER)
        self.egress_waiter = loop_waiter(loop, self.egress_reader.doorbell, self._drain_egress,
                                         ring_name=self.egress_ring.name, whose="sequencer's egress",
                                         setting="EGRESS_POLLABLE")  # fmt: skip
        self.egress_polling = False  # `_watch_egress`
        self.client_write_buffer_bytes_max = config.socket.client_write_buffer_bytes_max
        gateway_config = GatewayConfig(
            node_name=config.node.name,
            node_number=config.node.number,
            incarnation=counters[NODE_INCARNATION].get(),  # the supervisor's, within INCARNATION_BITS
            previous_incarnation=previous_incarnation(Path(config.node.data_dir), counters[NODE_INCARNATION].get()),
            command_bytes_max=config.socket.command_bytes_max,
            # The gateway checks a command's schema version (never its payload): a version newer
            # than the app's is refused there, because once in the log it would stop every replay.
            command_version_max=load_app(config.node.app).schema.version,
            sessions_max=config.socket.sessions_max,
            snapshot_every_records=config.snapshot.every_records,
            snapshot_every_bytes=config.snapshot.every_bytes,
            replicas=tuple(config.replica_socket_paths()),
            members=tuple(member.id for member in config.cluster.members) if config.cluster else (),
        )
        # Stamps continue from what recovery found in the journal.
        self.gateway: Gateway[Session] = Gateway(
            gateway_config,
            self._stamping(),
            self.writer.try_claim,
            self._report,
            last_index=counters[RECOVERY_LAST_INDEX].get(),
            last_timestamp_ns=counters[RECOVERY_LAST_TIMESTAMP_NS].get(),
        )
        self.published_index = self.gateway.next_index - 1
        self.published_claim = self.writer.claim_position  # the end of what was published
        self.flush_scheduled = False
        self.blocked: deque[Session] = deque()  # sessions waiting for ring space, in order
        self.blocked_retry: asyncio.TimerHandle | None = None
        self.timer_handle: asyncio.TimerHandle | None = None
        self.draining = False
        self.drain_commit_index: int | None = None  # a cluster's drain: what the blp must reach
        self.raise_seen = counters[APP_VERSION_RAISE_REQUEST].get()
        self.rules_asks = RulesAsks(RULES_ASK_AGAIN_S)  # the session rules version this start asks for
        self.server: asyncio.AbstractServer | None = None
        self.published_position = counters[LOG_PUBLISHED_POSITION]
        self.published_index_counter = counters[LOG_PUBLISHED_INDEX]
        if not self.clustered:  # in a cluster the replicator writes the log, not this role
            self.published_index_counter.set(self.published_index)  # the journal's last, until the first publish
        self.commands_total = counters[COMMANDS_TOTAL]
        self.sessions_open = counters[SESSIONS_OPEN]
        self.sessions_total = counters[SESSIONS_TOTAL]
        # Raised before anything of a subscribing session is published to the ring, so the blp,
        # which reads it after the records it applies, writes their events (docs/contracts.md).
        self.event_subscribers = counters[GATEWAY_EVENT_SUBSCRIBERS]
        self.errors_protocol = counters[ERRORS_PROTOCOL]
        self.errors_disk_full = counters[ERRORS_DISK_FULL]
        self.errors_total = context.errors
        self.egress_consumed = counters[EGRESS_CONSUMED_POSITION]
        self.timers_pending = counters[TIMERS_PENDING]
        self.disk_full = counters[JOURNAL_DISK_FULL]  # the journaller's DiskState
        self.disk_free_bytes = counters[JOURNAL_FREE_BYTES]
        # Client errors are counted every time and logged once per kind, with repeat counts, so
        # a misbehaving client cannot flood the log.
        self.errors = DistinctErrorLog(log, counter_add=self.errors_total.add)
        # Blue-green (`daemon.standby`): green follows blue and binds no socket until the switch.
        self.standby: Standby | None = None
        if config.standby is not None and not switched(config):
            self.standby = Standby(config, counters[RECOVERY_LAST_INDEX].get())

    def _stamping(self) -> StampingPolicy:
        """A single node stamps its records itself; in a cluster the leader's replicator does,
        and the Raft standing is read from the replicator's counters when the gateway asks."""
        config = self.config
        if config.cluster is None:
            return SingleNodeStamping(self.counters[RECOVERY_LAST_TERM].get(), config.node.name)
        raft_role = self.counters[RAFT_ROLE]
        leader = int(RaftRole.LEADER)
        names = {member.id: member.name for member in config.cluster.members if member.name}
        names[config.node.number] = config.node.name
        return ClusterStamping(self.counters[RAFT_LEADER].get, lambda: raft_role.get() == leader, names)

    def _report(self, kind: Report, key: str, message: str, error: BaseException | None) -> None:
        """The gateway's reports: logged once per key with repeat counts, and counted."""
        if kind is Report.SNAPSHOT_REQUESTED:
            log.info("%s", message)
            return
        if kind is Report.SNAPSHOT_DEFERRED:
            log.warning("%s", message)
            return
        if kind is Report.PROTOCOL_ERROR:
            self.errors_protocol.add(1)
        elif kind is Report.DISK_FULL:
            self.errors_disk_full.add(1)
        if error is not None:
            # A bug: keyed by where it was raised, and its traceback logged the first time.
            key = f"{key}.{exception_key(error)}"
            if self.errors.observation(key) is None:
                message += "\n" + "".join(traceback.format_exception(error)).rstrip()
        self.errors.record(key, message, time.monotonic())

    # ---- log ring: publishing --------------------------------------------------------------

    def _claimed(self) -> None:
        """After a gateway call: publish at the end of this loop pass if it claimed records."""
        if not self.flush_scheduled and self.writer.claim_position != self.published_claim:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.flush_scheduled = False
        writer = self.writer
        if writer.claim_position != self.published_claim:
            writer.publish()
            self.published_claim = writer.claim_position
            if not self.clustered:  # the log ring's: its indexes are the ones the gateway stamped
                last_index = self.gateway.next_index - 1
                self.published_index = last_index
                self.published_index_counter.set(last_index)
                self.published_position.set(self.published_claim)
        # While clients keep the loop busy, serve egress from here too: the doorbell's wake comes
        # on a later pass of the loop.
        if self.egress_reader.ready():
            self._drain_egress()

    # ---- sessions --------------------------------------------------------------------------

    def on_connect(self, session: Session) -> None:
        transport = session.transport
        assert transport is not None
        sock = transport.get_extra_info("socket")
        try:
            session.peer = _PEER_CREDENTIALS.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEER_CREDENTIALS.size)
            )
        except OSError:
            session.peer = PEER_UNKNOWN
        pid, uid, gid = session.peer
        socket_config = self.config.socket
        allowed = uid == os.getuid() or uid in socket_config.allowed_uids or gid in socket_config.allowed_gids
        if not allowed:
            self.counters[ERRORS_SECURITY].add(1)
            self.errors.record(
                "security.peer_not_allowed",
                f"refused a connection from pid {pid} uid {uid} gid {gid}: not in socket.allowed_uids/"
                "allowed_gids; add it to the config if it should be allowed",
                time.monotonic(),
            )
            self.gateway.fail(session, protocol.ErrorCode.PERMISSION_DENIED, f"uid {uid} gid {gid} is not allowed to use this socket")
            session.flush()
            return
        refusal = self.gateway.connection_refusal()
        if refusal is not None:
            self.gateway.fail(session, protocol.ErrorCode.UNAVAILABLE, refusal)
            session.flush()

    def on_disconnect(self, session: Session) -> None:
        gateway = self.gateway
        was_open = session.session_id in gateway.sessions
        gateway.close_session(session, wall_clock_ns())
        if was_open:
            self.sessions_open.set(len(gateway.sessions))
            self.event_subscribers.set(len(gateway.subscribers))
            self._claimed()
            if gateway.waiting:
                # Ring full: the close waits (bounded by sessions_max) and is claimed in order
                # once there is room, so every replica forgets the session.
                self._schedule_retry()
        if session in self.blocked:
            self.blocked.remove(session)
        session.transport = None

    def slow_client(self, session: Session) -> None:
        self.counters[ERRORS_SLOW_CLIENT].add(1)
        self.errors.record(
            "client.slow",
            f"session {session.session_id:x} (client {session.client_id}) is not reading its replies: "
            f"more than socket.client_write_buffer_bytes_max={self.client_write_buffer_bytes_max} bytes "
            "unsent; disconnected it (it may reconnect and resend)",
            time.monotonic(),
        )
        transport = session.transport
        if transport is not None:
            transport.abort()

    def on_data(self, session: Session) -> None:
        if session.backlog:
            return  # waiting for ring space; frames stay in the codec's bounded buffer
        if self._process(session):
            self._block(session)

    def on_eof(self, session: Session) -> None:
        """The client shut its end. Frames it sent whole are processed as usual; a frame cut
        short gets ERROR `truncated_frame` (the socket may still be writable after a half-close)
        and is counted. Then the connection closes: once the gateway has seen the EOF, or after
        the backlog of a session waiting for ring space is claimed."""
        connection = session.connection
        if session.transport is None or session.transport.is_closing():
            return  # already refused or failed: nothing more to read or answer
        if connection.error is None and not connection.peer_closed:
            connection.receive_data(b"")
        if not session.backlog and self._process(session):
            self._block(session)

    def _process(self, session: Session) -> bool:
        """Hand one session's frames to the gateway and write its answers. True when the
        session must wait for ring space (its remaining frames are in its backlog)."""
        gateway = self.gateway
        opening = not session.session_id
        disk_free_bytes = None if self.disk_full.get() == DiskState.ROOM else self.disk_free_bytes.get()
        commands = gateway.process(session, wall_clock_ns(), disk_free_bytes)
        # The checks below run once per read, so they are inlined rather than calls.
        if commands:
            self.commands_total.add(commands)
        if opening and session.session_id:
            self.sessions_open.set(len(gateway.sessions))
            self.sessions_total.add(1)
            self.event_subscribers.set(len(gateway.subscribers))  # before `_flush` publishes
        if not self.flush_scheduled and self.writer.claim_position != self.published_claim:
            self.flush_scheduled = True  # `_claimed()`
            self.loop.call_soon(self._flush)
        if session.out or session.closing:
            session.flush()
        if gateway.snapshot_pending:
            self._schedule_retry()  # a snapshot the policy asked for found the ring full
        return session.backlog is not None

    def _block(self, session: Session) -> None:
        if session.transport is not None:
            session.transport.pause_reading()
        self.blocked.append(session)
        self._schedule_retry()

    def _schedule_retry(self) -> None:
        if self.blocked_retry is None:
            self.blocked_retry = self.loop.call_later(BLOCKED_RETRY_S, self._retry_blocked)

    def _retry_blocked(self) -> None:
        self.blocked_retry = None
        self._flush()  # readers cannot pass unpublished claims: publish before waiting on them
        gateway = self.gateway
        retried = gateway.retry(wall_clock_ns())
        self._claimed()
        if not retried:
            self._schedule_retry()
            return
        blocked = self.blocked
        while blocked:
            session = blocked[0]
            if session.transport is None:
                blocked.popleft()
                continue
            if self._process(session):
                break  # still no room: it keeps its place at the front
            blocked.popleft()
            if session.transport is not None and not session.transport.is_closing() and not self.draining:
                session.transport.resume_reading()
        if blocked:
            self._schedule_retry()

    # ---- snapshots and timers --------------------------------------------------------------

    def request_snapshot(self) -> None:
        """SIGUSR1 (`seqd snapshot`): sequence a SNAPSHOT record."""
        if not self.gateway.request_snapshot(wall_clock_ns()):
            self._schedule_retry()
        self._claimed()

    def _check_app_version(self) -> None:
        """Rolling upgrades (sequencer/app_versions.py): in a cluster, admit commands only up to
        the log's active app version; sequence the raise `seqd cluster raise-version` asked for;
        ask the log to make active the session rules every member reported, again while it has
        not (sequencer/rules_versions.py: the other nodes ask too, and a second ask is a no-op)."""
        counters = self.counters
        if self.clustered:
            self.gateway.limit_command_version(counters[APP_VERSION_ACTIVE].get())
        request = counters[APP_VERSION_RAISE_REQUEST].get()
        if request != self.raise_seen and self.gateway.sequence_raise_version(wall_clock_ns(), request & 0xFFFF):
            self.raise_seen = request
            self._claimed()
            counters[APP_VERSION_RAISE_HANDLED].set(request)
        due, now_s = counters[RULES_VERSION_DUE].get(), time.monotonic()
        if self.rules_asks.should_ask(due, now_s) and self.gateway.sequence_rules_version(wall_clock_ns(), due):
            self.rules_asks.asked_for(due, now_s)
            self._claimed()

    def _log_snapshot_policy(self) -> None:
        """Cluster mode: the leader requests a snapshot by the log its blp applied."""
        counters = self.counters
        requested = self.gateway.log_applied(
            wall_clock_ns(), counters[BLP_APPLIED_INDEX].get(), counters[BLP_APPLIED_POSITION].get(),
            max(counters[SNAPSHOT_LAST_INDEX].get(), counters[SNAPSHOTTER_COUNTERS.snapshot_index].get()),
        )  # fmt: skip
        if requested:
            self._claimed()
            if self.gateway.snapshot_pending:
                self._schedule_retry()

    def _arm_timers(self) -> None:
        if self.timer_handle is not None:
            self.timer_handle.cancel()
            self.timer_handle = None
        timers = self.gateway.timers
        deadline_ns = timers.next_deadline_ns()
        self.timers_pending.set(len(timers))
        if deadline_ns is not None:
            delay_s = max(0.0, (deadline_ns - wall_clock_ns()) / 1e9)
            if not self.gateway.stamping.sequences_timers:
                delay_s = max(delay_s, LEADERSHIP_POLL_S)  # a follower fires nothing: look later
            self.timer_handle = self.loop.call_later(delay_s, self._fire_timers)

    def _fire_timers(self) -> None:
        self.timer_handle = None
        fired_all = self.gateway.fire_due_timers(wall_clock_ns())
        self._claimed()
        if not fired_all:
            self.timer_handle = self.loop.call_later(BLOCKED_RETRY_S, self._fire_timers)
            return
        self._arm_timers()

    # ---- egress ----------------------------------------------------------------------------

    def _drain_egress(self) -> None:
        """Send the egress ring's replies and events to their sessions; take its timer requests.

        The gateway frames each output on its own, and each session's bytes are written on their
        own: one output or one session that fails is reported and costs only itself, never the
        rest of the batch. That matters because the reader moves past the batch either way, and
        nothing reads an output twice: an exception escaping here would lose every reply, event
        and timer request of the batch, not delay them.
        """
        reader = self.egress_reader
        gateway = self.gateway
        dirty: list[Session] = []
        timers_changed = False
        frames = reader.poll(EGRESS_FRAMES_PER_DRAIN_MAX)
        # Until nothing is left: a poll stops at the ring's wrap (and one that met only the
        # padding returns nothing), and no ring comes for what the blp already published.
        while frames or reader.ready():
            if gateway.route_egress(frames, dirty):
                timers_changed = True
            reader.release()
            frames = reader.poll(EGRESS_FRAMES_PER_DRAIN_MAX)
        reader.release()  # past a padding frame the last poll skipped
        for session in dirty:
            try:
                session.flush()
            except Exception as error:  # one session's failure must not cost the others
                gateway.output_failed(_EGRESS_REPLY, error)
        self.egress_consumed.set(reader.position)
        if timers_changed:
            self._arm_timers()
        if (self.blocked or gateway.waiting) and self.blocked_retry is None:
            # On the next loop pass, not from here: retrying flushes, and a flush drains egress,
            # which would call back into this method as deep as the egress keeps coming.
            self.blocked_retry = self.loop.call_later(0, self._retry_blocked)

    # ---- life cycle ------------------------------------------------------------------------

    def bind(self) -> socket.socket:
        """Create the listening socket at socket.path (its directory 0750, the socket 0660).

        Raises:
            FatalError: as `daemon.unix_socket.bind_unix_socket`.
        """
        return bind_unix_socket(Path(self.config.socket.path), "socket.path", LISTEN_BACKLOG)

    async def _stand_by(self) -> bool:
        """Green of a blue-green switch-over (`daemon.standby`): True once it has taken over from
        blue (serve now), False when stopped while standing by."""
        assert self.standby is not None
        self._watch_egress()  # the blp's timer requests come through egress meanwhile
        # A SNAPSHOT record now would be green's own, in a journal that must be blue's, transformed.
        self.loop.add_signal_handler(signal.SIGUSR1, log.warning, "standing by: no snapshot before the switch")
        self.context.set_state(RoleState.RUNNING)
        green = GreenPipeline(self.writer.try_claim, self._flush, lambda: self.context.stop_requested,
                              self.counters[JOURNAL_DURABLE_INDEX].get, lambda: self.context.heartbeat.add(1))  # fmt: skip
        taken_over = await stand_by(self.standby, self.gateway, green)
        self.standby = None
        if taken_over:
            self._arm_timers()
        return taken_over

    def _watch_egress(self) -> None:
        """Serve egress as it comes: the loop watches the doorbell (`[roles.sequencer] idle`
        blocking or backoff), or polls egress on every pass (spin, yield: the latency profile,
        a core of its own; the loop then never sleeps and the blp never rings)."""
        if self.egress_polling or self.egress_waiter.started:
            return
        if self.context.role_config.idle in ("spin", "yield"):
            self.egress_polling = True
            self.loop.call_soon(self._poll_egress)
        else:
            self.egress_waiter.start()

    def _poll_egress(self) -> None:
        if not self.egress_polling:
            return
        if self.egress_reader.ready():
            self._drain_egress()
        elif self.context.role_config.idle == "yield":
            os.sched_yield()
        self.loop.call_soon(self._poll_egress)

    def _stop_egress(self) -> None:
        self.egress_polling = False
        self.egress_waiter.stop()

    async def serve(self) -> None:
        context = self.context
        if self.standby is not None and not await self._stand_by():
            self.context.set_state(RoleState.DRAINED)  # no session, no socket (blue's path!)
            return
        # Sessions of a previous incarnation of this node are closed by a record, so every replica
        # forgets them at the same index.
        while not self.gateway.sequence_node_start(wall_clock_ns()):
            await asyncio.sleep(BLOCKED_RETRY_S)
        serving_index = 0 if self.clustered else self.gateway.next_index - 1  # the node_start's
        self._flush()
        sock = self.bind()
        self._check_app_version()
        self.server = await self.loop.create_unix_server(lambda: Session(self), sock=sock)
        self._watch_egress()
        self.loop.add_signal_handler(signal.SIGUSR1, self.request_snapshot)
        # Before RUNNING, which the supervisor waits for to report it (not `log.published.index`
        # then: the node's own ADMIN records, a session rules version, may follow the node_start).
        self.counters[SEQUENCER_SERVING_INDEX].set(serving_index)
        context.set_state(RoleState.RUNNING)
        if self.clustered:
            log.info("serving %s in cluster mode: proposing to the replicator", self.config.socket.path)
        else:  # this start's node_start record: the first command gets a later index
            log.info("serving %s from index %d", self.config.socket.path, serving_index)
        beats = 0
        missed_rings = 0
        snapshot_config = self.config.snapshot
        log_snapshots = self.clustered and bool(snapshot_config.every_records or snapshot_config.every_bytes)
        while not context.stop_requested:
            beats += 1
            context.heartbeat.set(beats)
            if log_snapshots:
                self._log_snapshot_policy()
            self._check_app_version()
            self.errors.flush(time.monotonic())
            if self.egress_waiter.timeouts_with_work != missed_rings:
                missed_rings = self.egress_waiter.timeouts_with_work
                log.warning("egress: %d looks found replies waiting without a ring (a ring still on its way, "
                            "or a blp that stalled or died between its publish and its ring; each cost up to "
                            "%.0f ms)", missed_rings, self.egress_waiter.timeout_s * 1000)
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)
        await self.drain()

    async def drain(self) -> None:
        """SIGTERM: stop accepting, finish what is committed and reply to it, then close."""
        self.gateway.accepting = False
        self.draining = True
        if self.server is not None:
            self.server.close()
        for session in list(self.gateway.sessions.values()):
            if session.transport is not None:
                session.transport.pause_reading()
        self._flush()
        applied = self.counters[BLP_APPLIED_POSITION]
        egress_published = self.counters[EGRESS_PUBLISHED_POSITION]
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while time.monotonic() < deadline:
            self._drain_egress()
            if self._sequenced_is_applied(applied.get()) and self.egress_reader.position >= egress_published.get():
                break
            if self.disk_full.get() == DiskState.FULL:
                log.warning("draining on a full disk: records that did not fit were never acknowledged; clients resend them")
                break
            self.context.heartbeat.add(1)
            await asyncio.sleep(DRAIN_POLL_INTERVAL_S)
        else:
            log.warning("drain timed out after %.0f s; unreplied commands will be resent by clients", DRAIN_TIMEOUT_S)
        for session in list(self.gateway.sessions.values()):
            if session.transport is not None:
                session.transport.close()
        await asyncio.sleep(TRANSPORT_CLOSE_GRACE_S)
        Path(self.config.socket.path).unlink(missing_ok=True)
        self._stop_egress()
        self.context.set_state(RoleState.DRAINED)
        if self.clustered:
            log.info("drained: every proposal handed to the replicator")
        else:
            log.info("drained at index %d", self.gateway.next_index - 1)

    def _sequenced_is_applied(self, applied_position: int) -> bool:
        """Drain: whether what this sequencer wrote is applied, so its replies are in egress. A
        single node: the blp applied it (this ring is the log). A cluster: the replicator took
        every proposal and saw each one committed (`raft.pending_forwards` 0, stored before it
        releases the proposal ring), and the blp applied up to the commit index read after that
        (a committed record is durable and in this node's log ring, so the index covers them)."""
        if not self.clustered:
            return applied_position >= self.writer.published_position
        if self.log_ring.cursor(Role.REPLICATOR) < self.writer.published_position:
            return False
        if self.drain_commit_index is None:
            if self.counters[RAFT_PENDING_FORWARDS].get():
                return False
            self.drain_commit_index = self.counters[RAFT_COMMIT_INDEX].get()
        return self.counters[BLP_APPLIED_INDEX].get() >= self.drain_commit_index


def main() -> int:
    context = start_role(Role.SEQUENCER)
    uvloop.install()
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        with report_start_failure(context):
            sequencer = Sequencer(context, loop)
            try:
                loop.run_until_complete(sequencer.serve())
            finally:
                sequencer._stop_egress()
                sequencer.log_ring.close()
                sequencer.egress_ring.close()
    finally:
        loop.close()
        context.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
