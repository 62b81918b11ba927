"""The bridge loop: a source node's events, as commands to a target node, exactly once.

Theory of operation
-------------------

A bridge reads one service's committed events (a `Source`: the journal applied in-process, or
the catch-up subscription; `sequencer.projection`) and sends, for each event the `Route` turns
into a command, that command to the target node. Exactly once across a crash of either node or
of the bridge comes from three choices, none of which needs the bridge to store anything:

1. One client id per stream (`stream_client_id(stream)`, a stable hash of its name) and the
   source's log index as the request id (`Client.submit(request_id=...)`): the target's dedup
   table answers a redelivery with its saved reply or DUPLICATE, and never applies it twice.
2. The target records the stream's last source index in its own state, in the `apply` of each
   bridged command (`sequencer.bridge.inbox.Inbox`): a redelivery is recognised even after the
   dedup table forgot the client id, and the position is exactly what was applied.
3. At start the bridge asks the target for that position (`BridgePosition`, through the log, so
   it counts everything applied before it) and reads the source from the index after it.

Order per stream is kept: one session sends the commands in source-index order, the node
sequences one session's commands in the order they arrive, and a resend after a reconnect
repeats them in the same order. Request ids only go up, so an id skipped could never be applied
later: the bridge never skips one it has not sent (a route may turn at most one event of a
source index into a command; a second raises `BridgeError`). A second copy of a bridge for the
same stream (an old session the node has not yet closed, or an operator's mistake) sends the
same commands in the same order, so the interleaving of the two still applies each once.

The route must be deterministic (the same event gives the same command): a redelivery must be
the same command as the original.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from sequencer.bridge.inbox import STREAM_BYTES_MAX, BridgePosition, stream_client_id
from sequencer.projection.projection import SourceEvent

__all__ = [
    "GATEWAY_REFUSALS",
    "IN_FLIGHT_DEFAULT",
    "Bridge",
    "BridgeError",
    "BridgeProgress",
    "Route",
    "Source",
]

log = logging.getLogger("seqd.bridge")

# Commands in flight to the target: enough to keep a pipelined session busy (a few ms of the
# target's work), small enough that a restart resends little. The client library's window caps
# it (IN_FLIGHT_LIMIT_MAX), and it counts in request ids, which a bridge skips.
IN_FLIGHT_DEFAULT = 256
# A refusal the target's gateway gives before the log (index 0): resending gets it again, and
# skipping the command would lose it, so the bridge stops and says why.
GATEWAY_REFUSALS = frozenset({"bad_request_id", "command_too_large", "unknown_version",
                              "window_exceeded"})  # fmt: skip
# How long one wait on the target lasts before the bridge reports its progress and checks for a
# stop (it then waits again: nothing in flight is given up).
WAIT_SLICE_S = 1.0
# The wait on the oldest command in flight while the source has nothing new: short, since a new
# event waits behind it (the source's own idle wait is 10-50 ms).
IDLE_WAIT_S = 0.02


class BridgeError(Exception):
    """The bridge cannot go on without losing or reordering a command; the message says why."""


class Route(Protocol):
    """Which of the source's events become which of the target's commands."""

    def command_for(self, stream: str, source_index: int, event: Any) -> Any | None:
        """The target's command for `event` (published at `source_index`), or None to skip it.

        Deterministic; the command carries `stream` and `source_index` for the target's Inbox.
        """
        ...


class Source(Protocol):
    def read(self, from_index: int) -> Iterable[SourceEvent | None]: ...


@dataclass
class BridgeProgress:
    """What `seqd bridge status` shows; updated as the bridge runs."""

    stream: str
    client_id: int
    resumed_after: int = 0  # the target's position when this run started
    read_index: int = 0  # the last source index read
    delivered_index: int = 0  # every command up to this source index has its reply
    in_flight: int = 0
    delivered: int = 0  # replies this run (redeliveries included)
    redeliveries: int = 0  # of those, answered DUPLICATE: applied before
    rejected: int = 0  # the target's app refused the command (it was applied as a refusal)
    last_rejection: str = ""


class Bridge:
    """One stream from a source node to a target node.

    Args:
        route: the source's events as the target's commands.
        stream: the stream's name (1 to STREAM_BYTES_MAX bytes); its client id is a hash of it.
        target_socket: the target node's client socket.
        target_schema: the target app's schema.
        in_flight_max: commands in flight (the window, in request ids).
        reconnect_timeout_s: how long one wait for the target lasts before the bridge reports
            and waits again.
        on_progress: called with the progress after each event read, whenever the source is
            idle and after each wait (often: it decides itself how often to act).
    """

    def __init__(
        self,
        route: Route,
        stream: str,
        target_socket: str,
        target_schema: Any,
        *,
        in_flight_max: int = IN_FLIGHT_DEFAULT,
        reconnect_timeout_s: float = 5.0,
        on_progress: Callable[[BridgeProgress], object] | None = None,
    ) -> None:
        if not stream or len(stream.encode()) > STREAM_BYTES_MAX:
            raise ValueError(f"stream {stream!r}: a stream name is 1 to {STREAM_BYTES_MAX} bytes")
        self.route = route
        self.stream = stream
        self.target_socket = target_socket
        self.target_schema = target_schema
        self.in_flight_max = in_flight_max
        self.reconnect_timeout_s = reconnect_timeout_s
        self.on_progress = on_progress
        self.progress = BridgeProgress(stream, stream_client_id(stream))
        self.resumed = False  # the target's position is known and the source is being read

    def position(self, stop: Callable[[], bool] = lambda: False) -> int:
        """The last source index the target applied for this stream (waits for the target).

        Returns -1 when `stop()` became true first.
        """
        from sequencer.client import Client, ClientError

        while not stop():
            try:
                # A client id of its own: the stream's ids are source indexes, and the next one
                # is what this asks.
                with Client(self.target_socket, schema=self.target_schema, timeout_s=WAIT_SLICE_S,
                            reconnect_timeout_s=self.reconnect_timeout_s) as client:  # fmt: skip
                    reply = client.call(BridgePosition(self.stream))
                    position: int = reply.source_index
                    return position
            except (ClientError, OSError) as error:
                log.info("bridge %s: the target at %s does not answer yet (%s); waiting",
                         self.stream, self.target_socket, error)  # fmt: skip
                self._report()
        return -1

    def run(self, source: Source, stop: Callable[[], bool]) -> BridgeProgress:
        """Deliver until `stop()` is true (checked whenever the source is idle), then wait for
        the replies of what is in flight (unless `stop` stays true and the target is gone: the
        next run resends it).

        Raises:
            BridgeError: a command cannot be delivered in order (see the module docstring).
            Whatever the source raises (its node no longer holds the index, a bad event).
        """
        resume = self.position(stop)
        if resume < 0:
            return self.progress
        progress = self.progress
        progress.resumed_after = progress.read_index = progress.delivered_index = resume
        self.resumed = True
        log.info("bridge %s: the target has applied up to source index %d; reading from %d",
                 self.stream, resume, resume + 1)  # fmt: skip
        pending: collections.deque[tuple[int, Any]] = collections.deque()
        last_sent = resume
        client = self._connect(resume + 1, stop)
        if client is None:
            return progress
        with client:
            for item in source.read(resume + 1):
                if item is None:
                    self._wait_a_little(client, pending)
                    self._harvest(pending, last_sent)
                    self._report()
                    if stop():
                        break
                    continue
                progress.read_index = item.index
                self._report()  # on_progress is called per event: it keeps its own pace
                command = self.route.command_for(self.stream, item.index, item.event)
                if command is None:
                    continue
                if item.index <= last_sent:
                    raise BridgeError(
                        f"the route made a second command for source index {item.index} "
                        f"({command!r}); a bridge sends at most one command per source index "
                        "(its request id): combine them in one command in the route"
                    )
                request = self._submit(client, command, item.index, stop)
                if request is None:
                    break  # stopping while the target is away: the next run sends it
                pending.append((item.index, request))
                last_sent = item.index
                self._harvest(pending, last_sent)
            self._drain(client, pending, last_sent, stop)
        self._report()
        return progress

    # -- inside ----------------------------------------------------------------------------------

    def _connect(self, first_request_id: int, stop: Callable[[], bool]) -> Any:
        """The stream's client, connected (waits for the target); None if `stop()` first."""
        from sequencer.client import Client, ClientError

        while not stop():
            try:
                return Client(self.target_socket, client_id=self.progress.client_id,
                              schema=self.target_schema, first_request_id=first_request_id,
                              in_flight_max=self.in_flight_max, timeout_s=WAIT_SLICE_S,
                              reconnect_timeout_s=self.reconnect_timeout_s,
                              client_name=f"bridge {self.stream}")  # fmt: skip
            except (ClientError, OSError) as error:
                log.info("bridge %s: cannot reach the target yet (%s); waiting", self.stream, error)
                self._report()
        return None

    def _submit(self, client: Any, command: Any, source_index: int, stop: Callable[[], bool]) -> Any:
        from sequencer.client import ConnectionLost, TimedOut

        while True:
            try:
                return client.submit(command, request_id=source_index)
            except (TimedOut, ConnectionLost) as error:
                # The window is full and the target does not answer: nothing was submitted; the
                # same request id is tried again (ids below it stay in flight).
                log.info("bridge %s: waiting for the target (%s)", self.stream, error)
                self._report()
                if stop():
                    return None

    def _wait_a_little(self, client: Any, pending: collections.deque[tuple[int, Any]]) -> None:
        """The source is idle: send what is queued and take replies; with commands in flight,
        a short blocking wait, which is what reconnects to a restarted target and resends them
        (`poll` only drops a lost connection)."""
        from sequencer.client import ClientError

        try:
            if pending:
                pending[0][1].result(IDLE_WAIT_S)
            else:
                client.poll()
        except ClientError as error:  # a rejection is settled by _harvest; a timeout waits on
            if not pending or not pending[0][1].done():
                log.debug("bridge %s: %s", self.stream, error)

    def _harvest(self, pending: collections.deque[tuple[int, Any]], last_sent: int) -> None:
        """Take the replies that have come, in order."""
        while pending and pending[0][1].done():
            self._settle(*pending.popleft())
        progress = self.progress
        progress.in_flight = len(pending)
        progress.delivered_index = pending[0][0] - 1 if pending else last_sent

    def _drain(self, client: Any, pending: collections.deque[tuple[int, Any]], last_sent: int,
               stop: Callable[[], bool]) -> None:  # fmt: skip
        from sequencer.client import ClientError

        while pending:
            try:
                pending[0][1].result(WAIT_SLICE_S)
            except ClientError:
                pass  # settled below (a rejection), or still waiting (a timeout)
            if not pending[0][1].done() and stop():
                log.info("bridge %s: stopping with %d commands unanswered; the next run resends "
                         "them", self.stream, len(pending))  # fmt: skip
                return
            self._harvest(pending, last_sent)
            self._report()

    def _settle(self, source_index: int, request: Any) -> None:
        from sequencer.client import CommandRejected, Duplicate

        progress = self.progress
        progress.delivered += 1
        try:
            request.result(0)
        except Duplicate:
            progress.redeliveries += 1
        except CommandRejected as rejected:
            if rejected.code in GATEWAY_REFUSALS:
                raise BridgeError(
                    f"the target refused the command for source index {source_index} before its "
                    f"log ({rejected.code}: {rejected.message}); resending gets the same answer "
                    "and skipping it would lose it: fix the route or the target, then restart "
                    "the bridge"
                ) from None
            progress.rejected += 1
            progress.last_rejection = f"{source_index}: {rejected.code}: {rejected.message}"
            log.warning("bridge %s: the target refused the command for source index %d: %s: %s",
                        self.stream, source_index, rejected.code, rejected.message)  # fmt: skip

    def _report(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.progress)
