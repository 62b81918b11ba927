"""Copy-and-transform of the journal: a new journal from an old one, through a transform.

Theory of operation. Upcasting (`sequencer.schema`) turns one old message into one new message
on replay. What it cannot do (rename a command into several, merge several into one, drop one)
needs a new journal: every record of the old one is read in index order, each client request's
command is handed to a `Transform`, and what it returns is written as the new journal's records,
with new indexes dense from 1. Everything else is carried over so that exactly-once and time
still hold after the migration (docs/evolution.md has the long form):

- Sessions and client ids: SESSION_OPEN, SESSION_CLOSE and ADMIN records are copied, so every
  command keeps its session, and through it its client id.
- Request ids: every command the transform returns for a request carries that request's session,
  request id and acked request id. One command is written as a COMMAND; zero or several as
  COMMAND_PART records back to back (`sequencer.processor`, "Migrated requests"): the request is
  deduplicated as one request on a resend, its parts stop at the first rejected one, and its
  saved reply is the last part's (or the rejection). A request that became no command is a part
  without command bytes: it records the request id, so a resend gets DUPLICATE, never a second
  application.
- Resends: a command the old node deduplicated (its request id was not above the client's last)
  changed nothing, and is dropped. To know which those are, `_DedupMirror` follows the processor's
  dedup decisions (sessions, last request id per client, client expiry) without running the app.
  A command without a session (the processor drops those) is dropped too.
- Time: each new record has the timestamp and term of the old record it came from, so time never
  goes backwards. TIMER_FIRED records are copied (or changed by `Transform.timer_fired`): their
  timer id and deadline must match what the new app scheduled, which the verification checks.
- SNAPSHOT records are dropped: a snapshot of the old app is no state of the new one, and the
  new journal's indexes differ. The new node starts from the new journal alone.
- At the end, the transform's `finish()` commands (a merge still open) are written on a session
  of the migration itself (client id 0, as a timer has), and every session still open is closed,
  as the old node's next start would have done with its `node_start` record.

`Migration` is the sans-I/O core: `feed(run)` takes a run of whole old records (a journal batch)
and returns the new records' bytes, `finish()` the last ones; `index_map()` then says where each
old index went. Reading, writing, locking and verifying are in `daemon/migrate.py`.
"""

from __future__ import annotations

import bisect
import importlib
import struct
from collections.abc import Iterable
from typing import Any, ClassVar, Union

import crc32c
import msgspec

from sequencer.processor import CLIENT_EXPIRY_NS_DEFAULT
from sequencer.record import (
    ADMIN_NODE_START,
    COMMAND_PREFIX,
    RECORD_HEADER,
    RECORD_HEADER_BYTES,
    RecordType,
    decode_admin,
    decode_session_open,
    encode_session_open,
)
from sequencer.schema import Schema
from sequencer.state_machine import StateMachine
from sequencer.timers import TIMER_FIRED_PAYLOAD

__all__ = [
    "COMMANDS_PER_REQUEST_MAX",
    "INDEX_MAP_FILE",
    "MIGRATION_CLIENT_ID",
    "MIGRATION_NODE",
    "MIGRATION_SESSION_ID",
    "IndexMap",
    "Migration",
    "MigrationError",
    "Origin",
    "Transform",
    "TransformError",
    "TransformLoadError",
    "check_transform",
    "load_transform",
    "transform_name",
]

# A request becomes a handful of commands; more is a transform gone wrong (returning a string
# iterates it into characters), and the processor applies a request's parts back to back.
COMMANDS_PER_REQUEST_MAX = 1024
# The transform's finish() commands go on a session no node can have issued: session ids carry
# the node number (1..255) in their top 8 bits, so one with 0 there is free; client id 0 is
# refused by every node's HELLO and is what `ctx.client_id` says for a timer.
MIGRATION_SESSION_ID = 1
MIGRATION_CLIENT_ID = 0
MIGRATION_NODE = "@migration"  # no node is named so: a node_start record never closes it
INDEX_MAP_FILE = "migration.index-map"  # beside the new journal's segments

_COMMAND = int(RecordType.COMMAND)
_COMMAND_PART = int(RecordType.COMMAND_PART)
_SESSION_OPEN = int(RecordType.SESSION_OPEN)
_SESSION_CLOSE = int(RecordType.SESSION_CLOSE)
_TIMER_FIRED = int(RecordType.TIMER_FIRED)
_SNAPSHOT = int(RecordType.SNAPSHOT)
_TERM_START = int(RecordType.TERM_START)
_ADMIN = int(RecordType.ADMIN)
_COPIED = frozenset({_SESSION_OPEN, _SESSION_CLOSE, _TERM_START, _ADMIN})
_COMMAND_START = RECORD_HEADER_BYTES + COMMAND_PREFIX.size  # the app's bytes in a COMMAND record
_PADS = [bytes(n) for n in range(8)]
_pack_header = RECORD_HEADER.pack
# A COMMAND record's header and its acked request id, packed at once.
_COMMAND_HEADER = struct.Struct(RECORD_HEADER.format + COMMAND_PREFIX.format.lstrip("<"))
_pack_command_header = _COMMAND_HEADER.pack
_unpack_prefix = COMMAND_PREFIX.unpack_from
assert _COMMAND_HEADER.size == _COMMAND_START
_unpack_header = RECORD_HEADER.unpack_from
_NO_OUTPUTS: tuple[Any, ...] = ()
# How a request's commands are written (see the module docstring).
_WHOLE = 0  # a COMMAND: the whole request
_FIRST = 1  # the first COMMAND_PART of a migrated request (a journal migrated before)
_LATER = 2  # a later COMMAND_PART of the same request


class MigrationError(Exception):
    """The old journal cannot be migrated as it is; the message says why and what to do."""


class TransformError(MigrationError):
    """The transform raised, or returned something that is not commands of the target app.

    Attributes:
        index: the old index of the record being transformed (0: in `finish`).
    """

    def __init__(self, message: str, index: int) -> None:
        super().__init__(message)
        self.index = index


class TransformLoadError(Exception):
    """The transform named on the command line cannot be loaded."""


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


# -- following the old node's dedup decisions ------------------------------------------------------


class _Client:
    __slots__ = ("last_request_id", "sessions")

    def __init__(self) -> None:
        self.last_request_id = 0
        self.sessions = 0


class _Session:
    __slots__ = ("client", "client_id", "node")

    def __init__(self, client_id: int, node: str, client: _Client) -> None:
        self.client_id = client_id
        self.node = node
        self.client = client


class _DedupMirror:
    """The processor's session and dedup bookkeeping, without the app and the saved replies.

    It must decide exactly as `sequencer.processor.Processor` did which commands were applied:
    the same session table (SESSION_OPEN/CLOSE, `node_start` closing a node's sessions), the
    same last request id per client, the same client expiry in log time (a client without a
    session for `client_expiry_ns` is forgotten, so its next request id counts as new).
    tests/test_migrate.py checks the two against each other.
    """

    def __init__(self, client_expiry_ns: int) -> None:
        self.client_expiry_ns = client_expiry_ns
        self.sessions: dict[int, _Session] = {}
        self.clients: dict[int, _Client] = {}
        self.idle: dict[int, int] = {}  # client id -> idle since, oldest first

    def open(self, session_id: int, client_id: int, node: str, timestamp_ns: int) -> None:
        client = self.clients.get(client_id)
        if client is None:
            client = self.clients[client_id] = _Client()
        client.sessions += 1
        self.idle.pop(client_id, None)
        self._expire(timestamp_ns)
        self.sessions[session_id] = _Session(client_id, node, client)

    def close(self, session_id: int, timestamp_ns: int) -> bool:
        session = self.sessions.pop(session_id, None)
        if session is None:
            return False
        client = session.client
        client.sessions -= 1
        if client.sessions == 0:
            self.idle[session.client_id] = timestamp_ns
        self._expire(timestamp_ns)
        return True

    def close_node(self, node: str, timestamp_ns: int) -> None:
        for session_id in [sid for sid, session in self.sessions.items() if session.node == node]:
            self.close(session_id, timestamp_ns)

    def _expire(self, now_ns: int) -> None:
        idle = self.idle
        deadline = now_ns - self.client_expiry_ns
        while idle:
            client_id = next(iter(idle))
            if idle[client_id] > deadline:
                break
            del idle[client_id]
            del self.clients[client_id]


# -- the migration ---------------------------------------------------------------------------------


class Migration:
    """Turns the old journal's records into the new journal's (see the module docstring).

    Args:
        transform: the Transform (with `source` and `target` apps).
        client_expiry_ns: the old node's `node.client_expiry_s`, in ns: it decided which
            requests were resends, so the same value must be used here.

    Invariants (between calls): `source_last_index` is the last old index fed (0 before the
    first); `target_last_index` the last new index written; every old index up to
    `source_last_index` is in the index map.
    """

    def __init__(self, transform: Transform, client_expiry_ns: int = CLIENT_EXPIRY_NS_DEFAULT) -> None:
        check_transform(transform, transform_name(transform))
        self.transform = transform
        self.name = transform_name(transform)
        source_schema = transform.source.schema
        target_schema = transform.target.schema
        self.source_schema = source_schema
        self.target_schema = target_schema
        self.source_last_index = 0
        self.target_last_index = 0
        self.finished = False
        self._dedup = _DedupMirror(client_expiry_ns)
        self._origin = Origin()
        self._decode = source_schema.decode_command
        # The source's current version decodes with one C call; the target's commands encode so.
        self._decode_current = msgspec.msgpack.Decoder(Union[source_schema.commands]).decode  # noqa: UP007
        self._encoder_encode = msgspec.msgpack.Encoder().encode
        self._target_types = frozenset(target_schema.commands)
        self._source_version = source_schema.version
        self._target_version = target_schema.version
        # A command of a type both apps share, returned as it came, keeps its bytes.
        self._shared_types = frozenset(source_schema.commands) & frozenset(target_schema.commands)
        self._transform_command = transform.command
        self._timer_hook = type(transform).timer_fired is not Transform.timer_fired
        self._in: dict[Any, int] = {}  # record type or (record type, detail) -> records read
        self._out: dict[Any, int] = {}  # record type or (record type, detail) -> records written
        self._in_commands: dict[type, int] = {}  # COMMAND records read, by command type
        self._in_parts: dict[type, int] = {}  # COMMAND_PART records read (a journal migrated before)
        self._out_commands: dict[type, int] = {}  # COMMAND records written, by command type
        self._out_parts: dict[type, int] = {}  # COMMAND_PART records written, by command type
        self._runs: list[tuple[int, int, int, int]] = []  # closed index-map runs
        self._run_old_first = 1  # the open run: old indexes from here map to `_run_per` each
        self._run_new_first = 1
        self._run_per = -1  # none yet
        self._last = (0, 0)  # the term and timestamp of the last old record

    # -- records in ---------------------------------------------------------------------------

    def feed(self, run: Any) -> bytes:
        """The new records for a run of whole old records (the next ones, in index order).

        Raises:
            TransformError: the transform raised or returned what the target cannot encode;
                the message names the old index.
            MigrationError: a gap in the old indexes, a record type this seqd does not know, or
                a command newer than the transform's source app.
        """
        assert not self.finished, "feed after finish"
        # One copy of the run, immutable: commands decode from views into it without a copy each,
        # and a msgspec.Raw field of one (which references its input) stays valid after the
        # reader reuses its buffer.
        view = memoryview(bytes(run))
        end = len(view)
        pieces: list[Any] = []
        append = pieces.append
        count_in = self._in
        count_out = self._out
        in_commands = self._in_commands
        out_commands = self._out_commands
        out_parts = self._out_parts
        sessions = self._dedup.sessions
        origin = self._origin
        decode_current = self._decode_current
        transform_command = self._transform_command
        encode = self._encoder_encode
        target_types = self._target_types
        shared_types = self._shared_types
        source_version = self._source_version
        target_version = self._target_version
        expected = self.source_last_index + 1
        new_index = self.target_last_index + 1
        term, timestamp_ns = self._last
        run_per = self._run_per
        outputs: Any
        position = 0
        try:
            while position < end:
                header = _unpack_header(view, position)
                length, record_type, version, index, term, timestamp_ns, session_id, request_id = header
                step = (length + 7) & -8
                if position == 0 and index != expected:
                    raise self._gap(index, expected)
                first_new = new_index
                session = sessions.get(session_id) if record_type == _COMMAND else None
                if (session is not None and request_id > session.client.last_request_id
                        and version == source_version and length > _COMMAND_START):  # fmt: skip
                    # The hot path: a new request, at the source's current version. The same as
                    # `_command` and `_emit` for the common outcomes, with bound locals and
                    # without a call per record; anything unusual goes through them.
                    session.client.last_request_id = request_id
                    try:
                        command = decode_current(view[position + _COMMAND_START : position + length])
                    except Exception:
                        new_index = self._command(view, position, header, session.client_id, _WHOLE,
                                                  new_index, append)  # fmt: skip
                    else:
                        kind = type(command)
                        in_commands[kind] = in_commands.get(kind, 0) + 1
                        origin._header = header
                        origin.client_id = session.client_id
                        try:
                            outputs = transform_command(command, origin)
                        except Exception as error:
                            raise self._failure(error, index, command) from error
                        count = len(outputs) if type(outputs) is tuple or type(outputs) is list else -1
                        if count == 1 and outputs[0] is command and kind in shared_types:
                            # Unchanged, of a type both apps share: the same bytes decode the same.
                            out_commands[kind] = out_commands.get(kind, 0) + 1
                            append(_pack_header(length, _COMMAND, target_version, new_index, term,
                                                timestamp_ns, session_id, request_id))  # fmt: skip
                            append(view[position + RECORD_HEADER_BYTES : position + step])
                            new_index += 1
                        elif 0 < count <= COMMANDS_PER_REQUEST_MAX:
                            out_type, counts = (_COMMAND, out_commands) if count == 1 else (_COMMAND_PART, out_parts)
                            (acked_request_id,) = _unpack_prefix(view, position + RECORD_HEADER_BYTES)
                            for output in outputs:
                                output_kind = type(output)
                                if output_kind not in target_types:
                                    raise self._not_a_target_command(output, index, command)
                                counts[output_kind] = counts.get(output_kind, 0) + 1
                                data = encode(output)
                                record_length = _COMMAND_START + len(data)
                                append(_pack_command_header(record_length, out_type, target_version, new_index,
                                                            term, timestamp_ns, session_id, request_id,
                                                            acked_request_id))  # fmt: skip
                                append(data)
                                append(_PADS[-record_length & 7])
                                new_index += 1
                        else:
                            new_index = self._emit(outputs, command, view, position, header, _WHOLE,
                                                   new_index, append)  # fmt: skip
                elif record_type == _COMMAND or record_type == _COMMAND_PART:
                    new_index = self._request(view, position, header, new_index, append)
                elif record_type in _COPIED:
                    if record_type == _SESSION_OPEN:
                        opened = decode_session_open(view[position + RECORD_HEADER_BYTES : position + length])
                        self._dedup.open(session_id, opened.client_id, opened.node, timestamp_ns)
                    elif record_type == _SESSION_CLOSE:
                        self._dedup.close(session_id, timestamp_ns)
                    elif record_type == _ADMIN:
                        admin = decode_admin(view[position + RECORD_HEADER_BYTES : position + length])
                        if admin["op"] == ADMIN_NODE_START:
                            self._dedup.close_node(admin["node"], timestamp_ns)
                    count_in[record_type] = count_in.get(record_type, 0) + 1
                    count_out[record_type] = count_out.get(record_type, 0) + 1
                    append(_pack_header(length, record_type, version, new_index, term, timestamp_ns,
                                        session_id, request_id))  # fmt: skip
                    append(view[position + RECORD_HEADER_BYTES : position + step])
                    new_index += 1
                elif record_type == _TIMER_FIRED:
                    count_in[record_type] = count_in.get(record_type, 0) + 1
                    new_index = self._timer_fired(view, position, header, new_index, append)
                elif record_type == _SNAPSHOT:
                    self._count(count_in, (record_type, "(dropped)"))
                else:
                    raise MigrationError(
                        f"record {index} has type {record_type}, which this seqd does not know: "
                        "migrate it with the seqd version that wrote it"
                    )
                if new_index - first_new != run_per:
                    self._new_run(index, first_new, new_index - first_new)
                    run_per = new_index - first_new
                expected += 1
                position += step
            # A journal batch is gapless (its reader checked it); a run from elsewhere is checked
            # here, once per run rather than per record.
            if end and index != expected - 1:
                raise self._gap(index, expected - 1)
        finally:
            self.source_last_index = expected - 1
            self.target_last_index = new_index - 1
            self._last = (term, timestamp_ns)
        return b"".join(pieces)

    def _gap(self, index: int, expected: int) -> MigrationError:
        if expected == 1:
            return MigrationError(
                f"the old journal starts at index {index}: copy-and-transform needs the whole "
                "history from index 1 (segments deleted by retention cannot be migrated)"
            )
        return MigrationError(
            f"the old records are not gapless: record {index} where {expected} was expected"
        )

    def _request(self, view: memoryview, position: int, header: tuple[int, ...], new_index: int,
                 append: Any) -> int:  # fmt: skip
        """A COMMAND or COMMAND_PART off the hot path: decides, as the old node's processor did,
        whether it was a new request, a later part of one, a resend or without a session."""
        record_type, request_id = header[1], header[7]
        session = self._dedup.sessions.get(header[6])
        if session is None:
            self._count(self._in, (record_type, "(no session: dropped)"))
            return new_index
        client = session.client
        last = client.last_request_id
        if record_type == _COMMAND:
            if request_id <= last:
                self._count(self._in, (record_type, "(resent: dropped)"))
                return new_index
            client.last_request_id = request_id
            shape = _WHOLE
        elif request_id > last:
            client.last_request_id = request_id
            shape = _FIRST
        elif request_id == last:
            shape = _LATER
        else:
            self._count(self._in, (record_type, "(stale part: dropped)"))
            return new_index
        return self._command(view, position, header, session.client_id, shape, new_index, append)

    def _new_run(self, index: int, first_new: int, per: int) -> None:
        if self._run_per >= 0 and index > self._run_old_first:
            self._runs.append((self._run_old_first, self._run_new_first,
                               index - self._run_old_first, self._run_per))  # fmt: skip
        self._run_old_first = index
        self._run_new_first = first_new
        self._run_per = per

    def _command(self, view: memoryview, position: int, header: tuple[int, ...], client_id: int,
                 shape: int, new_index: int, append: Any) -> int:  # fmt: skip
        """Writes what one request's command becomes; returns the next new index."""
        length, record_type, version, index = header[:4]
        outputs: Any
        command: Any = None
        if length == _COMMAND_START:
            outputs = _NO_OUTPUTS  # a part that was no command already
            self._count(self._in, (record_type, "(no command)"))
        else:
            body = view[position + _COMMAND_START : position + length]
            try:
                if version == self._source_version:
                    command = self._decode_current(body)
                else:
                    command = self._decode(version, body, index)  # upcast from an older version
            except Exception as error:
                if version > self._source_version:
                    raise MigrationError(
                        f"record {index} holds a command of schema version {version}, newer than "
                        f"the transform's source app ({self.source_schema.name} "
                        f"v{self._source_version}): use a transform whose source is the app that "
                        "wrote this journal"
                    ) from error
                # The old node refused it (bad_command) and recorded its request id: keep that.
                outputs = _NO_OUTPUTS
                self._count(self._in, (record_type, "(undecodable: request id kept)"))
            else:
                self._count(self._in_commands if record_type == _COMMAND else self._in_parts, type(command))
                self._origin._header = header
                self._origin.client_id = client_id
                try:
                    outputs = self._transform_command(command, self._origin)
                except Exception as error:
                    raise self._failure(error, index, command) from error
        return self._emit(outputs, command, view, position, header, shape, new_index, append)

    def _emit(self, outputs: Any, command: Any, view: memoryview, position: int,
              header: tuple[int, ...], shape: int, new_index: int, append: Any) -> int:  # fmt: skip
        """Writes the records of one request's commands (`outputs`, as the transform returned
        them); returns the next new index."""
        length, _record_type, version, index, term, timestamp_ns, session_id, request_id = header
        if type(outputs) is not tuple and type(outputs) is not list:
            outputs = self._as_list(outputs, index, command)
        if len(outputs) > COMMANDS_PER_REQUEST_MAX:
            raise TransformError(
                f"the transform {self.name} returned {len(outputs)} commands for the record at "
                f"old index {index} ({command!r:.200}), more than COMMANDS_PER_REQUEST_MAX="
                f"{COMMANDS_PER_REQUEST_MAX}", index,
            )  # fmt: skip
        if (shape == _WHOLE and len(outputs) == 1 and outputs[0] is command
                and version == self._source_version and type(command) in self._shared_types):  # fmt: skip
            # Unchanged, of a type both apps share: the same bytes decode the same.
            self._count(self._out_commands, type(command))
            append(_pack_header(length, _COMMAND, self._target_version, new_index, term,
                                timestamp_ns, session_id, request_id))  # fmt: skip
            append(view[position + RECORD_HEADER_BYTES : position + ((length + 7) & -8)])
            return new_index + 1
        (acked_request_id,) = _unpack_prefix(view, position + RECORD_HEADER_BYTES)
        if not outputs:
            if shape == _LATER:
                return new_index
            # A request that became no command still records its request id (a part without
            # command bytes), so a resend of it is answered DUPLICATE and not applied.
            self._count(self._out, (_COMMAND_PART, "(no command)"))
            append(_pack_command_header(_COMMAND_START, _COMMAND_PART, self._target_version,
                                        new_index, term, timestamp_ns, session_id, request_id,
                                        acked_request_id))  # fmt: skip
            return new_index + 1
        if shape == _WHOLE and len(outputs) == 1:
            out_type, counts = _COMMAND, self._out_commands
        else:
            out_type, counts = _COMMAND_PART, self._out_parts
        for output in outputs:
            if type(output) not in self._target_types:
                raise self._not_a_target_command(output, index, command)
            self._count(counts, type(output))
            data = self._encoder_encode(output)
            record_length = _COMMAND_START + len(data)
            append(_pack_command_header(record_length, out_type, self._target_version, new_index,
                                        term, timestamp_ns, session_id, request_id,
                                        acked_request_id))  # fmt: skip
            append(data)
            append(_PADS[-record_length & 7])
            new_index += 1
        return new_index

    def _not_a_target_command(self, output: Any, index: int, command: Any) -> TransformError:
        schema = self.target_schema
        return TransformError(
            f"the transform {self.name} returned {output!r:.200} for the record at old index "
            f"{index} ({command!r:.200}): {type(output).__name__} is not a command of "
            f"{schema.name} v{schema.version} (its commands: "
            + ", ".join(t.__name__ for t in schema.commands) + ")", index,
        )  # fmt: skip

    @staticmethod
    def _count(counts: dict[Any, int], key: Any) -> None:
        counts[key] = counts.get(key, 0) + 1

    def _as_list(self, outputs: Any, index: int, command: Any) -> list[Any]:
        if isinstance(outputs, msgspec.Struct) or outputs is None or isinstance(outputs, str | bytes):
            raise TransformError(
                f"the transform {self.name} returned {outputs!r:.200} for the record at old index "
                f"{index}: return an iterable of commands (e.g. `return [command]`, or `return []` "
                "to drop it)", index,
            )  # fmt: skip
        try:
            return list(outputs)  # a generator runs here
        except Exception as error:
            raise self._failure(error, index, command) from error

    def _failure(self, error: Exception, index: int, command: Any) -> TransformError:
        where = f"the record at old index {index}" if index else "finish()"
        described = f" ({command!r:.200})" if command is not None else ""
        return TransformError(
            f"the transform {self.name} raised {type(error).__name__}: {error} on {where}"
            f"{described}", index,
        )  # fmt: skip

    def _timer_fired(self, view: memoryview, position: int, header: tuple[int, ...], new_index: int,
                     append: Any) -> int:  # fmt: skip
        length, record_type, version, index, term, timestamp_ns, session_id, request_id = header
        payload_at = position + RECORD_HEADER_BYTES
        count_out = self._out
        if self._timer_hook:
            timer_id, deadline_ns = TIMER_FIRED_PAYLOAD.unpack_from(view, payload_at)
            origin = self._origin
            origin._header = (length, record_type, version, index, term, timestamp_ns, 0, 0)
            origin.client_id = 0
            try:
                changed = self.transform.timer_fired(timer_id, deadline_ns, origin)
            except Exception as error:
                raise self._failure(error, index, f"TIMER_FIRED({timer_id}, {deadline_ns})") from error
            if changed is None:
                count_out[(record_type, "(dropped)")] = count_out.get((record_type, "(dropped)"), 0) + 1
                return new_index
            timer_id, deadline_ns = changed
            count_out[record_type] = count_out.get(record_type, 0) + 1
            append(_pack_header(length, record_type, version, new_index, term, timestamp_ns,
                                session_id, timer_id))  # fmt: skip
            append(TIMER_FIRED_PAYLOAD.pack(timer_id, deadline_ns))
            append(_PADS[-length & 7])
            return new_index + 1
        count_out[record_type] = count_out.get(record_type, 0) + 1
        append(_pack_header(length, record_type, version, new_index, term, timestamp_ns, session_id,
                            request_id))  # fmt: skip
        append(view[payload_at : position + ((length + 7) & -8)])
        return new_index + 1

    # -- the end ------------------------------------------------------------------------------

    def finish(self) -> bytes:
        """The last new records: the transform's `finish()` commands on the migration's own
        session, then a SESSION_CLOSE for every session still open. Call once, after the last
        `feed`.

        Raises:
            TransformError: `finish()` raised or returned what the target cannot encode.
        """
        assert not self.finished, "finish twice"
        self.finished = True
        if self._run_per >= 0:
            self._new_run(self.source_last_index + 1, self.target_last_index + 1, 0)
        self._run_per = -1
        pieces: list[bytes] = []
        new_index = self.target_last_index + 1
        term, timestamp_ns = self._last
        try:
            held = self.transform.finish()
            held = list(held) if type(held) is not list else held
        except Exception as error:
            raise self._failure(error, 0, None) from error
        count_out = self._out
        if held:
            session_id = MIGRATION_SESSION_ID
            while session_id in self._dedup.sessions:  # only in a journal no node wrote
                session_id += 1
            payload = encode_session_open(MIGRATION_CLIENT_ID, MIGRATION_NODE)
            pieces.append(_record(_SESSION_OPEN, 1, new_index, term, timestamp_ns, session_id, 0,
                                  payload))  # fmt: skip
            count_out[(_SESSION_OPEN, "(migration session)")] = 1
            new_index += 1
            for request_id, output in enumerate(held, start=1):
                try:
                    version, data = self.target_schema.encode_command(output)
                except TypeError as error:
                    raise TransformError(
                        f"the transform {self.name} returned {output!r:.200} from finish(): {error}", 0
                    ) from error
                acked = COMMAND_PREFIX.pack(request_id - 1)  # keeps one saved reply at most
                pieces.append(_record(_COMMAND, version, new_index, term, timestamp_ns, session_id,
                                      request_id, acked + data))  # fmt: skip
                self._count(self._out_commands, type(output))
                new_index += 1
            self._dedup.open(session_id, MIGRATION_CLIENT_ID, MIGRATION_NODE, timestamp_ns)
        # Every session still open is closed, as the old node's next start would have done.
        for session_id in list(self._dedup.sessions):
            pieces.append(_record(_SESSION_CLOSE, 1, new_index, term, timestamp_ns, session_id, 0, b""))
            count_out[(_SESSION_CLOSE, "(open at the end)")] = count_out.get((_SESSION_CLOSE, "(open at the end)"), 0) + 1
            self._dedup.close(session_id, timestamp_ns)
            new_index += 1
        self.target_last_index = new_index - 1
        return b"".join(pieces)

    # -- what it did --------------------------------------------------------------------------

    def counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """(records read, records written) by type, e.g. {"COMMAND Transfer": 10, "SNAPSHOT
        (dropped)": 1}, in a stable order."""
        read = dict(self._in)
        written = dict(self._out)
        for counts, record_type, kinds in ((read, _COMMAND, self._in_commands),
                                           (read, _COMMAND_PART, self._in_parts),
                                           (written, _COMMAND, self._out_commands),
                                           (written, _COMMAND_PART, self._out_parts)):
            for kind, count in kinds.items():
                counts[(record_type, kind)] = count
        return _named(read), _named(written)

    def index_map(self) -> IndexMap:
        """Where every old index went; complete after `finish`."""
        assert self.finished, "index_map before finish"
        return IndexMap(self._runs, self.source_last_index, self.target_last_index)


def _record(record_type: int, version: int, index: int, term: int, timestamp_ns: int,
            session_id: int, request_id: int, payload: bytes) -> bytes:  # fmt: skip
    length = RECORD_HEADER_BYTES + len(payload)
    return (_pack_header(length, record_type, version, index, term, timestamp_ns, session_id,
                         request_id) + payload + _PADS[-length & 7])  # fmt: skip


def _named(counts: dict[Any, int]) -> dict[str, int]:
    named: dict[str, int] = {}
    for key, count in counts.items():
        record_type, detail = key if isinstance(key, tuple) else (key, "")
        name = RecordType(record_type).name
        if isinstance(detail, type):
            detail = detail.__name__
        label = f"{name} {detail}" if detail else name
        named[label] = named.get(label, 0) + count
    return dict(sorted(named.items()))


# -- the index map -------------------------------------------------------------------------------

# magic, layout version, header bytes, crc32c of the file with this field zeroed, old last index,
# new last index, run count; then the runs.
_MAP_HEADER = struct.Struct("<8sHHIQQQ")
# old first index, new first index, old count, new records per old record
_MAP_RUN = struct.Struct("<QQII")
_MAP_MAGIC = b"SEQDIMAP"
_MAP_LAYOUT_VERSION = 1
_MAP_CRC_OFFSET = 12
_RUN_COUNT_MAX = (1 << 32) - 1  # old_count is a u32: a longer run is stored as several


class IndexMap:
    """Where each old index went in a migration: old index -> the new indexes of its records.

    Stored as runs (old first, new first, old count, new records per old record): a stretch of
    records copied one for one is one run, a stretch of transfers split in two another. The file
    (`INDEX_MAP_FILE`, beside the new journal's segments) is a 40-byte header (magic
    `SEQDIMAP`, layout version, header bytes, CRC-32C of the file with this field zeroed, old
    last index, new last index, run count), then 24 bytes per run (`<QQII`), little-endian.

    Args:
        runs: (old_first, new_first, old_count, per_old), ascending and contiguous from old 1.
        source_last_index: the old journal's last index.
        target_last_index: the new journal's last index (records after `covering(
            source_last_index)` were added by the migration itself).
    """

    def __init__(self, runs: list[tuple[int, int, int, int]], source_last_index: int,
                 target_last_index: int) -> None:  # fmt: skip
        self.runs = runs
        self.source_last_index = source_last_index
        self.target_last_index = target_last_index
        self._old_firsts = [run[0] for run in runs]
        expected_old, expected_new = 1, 1
        for old_first, new_first, old_count, per_old in runs:
            assert old_first == expected_old, (old_first, expected_old)
            assert new_first == expected_new, (new_first, expected_new)
            assert old_count > 0, old_count
            expected_old += old_count
            expected_new += old_count * per_old
        assert expected_old == source_last_index + 1, (expected_old, source_last_index)
        assert expected_new <= target_last_index + 1, (expected_new, target_last_index)
        self._carried = [run for run in runs if run[3] > 0]
        self._new_firsts = [run[1] for run in self._carried]

    def targets(self, old_index: int) -> range:
        """The new indexes of the records old record `old_index` became: one for a copy, several
        for a split, none for a dropped record or a request merged into a later one (the empty
        range then starts where its records would have been).

        Raises:
            KeyError: `old_index` is not in 1..source_last_index.
        """
        if not 1 <= old_index <= self.source_last_index:
            raise KeyError(f"old index {old_index} is outside the migrated journal (1..{self.source_last_index})")
        old_first, new_first, _old_count, per_old = self.runs[bisect.bisect_right(self._old_firsts, old_index) - 1]
        start = new_first + (old_index - old_first) * per_old
        return range(start, start + per_old)

    def covering(self, old_index: int) -> int:
        """The last new index whose records all come from old indexes up to `old_index`: a
        follower that had applied the old journal to `old_index` resumes after this (0: none)."""
        return self.targets(old_index).stop - 1

    def source(self, new_index: int) -> int | None:
        """The old index a new record came from; None for a record the migration added at the end.

        Raises:
            KeyError: `new_index` is not in 1..target_last_index.
        """
        if not 1 <= new_index <= self.target_last_index:
            raise KeyError(f"new index {new_index} is outside the new journal (1..{self.target_last_index})")
        position = bisect.bisect_right(self._new_firsts, new_index) - 1
        if position < 0:
            return None
        old_first, new_first, old_count, per_old = self._carried[position]
        offset = (new_index - new_first) // per_old
        return old_first + offset if offset < old_count else None

    def to_bytes(self) -> bytes:
        runs = []
        for old_first, new_first, old_count, per_old in self.runs:
            while old_count > _RUN_COUNT_MAX:
                runs.append(_MAP_RUN.pack(old_first, new_first, _RUN_COUNT_MAX, per_old))
                old_first += _RUN_COUNT_MAX
                new_first += _RUN_COUNT_MAX * per_old
                old_count -= _RUN_COUNT_MAX
            runs.append(_MAP_RUN.pack(old_first, new_first, old_count, per_old))
        header = _MAP_HEADER.pack(_MAP_MAGIC, _MAP_LAYOUT_VERSION, _MAP_HEADER.size, 0,
                                  self.source_last_index, self.target_last_index, len(runs))  # fmt: skip
        body = b"".join(runs)
        crc = crc32c.crc32c(body, crc32c.crc32c(header))
        return header[:_MAP_CRC_OFFSET] + struct.pack("<I", crc) + header[_MAP_CRC_OFFSET + 4 :] + body

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "index map") -> IndexMap:
        """Raises MigrationError on a damaged or foreign file (`name` says which, in the message)."""
        if len(data) < _MAP_HEADER.size:
            raise MigrationError(f"{name} is {len(data)} bytes, too short for its header: not an index map")
        magic, layout, header_bytes, crc, source_last, target_last, count = _MAP_HEADER.unpack_from(data)
        if magic != _MAP_MAGIC:
            raise MigrationError(f"{name} does not start with {_MAP_MAGIC!r}: not a seqd index map")
        if layout != _MAP_LAYOUT_VERSION or header_bytes != _MAP_HEADER.size:
            raise MigrationError(f"{name} has layout version {layout}; this seqd reads {_MAP_LAYOUT_VERSION}")
        if len(data) != header_bytes + count * _MAP_RUN.size:
            raise MigrationError(f"{name} is {len(data)} bytes but its header says {count} runs: cut short?")
        zeroed = data[:_MAP_CRC_OFFSET] + bytes(4) + data[_MAP_CRC_OFFSET + 4 : header_bytes]
        if crc32c.crc32c(data[header_bytes:], crc32c.crc32c(zeroed)) != crc:
            raise MigrationError(f"{name} fails its CRC-32C: the file is damaged")
        runs = [_MAP_RUN.unpack_from(data, header_bytes + n * _MAP_RUN.size) for n in range(count)]
        return cls(runs, source_last, target_last)
