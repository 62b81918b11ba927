"""The frames the blp writes to the egress ring and the sequencer reads (docs/contracts.md).

Each egress ring frame has `type = EgressKind` and one of these payloads (little-endian):

    REPLY           <QQQBxH4x  session_id, request_id, index, status, version; then the payload
    EVENT           <QH6x      index, version; then the payload (the app's encoded event)
    TIMER_SCHEDULE  <Qq        timer_id, deadline_ns (layout and encoder in `sequencer.timers`)
    TIMER_CANCEL    <Q         timer_id (likewise)
    EVENT_OMITTED   <QH6x      index, version; then msgpack {"code": str, "message": str}

A reply's `index` is the log index of the command that produced it (for a resent request, the
original index). Its payload is the app's encoded reply when status is OK, msgpack
`{"code": str, "message": str}` when REJECTED, and empty when DUPLICATE (the request was applied
before, but its reply has been pruned after the client acknowledged it).

Every output must fit a client frame, and that is decided here, by the blp, from protocol
constants only (never from config), so every replica and every replay decides the same and the
dedup table saves the same reply everywhere:
- a reply payload over `REPLY_PAYLOAD_BYTES_MAX` is replaced by a REJECTED reply with code
  `reply_too_large` (`reply_too_large_payload`). The command's effects on the state stay applied;
  only the reply is replaced, and that replacement is what a resend gets.
- an event payload over `EVENT_PAYLOAD_BYTES_MAX` is replaced by an EVENT_OMITTED output, which
  the sequencer turns into a non-fatal ERROR frame `event_too_large` for each subscriber: a
  subscriber learns, in order, at which index an event was left out, instead of missing it
  silently (event indexes are sparse, so a gap alone would not show).
"""

from __future__ import annotations

import enum
import struct
from typing import Any, Final, NamedTuple

from sequencer.client.protocol import EVENT_HEADER as CLIENT_EVENT_HEADER
from sequencer.client.protocol import (
    FRAME_BODY_BYTES_MAX,
    FRAME_BYTES_MAX,
    ProtocolError,
    RejectionCode,
    ReplyStatus,
    decode_rejection,
    encode_rejection,
)
from sequencer.client.protocol import REPLY_HEADER as CLIENT_REPLY_HEADER
from sequencer.timers import (
    TIMER_CANCEL,
    TIMER_SCHEDULE,
    TimerCancel,
    TimerSchedule,
    encode_timer_cancel,
    encode_timer_schedule,
)

__all__ = [
    "EGRESS_PAYLOAD_BYTES_MAX",
    "EVENT_HEADER",
    "EVENT_PAYLOAD_BYTES_MAX",
    "EVENT_TOO_LARGE",
    "NOTICE_CODES",
    "REJECTION_CODES",
    "REPLY_HEADER",
    "REPLY_PAYLOAD_BYTES_MAX",
    "REPLY_TOO_LARGE",
    "TIMER_CANCEL",
    "TIMER_SCHEDULE",
    "EgressKind",
    "Event",
    "EventOmitted",
    "Reply",
    "ReplyStatus",
    "TimerCancel",
    "TimerSchedule",
    "decode",
    "encode_event",
    "encode_event_omitted",
    "encode_reply",
    "encode_timer_cancel",
    "encode_timer_schedule",
    "reply_too_large_payload",
]


class EgressKind(enum.IntEnum):
    REPLY = 1
    EVENT = 2
    TIMER_SCHEDULE = 3
    TIMER_CANCEL = 4
    EVENT_OMITTED = 5  # an event too large to frame, left out: subscribers get a non-fatal ERROR


# A REPLY's status is the client protocol's `ReplyStatus` (re-exported here): the sequencer copies
# it from the egress frame into the REPLY frame without translating it. Likewise a REJECTED
# payload is the protocol's `encode_rejection`, and the timer payloads are `sequencer.timers`'.

REPLY_HEADER = struct.Struct("<QQQBxH4x")
EVENT_HEADER = struct.Struct("<QH6x")
assert REPLY_HEADER.size == 32
# After the session id, a REPLY output is the client's REPLY frame body byte for byte: the
# gateway frames it without unpacking it (`Connection.send_reply_body_into`).
assert REPLY_HEADER.format == "<Q" + CLIENT_REPLY_HEADER.format.lstrip("<"), REPLY_HEADER.format
assert EVENT_HEADER.size == 16

# The largest payloads a client REPLY and EVENT frame can carry (1,048,544 and 1,048,552 bytes).
# Protocol constants, not config: the blp decides with them, so every replica and every replay
# replaces the same outputs. A reply cannot be bounded by its command's size (a query may answer
# a small command with much data, a rejection may quote the command), so the gateway cannot
# refuse such commands up front; the blp replaces the reply instead.
REPLY_PAYLOAD_BYTES_MAX: Final = FRAME_BODY_BYTES_MAX - CLIENT_REPLY_HEADER.size
EVENT_PAYLOAD_BYTES_MAX: Final = FRAME_BODY_BYTES_MAX - CLIENT_EVENT_HEADER.size
# The largest egress frame payload the blp writes: a reply of the largest payload (the egress
# header carries the session id the client header does not). The egress ring must hold one frame
# of it, or the blp could never write it (daemon/config.py checks ring.egress_capacity_bytes).
EGRESS_PAYLOAD_BYTES_MAX: Final = REPLY_HEADER.size + REPLY_PAYLOAD_BYTES_MAX
assert REPLY_HEADER.size - CLIENT_REPLY_HEADER.size == 8  # the session id
assert EVENT_HEADER.size == CLIENT_EVENT_HEADER.size  # an event frame is the egress frame
assert EGRESS_PAYLOAD_BYTES_MAX >= EVENT_HEADER.size + EVENT_PAYLOAD_BYTES_MAX

# The codes of the REJECTED replies the blp makes itself (an app's own codes come from its
# `Rejected`; the gateway's, such as command_too_large, from the sequencer), and of the non-fatal
# ERROR frame sent to subscribers in place of an event. docs/client.md lists every one.
BAD_COMMAND: Final = RejectionCode.BAD_COMMAND.value
REPLY_TOO_LARGE: Final = RejectionCode.REPLY_TOO_LARGE.value
EVENT_TOO_LARGE: Final = "event_too_large"
REJECTION_CODES: Final = (BAD_COMMAND, REPLY_TOO_LARGE)
NOTICE_CODES: Final = (EVENT_TOO_LARGE,)


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


class EventOmitted(NamedTuple):
    index: int  # type: ignore[assignment]  # shadows tuple.index, named by the contract
    version: int
    code: str
    message: str


def encode_reply(
    session_id: int, request_id: int, index: int, status: int, version: int, payload: bytes
) -> bytes:
    return REPLY_HEADER.pack(session_id, request_id, index, status, version) + payload


def encode_event(index: int, version: int, payload: bytes) -> bytes:
    return EVENT_HEADER.pack(index, version) + payload


def reply_too_large_payload(payload_bytes: int, applied: bool) -> bytes:
    """The REJECTED payload that replaces a reply of `payload_bytes` too large to frame.

    Deterministic (sizes and constants only), so every replica saves the same bytes. `applied`:
    the reply was OK, so the command's effects stand; otherwise the app had rejected it and
    nothing changed (its rejection message was what did not fit).
    """
    assert payload_bytes > REPLY_PAYLOAD_BYTES_MAX, payload_bytes
    outcome = (
        "the command was applied and its effects stand; only its reply is replaced by this one"
        if applied
        else "the app rejected the command, which changed nothing, with a message too large to send"
    )
    return encode_rejection(
        REPLY_TOO_LARGE,
        f"the reply was {payload_bytes} bytes, over the limit of {REPLY_PAYLOAD_BYTES_MAX} (a "
        f"REPLY frame is at most FRAME_BYTES_MAX={FRAME_BYTES_MAX} bytes); {outcome}. A resend "
        "gets this same answer: make the app reply with less (a reference to large data, not "
        "the data itself)",
    )


def undecodable_payload(index: int, command_version: int, app_name: str, app_version: int,
                        error: Exception) -> bytes:  # fmt: skip
    """The REJECTED payload of a command at `index` whose bytes the app cannot decode or upcast.

    Refused the same way on every replica and every replay; the record is in the log for good, so
    it must never crash the blp. The message names the exception type only, not its text, which
    may differ between library versions on different replicas.
    """
    return encode_rejection(
        BAD_COMMAND,
        f"the command at index {index} (schema version {command_version}) could not be "
        f"decoded by {app_name} v{app_version} ({type(error).__name__}); nothing "
        "was applied",
    )


def encode_event_omitted(index: int, version: int, payload_bytes: int) -> bytes:
    """The EVENT_OMITTED frame that replaces an event of `payload_bytes` too large to frame."""
    assert payload_bytes > EVENT_PAYLOAD_BYTES_MAX, payload_bytes
    message = (
        f"the event published at index {index} was {payload_bytes} bytes, over the limit of "
        f"{EVENT_PAYLOAD_BYTES_MAX} (an EVENT frame is at most FRAME_BYTES_MAX={FRAME_BYTES_MAX} "
        "bytes); it was left out for every subscriber, and the command that published it was "
        "applied: make the app publish smaller events (a reference to large data, not the data)"
    )
    return EVENT_HEADER.pack(index, version) + encode_rejection(EVENT_TOO_LARGE, message)


class EgressError(Exception):
    """An egress frame of an unknown kind or a wrong length: blp and sequencer disagree."""


def decode(kind: int, view: Any) -> Reply | Event | EventOmitted | TimerSchedule | TimerCancel:
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
    if kind == EgressKind.EVENT_OMITTED:
        if length < EVENT_HEADER.size:
            raise EgressError(f"event omitted frame of {length} bytes < header {EVENT_HEADER.size}")
        index, version = EVENT_HEADER.unpack_from(view, 0)
        try:
            code, message = decode_rejection(bytes(view[EVENT_HEADER.size:]))
        except ProtocolError as error:
            raise EgressError(f"event omitted frame at index {index}: {error.message}") from None
        return EventOmitted(index, version, code, message)
    raise EgressError(
        f"egress frame of unknown kind {kind}: the blp and the sequencer run different seqd "
        "versions; restart the node with one version"
    )
