"""The bridge's parts without processes: request ids numbered by source index in the client
session (gaps skipped, resent in order), the bridge's config errors, its systemd unit. The
bridge itself, with real nodes and kill -9, is in tests/test_shards.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.bridge import load_bridge_config, load_route
from daemon.config import ConfigError
from daemon.exits import ExitCode
from sequencer.apps.sharded_ledger import CreditRequested, ShardRoute
from sequencer.bridge import Inbox, stream_client_id
from tests.test_client_session import Daemon, handshake, make_session, submit
from tests.test_systemd_units import (
    REQUIRED_SERVICE_DIRECTIVES,
    SYSTEMD_DIRECTORY,
    copy_with_runnable_exec_start,
    parse_unit,
    run_verify,
    verify_complaints,
    verify_works,  # noqa: F401  (a fixture)
)

BRIDGE_UNIT = SYSTEMD_DIRECTORY / "seqd-bridge@.service"


def test_request_ids_numbered_by_source_index_skip_the_gaps_and_resend_in_order() -> None:
    daemon = Daemon()
    session = make_session(first_request_id=101, in_flight_max=16)
    handshake(session, daemon)
    numbered = []
    for source_index in (105, 109, 110):
        session.skip_to(source_index)
        numbered.append(submit(session))
    assert daemon.commands(session) == [(105, 104), (109, 104), (110, 104)]
    # A reply to the first moves acked over the ids never used, up to the next in flight.
    assert session.receive_data(daemon.reply(105), 0.0) is None
    assert session.acked_request_id == 108
    # A reconnect resends what is unanswered, in order, and nothing for the skipped ids.
    session.connection_lost(None, 1.0)
    handshake(session, daemon, 1.0)
    assert daemon.commands(session) == [(109, 108), (110, 108)]
    with pytest.raises(ValueError, match="only go up"):
        session.skip_to(110)
    assert numbered[0].done() and not numbered[1].done()


def test_a_gap_wider_than_the_window_waits_for_the_replies_before_it() -> None:
    daemon = Daemon()
    session = make_session(first_request_id=1, in_flight_max=4)
    handshake(session, daemon)
    submit(session)
    session.skip_to(50)
    assert not session.has_room()  # 50 - acked 0 > 4: the daemon would refuse it
    session.receive_data(daemon.reply(1), 0.0)
    assert session.has_room()


def test_inbox_refuses_an_index_at_or_below_the_stream_position() -> None:
    inbox = Inbox()
    assert inbox.fresh("a>b", 5)
    assert not inbox.fresh("a>b", 5) and not inbox.fresh("a>b", 3)
    assert inbox.fresh("c>b", 3) and inbox.fresh("a>b", 6)
    assert inbox.positions == {"a>b": 6, "c>b": 3}


def test_stream_client_id_is_stable_and_differs_per_stream() -> None:
    assert stream_client_id("shard0>shard1") == stream_client_id("shard0>shard1")
    assert stream_client_id("shard0>shard1") != stream_client_id("shard1>shard0")
    assert 0 < stream_client_id("x") < 1 << 63


def test_shard_route_sends_each_event_only_to_its_shard() -> None:
    event = CreditRequested(9, 0, 2, "a", "b", 5)
    assert ShardRoute(1).command_for("shard0>shard1", 40, event) is None
    command = ShardRoute(2).command_for("shard0>shard2", 40, event)
    assert (command.stream, command.source_index, command.target) == ("shard0>shard2", 40, "b")


def test_bad_bridge_config_names_the_file_and_what_is_wrong(tmp_dir: Path) -> None:
    path = tmp_dir / "bridge.toml"
    path.write_text('source_config = "a.toml"\ntarget_config = "b.toml"\nroute = "x:Y"\nspeed = 3\n')
    with pytest.raises(ConfigError, match=r"bridge.toml.*speed"):
        load_bridge_config(path)
    path.write_text('source_config = "a"\ntarget_config = "b"\nroute = "x:Y"\nin_flight_max = 0\n')
    with pytest.raises(ConfigError, match="in_flight_max = 0 must be 1 to 1024"):
        load_bridge_config(path)
    with pytest.raises(ConfigError, match=r"no\.module.*cannot be built"):
        load_route("no.module:Route", {})
    with pytest.raises(ConfigError, match="cannot be built"):
        load_route("sequencer.apps.sharded_ledger:ShardRoute", {"shard": 1})
    assert load_route("sequencer.apps.sharded_ledger:ShardRoute", {"target_shard": 1}).target_shard == 1


def test_bridge_unit_is_hardened_and_not_restarted_on_failures_a_restart_cannot_cure() -> None:
    service = parse_unit(BRIDGE_UNIT)["Service"]
    assert service["ExecStart"] == "/usr/bin/seqd bridge run --config /etc/seqd/bridge-%i.toml"
    for key in ("Type", "NotifyAccess", "Restart", "KillMode", "User", "Group", "UMask",
                "NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices",
                "ProtectKernelTunables", "ProtectKernelModules", "ProtectControlGroups",
                "CapabilityBoundingSet", "SystemCallFilter"):  # fmt: skip
        assert service[key] == REQUIRED_SERVICE_DIRECTIVES[key], key
    assert service["RestrictAddressFamilies"] == "AF_UNIX"  # a bridge speaks to local sockets only
    prevented = {int(code) for code in service["RestartPreventExitStatus"].split()}
    assert prevented == {ExitCode.DATAERR, ExitCode.CONFIG}


def test_systemd_analyze_verify_accepts_the_bridge_unit(verify_works: None, tmp_dir: Path) -> None:  # noqa: F811
    copy_with_runnable_exec_start(BRIDGE_UNIT, tmp_dir)
    result = run_verify(tmp_dir / "seqd-bridge@shard0-shard1.service")
    assert result.returncode == 0, result.stderr
    assert not verify_complaints(result, BRIDGE_UNIT.name)
