"""The client protocol written from docs/client.md alone, for the conformance suite.

Only `socket`, `struct` and `msgspec.msgpack`: no `sequencer.client`, so the suite checks the
daemon against the documented bytes, not against the project's own codec (which could be wrong in
the same way as the daemon). Control bodies are decoded to plain dicts, as a client in another
language would, and app payloads are built as msgpack maps with a "type" key.
"""

from __future__ import annotations

import re
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

ROOT = Path(__file__).resolve().parent.parent
CLIENT_DOC = ROOT / "docs" / "client.md"

# docs/client.md, "Frames".
HEADER = struct.Struct("<IBBH")  # length (body bytes), kind, protocol_version, flags
COMMAND = struct.Struct("<QQH6x")  # request_id, acked_request_id, version
REPLY = struct.Struct("<QQBxH4x")  # request_id, index, status, version
EVENT = struct.Struct("<QH6x")  # index, version
FRAME_BYTES_MAX = 1 << 20
HELLO, WELCOME, COMMAND_KIND, REPLY_KIND, EVENT_KIND, ERROR, REDIRECT, PING, PONG = range(1, 10)
# docs/client.md, "Catch-up subscriptions and queries": a query replica's kinds.
SUBSCRIBE, ITEM_KIND, QUERY, ANSWER = range(10, 14)
ITEM = struct.Struct("<QqBBH4x")  # index, timestamp_ns, kind, record_type, version
ITEM_RECORD, ITEM_EVENT, ITEM_EVENT_OMITTED = 1, 2, 3
OK, REJECTED, DUPLICATE = 0, 1, 2
CONTROL_KINDS = {HELLO, WELCOME, ERROR, REDIRECT, PING, PONG, SUBSCRIBE, QUERY, ANSWER}
READ_TIMEOUT_S = 10.0


@dataclass
class Frame:
    """One frame as received: its kind, the decoded map (control frames) or the fixed header's
    fields (hot frames), and the payload of a hot frame."""

    kind: int
    fields: dict[str, Any] = field(default_factory=dict)
    payload: bytes = b""

    def app(self) -> Any:
        """The payload decoded as msgpack (an app reply or event, or a rejection map)."""
        return msgspec.msgpack.decode(self.payload)


def frame(kind: int, body: bytes, version: int = 1, flags: int = 0) -> bytes:
    return HEADER.pack(len(body), kind, version, flags) + body


def control(kind: int, **fields: Any) -> bytes:
    return frame(kind, msgspec.msgpack.encode(fields))


def hello(client_id: int, **fields: Any) -> bytes:
    return control(HELLO, client_id=client_id, **fields)


def command(request_id: int, payload: bytes, acked_request_id: int = 0, version: int = 1) -> bytes:
    return frame(COMMAND_KIND, COMMAND.pack(request_id, acked_request_id, version) + payload)


def app(type_name: str, **fields: Any) -> bytes:
    """An app payload: a msgpack map whose "type" key names the type."""
    return msgspec.msgpack.encode({"type": type_name, **fields})


def parse(data: bytes) -> tuple[list[Frame], bytes]:
    """The complete frames at the start of `data`, and the bytes left over."""
    frames = []
    offset = 0
    while len(data) - offset >= HEADER.size:
        length, kind, version, flags = HEADER.unpack_from(data, offset)
        assert version == 1, f"frame from the daemon has protocol_version {version}"
        assert flags == 0, f"frame from the daemon has flags {flags}"
        end = offset + HEADER.size + length
        if end > len(data):
            break
        body = data[offset + HEADER.size : end]
        if kind in CONTROL_KINDS:
            frames.append(Frame(kind, msgspec.msgpack.decode(body)))
        elif kind == REPLY_KIND:
            request_id, index, status, reply_version = REPLY.unpack_from(body)
            assert body[17] == 0 and body[20:24] == bytes(4), "REPLY padding is not zero"
            frames.append(Frame(kind, {"request_id": request_id, "index": index, "status": status,
                                       "version": reply_version}, body[REPLY.size :]))  # fmt: skip
        elif kind == EVENT_KIND:
            index, event_version = EVENT.unpack_from(body)
            frames.append(Frame(kind, {"index": index, "version": event_version}, body[EVENT.size :]))
        elif kind == ITEM_KIND:
            index, timestamp_ns, item_kind, record_type, item_version = ITEM.unpack_from(body)
            assert body[20:24] == bytes(4), "ITEM padding is not zero"
            frames.append(Frame(kind, {"index": index, "timestamp_ns": timestamp_ns, "kind": item_kind,
                                       "record_type": record_type, "version": item_version},
                                body[ITEM.size :]))  # fmt: skip
        else:
            raise AssertionError(f"the daemon sent a frame of kind {kind}")
        offset = end
    return frames, data[offset:]


class Raw:
    """One connection to a node: bytes out, frames in. Every read has a timeout."""

    def __init__(self, socket_path: str, timeout_s: float = READ_TIMEOUT_S) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout_s)
        self.sock.connect(socket_path)
        self.pending = b""
        self.frames: list[Frame] = []
        self.events: list[Frame] = []  # EVENT frames `replies` passed over
        self.eof = False

    def send(self, data: bytes) -> Raw:
        self.sock.sendall(data)
        return self

    def open(self, client_id: int, **hello_fields: Any) -> dict[str, Any]:
        """HELLO, then the WELCOME's fields."""
        self.send(hello(client_id, **hello_fields))
        welcome = self.next()
        assert welcome is not None and welcome.kind == WELCOME, welcome
        return welcome.fields

    def _read(self) -> None:
        try:
            chunk = self.sock.recv(1 << 20)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.eof = True
            return
        frames, self.pending = parse(self.pending + chunk)
        self.frames.extend(frames)

    def next(self) -> Frame | None:
        """The next frame, or None at EOF (socket.timeout if neither comes in time)."""
        while not self.frames and not self.eof:
            self._read()
        return self.frames.pop(0) if self.frames else None

    def replies(self, count: int) -> list[Frame]:
        """The next `count` REPLY frames (events in between are kept in `events`)."""
        replies: list[Frame] = []
        while len(replies) < count:
            got = self.next()
            assert got is not None, f"EOF after {len(replies)} of {count} replies"
            assert got.kind in (REPLY_KIND, EVENT_KIND), got
            if got.kind == REPLY_KIND:
                replies.append(got)
            else:
                self.events.append(got)
        return replies

    def until_eof(self) -> list[Frame]:
        frames = []
        while (got := self.next()) is not None:
            frames.append(got)
        assert not self.pending, f"{len(self.pending)} bytes of a partial frame before EOF"
        return frames

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def rejection(reply: Frame) -> str:
    """The code of a REJECTED reply (and a check of its documented payload)."""
    assert reply.kind == REPLY_KIND and reply.fields["status"] == REJECTED, reply
    body = reply.app()
    assert set(body) == {"code", "message"} and body["message"], body
    return str(body["code"])


def doc_codes(anchor: str, document: Path = CLIENT_DOC) -> list[str]:
    """The `names` in the first column of the first table after the line `anchor` (a heading, or
    the start of the sentence above the table) in docs/client.md."""
    text = document.read_text()
    start = text.index(f"\n{anchor}") + 1
    codes = []
    in_table = False
    for line in text[start:].splitlines()[1:]:
        if line.startswith("|"):
            in_table = True
            match = re.match(r"\|\s*`([a-z_]+)`\s*\|", line)
            if match:
                codes.append(match.group(1))
        elif in_table:
            break
    assert codes, f"no table of codes after {anchor!r} in {document}"
    return codes


ERROR_CODES_HEADING = "### ERROR codes"
SEQD_REJECTION_CODES_HEADING = "### REJECTED codes from seqd"
LEDGER_REJECTION_CODES_HEADING = "### The ledger's REJECTED codes"
WELCOME_FIELDS_ANCHOR = "WELCOME carries every limit a client must respect"
