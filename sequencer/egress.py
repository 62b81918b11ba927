"""The frames the blp writes to the egress ring and the sequencer reads (docs/contracts.md).

Each egress ring frame has `type = EgressKind` and one of these payloads (little-endian):

    REPLY           <QQQBxH4x  session_id, request_id, index, status, version; then the payload
    EVENT           <QH6x      index, version; then the payload (the app's encoded event)
    TIMER_SCHEDULE  <Qq        timer_id, deadline_ns
    TIMER_CANCEL    <Q         timer_id

A reply's `index` is the log index of the command that produced it (for a resent request, the
original index). Its payload is the app's encoded reply when status is OK, msgpack
`{"code": str, "message": str}` when REJECTED, and empty when DUPLICATE (the request was applied
before, but its reply has been pruned after the client acknowledged it).
"""

from __future__ import annotations

import enum
import struct
from typing import Any, NamedTuple

__all__ = [
    "EVENT_HEADER",
    "REPLY_HEADER",
    "TIMER_CANCEL",
    "TIMER_SCHEDULE",
    "EgressKind",
    "Event",
    "Reply",
    "ReplyStatus",
    "TimerCancel",
    "TimerSchedule",
    "decode",
    "encode_event",
    "encode_reply",
    "encode_timer_cancel",
    "encode_timer_schedule",
]


class EgressKind(enum.IntEnum):
    REPLY = 1
    EVENT = 2
    TIMER_SCHEDULE = 3
    TIMER_CANCEL = 4


class ReplyStatus(enum.IntEnum):
    OK = 0
    REJECTED = 1
    DUPLICATE = 2


REPLY_HEADER = struct.Struct("<QQQBxH4x")
EVENT_HEADER = struct.Struct("<QH6x")
TIMER_SCHEDULE = struct.Struct("<Qq")
TIMER_CANCEL = struct.Struct("<Q")
assert REPLY_HEADER.size == 32
assert EVENT_HEADER.size == 16


class Reply(NamedTuple):
    session_id: int
    request_id: int
    index: int  # type: ignore[assignment]  # shadows tuple.index, named by the contract
    status: int
    version: int
    payload: bytes


class Event(NamedTuple):
    index: int  # type: ignore[assignment]  # shadows tuple.index, named by the contract
    version: int
    payload: bytes


class TimerSchedule(NamedTuple):
    timer_id: int
    deadline_ns: int


class TimerCancel(NamedTuple):
    timer_id: int


def encode_reply(
    session_id: int, request_id: int, index: int, status: int, version: int, payload: bytes
) -> bytes:
    return REPLY_HEADER.pack(session_id, request_id, index, status, version) + payload


def encode_event(index: int, version: int, payload: bytes) -> bytes:
    return EVENT_HEADER.pack(index, version) + payload


def encode_timer_schedule(timer_id: int, deadline_ns: int) -> bytes:
    return TIMER_SCHEDULE.pack(timer_id, deadline_ns)


def encode_timer_cancel(timer_id: int) -> bytes:
    return TIMER_CANCEL.pack(timer_id)


class EgressError(Exception):
    """An egress frame of an unknown kind or a wrong length: blp and sequencer disagree."""


def decode(kind: int, view: Any) -> Reply | Event | TimerSchedule | TimerCancel:
    """Decodes one egress frame payload; the returned payload is a copy (the view is not kept).

    Raises:
        EgressError: unknown kind or a payload too short for its kind.
    """
    length = len(view)
    if kind == EgressKind.REPLY:
        if length < REPLY_HEADER.size:
            raise EgressError(f"reply frame of {length} bytes < header {REPLY_HEADER.size}")
        session_id, request_id, index, status, version = REPLY_HEADER.unpack_from(view, 0)
        return Reply(
            session_id, request_id, index, status, version, bytes(view[REPLY_HEADER.size:])
        )
    if kind == EgressKind.EVENT:
        if length < EVENT_HEADER.size:
            raise EgressError(f"event frame of {length} bytes < header {EVENT_HEADER.size}")
        index, version = EVENT_HEADER.unpack_from(view, 0)
        return Event(index, version, bytes(view[EVENT_HEADER.size:]))
    if kind == EgressKind.TIMER_SCHEDULE:
        if length != TIMER_SCHEDULE.size:
            raise EgressError(f"timer schedule frame of {length} bytes != {TIMER_SCHEDULE.size}")
        return TimerSchedule(*TIMER_SCHEDULE.unpack_from(view, 0))
    if kind == EgressKind.TIMER_CANCEL:
        if length != TIMER_CANCEL.size:
            raise EgressError(f"timer cancel frame of {length} bytes != {TIMER_CANCEL.size}")
        return TimerCancel(*TIMER_CANCEL.unpack_from(view, 0))
    raise EgressError(
        f"egress frame of unknown kind {kind}: the blp and the sequencer run different seqd "
        "versions; restart the node with one version"
    )
