"""`seqd integration`'s config: a bad one is refused with a message naming what is wrong and
the exit code for a bad config, before anything connects."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.cli import main
from daemon.config import ConfigError
from daemon.exits import ExitCode
from daemon.harness import write_config
from daemon.integration import load_integration_config, load_system
from sequencer.apps.payout_gateway import PaymentService


def test_the_example_config_loads_its_external_system(tmp_path: Path) -> None:
    path = write_config(tmp_path / "integration.toml", {
        "": {"system": "sequencer.apps.payout_gateway:PaymentService"},
        "options": {"base_url": "http://127.0.0.1:8080", "timeout_s": 0.5},
    })  # fmt: skip
    config = load_integration_config(path)
    system = load_system(config.system, config.options)
    assert isinstance(system, PaymentService)
    assert (system.host, system.port, system.timeout_s) == ("127.0.0.1", 8080, 0.5)


@pytest.mark.parametrize(("settings", "message"), [
    ({"": {"system": "sequencer.apps.payout_gateway:PaymentService", "colour": "red"}}, "colour"),
    ({"": {"system": "sequencer.apps.payout_gateway:PaymentService", "reconnect_timeout_s": 0}},
     "reconnect_timeout_s"),
])  # fmt: skip
def test_a_bad_config_is_refused_naming_the_setting(tmp_path: Path, settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_integration_config(write_config(tmp_path / "integration.toml", settings))


@pytest.mark.parametrize(("spec", "options", "message"), [
    ("sequencer.apps.nothing:PaymentService", {}, "cannot be loaded"),
    ("sequencer.apps.withdrawals:WithdrawalLedger", {}, "not a sequencer.integration.ExternalSystem"),
    ("sequencer.apps.payout_gateway:PaymentService", {"base_url": "ftp://x"}, "expected 'http://host:port'"),
    ("sequencer.apps.payout_gateway:PaymentService", {"url": "http://127.0.0.1:1"}, r"refused its \[options\]"),
])  # fmt: skip
def test_a_bad_external_system_is_refused_with_what_to_do(spec: str, options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_system(spec, options)


def test_seqd_integration_exits_with_the_config_code_for_a_missing_file(tmp_path: Path) -> None:
    assert main(["integration", "--config", str(tmp_path / "missing.toml")]) == ExitCode.CONFIG
