"""The exporter: the committed event stream into a NATS JetStream stream, exactly once.

    exporter = JetStreamExporter(["nats://127.0.0.1:4222"], stream="LEDGER",
                                 subject_prefix="seqd.ledger", log_id="n1")
    exporter.run(JournalSource(Ledger, journal_dir, follow=True, commit_index=...))

Theory of operation. A session connects (no automatic reconnect: a connection lost is a session
ended), makes sure the stream exists with a large enough duplicate window, reads the stream's
last message and resumes from the position its headers record (`message.resume_position`): the
stream is the only record of how far the export got. It then reads the source from that index,
skips the events of it already exported, and publishes one message per event, in batches of up
to `batch_events_max`: every message of a batch but the last is published without asking for an
ack, the last with `publish_async`, and up to `in_flight_max` messages await their batch's ack.
An ack per message costs nats-py ~100 us of CPU (a reply parsed, a future resolved); one per
batch makes the export ~6x cheaper (benches/export.py). The last message's ack vouches for the
whole batch because of point 2 below: it was stored at the sequence predicted for it only if
its predecessor was the stream's last message, and so on back to the batch's first.

Three things make each event land once and in order, whatever dies when:

1. The stream says where to resume, so an exporter that restarts (or reconnects) never skips
   what the stream lacks: a message lost with nats-server (killed before it wrote its buffer, or
   a power loss with lazy fsync) is published again, with the same content at the same stream
   sequence.
2. Every message carries `Nats-Expected-Last-Sequence`: the stream sequence its predecessor must
   have. The exporter owns the stream, so it knows each message's sequence in advance; a message
   whose predecessor is missing (lost in flight, refused) is refused by the server instead of
   being stored after a gap, and so is every message after it (the chain is broken), the
   batch's last included. The exporter sees the refusal in that ack and starts a new session,
   which resumes from the stream.
3. Every message carries `Nats-Msg-Id` (`<log>:<index>:<ordinal>`). A message can be stored
   after the session that sent it ended: the server still reads what the dead connection had
   sent. The new session may have read the stream's last message before that, and sends the
   same message again; JetStream drops it as a duplicate (its dedup check comes before the
   sequence check) and acks it with `duplicate`. The dedup window must cover that overlap: the
   copies of one message are at most one session restart apart (the reconnect wait plus an ack
   timeout, seconds), so the exporter requires a window of at least DUPLICATE_WINDOW_S_MIN and
   creates the stream with JetStream's default, 2 minutes. A resend after the window cannot
   happen: by then the original is in the stream and the resume reads past it.

Every ack is checked against the sequence the exporter predicted; a mismatch means something
else writes to the stream, and stops the exporter (ExportError) rather than guessing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from sequencer.export.message import (
    HEADER_INDEX,
    LOG_ID,
    SUBJECT_TOKEN,
    ExportError,
    encode_message,
    resume_position,
)
from sequencer.projection.projection import Position, SourceEvent
from sequencer.projection.projector import Source

__all__ = [
    "ACK_TIMEOUT_S_DEFAULT",
    "BATCH_EVENTS_DEFAULT",
    "DUPLICATE_WINDOW_S_DEFAULT",
    "DUPLICATE_WINDOW_S_MIN",
    "IN_FLIGHT_DEFAULT",
    "IN_FLIGHT_MAX",
    "NATS_MISSING",
    "JetStreamExporter",
    "sequence_of_index",
]

log = logging.getLogger("seqd.export")

NATS_MISSING = "the exporter needs nats-py: pip install 'seqd[export]'"

# Publishes awaiting their ack. A local JetStream ack takes ~0.1-1 ms; at 10-50k messages/s a
# window of 1024 covers 20-100 ms of round trip, so the exporter never waits on one ack. Each
# message in flight holds its future and headers (~1 KiB): IN_FLIGHT_MAX bounds that to 64 MiB.
IN_FLIGHT_DEFAULT = 1024
IN_FLIGHT_MAX = 65_536
# Messages published before the loop yields to the event loop (which then writes them and reads
# the acks): small enough that acks flow while a long backlog is published.
BATCH_EVENTS_DEFAULT = 256
BATCH_EVENTS_MAX = IN_FLIGHT_MAX
# See the module docstring, point 3: a window covers the resend of one session restart, which
# takes seconds (RECONNECT_WAIT_S_MAX + an ack timeout + a stream read); 60 s is ten times that.
DUPLICATE_WINDOW_S_MIN = 60.0
DUPLICATE_WINDOW_S_DEFAULT = 120.0  # JetStream's own default
ACK_TIMEOUT_S_DEFAULT = 5.0  # no ack for this long: the session is dead, start another
API_TIMEOUT_S = 5.0  # a stream info or message get
CONNECT_TIMEOUT_S = 2
RECONNECT_WAIT_S_MIN = 0.05
RECONNECT_WAIT_S_MAX = 1.0  # doubling between failed sessions, up to this
EXPECTED_LAST_SEQUENCE = "Nats-Expected-Last-Sequence"
EXPECTED_STREAM = "Nats-Expected-Stream"
assert ACK_TIMEOUT_S_DEFAULT + RECONNECT_WAIT_S_MAX + API_TIMEOUT_S < DUPLICATE_WINDOW_S_MIN / 4
assert BATCH_EVENTS_DEFAULT <= IN_FLIGHT_DEFAULT


class _Batch(NamedTuple):
    """Messages published in a row; only the last one asked for an ack."""

    future: asyncio.Future[Any]  # the last message's ack
    position: Position  # the export's position once the last message is in
    sequence: int  # the stream sequence predicted for the last message
    messages: int


class _SessionLost(Exception):
    """The connection or the stream failed: end the session, start another."""


class JetStreamExporter:
    """See the module docstring.

    Args:
        servers: NATS URLs.
        stream: the JetStream stream, the exporter's own (nothing else may publish into it).
        subject_prefix: each event goes to `<subject_prefix>.<event type>`; the stream's
            subjects must be `<subject_prefix>.>`.
        log_id: names the log in message ids and headers (the node's name, or `cluster-<id>`).
        create_stream: create the stream if it does not exist (file storage, `replicas`).
        replicas: the stream's replicas when it is created.
        duplicate_window_s: its duplicate window when it is created (>= DUPLICATE_WINDOW_S_MIN).
        from_index: where the export starts when the stream is empty.
        in_flight_max: publishes awaiting their ack, 1 to IN_FLIGHT_MAX.
        batch_events_max: messages published between two turns of the event loop.
        ack_timeout_s: an ack that takes longer ends the session.
        on_ack: called with the position each ack confirms (a batch's last message), in order.
    """

    def __init__(
        self,
        servers: list[str],
        stream: str,
        subject_prefix: str,
        log_id: str,
        *,
        create_stream: bool = True,
        replicas: int = 1,
        duplicate_window_s: float = DUPLICATE_WINDOW_S_DEFAULT,
        from_index: int = 1,
        in_flight_max: int = IN_FLIGHT_DEFAULT,
        batch_events_max: int = BATCH_EVENTS_DEFAULT,
        ack_timeout_s: float = ACK_TIMEOUT_S_DEFAULT,
        on_ack: Callable[[Position], object] | None = None,
    ) -> None:
        problems = []
        if not servers:
            problems.append("servers is empty: name at least one NATS URL, e.g. nats://127.0.0.1:4222")
        if not SUBJECT_TOKEN.fullmatch(stream):
            problems.append(f"stream = {stream!r}: a stream name is letters, digits, '_' and '-'")
        tokens = subject_prefix.split(".")
        if not all(SUBJECT_TOKEN.fullmatch(token) for token in tokens):
            problems.append(f"subject_prefix = {subject_prefix!r}: tokens of letters, digits, '_' and '-' "
                            "joined by '.', e.g. 'seqd.ledger'")  # fmt: skip
        if not LOG_ID.fullmatch(log_id):
            problems.append(f"log_id = {log_id!r}: 1-64 letters, digits, '_' and '-'")
        if duplicate_window_s < DUPLICATE_WINDOW_S_MIN:
            problems.append(f"duplicate_window_s = {duplicate_window_s} < DUPLICATE_WINDOW_S_MIN = "
                            f"{DUPLICATE_WINDOW_S_MIN}: the window must cover a session restart's resend")  # fmt: skip
        if not 1 <= in_flight_max <= IN_FLIGHT_MAX:
            problems.append(f"in_flight_max = {in_flight_max}: must be 1 to {IN_FLIGHT_MAX}")
        if not 1 <= batch_events_max <= min(BATCH_EVENTS_MAX, in_flight_max):
            problems.append(f"batch_events_max = {batch_events_max}: must be 1 to in_flight_max "
                            f"({in_flight_max}): a batch is acknowledged as a whole")  # fmt: skip
        if from_index < 1:
            problems.append(f"from_index = {from_index}: log indexes start at 1")
        if not 0 < ack_timeout_s < DUPLICATE_WINDOW_S_MIN / 4:
            problems.append(f"ack_timeout_s = {ack_timeout_s}: must be above 0 and below "
                            f"{DUPLICATE_WINDOW_S_MIN / 4} (a quarter of the smallest duplicate window)")  # fmt: skip
        if problems:
            raise ExportError("; ".join(problems))
        self.servers = list(servers)
        self.stream = stream
        self.subject_prefix = subject_prefix
        self.log_id = log_id
        self.create_stream = create_stream
        self.replicas = replicas
        self.duplicate_window_s = duplicate_window_s
        self.from_index = from_index
        self.in_flight_max = in_flight_max
        self.batch_events_max = batch_events_max
        self.ack_timeout_s = ack_timeout_s
        self.on_ack = on_ack
        self.stopping = False  # set (e.g. from a signal handler) to end `run` once its acks are in
        self.acked: Position | None = None  # the position of the last message acknowledged
        self.published = 0  # messages published, acknowledged or not
        self.duplicates = 0  # acks that said "duplicate": resends the window caught
        self.sessions = 0  # sessions started; more than one: a failure was recovered from
        self.in_flight = 0  # messages published in this session whose ack is not yet read
        self._message_bytes_max: int | None = None  # the stream's max_msg_size, if it has one

    def stop(self) -> None:
        self.stopping = True

    def run(self, source: Source, until_caught_up: bool = False) -> Position:
        """Export the source's events until `stop()` (or, with `until_caught_up`, until the
        source has nothing more for now and every message is acknowledged); returns the
        position the stream holds. Failures of NATS (a lost connection, a server restarting, a
        refused message) start a new session after a short wait, for ever.

        Raises:
            ExportError: the stream is not this log's, cannot be created, has too small a
                duplicate window, or another writer publishes into it.
        """
        return asyncio.run(self.run_async(source, until_caught_up))

    async def run_async(self, source: Source, until_caught_up: bool = False) -> Position:
        """`run`, inside an event loop of your own."""
        try:
            import nats  # noqa: F401
        except ImportError:
            raise ExportError(NATS_MISSING) from None
        wait_s = RECONNECT_WAIT_S_MIN
        while True:
            self.sessions += 1
            try:
                return await self._session(source, until_caught_up)
            except _SessionLost as lost:
                log.warning("export session %d to %s ended: %s; starting another in %.2f s",
                            self.sessions, self.stream, lost, wait_s)  # fmt: skip
            if self.stopping:
                return self.acked or Position(0, 0)
            await asyncio.sleep(wait_s)
            wait_s = min(RECONNECT_WAIT_S_MAX, wait_s * 2)

    # -- one session ----------------------------------------------------------------------------

    async def _session(self, source: Source, until_caught_up: bool) -> Position:
        import nats
        import nats.errors
        import nats.js.errors

        pending: deque[_Batch] = deque()
        self.in_flight = 0

        async def on_closed() -> None:
            # The connection is gone for good (no reconnect): fail what awaits an ack now
            # rather than at its timeout.
            for future, *_rest in pending:
                if not future.done():
                    future.set_exception(_SessionLost("the connection to NATS closed"))

        async def on_error(error: Exception) -> None:
            log.debug("nats: %r", error)

        try:
            connection = await nats.connect(
                self.servers, allow_reconnect=False, connect_timeout=CONNECT_TIMEOUT_S,
                max_reconnect_attempts=0, closed_cb=on_closed, disconnected_cb=on_closed,
                error_cb=on_error,
            )  # fmt: skip
        except (TimeoutError, nats.errors.Error, OSError) as error:
            raise _SessionLost(f"cannot connect to {self.servers}: {error!r}") from None
        try:
            js = connection.jetstream(timeout=API_TIMEOUT_S, publish_async_max_pending=self.in_flight_max + 1)
            position, sequence = await self._resume(js)
            log.info("exporting log %s into stream %s from index %d (%d events there already), "
                     "stream sequence %d", self.log_id, self.stream, *position, sequence)  # fmt: skip
            return await self._publish(connection, js, source, position, sequence, pending, until_caught_up)
        except nats.js.errors.APIError as error:
            raise _SessionLost(f"JetStream refused: {error}") from None
        except (TimeoutError, nats.errors.Error, OSError) as error:
            raise _SessionLost(repr(error)) from None
        finally:
            for future, *_rest in pending:  # a session lost leaves its acks unread
                if future.done():
                    with contextlib.suppress(asyncio.CancelledError):
                        future.exception()
                else:
                    future.cancel()
            pending.clear()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), API_TIMEOUT_S)

    async def _resume(self, js: Any) -> tuple[Position, int]:
        """(the position the stream holds, its last sequence); the stream created if allowed."""
        import nats.js.api
        import nats.js.errors

        try:
            info = await js.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            if not self.create_stream:
                raise ExportError(
                    f"stream {self.stream!r} does not exist: create it with subjects "
                    f"['{self.subject_prefix}.>'] and a duplicate window of at least "
                    f"{DUPLICATE_WINDOW_S_MIN:.0f} s, or set create_stream = true"
                ) from None
            config = nats.js.api.StreamConfig(
                name=self.stream, subjects=[f"{self.subject_prefix}.>"],
                storage=nats.js.api.StorageType.FILE, num_replicas=self.replicas,
                duplicate_window=self.duplicate_window_s,
                description=f"seqd events of log {self.log_id} (seqd export)",
            )  # fmt: skip
            info = await js.add_stream(config)
        stream_bytes_max = info.config.max_msg_size
        self._message_bytes_max = stream_bytes_max if stream_bytes_max and stream_bytes_max > 0 else None
        window_s = float(info.config.duplicate_window or 0)
        if window_s < DUPLICATE_WINDOW_S_MIN:
            raise ExportError(
                f"stream {self.stream!r} has a duplicate window of {window_s:g} s < "
                f"DUPLICATE_WINDOW_S_MIN = {DUPLICATE_WINDOW_S_MIN:g} s: a resend after a "
                "session restart could be stored twice. Raise it (nats stream edit "
                f"{self.stream} --dupe-window 2m)"
            )
        subjects = list(info.config.subjects or [])
        if f"{self.subject_prefix}.>" not in subjects:
            raise ExportError(
                f"stream {self.stream!r} takes the subjects {subjects}, not "
                f"'{self.subject_prefix}.>': set subject_prefix to the stream's, or export into "
                "a stream of its own"
            )
        state = info.state
        if state.last_seq == 0:
            return Position(self.from_index, 0), 0
        if state.messages == 0:
            raise ExportError(
                f"stream {self.stream!r} holds no message, but its last sequence is "
                f"{state.last_seq}: its messages were removed (age or size limits, a purge), so "
                "it no longer records how far the export got. Give the stream limits that keep "
                "its last message, and start again with a new stream (set from_index to the "
                "first index it should hold)"
            )
        try:
            last = await js.get_msg(self.stream, seq=state.last_seq)
        except nats.js.errors.NotFoundError:
            raise ExportError(
                f"the last message of stream {self.stream!r} (sequence {state.last_seq}) was "
                "deleted, so the stream no longer records how far the export got; start a new "
                "stream (with from_index set to the first index it should hold)"
            ) from None
        return resume_position(last.headers, self.log_id, self.stream, state.last_seq), state.last_seq

    async def _publish(
        self, connection: Any, js: Any, source: Source, position: Position, sequence: int,
        pending: deque[_Batch], until_caught_up: bool,
    ) -> Position:  # fmt: skip
        self.acked = position
        resume = position
        skip = position.events
        items: Iterator[SourceEvent | None] = iter(source.read(max(1, position.index)))
        loop = asyncio.get_running_loop()
        publish = connection.publish
        bytes_max = min(connection.max_payload, self._message_bytes_max or connection.max_payload)
        try:
            while not self.stopping:
                # The source may block (a live journal sleeps between polls): it runs in a
                # thread, a batch per call, so the event loop reads acks meanwhile.
                batch, after = await loop.run_in_executor(None, _take, items, self.batch_events_max)
                if skip:
                    for item in batch[:skip]:
                        if item.index != resume.index:
                            raise ExportError(
                                f"stream {self.stream!r} holds {resume.events} events of index "
                                f"{resume.index}, but the source has fewer there: the source is "
                                "not the log this stream was exported from"
                            )
                    dropped = min(skip, len(batch))
                    batch = batch[dropped:]
                    skip -= dropped
                if batch:
                    await self._settle(pending, self.in_flight_max - len(batch))
                    if self.stopping:  # said while it waited (a signal, on_ack)
                        break
                    first = sequence
                    last = len(batch) - 1
                    for number, item in enumerate(batch):
                        message = encode_message(self.log_id, self.subject_prefix, position, item.index,
                                                 item.timestamp_ns, item.event)  # fmt: skip
                        headers = message.headers
                        headers[EXPECTED_LAST_SEQUENCE] = str(sequence)
                        headers[EXPECTED_STREAM] = self.stream
                        size = len(message.payload) + sum(len(k) + len(v) + 4 for k, v in headers.items()) + 12
                        if size > bytes_max:  # refused, it would stop the export there for ever
                            raise ExportError(
                                f"the event at index {item.index} ({type(item.event).__name__}) makes a "
                                f"message of {size} bytes, over the {bytes_max} bytes that stream "
                                f"{self.stream!r} and the server take (max_msg_size, max_payload): "
                                "raise the limit; the exporter never skips an event"
                            )
                        sequence += 1
                        position = message.position
                        if number < last:  # stored without an ack: the last one's ack covers it
                            await publish(message.subject, message.payload, headers=headers)
                        else:
                            future = await js.publish_async(message.subject, message.payload, headers=headers,
                                                            wait_stall=self.ack_timeout_s)  # fmt: skip
                    pending.append(_Batch(future, position, sequence, sequence - first))
                    self.in_flight += sequence - first
                    self.published += sequence - first
                if after == _ENDED or (after == _IDLE and until_caught_up):
                    break
                await asyncio.sleep(0)  # the connection writes what is queued, reads acks
                await self._settle(pending, self.in_flight)  # the acks already in
            await self._settle(pending, 0)
            return self.acked
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                with contextlib.suppress(ValueError):  # still running in its thread: let it be
                    close()

    async def _settle(self, pending: deque[_Batch], keep: int) -> None:
        """Take the acks of the oldest batches until at most `keep` messages await theirs (and
        every ack already in, whatever `keep`), checking each.

        Raises:
            _SessionLost: an ack did not come within ack_timeout_s, or the server refused a
                message (a missing predecessor, the stream unavailable).
            ExportError: an ack names another stream or sequence than predicted.
        """
        import nats.js.errors

        while pending:
            future, position, sequence, messages = pending[0]
            if not future.done():
                if self.in_flight <= keep:
                    return
                try:
                    await asyncio.wait_for(asyncio.shield(future), self.ack_timeout_s)
                except TimeoutError:
                    raise _SessionLost(f"no ack for the message at {tuple(position)} in "
                                       f"{self.ack_timeout_s} s") from None  # fmt: skip
                except Exception:
                    pass  # read below
            pending.popleft()
            self.in_flight -= messages
            try:
                ack = future.result()
            except _SessionLost:
                raise
            except nats.js.errors.APIError as error:
                raise _SessionLost(f"the message at {tuple(position)} was refused: {error}") from None
            except Exception as error:
                raise _SessionLost(f"the message at {tuple(position)} failed: {error!r}") from None
            if ack.stream != self.stream or ack.seq != sequence:
                raise ExportError(
                    f"the message at {tuple(position)} was stored in stream {ack.stream!r} at "
                    f"sequence {ack.seq}, not in {self.stream!r} at {sequence}: something else "
                    "publishes into the stream. Give the exporter a stream of its own"
                )
            if ack.duplicate:
                self.duplicates += 1
            self.acked = position
            if self.on_ack is not None:
                self.on_ack(position)


_MORE, _IDLE, _ENDED = 0, 1, 2  # after a batch the source has more, has nothing for now, ended


def _take(items: Iterator[SourceEvent | None], count_max: int) -> tuple[list[SourceEvent], int]:
    """Up to `count_max` events from the source, and what it has after them."""
    batch: list[SourceEvent] = []
    for item in items:
        if item is None:
            return batch, _IDLE
        batch.append(item)
        if len(batch) >= count_max:
            return batch, _MORE
    return batch, _ENDED


async def sequence_of_index(js: Any, stream: str, index: int) -> int:
    """The stream sequence of the first message whose event is at log index >= `index` (the
    stream's last sequence + 1 if there is none yet): where a consumer that stored the log index
    it reached resumes (a consumer with `opt_start_seq`). A binary search over the `Seqd-Index`
    headers, which grow with the sequence: ~log2(messages) message reads.

    Args:
        js: a nats-py JetStream context (`connection.jetstream()`).
    """
    state = (await js.stream_info(stream)).state
    low, high = max(1, state.first_seq), state.last_seq + 1  # the answer is in [low, high]
    while low < high:
        middle = (low + high) // 2
        message = await js.get_msg(stream, seq=middle)
        if int(message.headers[HEADER_INDEX]) < index:
            low = middle + 1
        else:
            high = middle
    return low
