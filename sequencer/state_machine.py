"""The API an app implements: a deterministic state machine over the log.

    class Ledger(StateMachine):
        schema = LEDGER_SCHEMA
        def apply(self, ctx, command): ...        # returns the reply; raise Rejected before mutating
        def on_timer(self, ctx, timer_id): ...
        def snapshot(self): ...                    # -> schema.snapshot_type
        @classmethod
        def restore(cls, snapshot): ...            # -> a new instance

Every replica and every replay applies the same records in the same order to the same code, so
they must compute the same state and the same outputs. That holds only if `apply` is a function
of (state, command, ctx) alone: no clock (use `ctx.now`, the record's timestamp), no randomness,
no I/O, no iteration over a set of strings (its order changes with PYTHONHASHSEED). An external
call is an output event; its answer comes back as a later command.

There is no rollback. An `apply` validates the command completely, raises `Rejected` if it is
invalid, and only then mutates. Any exception other than `Rejected` is a programmer error: it
crashes the blp on purpose, the supervisor restarts it from snapshot + journal, and the same
record crashes it again until the app is fixed. Silently skipping the record would let this
replica diverge from the others.

See docs/state-machine.md for the rules and a worked example.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Protocol, Self, TypeVar

from sequencer.schema import Schema

__all__ = ["AppLoadError", "Context", "Rejected", "StateMachine", "load_app", "query"]


class Rejected(Exception):
    """Refuse a command: the client gets status REJECTED with {code, message}.

    Raise it before mutating anything: state changes made before the raise are not undone.
    """

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}" if self.message else self.code


class _Sink(Protocol):
    def _schedule(self, timer_id: int, deadline_ns: int) -> None: ...
    def _cancel(self, timer_id: int) -> None: ...
    def _publish(self, event: Any) -> None: ...


class Context:
    """What an app may know about the record being applied, and how it emits outputs.

    One Context is reused for every record (an allocation per command costs throughput); do
    not keep a reference to it past the call.

    Attributes:
        now: the record's timestamp_ns (leader time, never goes backwards). Use it instead of
            the clock: a replay sees the same value.
        index: the record's log index (1-based).
        term: the record's Raft term.
        session: the session id the command came on (0 for a timer).
        client_id: the stable id of the client that sent it (0 for a timer).
        app_version: the app schema version active at this index (docs/evolution.md, "Rolling
            upgrades of a cluster"): new behaviour of `apply` for old commands keys on it, so
            it starts at the same index on every node. The app's own version until a log says.

    Outputs (each the processor's own method, bound here, so an app's call is one Python call,
    not two: `ctx.publish` is on every transfer's path):
        schedule(timer_id, deadline_ns): arms (or re-arms: the new deadline replaces the old)
            timer `timer_id`. `on_timer(ctx, timer_id)` runs once, through a TIMER_FIRED record,
            when the leader's clock passes `deadline_ns` (compare with `ctx.now`). The timer is
            part of the state: it survives snapshots and restarts.
        cancel(timer_id): disarms timer `timer_id`; a no-op if it is not armed (e.g. it has
            already fired).
        publish(event): emits `event` (one of the schema's event types) to the clients after
            commit.
    """

    __slots__ = ("app_version", "cancel", "client_id", "index", "now", "publish", "schedule", "session", "term")

    schedule: Callable[[int, int], None]
    cancel: Callable[[int], None]
    publish: Callable[[Any], None]

    def __init__(self, sink: _Sink) -> None:
        self.schedule = sink._schedule
        self.cancel = sink._cancel
        self.publish = sink._publish
        self.now = 0
        self.index = 0
        self.term = 0
        self.session = 0
        self.client_id = 0
        self.app_version = 0


_Handler = TypeVar("_Handler", bound=Callable[..., Any])
_QUERY_ATTRIBUTE = "__seqd_query__"


def query(name: str | None = None) -> Callable[[_Handler], _Handler]:
    """Declare a method of a StateMachine as the query handler `name` (default: its own name).

        @query("balance")
        def query_balance(self, account: str) -> AccountBalance: ...

    Query replicas call it as `method(**args)` with the query's arguments (a msgpack map) and
    send back its return value (anything msgspec encodes). It runs on a replica's copy of the
    state, never on the blp, between two records: it must only read the state (no mutation, no
    `ctx`: there is none), and the determinism rules of `apply` hold (no clock, no randomness, no
    I/O), so every replica at the same index answers the same. `Rejected(code, message)` refuses
    it: the client gets `QueryError` with that code. docs/state-machine.md, "Queries".
    """

    def mark(method: _Handler) -> _Handler:
        setattr(method, _QUERY_ATTRIBUTE, name or method.__name__)
        return method

    return mark


class StateMachine:
    """Base class of an app. Subclasses set `schema` and override `apply`, or declare
    `command_handlers`, at least.

    A new, empty state is `cls()`: the constructor takes no arguments.

    `command_handlers` (optional): {command type: function(app, ctx, command) -> reply}, one per
    command type of the schema, e.g. `{Transfer: Ledger.transfer}`. The base `apply` dispatches
    through it; the processor, for an app that keeps the base `apply`, calls the command's handler
    itself, one Python call a command less than through `apply` (~0.3k instructions of a ~37k
    transfer; benches/RESULTS.md, "blpcycle, second session"). An app that overrides `apply` is
    always called through it. The table holds functions, not method names: a subclass that
    overrides a handler declares its own table (`{**Base.command_handlers, Transfer:
    Mine.transfer}`), or the base's function is called.
    """

    schema: ClassVar[Schema]
    command_handlers: ClassVar[Mapping[type, Callable[[Any, Context, Any], Any]] | None] = None

    def apply(self, ctx: Context, command: Any) -> Any:
        """Applies one command and returns the reply (a schema reply type, or None).

        Raises:
            Rejected: the command is invalid; raised before any mutation.
        """
        handlers = type(self).command_handlers
        if handlers is None:
            raise NotImplementedError(f"{type(self).__name__}.apply is not implemented")
        return handlers[type(command)](self, ctx, command)

    @classmethod
    def direct_handlers(cls) -> Mapping[type, Callable[[Any, Context, Any], Any]] | None:
        """The table the processor may call instead of `apply`: `command_handlers` when `apply`
        is the base one, else None (`apply` is the app's own: it decides).

        Raises:
            TypeError: the table lacks a command type of the schema (a handler for a type that is
                no command of it is never called, and allowed: a subclass may narrow the schema).
        """
        handlers = cls.command_handlers
        if handlers is None or cls.apply is not StateMachine.apply:
            return None
        if missing := sorted(t.__name__ for t in set(cls.schema.commands) - set(handlers)):
            raise TypeError(
                f"{cls.__name__}.command_handlers must have a handler for every command type of "
                f"schema {cls.schema.name!r}: missing {missing}"
            )
        return handlers

    def on_timer(self, ctx: Context, timer_id: int) -> None:
        """A timer scheduled with `ctx.schedule` has fired (it is no longer armed)."""
        raise NotImplementedError(
            f"{type(self).__name__} scheduled timer {timer_id} but does not implement on_timer"
        )

    def on_session_open(self, ctx: Context) -> None:
        """A client session opened (`ctx.session`, `ctx.client_id`). Optional."""

    def on_session_close(self, ctx: Context) -> None:
        """A client session closed or was lost with its node. Optional."""

    def snapshot(self) -> Any:
        """Returns the whole state as an instance of `schema.snapshot_type`.

        Called in a forked child (the parent is already applying further records), so it may
        take its time, but it must not mutate the state.
        """
        raise NotImplementedError(f"{type(self).__name__}.snapshot is not implemented")

    @classmethod
    def restore(cls, snapshot: Any) -> Self:
        """Builds an instance from a `schema.snapshot_type` (already upcast to the current
        version): the exact state that produced it, including the order of dicts."""
        raise NotImplementedError(f"{cls.__name__}.restore is not implemented")

    @classmethod
    def query_handlers(cls) -> dict[str, str]:
        """The app's query handlers (`@query`): query name -> method name, sorted by name.

        Raises:
            TypeError: two methods declare the same query name.
        """
        handlers: dict[str, str] = {}
        for attribute in dir(cls):
            name = getattr(getattr(cls, attribute, None), _QUERY_ATTRIBUTE, None)
            if name is None:
                continue
            if name in handlers:
                raise TypeError(
                    f"{cls.__name__}: query {name!r} is declared by both {handlers[name]} and "
                    f"{attribute}: give each query its own name"
                )
            handlers[name] = attribute
        return dict(sorted(handlers.items()))


class AppLoadError(Exception):
    """The app named in the configuration cannot be loaded."""


def load_app(spec: str) -> type[StateMachine]:
    """Imports an app named `"package.module:Class"` and checks that it is a StateMachine.

    Raises:
        AppLoadError: the name is malformed, the module or class is missing, or the class is not
            a StateMachine with a Schema.
    """
    module_name, colon, class_name = spec.partition(":")
    if not colon or not module_name or not class_name:
        raise AppLoadError(
            f"app {spec!r} is not of the form 'package.module:Class' "
            "(e.g. 'sequencer.apps.ledger:Ledger')"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise AppLoadError(
            f"cannot import module {module_name!r} of app {spec!r}: {error}. Is it installed in "
            "the environment seqd runs in (or on PYTHONPATH)?"
        ) from error
    cls = getattr(module, class_name, None)
    if cls is None:
        raise AppLoadError(f"module {module_name!r} has no class {class_name!r} (app {spec!r})")
    if not (isinstance(cls, type) and issubclass(cls, StateMachine)):
        raise AppLoadError(
            f"{spec} is {cls!r}, not a subclass of sequencer.state_machine.StateMachine"
        )
    if not isinstance(getattr(cls, "schema", None), Schema):
        raise AppLoadError(
            f"{spec} has no `schema` class attribute of type sequencer.schema.Schema"
        )
    if cls.apply is StateMachine.apply and cls.command_handlers is None:
        raise AppLoadError(f"{spec} implements neither apply(ctx, command) nor command_handlers")
    try:
        cls.direct_handlers()
    except TypeError as error:
        raise AppLoadError(f"{spec}: {error}") from error
    return cls
