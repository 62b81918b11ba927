"""The transform API of a copy-and-transform of the journal: what a migration does to each command
(`Transform`), where the command came from (`Origin`), and loading a transform by name.

A transform is the user's code; everything else about a migration (`sequencer.migrate`) is the
seqd's. docs/evolution.md has the long form and a worked example.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any, ClassVar

from sequencer.migrate.errors import TransformLoadError
from sequencer.schema import Schema
from sequencer.state_machine import StateMachine

__all__ = ["Origin", "Transform", "check_transform", "load_transform", "transform_name"]


class Origin:
    """Where the command being transformed came from: the old record's header and its client.

    One Origin is reused for every record (an allocation per record costs throughput): read
    what you need during the call, do not keep it.

    Attributes:
        index, term, timestamp_ns: the old record's.
        session_id, client_id, request_id: the request (0 for a timer fire).
        version: the schema version the command was written at (it reaches the transform
            upcast to the source app's current version).
    """

    __slots__ = ("_header", "client_id")

    def __init__(self, index: int = 0, term: int = 0, timestamp_ns: int = 0, session_id: int = 0,
                 client_id: int = 0, request_id: int = 0, version: int = 0) -> None:  # fmt: skip
        # The old record's header tuple as unpacked (RECORD_HEADER's fields): the migration
        # swaps in a new one per record instead of setting seven attributes.
        self._header: tuple[int, ...] = (0, 0, version, index, term, timestamp_ns, session_id,
                                         request_id)  # fmt: skip
        self.client_id = client_id

    @property
    def index(self) -> int:
        return self._header[3]

    @property
    def term(self) -> int:
        return self._header[4]

    @property
    def timestamp_ns(self) -> int:
        return self._header[5]

    @property
    def session_id(self) -> int:
        return self._header[6]

    @property
    def request_id(self) -> int:
        return self._header[7]

    @property
    def version(self) -> int:
        return self._header[2]

    def __repr__(self) -> str:
        return (f"Origin(index={self.index}, term={self.term}, timestamp_ns={self.timestamp_ns}, "
                f"session_id={self.session_id:#x}, client_id={self.client_id}, "
                f"request_id={self.request_id}, version={self.version})")  # fmt: skip


class Transform:
    """What a migration does to each command. Subclass it, set `source` and `target`, override
    `command` (and `timer_fired` or `finish` when needed).

    A transform is deterministic and pure in what it returns: the same old journal must give the
    same new journal. It may keep state in `self` (a merge waits for the rest of its inputs);
    `seqd log migrate` makes one instance per run.

    Attributes:
        source: the app that wrote the old journal; its schema decodes (and upcasts) the commands.
        target: the app the new journal is for; its schema encodes what `command` returns, and
            the verification replays the new journal under it.
    """

    source: ClassVar[type[StateMachine]]
    target: ClassVar[type[StateMachine]]

    def command(self, command: Any, origin: Origin) -> Iterable[Any]:
        """The commands of the target app that `command` (a new client request, never a
        resend) becomes; called once per request, in log order.

        Return one to rename or change it, none to drop it, several to split it (they are
        applied in order; the first rejected one stops the rest, so put the one that validates
        everything first), or none now and the merged command with a later request (merge). A
        request's commands keep its client, session and request id and its old timestamp.
        """
        return (command,)

    def timer_fired(self, timer_id: int, deadline_ns: int, origin: Origin) -> tuple[int, int] | None:
        """The (timer_id, deadline_ns) a TIMER_FIRED record carries in the new journal, or None to
        drop it. A fire runs `on_timer` only if the new app scheduled exactly that timer with
        that deadline: change this only together with how the target schedules its timers."""
        return timer_id, deadline_ns

    def finish(self) -> Iterable[Any]:
        """Commands still held at the end of the old journal (a merge that never completed).
        They are written on the migration's own session (client id 0)."""
        return ()


def load_transform(spec: str) -> Transform:
    """A transform named `"package.module:name"`: a Transform subclass, or a function that
    returns a Transform (a factory, for one that takes arguments).

    Raises:
        TransformLoadError: the name is malformed, cannot be imported, or is not a transform
            with a source and a target app.
    """
    module_name, colon, name = spec.partition(":")
    if not colon or not module_name or not name:
        raise TransformLoadError(
            f"transform {spec!r} is not of the form 'package.module:name' (e.g. "
            "'sequencer.apps.ledger_v2:FromLedgerV1')"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise TransformLoadError(
            f"cannot import module {module_name!r} of transform {spec!r}: {error}. Is it on "
            "PYTHONPATH, or installed in the environment seqd runs in?"
        ) from error
    factory = getattr(module, name, None)
    if factory is None:
        raise TransformLoadError(f"module {module_name!r} has no {name!r} (transform {spec!r})")
    transform = factory() if callable(factory) else factory
    if not isinstance(transform, Transform):
        raise TransformLoadError(
            f"{spec} gives {transform!r}, not a sequencer.migrate.Transform: name a Transform "
            "subclass or a function that returns an instance of one"
        )
    check_transform(transform, spec)
    return transform


def check_transform(transform: Transform, name: str) -> None:
    """Raises TransformLoadError unless `transform` names a source and a target app."""
    for role in ("source", "target"):
        app = getattr(transform, role, None)
        if not (isinstance(app, type) and issubclass(app, StateMachine)
                and isinstance(getattr(app, "schema", None), Schema)):  # fmt: skip
            raise TransformLoadError(
                f"transform {name} has {role}={app!r}: set the class attribute `{role}` to the "
                f"StateMachine subclass {'that wrote the old journal' if role == 'source' else 'the new journal is for'}"
            )


def transform_name(transform: Transform) -> str:
    kind = type(transform)
    return f"{kind.__module__}:{kind.__qualname__}"
