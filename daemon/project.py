"""`seqd project`: run an app's projection into SQLite or PostgreSQL (docs/query-side.md).

    seqd project --config projector.toml                    # follow the node, until SIGTERM
    seqd project --config projector.toml --until-caught-up  # apply what there is, then exit
    seqd project --config projector.toml --rebuild          # from index 1 into new tables, switch

The projector's config (its own small TOML file; the node's config says where the events are):

    projection = "sequencer.apps.ledger_projection:Balances"   # module:Class
    database = "sqlite:////var/lib/seqd/read-model.db"       # or "postgresql://user@host/db"
    node_config = "/etc/seqd/seqd.toml"                       # the node whose log to project
    batch_events_max = 500
    source = "journal"                                        # or "subscription"

`source = "journal"`: the node's journal, applied in-process (`JournalSource`), read only up to
the node's commit index while the node runs (its counters segment); a stopped single node's
journal is read to its end. A cluster node must be running: past its commit index a record may
yet be replaced by a new leader. `source = "subscription"`: the node's catch-up subscription,
served by its query replicas (`[replicas] count >= 1` in the node's config;
`SubscriptionSource`). A rebuild reads the same source from index 1.

Exit codes: 0 stopped on request or caught up (the rebuild: switched), 1 the projection failed
on an event (the message names its index), 78 a bad config.
"""

from __future__ import annotations

import importlib
import logging
import signal
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import msgspec

from daemon.config import Config, ConfigError, load_config
from daemon.exits import ExitCode
from sequencer.projection import (
    BATCH_EVENTS_DEFAULT,
    BATCH_EVENTS_MAX,
    Generation,
    JournalSource,
    Position,
    Projection,
    ProjectionError,
    ProjectionFailed,
    Projector,
    Source,
    SubscriptionSource,
    open_store,
)
from sequencer.state_machine import load_app

__all__ = ["ProjectorConfig", "load_projector_config", "make_projector", "make_source", "run_project"]

log = logging.getLogger("seqd.project")


class ProjectorConfig(msgspec.Struct, forbid_unknown_fields=True):
    projection: str  # "module:Class", a Projection subclass
    database: str  # "sqlite:///path", a path, or a PostgreSQL DSN/URI
    node_config: str = ""  # the node's seqd.toml ("": the built-in defaults)
    batch_events_max: int = BATCH_EVENTS_DEFAULT
    source: Literal["journal", "subscription"] = "journal"


def load_projector_config(path: str | Path) -> ProjectorConfig:
    """Raises ConfigError naming the file and what is wrong."""
    try:
        raw = tomllib.loads(Path(path).read_text())
        config = msgspec.convert(raw, ProjectorConfig)
    except FileNotFoundError:
        raise ConfigError(f"projector config {path} does not exist") from None
    except (tomllib.TOMLDecodeError, msgspec.ValidationError) as error:
        raise ConfigError(f"projector config {path}: {error}") from None
    if not 1 <= config.batch_events_max <= BATCH_EVENTS_MAX:
        raise ConfigError(
            f"projector config {path}: batch_events_max = {config.batch_events_max} must be "
            f"between 1 and {BATCH_EVENTS_MAX}"
        )
    return config


def load_projection(spec: str) -> Projection:
    """An instance of the Projection subclass named "module:Class"."""
    module_name, _, class_name = spec.partition(":")
    try:
        found = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ConfigError(
            f"projection = {spec!r} cannot be loaded ({error}): name a Projection subclass as "
            "'module:Class', e.g. 'sequencer.apps.ledger_projection:Balances'"
        ) from None
    if not (isinstance(found, type) and issubclass(found, Projection)):
        raise ConfigError(f"projection = {spec!r} is not a Projection subclass")
    return found()


def _commit_index(node: str, clustered: bool) -> Callable[[], int | None]:
    """The node's commit index, read from its counters at each call; None (no limit) while a
    single node is stopped."""
    from daemon.layout import committed_index
    from daemon.status import read_counters

    def commit_index() -> int | None:
        values, why_not = read_counters(node)
        if values is None:
            if clustered:
                raise ProjectionError(
                    f"{why_not}. A cluster node's journal is read only up to its commit index: "
                    "start the node before its projector"
                )
            return None
        return committed_index(values)

    return commit_index


def make_source(node: Config, kind: Literal["journal", "subscription"], follow: bool) -> Source:
    """The node's committed events: its journal applied in-process, read up to its commit index
    (`JournalSource`), or its catch-up subscription (`SubscriptionSource`). The projector and
    the exporter (daemon/export.py) and a bridge (daemon/bridge.py) read them the same way."""
    if kind == "subscription":
        return SubscriptionSource(node.socket.path, load_app(node.node.app).schema)
    return JournalSource(
        load_app(node.node.app),
        node.journal_dir,
        node.snapshot_dir,
        follow=follow,
        commit_index=_commit_index(node.node.name, node.cluster is not None),
    )


def make_projector(
    config: ProjectorConfig, follow: bool,
    on_commit: Callable[[Generation, Position], object] | None = None,
) -> tuple[Projector, Source]:  # fmt: skip
    node = load_config(config.node_config or None)
    projector = Projector(load_projection(config.projection), open_store(config.database),
                          config.batch_events_max, on_commit)  # fmt: skip
    return projector, make_source(node, config.source, follow)


def run_project(config_path: str, rebuild: bool = False, until_caught_up: bool = False) -> int:
    """`seqd project`; returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s seqd[project:%(process)d] %(levelname)s %(message)s")
    config = load_projector_config(config_path)
    try:
        projector, source = make_projector(config, follow=not until_caught_up or rebuild)
    except ConfigError:
        raise  # `seqd` prints it and exits with ExitCode.CONFIG
    except ProjectionError as error:
        log.error("%s", error)
        return ExitCode.FAILED
    except Exception as error:  # the database driver's own errors: the message is what matters
        log.error("cannot open the read model's database (database = ... in %s): %s: %s",
                  config_path, type(error).__name__, error)  # fmt: skip
        return ExitCode.FAILED

    def on_signal(signum: int, _frame: Any) -> None:
        projector.stop()  # only a flag: the loop ends after committing its batch

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        if rebuild:
            generation = projector.rebuild(source)
            log.info("projection %s: generation %d at %s is %s", projector.name, generation.generation,
                     tuple(generation.position), generation.state)  # fmt: skip
        else:
            position = projector.run(source, until_caught_up=until_caught_up)
            log.info("projection %s stopped at index %d (%d events there)", projector.name, *position)
    except ProjectionFailed as failed:
        log.error("%s", failed, exc_info=failed.cause)
        return ExitCode.FAILED
    except ProjectionError as error:
        log.error("%s", error)
        return ExitCode.FAILED
    finally:
        projector.store.close()
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(run_project(sys.argv[1]))
