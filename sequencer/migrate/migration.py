"""The migration loop: `Migration`, the sans-I/O core of a copy-and-transform of the journal.

`feed(run)` takes a run of whole old records (a journal batch) and returns the new records'
bytes, `finish()` the last ones; `index_map()` then says where each old index went. How each
record type is carried over, and why, is the theory of operation in `sequencer.migrate`.
"""

from __future__ import annotations

import struct
from typing import Any, Union

import msgspec

from sequencer.migrate.dedup_mirror import DedupMirror
from sequencer.migrate.errors import MigrationError, TransformError
from sequencer.migrate.index_map import IndexMap
from sequencer.migrate.transform import Origin, Transform, check_transform, transform_name
from sequencer.processor import CLIENT_EXPIRY_NS_DEFAULT
from sequencer.record import (
    COMMAND_PREFIX,
    RECORD_HEADER,
    RECORD_HEADER_BYTES,
    RecordType,
    decode_admin,
    decode_session_open,
    encode_session_open,
)
from sequencer.timers import TIMER_FIRED_PAYLOAD

__all__ = [
    "COMMANDS_PER_REQUEST_MAX",
    "MIGRATION_CLIENT_ID",
    "MIGRATION_NODE",
    "MIGRATION_SESSION_ID",
    "Migration",
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
# A journal migrated n times holds the n earlier migrations' sessions, and each migration takes the
# next id; far more migrations of one journal than this is no journal seqd wrote.
MIGRATION_SESSIONS_MAX = 1 << 16

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
# A record header's first fields, the ones that differ between the records one request becomes:
# length, type, version, index. The rest (term, timestamp, session id, request id, and a
# command's acked request id) is the old record's, copied as bytes.
_HEAD = struct.Struct(RECORD_HEADER.format[:5])
_HEAD_BYTES = _HEAD.size
_HEAD_SPACE = bytes(_HEAD_BYTES)
assert _HEAD.format == "<IHHQ" and _HEAD_BYTES == 16, _HEAD.format
_NO_OUTPUTS: tuple[Any, ...] = ()
# How a request's commands are written (see `sequencer.migrate`'s docstring).
_WHOLE = 0  # a COMMAND: the whole request
_FIRST = 1  # the first COMMAND_PART of a migrated request (a journal migrated before)
_LATER = 2  # a later COMMAND_PART of the same request


class Migration:
    """Turns the old journal's records into the new journal's (see `sequencer.migrate`).

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
        self._dedup = DedupMirror(client_expiry_ns)
        self._origin = Origin()
        self._decode = source_schema.decode_command
        # The source's current version decodes with one C call; the target's commands encode so.
        self._decode_current = msgspec.msgpack.Decoder(Union[source_schema.commands]).decode  # noqa: UP007
        encoder = msgspec.msgpack.Encoder()
        self._encoder_encode = encoder.encode
        self._encoder_encode_into = encoder.encode_into
        self._target_types = frozenset(target_schema.commands)
        self._source_version = source_schema.version
        self._target_version = target_schema.version
        # A command of a type both apps share, returned as it came, keeps its bytes.
        self._shared_types = frozenset(source_schema.commands) & frozenset(target_schema.commands)
        self._transform_command = transform.command
        self._timer_hook = type(transform).timer_fired is not Transform.timer_fired
        self._in: dict[Any, int] = {}  # record type or (record type, detail) -> records read
        self._out: dict[Any, int] = {}  # record type or (record type, detail) -> records written
        # COMMAND records read, by command type (every source type a key, as for the written)
        self._in_commands: dict[type, int] = dict.fromkeys(source_schema.commands, 0)
        self._in_parts: dict[type, int] = {}  # COMMAND_PART records read (a journal migrated before)
        # COMMAND and COMMAND_PART records written, by command type: every type of the target
        # is a key from the start (so the hot path counts with one `+= 1`, and a type that is
        # not the target's is a KeyError); `counts` leaves out the zeros.
        self._out_commands: dict[type, int] = dict.fromkeys(target_schema.commands, 0)
        self._out_parts: dict[type, int] = dict.fromkeys(target_schema.commands, 0)
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
        out = bytearray()  # the new records, written in place
        append = out.extend
        count_in = self._in
        count_out = self._out
        in_commands = self._in_commands
        out_commands = self._out_commands
        out_parts = self._out_parts
        sessions = self._dedup.sessions
        origin = self._origin
        decode_current = self._decode_current
        transform_command = self._transform_command
        encode_into = self._encoder_encode_into
        pack_head_into = _HEAD.pack_into
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
                        in_commands[kind] += 1  # the decoder gives the source's types only
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
                            # Every new record of the request has the old one's term, timestamp,
                            # session, request id and acked id: its header's last 40 bytes.
                            tail = view[position + _HEAD_BYTES : position + _COMMAND_START]
                            for output in outputs:
                                try:
                                    counts[type(output)] += 1  # holds the target's types only
                                except KeyError:
                                    raise self._not_a_target_command(output, index, command) from None
                                # Written in place, the command encoded after its header, whose
                                # length, type, version and index are packed in once the length
                                # is known: no bytes object per record, and no join.
                                start = len(out)
                                out += _HEAD_SPACE
                                out += tail
                                encode_into(output, out, -1)
                                record_length = len(out) - start
                                pack_head_into(out, start, record_length, out_type, target_version, new_index)
                                out += _PADS[-record_length & 7]
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
                        self._dedup.admin(admin, index, timestamp_ns)
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
        return bytes(out)

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
            if self._dedup.refused(client, request_id):
                self._count(self._in, (record_type, "(after a refused part: dropped)"))
                return new_index
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
                # The old node refused it (bad_command) and recorded its request id: keep that,
                # and drop the request's later parts, which it skipped (`DedupMirror.refuse`).
                outputs = _NO_OUTPUTS
                self._count(self._in, (record_type, "(undecodable: request id kept)"))
                self._dedup.refuse(self._dedup.sessions[header[6]].client, header[7])
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
            session_id = self._migration_session(timestamp_ns)
            payload = encode_session_open(MIGRATION_CLIENT_ID, MIGRATION_NODE)
            pieces.append(_record(_SESSION_OPEN, 1, new_index, term, timestamp_ns, session_id, 0,
                                  payload))  # fmt: skip
            count_out[(_SESSION_OPEN, "(migration session)")] = 1
            new_index += 1
            # Above the requests of the migrations before (client id 0 is theirs too, remembered
            # like any client's): from 1 again they would be resends, answered, never applied.
            client = self._dedup.sessions[session_id].client
            for request_id, output in enumerate(held, start=client.last_request_id + 1):
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
                client.last_request_id = request_id
        # Every session still open is closed, as the old node's next start would have done.
        for session_id in list(self._dedup.sessions):
            pieces.append(_record(_SESSION_CLOSE, 1, new_index, term, timestamp_ns, session_id, 0, b""))
            count_out[(_SESSION_CLOSE, "(open at the end)")] = count_out.get((_SESSION_CLOSE, "(open at the end)"), 0) + 1
            self._dedup.close(session_id, timestamp_ns)
            new_index += 1
        self.target_last_index = new_index - 1
        return b"".join(pieces)

    def _migration_session(self, timestamp_ns: int) -> int:
        """Opens the session of `finish()`'s commands in the mirror: the first id from
        MIGRATION_SESSION_ID on that the old journal's own rules take for a new session. A journal
        migrated before holds that migration's session, closed, and an open of it again would
        be a second copy to rules 2 (rules 1 take id 1 again): the new node would apply no command on
        it."""
        for session_id in range(MIGRATION_SESSION_ID, MIGRATION_SESSION_ID + MIGRATION_SESSIONS_MAX):
            if self._dedup.open(session_id, MIGRATION_CLIENT_ID, MIGRATION_NODE, timestamp_ns):
                return session_id
        raise MigrationError(
            f"no session id from {MIGRATION_SESSION_ID} to {MIGRATION_SESSION_ID + MIGRATION_SESSIONS_MAX - 1} "
            "(node number 0: the migrations' own) is free in the old journal, which holds their "
            "sessions: no seqd node or migration wrote it, and it cannot be migrated"
        )

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
                if count:
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
