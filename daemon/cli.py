"""`seqd`: the command line.

    seqd run [--config FILE] [--set section.key=value ...]   run a node in the foreground
    seqd demo [--clients N] [--transfers N]                   a node on the ledger app, driven by clients
    seqd demo --cluster 3 [--duration S]                     a local cluster, its leader killed mid-run
    seqd status [--config FILE | --node NAME] [--json] [--watch]
    seqd snapshot [--config FILE]                             sequence a SNAPSHOT record now
    seqd snapshot list|verify [--config FILE]
    seqd log dump|tail|check [--config FILE] ...
    seqd log migrate --from DIR --to DIR --transform MODULE:NAME   copy-and-transform a journal
    seqd bluegreen switch --blue FILE --green FILE            hand blue's socket to green (docs/evolution.md)
    seqd verify [--config FILE]                               replay the journal under another hash seed
    seqd schema [--app module:Class | --config FILE]          the app's message types as JSON Schema
    seqd cluster transfer-leader [--config FILE] [--to N]      hand leadership from this node to another
    seqd cluster raise-version [--config FILE] [--to V]        activate a new app version on every node
    seqd project --config FILE [--rebuild | --until-caught-up]  a projection into SQLite/PostgreSQL
    seqd export --config FILE [--until-caught-up]             the events into NATS JetStream, exactly once
    seqd integration --config FILE                            a gateway to an external system
    seqd bridge run|status --config FILE [--json]             one node's events as another's commands
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from daemon.config import Config, ConfigError, load_config
from daemon.exits import ExitCode

__all__ = ["main"]


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="TOML configuration file (default: built-in defaults)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, e.g. --set roles.blp.idle=spin (repeatable)",
    )


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def command_run(args: argparse.Namespace) -> int:
    """Run a node until it is stopped; every way it can end is an `ExitCode` and, for an error,
    one log line (daemon/exits.py)."""
    from daemon.exits import report
    from daemon.parent_death import stop_when_parent_exits
    from daemon.supervisor import Supervisor

    logging.basicConfig(
        level=os.environ.get("SEQD_LOG_LEVEL", "INFO"),
        format="%(asctime)s seqd[supervisor:%(process)d] %(levelname)s %(message)s",
    )
    stop_when_parent_exits(os.environ)  # started by a harness: stop when it exits
    try:
        return Supervisor(_load(args)).run()
    except Exception as error:
        return report(logging.getLogger("seqd.supervisor"), error)


def command_demo(args: argparse.Namespace) -> int:
    if args.cluster:
        from daemon.demo_cluster import run_cluster_demo

        return run_cluster_demo(nodes=args.cluster, duration_s=args.duration, keep=args.keep)
    from daemon.demo import run_demo

    return run_demo(
        clients=args.clients,
        transfers=args.transfers,
        accounts=args.accounts,
        in_flight=args.in_flight,
        keep=args.keep,
    )


def command_project(args: argparse.Namespace) -> int:
    from daemon.project import run_project

    return run_project(args.config, rebuild=args.rebuild, until_caught_up=args.until_caught_up)


def command_export(args: argparse.Namespace) -> int:
    from daemon.export import run_export

    return run_export(args.config, until_caught_up=args.until_caught_up)


def command_integration(args: argparse.Namespace) -> int:
    from daemon.integration import run_integration

    return run_integration(args.config)


def command_bridge(args: argparse.Namespace) -> int:
    from daemon.bridge import run_bridge, show_status

    if args.action == "status":
        return show_status(args.config, args.json)
    return run_bridge(args.config)


def command_replica(args: argparse.Namespace) -> int:
    from daemon.roles.replica import run_standalone

    return run_standalone(_load(args), args.socket or None, args.number)


def command_bluegreen_switch(args: argparse.Namespace) -> int:
    """`seqd bluegreen switch`: daemon/standby.py does the work."""
    from daemon.standby import SwitchError, switch

    blue, green = load_config(args.blue), load_config(args.green)
    try:
        switch(blue, green, timeout_s=args.timeout)
    except SwitchError as error:
        print(f"seqd: bluegreen switch: {error}", file=sys.stderr)
        return ExitCode.FAILED
    return 0


def command_backup(args: argparse.Namespace) -> int:
    from daemon.backup import BackupError, take_backup

    try:
        backup = take_backup(_load(args), args.to)
    except BackupError as error:
        print(f"seqd backup: {error}", file=sys.stderr)
        return 1
    print(f"backed up node {backup.node} at index {backup.index} (snapshot {backup.snapshot_index}) to {args.to}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seqd", description="seqd: a sequencer daemon for event-log architectures")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a node in the foreground (under systemd or a terminal)")
    _add_config_arguments(run)
    run.set_defaults(func=command_run)

    replica = commands.add_parser(
        "replica",
        help="run a query replica of a node's data directory by hand (docs/query-side.md)",
    )
    _add_config_arguments(replica)
    replica.add_argument("--socket", default="", help="where to listen (default: beside socket.path, replica<N>)")
    replica.add_argument("--number", type=int, default=0, help="N of the default socket name (default 0)")
    replica.set_defaults(func=command_replica)

    backup = commands.add_parser(
        "backup", help="copy a running node's snapshot and journal, cut at its commit index (docs/operations.md)"
    )
    _add_config_arguments(backup)
    backup.add_argument("--to", required=True, help="a new directory: the data_dir of a restored single node")
    backup.set_defaults(func=command_backup)

    demo = commands.add_parser("demo", help="start a node on the ledger app in a temporary directory and drive it")
    demo.add_argument("--clients", type=int, default=4, help="client processes (default 4)")
    demo.add_argument("--transfers", type=int, default=20_000, help="transfers per client (default 20000)")
    demo.add_argument("--accounts", type=int, default=100, help="ledger accounts (default 100)")
    demo.add_argument("--in-flight", type=int, default=64, help="pipelined requests per client (default 64)")
    demo.add_argument("--keep", action="store_true", help="keep the temporary directory for inspection")
    demo.add_argument("--cluster", type=int, choices=(3, 5), help="run a local cluster of 3 or 5 nodes instead, "
                      "kill its leader mid-run and check the clients' histories")
    demo.add_argument("--duration", type=float, default=10.0, help="with --cluster: seconds of load (default 10)")
    demo.set_defaults(func=command_demo)

    project = commands.add_parser("project", help="run a projection of the node's events into SQLite or PostgreSQL")
    project.add_argument("--config", "-c", required=True, help="the projector's TOML file (daemon/project.py)")
    mode = project.add_mutually_exclusive_group()
    mode.add_argument("--rebuild", action="store_true", help="rebuild from index 1 into new tables, then switch")
    mode.add_argument("--until-caught-up", action="store_true", help="apply what the journal holds, then exit")
    project.set_defaults(func=command_project)

    export = commands.add_parser("export", help="publish the node's events to NATS JetStream, exactly once")
    export.add_argument("--config", "-c", required=True, help="the exporter's TOML file (daemon/export.py)")
    export.add_argument("--until-caught-up", action="store_true", help="export what the journal holds, then exit")
    export.set_defaults(func=command_export)
    bluegreen = commands.add_parser("bluegreen", help="blue-green switch-over on one machine (docs/evolution.md)")
    bluegreen_actions = bluegreen.add_subparsers(dest="action", required=True)
    switch = bluegreen_actions.add_parser(
        "switch", help="stop blue (it drains) and let green, standing by, take over its socket"
    )
    switch.add_argument("--blue", required=True, help="the config file of the serving node")
    switch.add_argument("--green", required=True, help="the config file of the node standing by ([standby])")
    switch.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for green (default 60)")
    switch.set_defaults(func=command_bluegreen_switch)
    integration = commands.add_parser(
        "integration", help="run an integration gateway to an external system (docs/integration.md)"
    )
    integration.add_argument("--config", "-c", required=True, help="the gateway's TOML file (daemon/integration.py)")
    integration.set_defaults(func=command_integration)
    bridge = commands.add_parser("bridge", help="deliver one node's events as commands to another (docs/integration.md)")
    bridge.add_argument("action", choices=("run", "status"), help="run the bridge, or show its status")
    bridge.add_argument("--config", "-c", required=True, help="the bridge's TOML file (daemon/bridge.py)")
    bridge.add_argument("--json", action="store_true", help="status as JSON")
    bridge.set_defaults(func=command_bridge)

    try:
        from daemon import cli_tools
    except ImportError:
        cli_tools = None  # type: ignore[assignment]
    if cli_tools is not None:
        cli_tools.add_commands(commands, _add_config_arguments)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except ConfigError as error:
        print(f"seqd: {error}", file=sys.stderr)
        return ExitCode.CONFIG
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
