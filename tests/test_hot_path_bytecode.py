"""The per-frame paths call their globals' methods the fast way, whichever module defines them.

CPython compiles `NAME.method(...)` to LOAD_METHOD (no bound method built) unless NAME is bound by
an import in the module, where it compiles an attribute load and a call instead: a module split
that turns `EVENT_HEADER = struct.Struct(...)` into `from .wire import EVENT_HEADER` slows every
frame without changing a line of the method. So the codec modules bind such names by assignment
(`EVENT_HEADER: Final = wire.EVENT_HEADER`; the ring's writer and reader likewise bind the
`ipc.ring_layout` names they use); this test fails if one is imported again. Modules
(`hmac.compare_digest`) are exempt: an attribute of a module is a plain function, not a method.
"""

from __future__ import annotations

import dis
import itertools
import types
from collections.abc import Callable
from typing import Any

import pytest

from ipc.ring import RingReader, RingWriter
from sequencer.client.connection import Connection
from sequencer.client.session import Session
from sequencer.processor import Processor
from sequencer.raft.peer_protocol import PeerConnection

HOT_METHODS: list[tuple[type, tuple[str, ...]]] = [
    (
        Connection,
        ("next_frames", "send_command_into", "send_reply_into", "send_reply_body_into", "send_event_into",
         "send_into"),
    ),
    (Session, ("add", "receive_data", "_send_held", "_control")),
    (PeerConnection, ("next_event", "_check_header", "_handle_data", "_append_frames")),
    # The blp's per-record paths (the processor split by concept keeps their names module-local).
    (Processor, ("apply_frame", "replay_run", "apply_records", "_answer_resend", "_publish", "_emit")),
    (RingWriter, ("try_write", "try_claim", "publish", "_claim")),
    (RingReader, ("poll", "poll_region", "release", "read")),
]


def method_calls_without_load_method(function: Callable[..., Any]) -> list[str]:
    """`NAME.attr` loads where NAME is a global pushed for a call (with NULL) and not a module."""
    found = []
    for load, attribute in itertools.pairwise(dis.get_instructions(function)):
        if load.opname == "LOAD_GLOBAL" and load.arg is not None and load.arg & 1:
            if attribute.opname != "LOAD_ATTR":
                continue
            value = function.__globals__.get(load.argval)
            if not isinstance(value, types.ModuleType):
                line = load.positions.lineno if load.positions else None
                found.append(f"{load.argval}.{attribute.argval} (line {line})")
    return found


@pytest.mark.parametrize(
    ("klass", "name"),
    [(klass, name) for klass, names in HOT_METHODS for name in names],
    ids=lambda value: value if isinstance(value, str) else value.__name__,
)
def test_hot_methods_call_global_methods_with_load_method(klass: type, name: str) -> None:
    function = getattr(klass, name)
    found = method_calls_without_load_method(function)
    assert not found, (
        f"{klass.__name__}.{name} calls methods of imported names {found}: bind each in "
        f"{function.__module__} by assignment (NAME: Final = module.NAME), not by import"
    )


def test_the_check_sees_a_method_called_on_an_imported_name() -> None:
    namespace: dict[str, Any] = {}
    source = (
        "import struct\nfrom struct import Struct\nASSIGNED = Struct('<Q')\n"
        "def hot(buffer):\n"
        "    struct.unpack_from('<Q', buffer)\n"  # a module's function: fine
        "    ASSIGNED.unpack_from(buffer)\n"  # LOAD_METHOD
        "    Struct('<Q').unpack_from(buffer)\n"  # a method of a call's result, not of a global
        "    return Struct.unpack_from(ASSIGNED, buffer)\n"  # a method of an imported name
    )
    exec(compile(source, "<planted>", "exec"), namespace)
    assert method_calls_without_load_method(namespace["hot"]) == ["Struct.unpack_from (line 8)"]
