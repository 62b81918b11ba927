"""What the exporter puts in a JetStream message, and where it resumes from (I/O-free).

One message per event the state machine published, in log order. A command may publish several
events, so an event is named by its record's index **and its ordinal** among that record's
events (0, 1, ...): the same on every replay, because the app is deterministic. The message id
that JetStream deduplicates on is `<log id>:<index>:<ordinal>`, the log id naming the log (a
single node's name, or the cluster's id: every node of a cluster holds the same log, so an
exporter moved to another node of it publishes the same ids).

Headers (every value a decimal or a plain name, so any client can read them):

    Nats-Msg-Id           n1:1042:0          the deduplication id
    Seqd-Log              n1                 the log it came from
    Seqd-Index            1042               the record's log index
    Seqd-Ordinal          0                  the event's place among that record's events
    Seqd-Timestamp-Ns     1764431234123456789  the record's timestamp (the sequencer's clock)
    Seqd-Type             TransferMade       the event's type (its msgspec tag)

The payload is the event as JSON (msgspec), the form `seqd schema` describes.

Resume rule: the stream's last message says how far the export got, `Position(index, ordinal
+ 1)` (the projector's position: the last index done and how many of its events); the exporter
starts the source at that index and skips that many events of it. Nothing else is stored
anywhere, so the stream is the only truth about what was exported.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import msgspec

from sequencer.projection.projection import Position

__all__ = [
    "HEADER_INDEX",
    "HEADER_LOG",
    "HEADER_MSG_ID",
    "HEADER_ORDINAL",
    "HEADER_TIMESTAMP_NS",
    "HEADER_TYPE",
    "LOG_ID",
    "SUBJECT_TOKEN",
    "ExportError",
    "ExportMessage",
    "encode_message",
    "event_type_name",
    "message_id",
    "resume_position",
]

HEADER_MSG_ID = "Nats-Msg-Id"
HEADER_LOG = "Seqd-Log"
HEADER_INDEX = "Seqd-Index"
HEADER_ORDINAL = "Seqd-Ordinal"
HEADER_TIMESTAMP_NS = "Seqd-Timestamp-Ns"
HEADER_TYPE = "Seqd-Type"

# A log id and a subject token: no '.', '*', '>' or white space (NATS subject syntax), no ':'
# (the message id's separator); short, because it is in every message id.
LOG_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
SUBJECT_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,128}")

_json_encode = msgspec.json.Encoder().encode


class ExportError(Exception):
    """The exporter cannot go on: a bad configuration, or a stream that is not this log's."""


class ExportMessage(NamedTuple):
    subject: str
    payload: bytes
    headers: dict[str, str]
    position: Position  # the export's position once this message is in the stream


def message_id(log_id: str, index: int, ordinal: int) -> str:
    return f"{log_id}:{index}:{ordinal}"


def event_type_name(event: Any) -> str:
    """The event's type as consumers see it: its msgspec tag (the class name by default)."""
    config = getattr(type(event), "__struct_config__", None)
    tag = getattr(config, "tag", None)
    name = tag if isinstance(tag, str) else type(event).__name__
    if not SUBJECT_TOKEN.fullmatch(name):
        raise ExportError(
            f"the event type {name!r} cannot be a NATS subject token: give the event a tag of "
            "letters, digits, '_' and '-' (msgspec.Struct, tag='...')"
        )
    return name


def encode_message(
    log_id: str, subject_prefix: str, position: Position, index: int, timestamp_ns: int, event: Any
) -> ExportMessage:
    """The message of the event at `index` that follows the export position `position`."""
    assert index >= position.index, (index, position)
    ordinal = position.events if index == position.index else 0
    type_name = event_type_name(event)
    headers = {
        HEADER_MSG_ID: message_id(log_id, index, ordinal),
        HEADER_LOG: log_id,
        HEADER_INDEX: str(index),
        HEADER_ORDINAL: str(ordinal),
        HEADER_TIMESTAMP_NS: str(timestamp_ns),
        HEADER_TYPE: type_name,
    }
    return ExportMessage(f"{subject_prefix}.{type_name}", _json_encode(event), headers,
                         Position(index, ordinal + 1))  # fmt: skip


def resume_position(headers: Mapping[str, str] | None, log_id: str, stream: str, sequence: int) -> Position:
    """The export position the stream's last message (at `sequence`) records.

    Raises:
        ExportError: the message was not written by an exporter of this log.
    """
    headers = headers or {}
    found_log = headers.get(HEADER_LOG)
    if found_log != log_id:
        raise ExportError(
            f"the last message of stream {stream!r} (sequence {sequence}) was not exported from "
            f"log {log_id!r} (its {HEADER_LOG} header is {found_log!r}): a stream holds one log's "
            "events. Export into a stream of its own, or set log_id to the log that wrote it"
        )
    try:
        index = int(headers[HEADER_INDEX])
        ordinal = int(headers[HEADER_ORDINAL])
    except (KeyError, ValueError):
        raise ExportError(
            f"the last message of stream {stream!r} (sequence {sequence}) has no valid "
            f"{HEADER_INDEX}/{HEADER_ORDINAL} headers ({dict(headers)!r}): something other "
            "than the exporter writes to the stream; give the exporter a stream of its own"
        ) from None
    if index < 1 or ordinal < 0:
        raise ExportError(f"stream {stream!r} sequence {sequence}: bad position headers {dict(headers)!r}")
    return Position(index, ordinal + 1)
