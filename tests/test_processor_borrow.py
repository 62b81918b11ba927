"""A command is decoded straight from the ring unless a field of it could point into the ring.

The ring's bytes are reused once the blp releases them, so no part of a decoded command may be a
view of them. msgspec copies every value out of its input except a `msgspec.Raw` and a
`memoryview` (and whatever a dec_hook builds): `Schema.hot_codec().command_borrows_input` says
whether a schema's commands can hold one, and only then does the processor decode from a copy.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import msgspec
import pytest

from sequencer.apps.ledger import LEDGER_SCHEMA
from sequencer.processor import Processor
from sequencer.record import FRAME_HEADER_BYTES
from sequencer.schema import Schema, borrows_input
from sequencer.state_machine import StateMachine
from tests.fixtures.feeder import Feeder, frame_of, session_id_of

S1 = session_id_of(1, 1)


class _Copied(msgspec.Struct, tag=True):
    text: str
    blob: bytes
    buffer: bytearray
    ext: msgspec.msgpack.Ext
    anything: Any
    blobs: list[bytes]
    by_name: dict[str, bytes]
    maybe: Optional[bytes]  # noqa: UP045 (what an app may write)


class _Raw(msgspec.Struct, tag=True):
    raw: msgspec.Raw


class _Nested(msgspec.Struct, tag=True):
    rows: Optional[list[dict[str, tuple[int, memoryview]]]]  # noqa: UP045


class _Tree(msgspec.Struct, tag=True):
    children: list[_Tree]
    leaf: Union[int, msgspec.Raw] = 0  # noqa: UP007


class _PlainTree(msgspec.Struct, tag=True):
    children: list[_PlainTree]
    name: str = ""


@pytest.mark.parametrize(
    ("type_", "borrows"),
    [
        (_Copied, False),
        (_PlainTree, False),  # recursive, and nothing borrowed
        (LEDGER_SCHEMA._command_type, False),
        (_Raw, True),
        (_Nested, True),  # a memoryview in a tuple in a dict in a list in an optional
        (_Tree, True),  # a Raw in a union of a recursive struct
        (Union[_Copied, _Raw], True),  # noqa: UP007 (a schema's command union)
    ],
)
def test_borrows_input_finds_a_raw_or_a_memoryview_anywhere(type_, borrows):
    assert borrows_input(type_) is borrows


def test_msgspec_copies_every_other_value_out_of_the_buffer():
    """The claim `borrows_input` rests on: nothing of `_Copied` changes when its bytes do."""
    value = _Copied("text", b"blob", bytearray(b"buffer"), msgspec.msgpack.Ext(3, b"ext"), b"any",
                    [b"one", b"two"], {"key": b"value"}, b"maybe")  # fmt: skip
    buffer = bytearray(msgspec.msgpack.encode(value))
    decoded = msgspec.msgpack.Decoder(_Copied).decode(memoryview(buffer))
    buffer[:] = bytes(len(buffer))
    assert decoded == value
    assert decoded.ext.data == b"ext"


class _Keep(msgspec.Struct, tag=True):
    raw: msgspec.Raw
    view: memoryview


class _Kept(msgspec.Struct):
    items: list[bytes]


class Keeper(StateMachine):
    """Keeps its commands' Raw and memoryview fields as they are (what the rule protects)."""

    schema = Schema("keeper", 1, (_Keep,), (), (), _Kept)

    def __init__(self) -> None:
        self.kept: list[Any] = []

    def apply(self, ctx, command):
        self.kept.append((command.raw, command.view))

    def snapshot(self):
        return _Kept([bytes(item) for pair in self.kept for item in pair])

    @classmethod
    def restore(cls, snapshot):
        return cls()


def _ring_frame(record: bytes) -> tuple[int, memoryview, bytearray]:
    """A record in a buffer the test then overwrites, as the ring's writer does with a lap."""
    frame_type, view = frame_of(record)
    ring = bytearray(record)
    return frame_type, memoryview(ring)[FRAME_HEADER_BYTES : FRAME_HEADER_BYTES + view.nbytes], ring


@pytest.mark.parametrize("as_region", [False, True], ids=["view", "region"])
def test_a_raw_or_memoryview_field_of_a_command_does_not_point_into_the_ring(as_region):
    """As a view of the record, and as the blp's region walk hands it (the ring, the bounds)."""
    assert Keeper.schema.hot_codec().command_borrows_input
    processor = Processor(Keeper)
    feeder = Feeder(Keeper.schema)
    frame_type, view = frame_of(feeder.open_session(S1, client_id=1))
    processor.apply_frame(frame_type, view)
    command = _Keep(msgspec.Raw(msgspec.msgpack.encode("kept")), memoryview(b"also kept"))
    frame_type, view, ring = _ring_frame(feeder.command(S1, 1, command))
    if as_region:
        processor.apply_frame(frame_type, memoryview(ring), FRAME_HEADER_BYTES, FRAME_HEADER_BYTES + view.nbytes)
    else:
        processor.apply_frame(frame_type, view)
    ring[:] = b"\xff" * len(ring)  # the writer's next lap
    ((raw, kept_view),) = processor.app.kept
    assert bytes(raw) == msgspec.msgpack.encode("kept")
    assert bytes(kept_view) == b"also kept"


def test_the_ledger_decodes_its_commands_from_the_ring_without_a_copy():
    """~0.9k instructions a command less (benches/RESULTS.md, "blpcycle, second session")."""
    assert not LEDGER_SCHEMA.hot_codec().command_borrows_input
