"""An app's message types, their version, and the upcasters that bring old data up to date.

Theory of operation. A journal outlives the code that wrote it: a record written by version 1 of
an app is replayed, years later, by version 5. So every command, reply, event and snapshot is
stored with the version of the schema that encoded it (the record header's `version` field for a
command; the egress frame for replies and events; the snapshot file header for a snapshot), and
decoding takes that version as an argument:

- the version equals the code's: the fast path, one typed msgspec decode of the tagged union;
- older: decode to builtins (dicts, or lists for `array_like` structs), run the registered
  upcasters one version step at a time (1 -> 2 -> 3 ...), then `msgspec.convert` to the current
  types. An upcaster is a pure function of one message: it may rename, add (with a value the new
  code would have computed), remove or re-tag fields, never look at other messages;
- newer than the code: `VersionError`. Misreading a field we do not know is worse than stopping.

One version number covers the whole schema (every type in it), because the record header has one
version field and because "ledger v3" is a thing an operator can reason about. Bump it whenever
any type changes shape, and register an upcaster for each type whose stored form changed; types
without an upcaster for a step pass through unchanged. Merges and splits of messages do not fit
upcasting (one message in, one out): they need a copy-and-transform of the journal (Overeem et
al., "The Dark Side of Event Sourcing", 2017).

The same object serves the client library (`schema=`): it encodes commands and decodes replies
and events with the same types and the same version rules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Union

import msgspec
import msgspec.inspect

__all__ = [
    "SCHEMA_VERSION_MAX", "HotCodec", "Schema", "SchemaError", "Upcaster", "VersionError",
    "borrows_input",
]  # fmt: skip

# The record header and the egress frames carry the version in a u16.
SCHEMA_VERSION_MAX = 0xFFFF

# An upcaster takes the builtin form of one message at version v (a dict for a map-like struct,
# a list for an `array_like` one) and returns its form at version v + 1.
Upcaster = Callable[[Any], Any]



class HotCodec(NamedTuple):
    """`Schema.hot_codec()`: the schema's msgspec functions for the processor's hot path."""

    decode_command: Callable[[Any], Any]
    encode: Callable[[Any], bytes]
    event_types: frozenset[type]
    # Whether a decoded command may point into the bytes it was decoded from (`borrows_input`):
    # then the processor decodes it from a copy of the ring's bytes, else from the ring itself.
    command_borrows_input: bool


# What msgspec decodes as a view of its input rather than a copy; CustomType (a type only a
# dec_hook knows) counts too, as the safe answer for what this module cannot see into.
_BORROWING_TYPES = (
    msgspec.inspect.RawType, msgspec.inspect.MemoryViewType, msgspec.inspect.CustomType,
)  # fmt: skip


def borrows_input(type_: Any) -> bool:
    """Whether a value msgspec decodes as `type_` can hold a reference into the buffer it was
    decoded from: a `msgspec.Raw` or a `memoryview` anywhere in it (fields, items, unions,
    nested and recursive structs). Everything else is copied out by the decode (str, bytes,
    bytearray, an Ext's data, Any), so the buffer may be reused once the decode returns.
    """
    seen: set[int] = set()

    def walk(info: Any) -> bool:
        if isinstance(info, _BORROWING_TYPES):
            return True
        if id(info) in seen:
            return False
        seen.add(id(info))
        if isinstance(info, tuple):
            return any(walk(item) for item in info)
        if isinstance(info, (msgspec.inspect.Type, msgspec.inspect.Field)):  # every part of it
            return any(walk(getattr(info, name)) for name in info.__struct_fields__)
        return False

    return walk(msgspec.inspect.type_info(type_))

class SchemaError(Exception):
    """A schema is badly declared (found when the app is loaded, never while applying)."""


class VersionError(Exception):
    """Data was written by a newer version of the app than this code, or cannot be upcast."""


class Schema:
    """The types of one app and how to read every version of them.

    Args:
        name: the app's name, written in snapshot headers and error messages ("ledger").
        version: the current schema version, 1 to SCHEMA_VERSION_MAX.
        commands: the command types, msgspec Structs declared with `tag=...`, forming a tagged
            union; all map-like or all `array_like` (msgspec's rule for unions).
        replies: the reply types, tagged likewise. An `apply` may also return None.
        events: the event types, tagged likewise (may be empty).
        snapshot_type: the msgspec Struct that `StateMachine.snapshot()` returns.
        upcasters: {(type name, from_version): function}, the same as registering each with
            `@schema.upcaster(name, from_version=...)`. The snapshot's name is `Schema.SNAPSHOT`.

    Raises:
        SchemaError: a type is not a tagged Struct, two types share a tag, or the version is
            out of range.
    """

    # The upcaster key of the snapshot type: a snapshot is not tagged, and "@" cannot start a
    # Python class name, so it never collides with a message's tag.
    SNAPSHOT = "@snapshot"

    def __init__(
        self,
        name: str,
        version: int,
        commands: tuple[type, ...],
        replies: tuple[type, ...] = (),
        events: tuple[type, ...] = (),
        snapshot_type: type | None = None,
        upcasters: dict[tuple[str, int], Upcaster] | None = None,
    ) -> None:
        if not 1 <= version <= SCHEMA_VERSION_MAX:
            raise SchemaError(
                f"schema {name!r} has version {version}: a version is 1 to {SCHEMA_VERSION_MAX}"
            )
        if not commands:
            raise SchemaError(f"schema {name!r} declares no command types")
        self.name = name
        self.version = version
        self.commands = tuple(commands)
        self.replies = tuple(replies)
        self.events = tuple(events)
        self.snapshot_type = snapshot_type
        self._upcasters: dict[tuple[Any, int], Upcaster] = {}
        for (type_name, from_version), function in (upcasters or {}).items():
            self._register(type_name, from_version, function)

        self._tag_fields = {}
        for kind, types in (("command", self.commands), ("reply", self.replies),
                            ("event", self.events)):
            self._tag_fields[kind] = _check_tagged_union(name, kind, types)
        self._command_types = frozenset(self.commands)
        self._event_types = frozenset(self.events)

        # msgspec compiles a decoder per type once; a decode is then one C call.
        self._encoder = msgspec.msgpack.Encoder()
        self._command_type: Any = Union[self.commands]  # noqa: UP007 (a runtime tuple)
        self._reply_type: Any = Union[(*self.replies, None)]
        self._event_type: Any = Union[self.events] if self.events else None  # noqa: UP007
        self._command_decoder = msgspec.msgpack.Decoder(self._command_type)
        self._reply_decoder = msgspec.msgpack.Decoder(self._reply_type)
        self._event_decoder = (
            msgspec.msgpack.Decoder(self._event_type) if self.events else None
        )
        self._snapshot_decoder: Any = (
            msgspec.msgpack.Decoder(snapshot_type) if snapshot_type is not None else None
        )
        self._any_decoder = msgspec.msgpack.Decoder()

    def __repr__(self) -> str:
        return f"Schema({self.name!r} v{self.version})"

    # -- publishing -------------------------------------------------------------------------

    def json_schema(self) -> dict[str, Any]:
        """The command, reply and event types as one JSON Schema (2020-12) document.

        Generated from the types themselves (`msgspec.json.schema_components`), so it cannot
        drift from the code: what `seqd schema` prints for client writers in other languages.
        `commands`, `replies` and `events` are tagged unions (a `discriminator` on the tag key,
        "type" unless a type says otherwise); `$defs` holds one schema per type, each with its
        kind and schema version (`x-seqd-kind`, `x-seqd-version`: the version that goes in the
        COMMAND, REPLY and EVENT frames). One version covers every type of the app.
        """
        ref_template = "#/$defs/{name}"
        unions: list[Any] = [self._command_type, self._reply_type]
        if self._event_type is not None:
            unions.append(self._event_type)
        schemas, components = msgspec.json.schema_components(unions, ref_template=ref_template)
        kinds = {cls.__name__: kind for kind, types in (("command", self.commands),
                 ("reply", self.replies), ("event", self.events)) for cls in types}  # fmt: skip
        for name, component in components.items():
            if name in kinds:
                component["x-seqd-kind"] = kinds[name]
                component["x-seqd-version"] = self.version
        return {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": f"{self.name} v{self.version}",
            "x-seqd-app": self.name,
            "x-seqd-version": self.version,
            "x-seqd-tag-fields": dict(self._tag_fields),
            "commands": schemas[0],
            "replies": schemas[1],
            "events": schemas[2] if self._event_type is not None else {"not": {}},
            "$defs": components,
        }

    # -- registration -----------------------------------------------------------------------

    def upcaster(self, type_name: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
        """Register `function(old) -> new` turning `type_name` at `from_version` into the next.

        `type_name` is the message's tag as written by the old version (for a renamed type,
        the old tag; the upcaster returns the new tag in the tag field), or `Schema.SNAPSHOT`.
        """

        def register(function: Upcaster) -> Upcaster:
            self._register(type_name, from_version, function)
            return function

        return register

    def _register(self, type_name: Any, from_version: int, function: Upcaster) -> None:
        if not 1 <= from_version < self.version:
            raise SchemaError(
                f"upcaster for {type_name!r} from version {from_version} in schema "
                f"{self.name!r} v{self.version}: from_version must be 1 to {self.version - 1}"
            )
        key = (type_name, from_version)
        if key in self._upcasters:
            raise SchemaError(
                f"two upcasters for {type_name!r} from version {from_version} in schema "
                f"{self.name!r}"
            )
        self._upcasters[key] = function

    def hot_codec(self) -> HotCodec:
        """The codec for a processor's hot path, each function one C call (no Python frame):
        `decode_command` for commands of the current version only, `encode` for replies and
        for events whose type is in `event_types` (anything else goes through `encode_event`,
        which names the mistake)."""
        return HotCodec(self._command_decoder.decode, self._encoder.encode, self._event_types,
                        borrows_input(self._command_type))  # fmt: skip

    # -- commands ---------------------------------------------------------------------------

    def encode_command(self, command: Any) -> tuple[int, bytes]:
        """Returns (version, bytes) for a command of this schema; TypeError for any other."""
        if type(command) not in self._command_types:
            raise TypeError(
                f"{type(command).__name__} is not a command of schema {self.name!r} v"
                f"{self.version}; its commands are "
                + ", ".join(t.__name__ for t in self.commands)
            )
        return self.version, self._encoder.encode(command)

    def decode_command(self, version: int, data: Any, index: int = 0) -> Any:
        """Decodes a command written at `version` (a record at `index`, for error messages).

        Raises:
            VersionError: `version` is newer than this code, or an upcaster is missing.
            msgspec.ValidationError / DecodeError: the bytes do not match the types.
        """
        if version == self.version:
            return self._command_decoder.decode(data)
        return self._decode_old("command", version, data, self._command_type, index)

    # -- replies ----------------------------------------------------------------------------

    def encode_reply(self, reply: Any) -> bytes:
        return self._encoder.encode(reply)

    def decode_reply(self, version: int, data: Any) -> Any:
        if version == self.version:
            return self._reply_decoder.decode(data)
        return self._decode_old("reply", version, data, self._reply_type, 0)

    # -- events -----------------------------------------------------------------------------

    def encode_event(self, event: Any) -> bytes:
        if type(event) not in self._event_types:
            raise TypeError(
                f"{type(event).__name__} is not an event of schema {self.name!r}; declare it "
                "in the schema's events"
            )
        return self._encoder.encode(event)

    def decode_event(self, version: int, data: Any) -> Any:
        if self._event_decoder is None:
            raise SchemaError(f"schema {self.name!r} declares no event types")
        if version == self.version:
            return self._event_decoder.decode(data)
        return self._decode_old("event", version, data, self._event_type, 0)

    # -- snapshots --------------------------------------------------------------------------

    def encode_snapshot(self, snapshot: Any) -> bytes:
        if self.snapshot_type is None or type(snapshot) is not self.snapshot_type:
            raise TypeError(
                f"snapshot() returned {type(snapshot).__name__}, but schema {self.name!r} "
                f"declares snapshot_type={getattr(self.snapshot_type, '__name__', None)}"
            )
        return self._encoder.encode(snapshot)

    def decode_snapshot(self, version: int, data: Any, index: int = 0) -> Any:
        if self._snapshot_decoder is None:
            raise SchemaError(f"schema {self.name!r} declares no snapshot_type")
        if version == self.version:
            return self._snapshot_decoder.decode(data)
        return self._decode_old("snapshot", version, data, self.snapshot_type, index)

    # -- the slow path ----------------------------------------------------------------------

    def _decode_old(self, kind: str, version: int, data: Any, target: Any, index: int) -> Any:
        where = _where(kind, index)
        if version > self.version:
            raise VersionError(
                f"{where} has schema version {version} but this app build ({self.name} "
                f"v{self.version}) knows up to {self.version}: upgrade the app before "
                "replaying this journal"
            )
        if version < 1:
            raise VersionError(f"{where} has schema version {version}; versions start at 1")
        value = self._any_decoder.decode(data)
        for step in range(version, self.version):
            key = self.SNAPSHOT if kind == "snapshot" else self._tag_of(kind, value)
            function = self._upcasters.get((key, step))
            if function is not None:
                value = function(value)
        try:
            return msgspec.convert(value, target)
        except msgspec.ValidationError as error:
            raise VersionError(
                f"{where} written at schema version {version} does not fit {self.name} "
                f"v{self.version} after upcasting ({error}): register an upcaster for it "
                f"with @schema.upcaster(name, from_version=...)"
            ) from error

    def _tag_of(self, kind: str, value: Any) -> Any:
        if isinstance(value, dict):
            return value.get(self._tag_fields[kind])
        if isinstance(value, list) and value:
            return value[0]
        return None


def _where(kind: str, index: int) -> str:
    if kind == "command":
        return f"journal record at index {index}" if index else "command"
    if kind == "snapshot":
        return f"snapshot at index {index}" if index else "snapshot"
    return kind


def _check_tagged_union(schema_name: str, kind: str, types: tuple[type, ...]) -> str:
    """Returns the union's tag field; raises SchemaError unless `types` can form a union."""
    tag_fields = set()
    tags: dict[Any, type] = {}
    for cls in types:
        config = getattr(cls, "__struct_config__", None)
        if config is None or not isinstance(cls, type):
            raise SchemaError(f"{kind} type {cls!r} of schema {schema_name!r} is not a msgspec Struct")
        if config.tag is None:
            raise SchemaError(
                f"{kind} type {cls.__name__} of schema {schema_name!r} is not tagged: declare "
                f"it as `class {cls.__name__}(msgspec.Struct, tag=True)`"
            )
        if config.tag in tags:
            raise SchemaError(
                f"{kind} types {tags[config.tag].__name__} and {cls.__name__} of schema "
                f"{schema_name!r} share the tag {config.tag!r}"
            )
        tags[config.tag] = cls
        tag_fields.add(config.tag_field)
    if len(tag_fields) > 1:
        raise SchemaError(
            f"{kind} types of schema {schema_name!r} use different tag fields {sorted(tag_fields)}"
        )
    return tag_fields.pop() if tag_fields else "type"
