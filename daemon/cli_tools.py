"""The operator commands of `seqd` beside `run` and `demo`: status, snapshot, log, verify, schema.

Each reads what it needs without talking to the daemon: the counters segment (status), the journal
and snapshot files (log, snapshot list/verify, verify), a signal to the sequencer's pid from
the counters (snapshot: the sequencer then sequences a SNAPSHOT record like any other input), or
the app's code (schema: its message types as JSON Schema).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from daemon.config import Config, load_config

__all__ = ["add_commands"]


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def _node_name(args: argparse.Namespace) -> str:
    if getattr(args, "node", None):
        return str(args.node)
    return _config(args).node.name


def command_status(args: argparse.Namespace) -> int:
    from daemon import status
    from daemon.exits import ExitCode
    from ipc.segment import SegmentVersionError

    node = _node_name(args)
    try:
        if args.watch:
            try:
                status.watch(node, interval_s=args.interval)
            except KeyboardInterrupt:
                pass
            return 0
        observed = status.sample_status(node)
    except SegmentVersionError as error:
        print(f"seqd: cannot show node {node}: {error}", file=sys.stderr)
        return ExitCode.DATAERR
    if args.json:
        print(json.dumps(status.render_json(observed), indent=2, sort_keys=True))
    else:
        print(status.render_text(observed), end="")
    return 0 if observed.liveness == status.Liveness.LIVE else 1


def command_snapshot(args: argparse.Namespace) -> int:
    from daemon.layout import ROLE_COUNTERS, CounterView, Role, attach_counters
    from ipc.segment import SegmentError

    config = _config(args)
    action = args.action or "take"
    if action == "take":
        try:
            counters = CounterView(attach_counters(config.node.name), owner=None)
        except (SegmentError, FileNotFoundError) as error:
            print(f"seqd: node {config.node.name} is not running ({error})", file=sys.stderr)
            return 1
        try:
            pid = counters[ROLE_COUNTERS[Role.SEQUENCER].pid].get()
        finally:
            counters.close()
        if pid <= 0:
            print(f"seqd: node {config.node.name} has no sequencer running", file=sys.stderr)
            return 1
        os.kill(pid, signal.SIGUSR1)
        print(f"asked the sequencer (pid {pid}) to sequence a SNAPSHOT record; "
              f"watch `seqd status` for snapshot.last.index")
        return 0
    from sequencer import snapshot as snapshots

    if action == "list":
        infos = snapshots.list_snapshots(config.snapshot_dir)
        if not infos:
            print(f"no snapshots in {config.snapshot_dir}")
        for info in infos:
            if info.header is not None:
                print(f"{info.index:>12}  term {info.header.term:<5} app {info.header.app_name} "
                      f"v{info.header.app_version}  hash {info.header.state_hash.hex()[:16]}  {info.path}")
            else:
                print(f"{info.index:>12}  INVALID: {info.error}  {info.path}")
        return 0
    if action == "verify":
        from daemon.verify import verify_snapshots

        return verify_snapshots(config, print)
    raise AssertionError(action)


def command_verify(args: argparse.Namespace) -> int:
    from daemon.verify import verify_journal

    return verify_journal(_config(args), print, hash_seed=args.hash_seed)


def command_log(args: argparse.Namespace) -> int:
    from sequencer import logtools
    from sequencer.journal import JournalError
    from sequencer.record import RecordType

    config = _config(args)
    directory = args.journal or config.journal_dir
    if args.action == "check":
        report = logtools.check(directory)
        print(report)
        return 0 if report.ok else 1
    if args.action == "compact":
        from daemon.roles.journaller import compact
        from sequencer.journal import Journal

        try:
            with Journal.open(directory, segment_bytes=config.journal.segment_bytes,
                              preallocate=config.journal.preallocate) as journal:
                deleted = compact(journal, config.snapshot_dir)
        except JournalError as error:
            print(f"seqd: {error}", file=sys.stderr)
            return 1
        print(f"deleted {len(deleted)} segment(s) wholly before the oldest retained snapshot"
              + "".join(f"\n  {path}" for path in deleted))
        return 0
    types = None
    if args.type:
        try:
            types = {RecordType[name.upper()] for name in args.type}
        except KeyError as error:
            print(f"seqd: unknown record type {error}; known: {', '.join(t.name for t in RecordType)}", file=sys.stderr)
            return 2
    decode = _payload_decoder(config) if args.decode else None
    if args.action == "dump":
        records = logtools.dump(directory, args.from_index, args.to_index, types, args.session, decode,
                                note=lambda line: print(f"seqd: note: {line}", file=sys.stderr))
    else:
        records = logtools.tail(directory, follow=args.follow, last=args.lines,
                                from_index=args.from_index if args.from_index > 1 else None,
                                types=types, session_id=args.session, decode=decode)
    try:
        for record in records:
            print(json.dumps(record, default=_json_default) if args.json else _format_record(record), flush=True)
    except (KeyboardInterrupt, BrokenPipeError):
        pass
    except JournalError as error:
        print(f"seqd: {error}", file=sys.stderr)
        return 1
    return 0


def command_log_migrate(args: argparse.Namespace) -> int:
    """`seqd log migrate`: daemon/migrate.py does the work; this maps its failures to one line
    and an exit code (daemon.exits.ExitCode)."""
    from daemon.exits import ExitCode
    from daemon.migrate import MigrationFailed, migrate
    from sequencer.migrate import TransformLoadError, load_transform

    config = _config(args)
    try:
        transform = load_transform(args.transform)
    except TransformLoadError as error:
        print(f"seqd: {error}", file=sys.stderr)
        return ExitCode.CONFIG
    try:
        migrate(args.source, args.target, transform, client_expiry_ns=config.client_expiry_ns,
                segment_bytes=config.journal.segment_bytes, preallocate=config.journal.preallocate,
                say=lambda line: print(line, flush=True))  # fmt: skip
    except MigrationFailed as error:
        print(f"seqd: log migrate: {error}", file=sys.stderr)
        if error.exit_code == ExitCode.SOFTWARE and error.__cause__ is not None and error.__cause__.__cause__:
            import traceback  # the transform's own error: where in its code it raised

            print("".join(traceback.format_exception(error.__cause__.__cause__)), file=sys.stderr, end="")
        return error.exit_code
    return 0


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    import msgspec

    try:
        return msgspec.to_builtins(value)
    except TypeError:
        return str(value)


def _format_record(record: dict[str, Any]) -> str:
    head = " ".join(f"{key}={record[key]}" for key in ("index", "term", "type", "version", "session_id", "request_id")
                    if key in record)
    rest = {key: value for key, value in record.items()
            if key not in ("index", "term", "type", "version", "session_id", "request_id")}
    return f"{head} {json.dumps(rest, default=_json_default)}"


def _payload_decoder(config: Config) -> Callable[[int, memoryview], Any]:
    from sequencer.state_machine import load_app

    schema = load_app(config.node.app).schema
    return lambda version, data: schema.decode_command(version, bytes(data), 0)


def command_schema(args: argparse.Namespace) -> int:
    """Print the app's command, reply and event types as JSON Schema, for clients in any language."""
    from sequencer.state_machine import AppLoadError, load_app

    spec = args.app or _config(args).node.app
    try:
        app = load_app(spec)
    except AppLoadError as error:
        print(f"seqd: {error}", file=sys.stderr)
        return 2
    published = app.schema.json_schema()
    document = {"$schema": published.pop("$schema"), "title": published.pop("title"), "x-seqd-app-class": spec}
    document.update(published)
    print(json.dumps(document, indent=2))
    return 0


def add_commands(commands: Any, add_config_arguments: Callable[[argparse.ArgumentParser], None]) -> None:
    status = commands.add_parser("status", help="show a node's roles, positions, lags and rates from shared memory")
    add_config_arguments(status)
    status.add_argument("--node", help="node name (default: from the config)")
    status.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    status.add_argument("--watch", action="store_true", help="refresh like top until interrupted")
    status.add_argument("--interval", type=float, default=1.0, help="--watch refresh interval in seconds")
    status.set_defaults(func=command_status)

    snapshot = commands.add_parser("snapshot", help="take (default), list or verify snapshots")
    add_config_arguments(snapshot)
    snapshot.add_argument("action", nargs="?", choices=("take", "list", "verify"))
    snapshot.set_defaults(func=command_snapshot)

    log_parser = commands.add_parser("log", help="dump, follow, check, compact or migrate the journal")
    log_actions = log_parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action_name, action_help in (
        ("dump", "print records"),
        ("tail", "print the last records; -f follows"),
        ("check", "verify every CRC and index"),
        ("compact", "delete segments before the oldest retained snapshot (node stopped)"),
    ):
        action = log_actions.add_parser(action_name, help=action_help)
        add_config_arguments(action)
        action.add_argument("--journal", help="journal directory (default: <data_dir>/journal from the config)")
        action.add_argument("--from", dest="from_index", type=int, default=1, help="first index")
        action.add_argument("--to", dest="to_index", type=int, default=None, help="last index")
        action.add_argument("--type", action="append", help="only records of this type (repeatable)")
        action.add_argument("--session", type=lambda text: int(text, 0), default=None, help="only this session id")
        action.add_argument("--decode", action="store_true", help="decode payloads with the configured app's types")
        action.add_argument("--json", action="store_true", help="one JSON object per record")
        action.add_argument("-f", "--follow", action="store_true", help="tail: keep printing new records")
        action.add_argument("-n", "--lines", type=int, default=10, help="tail: how many of the last records")
        action.set_defaults(func=command_log)
    migrate = log_actions.add_parser(
        "migrate", help="copy-and-transform a stopped node's journal into a new one (docs/evolution.md)"
    )
    add_config_arguments(migrate)
    migrate.add_argument("--from", dest="source", required=True, metavar="DIR",
                         help="the old journal directory (of a stopped node, or a copy)")
    migrate.add_argument("--to", dest="target", required=True, metavar="DIR",
                         help="the new journal directory; must not exist, or be empty")
    migrate.add_argument("--transform", required=True, metavar="MODULE:NAME",
                         help="a sequencer.migrate.Transform subclass (or a function returning one)")
    migrate.set_defaults(func=command_log_migrate)

    schema = commands.add_parser(
        "schema", help="print the app's command, reply and event types as JSON Schema (for clients in other languages)"
    )
    add_config_arguments(schema)
    schema.add_argument("--app", help="module:Class (default: node.app from the config, the ledger without one)")
    schema.set_defaults(func=command_schema)

    verify = commands.add_parser("verify", help="replay the journal in fresh processes under two hash seeds and compare")
    add_config_arguments(verify)
    verify.add_argument("--hash-seed", type=int, default=12345, help="the second PYTHONHASHSEED (the blp uses 0)")
    verify.set_defaults(func=command_verify)

    from daemon.cli_cluster import add_cluster_commands

    add_cluster_commands(commands, add_config_arguments)
