"""A client's history: what it asked, when, and what it was told; one JSON line per operation.

    with HistoryWriter(path) as sink:
        client = RecordingClient(Client(socket_path, schema=Ledger.schema), "c1", sink)
        client.call(Deposit("alice", 5))         # recorded: invoke, completion, outcome
        pending = client.submit(Transfer(...))   # recorded when its result is taken
        client.close()                           # requests never answered are written "info"

Each line is one `Operation` (docs/cluster.md, "Checking a cluster's history"). Times are
`time.monotonic_ns()`, CLOCK_MONOTONIC: one clock for every process on a machine, so operations of
clients in different processes are ordered in real time by comparing them; it never jumps with
the wall clock (the nemesis may jump a node's wall clock; the history's clock is the observer's).

Outcomes, as Jepsen names them:
    ok    the daemon replied: the command was sequenced at `index` and `reply` is what the state
          machine answered (`status` "ok", or "rejected": a refusal is an answer too, saved and
          replayed like any reply).
    fail  definitely not applied: the command never left the client (it did not encode, or the
          window stayed full).
    info  unknown: no reply before the client gave up (timed out, connection lost, closed with
          the request in flight). It may or may not be in the log, at most once.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

import msgspec

from sequencer.client import Client, ClientError, CommandRejected, PendingRequest, TimedOut
from sequencer.egress import ReplyStatus

__all__ = [
    "OUTCOMES",
    "HistoryWriter",
    "Operation",
    "RecordingClient",
    "RecordingRequest",
    "read_history",
]

OUTCOMES = ("ok", "fail", "info")
_REPLY_STATUS_NAMES = {int(ReplyStatus.OK): "ok", int(ReplyStatus.REJECTED): "rejected",
                       int(ReplyStatus.DUPLICATE): "duplicate"}  # fmt: skip


@dataclass
class Operation:
    """One line of a history.

    `client_id` and `request_id` are the command's identity in the log (the journal's COMMAND
    records carry the session id, which SESSION_OPEN maps to the client id, and the request id).
    `payload_hex` is the encoded command exactly as sent, so the checker can tell that the record
    at that identity is this command. `reply_hex` is the reply payload the client received, and
    `reply_status` its status; both None unless the outcome is ok.
    """

    client: str  # the recorder's name for the client ("n1.c0")
    client_id: int
    request_id: int  # 0 for a "fail" that never got a request id
    op: str  # the command's type name ("Deposit")
    command: Any  # the command as JSON (msgspec.to_builtins)
    payload_hex: str
    version: int  # the command's schema version
    invoke_ns: int
    complete_ns: int | None  # None for "info": it never completed
    outcome: str  # one of OUTCOMES
    index: int | None = None  # the log index of an ok reply
    reply_status: str | None = None  # "ok" or "rejected"
    reply_hex: str | None = None
    error: str | None = None  # what the client raised, for "fail" and "info"

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome {self.outcome!r} is not one of {OUTCOMES}")

    def describe(self) -> str:
        """A one-line name for reports: who, what, when, and how it ended."""
        where = f" at index {self.index}" if self.index is not None else ""
        return (
            f"{self.client} (client {self.client_id}) request {self.request_id} {self.op} "
            f"{json.dumps(self.command, sort_keys=True)} {self.outcome}{where} "
            f"[{self.invoke_ns}..{self.complete_ns}]"
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def read_history(path: Path | str) -> list[Operation]:
    """Every operation of a JSON-lines history file.

    Raises:
        ValueError: a line is not an operation (naming the file and line).
    """
    operations = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                operations.append(Operation(**json.loads(line)))
            except (TypeError, ValueError) as error:
                raise ValueError(
                    f"{path}:{number} is not a history operation ({error}): was it written by "
                    "sequencer.history.HistoryWriter?"
                ) from error
    return operations


class HistoryWriter:
    """Appends operations to a JSON-lines file, one write and flush per line, from any thread.

    A line is flushed as it completes, so a recorder killed mid-run leaves every finished
    operation behind (the ones in flight are lost with it, as they would be for any observer).
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._file: TextIO = open(self.path, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, operation: Operation) -> None:
        line = operation.to_json() + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> HistoryWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class RecordingRequest:
    """A submitted request whose outcome is recorded when `result` ends it."""

    def __init__(self, recorder: RecordingClient, pending: PendingRequest, operation: Operation) -> None:
        self._recorder = recorder
        self.pending = pending
        self.operation = operation
        self.recorded = False

    @property
    def request_id(self) -> int:
        return self.pending.request_id

    def result(self, timeout_s: float | None = None) -> Any:
        """The reply, as `PendingRequest.result`; records ok, or info when the client gave up.

        A `TimedOut` is not recorded: the request stays in flight and the caller may wait again;
        `RecordingClient.close` records whatever is still unanswered as info.
        """
        try:
            value = self.pending.result(timeout_s)
        except CommandRejected:
            self._record_reply()
            raise
        except TimedOut:
            raise
        except ClientError as error:
            self._recorder._finish(self, "info", error=repr(error))
            raise
        self._record_reply()
        return value

    def _record_reply(self) -> None:
        # The raw reply frame (its log index and payload bytes) is what the checker compares with
        # the replay; the decoded value alone has lost the index.
        reply = self.pending._reply
        assert reply is not None, self.pending.request_id
        self.operation.index = reply.index
        self.operation.reply_status = _REPLY_STATUS_NAMES.get(reply.status, str(reply.status))
        self.operation.reply_hex = bytes(reply.payload).hex()
        self._recorder._finish(self, "ok")


class RecordingClient:
    """Wraps a `sequencer.client.Client`: every `submit`/`call` becomes a line of the history.

    Use it from one thread, as the client. The wrapped client stays available as `.client`.
    """

    def __init__(self, client: Client, name: str, sink: HistoryWriter) -> None:
        self.client = client
        self.name = name
        self.sink = sink
        self._unfinished: dict[int, RecordingRequest] = {}

    def submit(self, command: Any, timeout_s: float | None = None) -> RecordingRequest:
        """As `Client.submit`; an encode error or a full window is recorded as fail."""
        invoke_ns = time.monotonic_ns()
        operation = Operation(
            client=self.name,
            client_id=self.client.client_id,
            request_id=0,
            op=type(command).__name__,
            command=msgspec.to_builtins(command) if not isinstance(command, bytes) else command.hex(),
            payload_hex="",
            version=0,
            invoke_ns=invoke_ns,
            complete_ns=None,
            outcome="info",
        )
        try:
            pending = self.client.submit(command, timeout_s)
        except (TimedOut, TypeError, ValueError) as error:
            operation.complete_ns = time.monotonic_ns()
            operation.outcome = "fail"
            operation.error = repr(error)
            self.sink.write(operation)
            raise
        operation.request_id = pending.request_id
        operation.version = pending.version
        operation.payload_hex = pending.payload.hex()
        request = RecordingRequest(self, pending, operation)
        self._unfinished[pending.request_id] = request
        return request

    def call(self, command: Any, timeout_s: float | None = None) -> Any:
        """As `Client.call`, recorded."""
        return self.submit(command, timeout_s).result(timeout_s)

    def _finish(self, request: RecordingRequest, outcome: str, error: str | None = None) -> None:
        if request.recorded:
            return
        request.recorded = True
        self._unfinished.pop(request.request_id, None)
        operation = request.operation
        operation.outcome = outcome
        operation.error = error
        operation.complete_ns = time.monotonic_ns() if outcome == "ok" else None
        self.sink.write(operation)

    def unfinished(self) -> Iterator[RecordingRequest]:
        yield from list(self._unfinished.values())

    def close(self) -> None:
        """Closes the client; each request still unanswered is recorded info (unknown)."""
        for request in self.unfinished():
            if request.pending.done():
                request._record_reply()  # answered, never asked for: still an ok
            else:
                self._recorder_info(request)
        self.client.close()

    def _recorder_info(self, request: RecordingRequest) -> None:
        self._finish(request, "info", error="no reply before the client was closed")

    def __enter__(self) -> RecordingClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
