"""An integration gateway: the log's requests to an external system, its answers back as commands.

An integration gateway (not the sequencer's admission core in `sequencer/gateway/`) is a client
process outside the deterministic core. It follows the node's committed events through a
catch-up subscription; for each *integration request* the state machine published (an event
with a `key`, docs/integration.md) it asks the external system, with the key as the idempotency
key, and submits the final answer as a command. It decides nothing: the state machine's timers
decide what happens when no answer comes (retry with the same key, give up, compensate), and
the state machine recognises a late or repeated answer by its key.

Theory of operation:

- **No position of its own.** Where to resume is derived from the ledger's state: the app's
  pending-requests query (`ExternalSystem.pending_query`) lists, as of some index Q, the current
  request of every action still unanswered. Those are all the gateway has to do for the log up
  to Q; everything after Q comes from a subscription from Q + 1. A request answered before Q
  needs nothing (its answer is in the log). So the gateway stores nothing, cannot disagree with
  the ledger, and may restart anywhere; the price is one query per start.
- **Start-up agreement with the external system.** Before calling, the gateway asks the external
  system which keys it has already seen (`recall`). A seen key with a final answer is answered
  from that record, not called again; a seen key still in progress is left to the state
  machine's timer; only unseen keys are called. So a gateway killed between the call and the
  command neither calls twice nor loses the answer. It asks before every batch, not only at
  start-up: a replica behind the one that fed the previous run may hand it requests that run
  had already called.
- **Answers are commands.** Each run has its own client id, so the client library's resends
  after a reconnect are applied once (the node's dedup table); an answer resent by a later run
  (or given twice by the external system) is recognised by the state machine from the key.
- **A call that gets no final answer is dropped** (the external system is down, slow past the
  call's timeout, or failed): the request's timer fires in the state machine, which publishes
  the next request (a retry with the same key, or a cancel), and the gateway meets it then.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar, Union

from sequencer.client import Client, CommandRejected, TimedOut, new_client_id
from sequencer.client.replica import ItemKind

__all__ = ["BATCH_REQUESTS_MAX", "ExternalSystem", "GatewayStats", "IntegrationGateway"]

log = logging.getLogger("sequencer.integration")

# Requests handled per batch (one recall covers them): a GET with 256 keys is a few KiB.
BATCH_REQUESTS_MAX = 256
# A batch closes this long after its first request: a request waits at most this for its call,
# far below any sensible answer timeout of the state machine's (the example's: 200 ms and up).
BATCH_WAIT_S_MAX = 0.02
# Calls to the external system at once, each on its own key (a batch keeps one request per key):
# with calls of ~50 ms, 16 at once carry ~300 requests/s, well past the example's rate.
CALLS_IN_FLIGHT_MAX = 16
PENDING_PAGES_MAX = 10_000  # pending_query pages at start-up (x its page size: 10M requests)
# Answer commands submitted before the gateway waits for their replies: inside the client's
# window (in_flight_max, 256 by default), so a batch never stalls on window room.
ANSWERS_IN_FLIGHT_MAX = 128
IDLE_WAIT_S = 0.5  # the longest wait for an item before `stop` is looked at again


class ExternalSystem:
    """What a gateway needs to know about one external system; subclass it.

    Attributes:
        request_types: the app's event types that are integration requests (each has `key`).
        pending_query: the app's query that returns, a page at a time (`after_key`, `limit`),
            the current request of each pending action, in key order.
    """

    request_types: ClassVar[tuple[type[Any], ...]] = ()
    pending_query: ClassVar[str] = ""

    def recall(self, keys: list[int]) -> dict[int, Any]:
        """The keys among `keys` the external system has seen: key -> its final answer, or
        None when seen but not final yet. Raise OSError when it cannot be asked."""
        raise NotImplementedError

    def call(self, request: Any) -> Any | None:
        """Performs `request` with `request.key` as the idempotency key; returns the final
        answer, or None when there is none (down, timed out, failed): the state machine's timer
        then decides."""
        raise NotImplementedError

    def answer_command(self, request: Any, answer: Any) -> Any:
        """The app command that hands `answer` (for `request`'s key) to the state machine."""
        raise NotImplementedError

    def close(self) -> None:
        """Releases connections."""


class GatewayStats:
    """What a run did, for its log lines and the tests."""

    def __init__(self) -> None:
        self.requests = 0  # integration requests met (from the pending query and the stream)
        self.recalled = 0  # answered from the external system's record, without a call
        self.called = 0  # calls made
        self.unanswered = 0  # calls or recalls without a final answer: left to the timers
        self.answers = 0  # answer commands applied
        self.answers_refused = 0  # answer commands the app refused (e.g. a key long finished)

    def __repr__(self) -> str:
        return f"GatewayStats({vars(self)})"


class IntegrationGateway:
    """Runs one external system's requests; see the module docstring.

    Args:
        socket_path: the node's client socket (its WELCOME names the query replicas).
        schema: the app's schema.
        system: the external system.
        reconnect_timeout_s: how long the node or its replicas may be unreachable before `run`
            raises (a supervisor restarts the gateway).
        on_batch: called after each batch (tests and progress lines).
    """

    def __init__(
        self,
        socket_path: str,
        schema: Any,
        system: ExternalSystem,
        *,
        reconnect_timeout_s: float = 60.0,
        on_batch: Callable[[GatewayStats], object] | None = None,
    ) -> None:
        if not system.request_types or not system.pending_query:
            raise ValueError(
                f"{type(system).__name__} must name its request_types and pending_query "
                "(see sequencer.integration.ExternalSystem)"
            )
        self.socket_path = socket_path
        self.schema = schema
        self.system = system
        self.reconnect_timeout_s = reconnect_timeout_s
        self.on_batch = on_batch
        self.stats = GatewayStats()
        self.stop_requested = threading.Event()
        self._request_union: Any = Union[system.request_types]  # noqa: UP007 (a runtime value)
        self._answers: list[tuple[Any, Any]] = []
        self._calls = concurrent.futures.ThreadPoolExecutor(CALLS_IN_FLIGHT_MAX, "integration-call")
        self._ran = False

    def stop(self) -> None:
        """Asks `run` to return after the batch in hand (safe from a signal handler)."""
        self.stop_requested.set()

    def run(self) -> GatewayStats:
        """Agrees on the pending requests, then follows the stream until `stop`.

        Raises:
            ConnectionLost: the node or its replicas were unreachable for reconnect_timeout_s.
            SubscriptionError, QueryError: the node cannot serve the stream or the query.
        """
        assert not self._ran, "an IntegrationGateway runs once; make a new one to run again"
        self._ran = True
        client_id = new_client_id()  # per run: see the module docstring, "Answers are commands"
        with Client(self.socket_path, client_id=client_id, schema=self.schema,
                    timeout_s=self.reconnect_timeout_s,
                    reconnect_timeout_s=self.reconnect_timeout_s,
                    client_name="integration-gateway") as client:  # fmt: skip
            try:
                self._follow(client)
            finally:
                self._calls.shutdown()
                self.system.close()
        return self.stats

    def _follow(self, client: Client) -> None:
        pending, start_index = self._pending(client)
        log.info("integration gateway: %d pending requests as of index %d; following from %d",
                 len(pending), start_index, start_index + 1)  # fmt: skip
        for first in range(0, len(pending), BATCH_REQUESTS_MAX):
            self._handle(client, pending[first : first + BATCH_REQUESTS_MAX])
        with client.subscribe(start_index + 1, reconnect_timeout_s=self.reconnect_timeout_s) as stream:
            while not self.stop_requested.is_set():
                self._handle(client, self._next_batch(stream))
        self._settle_answers(0)

    def _pending(self, client: Client) -> tuple[list[Any], int]:
        """The pending requests, paged, and the lowest index a page reflects."""
        requests: list[Any] = []
        start_index: int | None = None
        after_key = 0
        result_type: Any = list[self._request_union]  # type: ignore[name-defined]
        for _ in range(PENDING_PAGES_MAX):
            page = client.query(self.system.pending_query, {"after_key": after_key},
                                consistency="local", result_type=result_type)  # fmt: skip
            start_index = page.index if start_index is None else min(start_index, page.index)
            if not page.value:
                break
            requests.extend(page.value)
            after_key = page.value[-1].key
        else:
            raise RuntimeError(f"more than {PENDING_PAGES_MAX} pages of pending requests")
        assert start_index is not None
        return requests, start_index

    def _next_batch(self, stream: Any) -> list[Any]:
        """The requests that arrive within BATCH_WAIT_S_MAX of the first, the latest per key
        (a later request of a key supersedes an earlier one: a cancel makes a pay moot, a retry
        repeats it)."""
        latest: dict[int, Any] = {}
        closes_at = math.inf
        while len(latest) < BATCH_REQUESTS_MAX and not self.stop_requested.is_set():
            now = time.monotonic()
            if now >= closes_at:
                break
            try:
                item = stream.next(min(closes_at - now, IDLE_WAIT_S))
            except TimedOut:
                continue
            request: Any = item.event
            if item.kind == ItemKind.EVENT and isinstance(request, self.system.request_types):
                latest.pop(request.key, None)
                latest[request.key] = request
                closes_at = min(closes_at, time.monotonic() + BATCH_WAIT_S_MAX)
        return list(latest.values())

    def _handle(self, client: Client, requests: list[Any]) -> None:
        if not requests:
            return
        stats = self.stats
        stats.requests += len(requests)
        system = self.system
        try:
            seen = system.recall(sorted({request.key for request in requests}))
        except OSError as error:
            # Without knowing what it has seen, calling could call twice: leave the batch to
            # the state machine's timers, which publish the requests again.
            log.warning("integration gateway: cannot ask the external system what it has seen "
                        "(%s); %d requests left to their timers", error, len(requests))  # fmt: skip
            stats.unanswered += len(requests)
            return
        answers: list[tuple[Any, Any]] = []
        calls: list[tuple[Any, concurrent.futures.Future[Any]]] = []
        for request in requests:
            if request.key not in seen:
                calls.append((request, self._calls.submit(system.call, request)))
            elif seen[request.key] is None:
                stats.unanswered += 1  # seen, not final: the timer asks again later
            else:
                stats.recalled += 1
                answers.append((request, seen[request.key]))
        stats.called += len(calls)
        for request, call in calls:
            answer = call.result()
            if answer is None:
                stats.unanswered += 1
            else:
                answers.append((request, answer))
        for request, answer in answers:
            self._answers.append((request.key, client.submit(system.answer_command(request, answer))))
            self._settle_answers(ANSWERS_IN_FLIGHT_MAX)
        self._settle_answers(0)
        if self.on_batch is not None:
            self.on_batch(stats)

    def _settle_answers(self, keep_max: int) -> None:
        """Waits for answer replies until at most `keep_max` are outstanding."""
        while len(self._answers) > keep_max:
            key, pending = self._answers.pop(0)
            try:
                pending.result()
                self.stats.answers += 1
            except CommandRejected as rejected:
                self.stats.answers_refused += 1
                log.info("integration gateway: the answer for key %d was refused: %s", key, rejected)
