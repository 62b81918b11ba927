"""`seqd export`: publish a node's committed events to NATS JetStream (docs/integration.md).

    seqd export --config exporter.toml                    # follow the node, until SIGTERM
    seqd export --config exporter.toml --until-caught-up  # export what there is, then exit

The exporter's config (its own small TOML file; the node's config says where the events are):

    node_config = "/etc/seqd/seqd.toml"       # the node whose log to export
    source = "journal"                        # or "subscription" (as `seqd project`)
    servers = ["nats://127.0.0.1:4222"]
    stream = "LEDGER"                         # the exporter's own stream
    subject_prefix = "seqd.ledger"            # events go to seqd.ledger.<event type>
    log_id = ""                               # "": the node's name; on a cluster "cluster-<id>"
    create_stream = true                      # file storage, `replicas`, `duplicate_window_s`
    replicas = 1
    duplicate_window_s = 120.0
    from_index = 1                            # where an empty stream starts
    in_flight_max = 1024                      # publishes awaiting their ack
    batch_events_max = 256
    ack_timeout_s = 5.0

Where it resumes is read from the stream (its last message's headers), never stored here, so
the exporter can be killed at any moment and moved to another machine (with the node's journal,
or with `source = "subscription"`). A cluster's log id is the cluster's, so an exporter following
any of its nodes writes the same message ids.

Exit codes: 0 stopped on request or caught up, 1 the stream is not this log's or is unusable
(the message says why), 78 a bad config.
"""

from __future__ import annotations

import logging
import signal
import sys
import tomllib
from pathlib import Path
from typing import Any, Literal

import msgspec

from daemon.config import Config, ConfigError, load_config
from daemon.exits import ExitCode
from daemon.project import make_source
from sequencer.export import (
    ACK_TIMEOUT_S_DEFAULT,
    BATCH_EVENTS_DEFAULT,
    DUPLICATE_WINDOW_S_DEFAULT,
    IN_FLIGHT_DEFAULT,
    ExportError,
    JetStreamExporter,
)
from sequencer.projection import ProjectionError

__all__ = ["ExporterConfig", "load_exporter_config", "log_id_of", "make_exporter", "run_export"]

log = logging.getLogger("seqd.export")


class ExporterConfig(msgspec.Struct, forbid_unknown_fields=True):
    stream: str
    subject_prefix: str
    servers: list[str] = msgspec.field(default_factory=lambda: ["nats://127.0.0.1:4222"])
    node_config: str = ""  # the node's seqd.toml ("": the built-in defaults)
    source: Literal["journal", "subscription"] = "journal"
    log_id: str = ""
    create_stream: bool = True
    replicas: int = 1
    duplicate_window_s: float = DUPLICATE_WINDOW_S_DEFAULT
    from_index: int = 1
    in_flight_max: int = IN_FLIGHT_DEFAULT
    batch_events_max: int = BATCH_EVENTS_DEFAULT
    ack_timeout_s: float = ACK_TIMEOUT_S_DEFAULT


def load_exporter_config(path: str | Path) -> ExporterConfig:
    """Raises ConfigError naming the file and what is wrong."""
    try:
        return msgspec.convert(tomllib.loads(Path(path).read_text()), ExporterConfig)
    except FileNotFoundError:
        raise ConfigError(f"exporter config {path} does not exist") from None
    except (tomllib.TOMLDecodeError, msgspec.ValidationError) as error:
        raise ConfigError(f"exporter config {path}: {error}") from None


def log_id_of(node: Config) -> str:
    """The log's name in message ids: the cluster's on a cluster (every node holds the same
    log), else the node's."""
    if node.cluster is not None:
        return f"cluster-{node.cluster.cluster_id}"
    return node.node.name


def make_exporter(config: ExporterConfig, node: Config, config_path: str | Path = "") -> JetStreamExporter:
    """Raises ConfigError (a bad setting, named with the file)."""
    try:
        return JetStreamExporter(
            config.servers, config.stream, config.subject_prefix, config.log_id or log_id_of(node),
            create_stream=config.create_stream, replicas=config.replicas,
            duplicate_window_s=config.duplicate_window_s, from_index=config.from_index,
            in_flight_max=config.in_flight_max, batch_events_max=config.batch_events_max,
            ack_timeout_s=config.ack_timeout_s,
        )  # fmt: skip
    except ExportError as error:
        raise ConfigError(f"exporter config {config_path}: {error}") from None


def run_export(config_path: str, until_caught_up: bool = False) -> int:
    """`seqd export`; returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s seqd[export:%(process)d] %(levelname)s %(message)s")
    config = load_exporter_config(config_path)
    node = load_config(config.node_config or None)
    exporter = make_exporter(config, node, config_path)
    source = make_source(node, config.source, follow=not until_caught_up)

    def on_signal(signum: int, _frame: Any) -> None:
        exporter.stop()  # only a flag: the loop ends once the acks in flight are in

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        position = exporter.run(source, until_caught_up=until_caught_up)
    except (ExportError, ProjectionError) as error:
        log.error("%s", error)
        return ExitCode.FAILED
    log.info("export of log %s into stream %s stopped at index %d (%d events there); %d published, "
             "%d duplicates dropped by the stream, %d sessions", exporter.log_id, exporter.stream,
             *position, exporter.published, exporter.duplicates, exporter.sessions)  # fmt: skip
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(run_export(sys.argv[1]))
