"""`seqd integration`: run an integration gateway to an external system (docs/integration.md).

    seqd integration --config integration.toml      # until SIGTERM

The gateway's config (its own small TOML file; the node's config says where the node is):

    system = "sequencer.apps.payout_gateway:PaymentService"  # module:Class, an ExternalSystem
    node_config = "/etc/seqd/seqd.toml"                     # the node (it must run [replicas])
    reconnect_timeout_s = 60.0
    [options]                                                # the class's keyword arguments
    base_url = "http://127.0.0.1:8080"

Exit codes: 0 stopped on request, 1 the node or its replicas stayed unreachable (a supervisor
restarts it: the gateway keeps no state, so a restart is always safe), 78 a bad config.
"""

from __future__ import annotations

import importlib
import logging
import signal
import tomllib
from pathlib import Path
from typing import Any

import msgspec

from daemon.config import ConfigError, load_config
from daemon.exits import ExitCode
from sequencer.client import ClientError
from sequencer.integration import ExternalSystem, IntegrationGateway
from sequencer.state_machine import AppLoadError, load_app

__all__ = ["IntegrationConfig", "load_integration_config", "run_integration"]

log = logging.getLogger("seqd.integration")

RECONNECT_TIMEOUT_S_MAX = 24 * 3600.0  # longer is a typo; a supervisor restarts it anyway


class IntegrationConfig(msgspec.Struct, forbid_unknown_fields=True):
    system: str  # "module:Class", an ExternalSystem subclass
    node_config: str = ""  # the node's seqd.toml ("": the built-in defaults)
    reconnect_timeout_s: float = 60.0
    options: dict[str, Any] = {}


def load_integration_config(path: str | Path) -> IntegrationConfig:
    """Raises ConfigError naming the file and what is wrong."""
    try:
        config = msgspec.convert(tomllib.loads(Path(path).read_text()), IntegrationConfig)
    except FileNotFoundError:
        raise ConfigError(f"integration config {path} does not exist") from None
    except (tomllib.TOMLDecodeError, msgspec.ValidationError) as error:
        raise ConfigError(f"integration config {path}: {error}") from None
    if not 0 < config.reconnect_timeout_s <= RECONNECT_TIMEOUT_S_MAX:
        raise ConfigError(f"integration config {path}: reconnect_timeout_s = "
                          f"{config.reconnect_timeout_s} must be above 0 and at most {RECONNECT_TIMEOUT_S_MAX}")  # fmt: skip
    return config


def load_system(spec: str, options: dict[str, Any]) -> ExternalSystem:
    """An instance of the ExternalSystem subclass named "module:Class", built with `options`."""
    module_name, _, class_name = spec.partition(":")
    try:
        found = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ConfigError(
            f"system = {spec!r} cannot be loaded ({error}): name an ExternalSystem subclass as "
            "'module:Class', e.g. 'sequencer.apps.payout_gateway:PaymentService'"
        ) from None
    if not (isinstance(found, type) and issubclass(found, ExternalSystem)):
        raise ConfigError(f"system = {spec!r} is not a sequencer.integration.ExternalSystem subclass")
    try:
        return found(**options)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"system = {spec!r} refused its [options] {options!r}: {error}") from None


def run_integration(config_path: str) -> int:
    """`seqd integration`; returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s seqd[integration:%(process)d] %(levelname)s %(message)s")
    config = load_integration_config(config_path)
    node = load_config(config.node_config or None)
    try:
        schema = load_app(node.node.app).schema
    except AppLoadError as error:
        raise ConfigError(f"integration config {config_path}: the node's app: {error}") from None
    gateway = IntegrationGateway(node.socket.path, schema, load_system(config.system, config.options),
                                 reconnect_timeout_s=config.reconnect_timeout_s)  # fmt: skip

    def on_signal(signum: int, _frame: Any) -> None:
        gateway.stop()  # only a flag: the loop returns after the batch in hand

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        stats = gateway.run()
    except ClientError as error:
        log.error("integration gateway stopped: %s", error)
        return ExitCode.FAILED
    log.info("integration gateway stopped: %s", stats)
    return ExitCode.OK
