"""`[cluster]`: cluster mode's settings, each bad value refused with one line naming it and why.

A config without `[cluster]` is a single node, as before (`Config.cluster` is None).
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import pytest

from daemon.config import STORAGE_READ_BYTES_PER_PASS_FLOOR as PASS_FLOOR
from daemon.config import STORAGE_READ_BYTES_PER_PASS_LIMIT as PASS_LIMIT
from daemon.config import ClusterConfig, Config, ConfigError, MemberConfig, load_config
from daemon.config_catchup import FOLLOWER_LOG_RETENTION_LIMIT
from sequencer.raft.config import pass_budget_max, pass_cpu_ms

EXAMPLE = Path(__file__).resolve().parent.parent / "systemd" / "seqd.toml.example"
SECRET = "8f" * 32  # 64 bytes of hex text, as `secrets.token_hex(32)` prints


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.secret"
    path.write_text(SECRET + "\n")
    path.chmod(0o600)
    return path


def cluster_toml(secret_file: Path, members: int = 3, node_number: int = 1, **settings: object) -> str:
    lines = [f"[node]\nnumber = {node_number}\n", "[cluster]", f'secret_file = "{secret_file}"']
    lines += [f"{key} = {value!r}".replace("'", '"') for key, value in settings.items()]
    for number in range(1, members + 1):
        lines += ["[[cluster.members]]", f"id = {number}", f'peer_address = "127.0.0.1:{7100 + number}"']
    return "\n".join(lines) + "\n"


def load_text(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "seqd.toml"
    path.write_text(text)
    return load_config(path)


def refused(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as raised:
        load_text(tmp_path, text)
    message = str(raised.value)
    assert "\n" not in message  # one line: journald, systemctl status
    return message


def test_a_config_without_cluster_is_a_single_node() -> None:
    assert load_config().cluster is None


def test_a_three_node_cluster_loads_with_lan_defaults(tmp_path: Path, secret_file: Path) -> None:
    config = load_text(tmp_path, cluster_toml(secret_file, node_number=2))
    cluster = config.cluster
    assert cluster is not None
    assert [m.id for m in cluster.members] == [1, 2, 3]
    assert cluster.member(2).peer_address == "127.0.0.1:7102"
    assert (cluster.heartbeat_ms, cluster.election_timeout_ms) == (50, 300)
    assert (cluster.heartbeat_ticks, cluster.election_ticks) == (5, 30)
    assert cluster.read_secret() == SECRET.encode()
    assert Config.from_json(config.to_json()) == config
    assert SECRET not in config.to_json().decode()  # the path travels, never the secret


def test_five_members_are_allowed(tmp_path: Path, secret_file: Path) -> None:
    assert len(load_text(tmp_path, cluster_toml(secret_file, members=5)).cluster.members) == 5


def test_the_example_states_every_cluster_default(tmp_path: Path, secret_file: Path) -> None:
    """The commented [cluster] block of systemd/seqd.toml.example, uncommented, is valid and
    states every default of ClusterConfig and MemberConfig."""
    text = EXAMPLE.read_text()
    block = text[text.index("# [cluster]") :]
    uncommented = "\n".join(line[2:] if line.startswith("# ") else "" for line in block.splitlines())
    uncommented = uncommented.replace("/etc/seqd/cluster.secret", str(secret_file))
    config = load_text(tmp_path, uncommented)
    cluster = config.cluster
    assert cluster is not None
    defaults = ClusterConfig()
    for field in msgspec.structs.fields(ClusterConfig):
        stated = "[[cluster.members]]" if field.name == "members" else f"{field.name} ="
        assert stated in block, f"cluster.{field.name} is missing from the example"
        if field.name not in ("members", "secret_file"):
            assert getattr(cluster, field.name) == getattr(defaults, field.name), field.name
    for field in msgspec.structs.fields(MemberConfig):
        assert f"{field.name} =" in block, f"cluster.members.{field.name} is missing from the example"
    assert all(m.socket_path == "" for m in cluster.members)


@pytest.mark.parametrize(
    ("members", "number", "expected"),
    [
        (1, 1, "cluster.members lists 1 node(s): a cluster has 3 or 5"),
        (4, 1, "cluster.members lists 4 node(s)"),
        (3, 4, "node.number=4 is not among cluster.members ids [1, 2, 3]"),
    ],
)
def test_membership_size_and_this_node_are_checked(tmp_path, secret_file, members, number, expected) -> None:
    assert expected in refused(tmp_path, cluster_toml(secret_file, members=members, node_number=number))


@pytest.mark.parametrize(
    ("replace", "expected"),
    [
        (("id = 3", "id = 2"), "cluster.members ids [2] appear more than once"),
        (("id = 3", "id = 300"), "cluster.members ids [300]: must be 1..255"),
        (('"127.0.0.1:7103"', '"127.0.0.1:7102"'), "peer_address ['127.0.0.1:7102'] given to more than one"),
        (('"127.0.0.1:7103"', '"127.0.0.1"'), "id 3 peer_address='127.0.0.1': expected host:port"),
        (('"127.0.0.1:7103"', '"127.0.0.1:70000"'), "port 70000 is outside 1..65535"),
        (("id = 3", 'id = 3\nsocket_path = "/' + "s" * 120 + '"'), "id 3 socket_path is 121 bytes > 107"),
        (("id = 3", "id = 3\nbogus = 1"), "bogus"),
    ],
)
def test_bad_members_are_refused(tmp_path, secret_file, replace, expected) -> None:
    text = cluster_toml(secret_file).replace(*replace)
    assert expected in refused(tmp_path, text)


def test_a_member_name_must_be_this_nodes_name(tmp_path: Path, secret_file: Path) -> None:
    text = cluster_toml(secret_file).replace('[node]\n', '[node]\nname = "east"\n')
    named = text.replace("id = 1\n", 'id = 1\nname = "west"\n').replace("id = 2\n", 'id = 2\nname = "b"\n')
    assert "cluster.members id 1 name='west' but this node's node.name='east'" in refused(tmp_path, named)
    config = load_text(tmp_path, named.replace('name = "west"', 'name = "east"'))
    assert config.cluster is not None and [m.name for m in config.cluster.members] == ["east", "b", ""]


def test_a_missing_secret_file_says_how_to_make_one(tmp_path: Path) -> None:
    message = refused(tmp_path, cluster_toml(tmp_path / "absent"))
    assert "does not exist" in message and "secrets.token_hex(32)" in message and "chmod 600" in message


def test_a_secret_readable_by_others_is_refused(tmp_path: Path, secret_file: Path) -> None:
    secret_file.chmod(0o640)
    message = refused(tmp_path, cluster_toml(secret_file))
    assert "mode 0640" in message and "impersonate" in message and "0600 or stricter" in message


def test_a_stricter_secret_mode_is_accepted(tmp_path: Path, secret_file: Path) -> None:
    secret_file.chmod(0o400)
    assert load_text(tmp_path, cluster_toml(secret_file)).cluster is not None


def test_a_short_secret_is_refused_saying_why(tmp_path: Path, secret_file: Path) -> None:
    secret_file.write_text("hunter2\n")
    message = refused(tmp_path, cluster_toml(secret_file))
    assert "holds 7 bytes < 32" in message and "guessed offline" in message


def test_a_secret_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "secret.d"
    directory.mkdir(mode=0o700)
    assert "is not a regular file" in refused(tmp_path, cluster_toml(directory))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_secret_is_refused(tmp_path: Path, secret_file: Path) -> None:
    secret_file.chmod(0o000)
    assert "cannot be read" in refused(tmp_path, cluster_toml(secret_file))


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"peer_listen": "0.0.0.0:7101"}, "cluster.peer_listen='0.0.0.0:7101' is not a loopback address"),
        ({"peer_listen": "localhost:7101"}, "the host must be an IP address"),
        ({"peer_listen": "7101"}, "cluster.peer_listen='7101': expected host:port"),
        ({"tick_ms": 0}, "cluster.tick_ms=0: must be 1..100"),
        ({"heartbeat_ms": 55}, "cluster.heartbeat_ms=55: must be a positive multiple of cluster.tick_ms=10"),
        ({"election_timeout_ms": 0}, "cluster.election_timeout_ms=0: must be a positive multiple"),
        ({"election_timeout_ms": 100}, "cluster.election_timeout_ms=100 must exceed 2 x cluster.heartbeat_ms=50"),
        ({"cluster_id": -1}, "cluster.cluster_id=-1: must be 0..2**64-1"),
        ({"inflight_bytes_max": 0}, "cluster.inflight_bytes_max=0: must be 65536..4194304 bytes"),
        ({"inflight_bytes_max": 8 << 20}, "cluster.inflight_bytes_max=8388608: must be 65536..4194304"),
        ({"storage_read_bytes_per_pass_max": 4096},
         "cluster.storage_read_bytes_per_pass_max=4096: must be 1048576..16777216 bytes"),
        ({"storage_read_bytes_per_pass_max": 64 << 20},
         "cluster.storage_read_bytes_per_pass_max=67108864: must be 1048576..16777216 bytes (above, one pass"),
    ],
)
def test_bad_listen_address_and_timeouts_are_refused(tmp_path, secret_file, settings, expected) -> None:
    assert expected in refused(tmp_path, cluster_toml(secret_file, **settings))


def test_the_byte_window_and_the_pass_budget_reach_the_raft_core(tmp_path: Path, secret_file: Path) -> None:
    from daemon.roles.replicator_setup import raft_config

    settings = {"inflight_bytes_max": 1 << 20, "storage_read_bytes_per_pass_max": 2 << 20}
    raft = raft_config(load_text(tmp_path, cluster_toml(secret_file, **settings)), 1 << 20, 7)
    assert (raft.inflight_bytes_max, raft.storage_read_bytes_per_pass_max, raft.incarnation) == (1 << 20, 2 << 20, 7)
    default = raft_config(load_text(tmp_path, cluster_toml(secret_file)), 1 << 20, 7)
    assert (default.inflight_bytes_max, default.storage_read_bytes_per_pass_max) == (4 << 20, 4 << 20)


def test_the_followers_memory_window_reaches_the_raft_core(tmp_path: Path, secret_file: Path) -> None:
    from daemon.roles.replicator_setup import raft_config

    raft = raft_config(load_text(tmp_path, cluster_toml(secret_file, follower_log_retention_entries=64)), 1 << 20, 7)
    assert raft.follower_log_retention_entries == 64
    assert raft_config(load_text(tmp_path, cluster_toml(secret_file)), 1 << 20, 7).follower_log_retention_entries == 4096


@pytest.mark.parametrize(
    ("entries", "accepted"),
    [(-1, False), (0, True), (FOLLOWER_LOG_RETENTION_LIMIT, True), (FOLLOWER_LOG_RETENTION_LIMIT + 1, False)],
)
def test_the_followers_memory_window_is_accepted_from_none_to_the_leaders_window_both_included(
    tmp_path: Path, secret_file: Path, entries: int, accepted: bool
) -> None:
    text = cluster_toml(secret_file, follower_log_retention_entries=entries)
    if accepted:
        assert load_text(tmp_path, text).cluster.follower_log_retention_entries == entries  # type: ignore[union-attr]
    else:
        assert (f"cluster.follower_log_retention_entries={entries}: must be 0..{FOLLOWER_LOG_RETENTION_LIMIT} entries"
                in refused(tmp_path, text))


@pytest.mark.parametrize(
    ("budget", "accepted"),
    [(PASS_FLOOR - 1, False), (PASS_FLOOR, True), (PASS_LIMIT, True), (PASS_LIMIT + 1, False)],
)
def test_the_pass_budget_is_accepted_from_its_floor_to_its_limit_both_included(
    tmp_path: Path, secret_file: Path, budget: int, accepted: bool
) -> None:
    # The limit's pass (~270 ms) needs an election timeout over twice that to be accepted at all.
    text = cluster_toml(secret_file, storage_read_bytes_per_pass_max=budget, election_timeout_ms=600)
    if accepted:
        assert load_text(tmp_path, text).cluster.storage_read_bytes_per_pass_max == budget  # type: ignore[union-attr]
    else:
        assert f"cluster.storage_read_bytes_per_pass_max={budget}: must be {PASS_FLOOR}..{PASS_LIMIT}" in refused(
            tmp_path, text)


def test_a_pass_budget_must_take_under_half_the_configured_election_timeout(tmp_path: Path, secret_file: Path) -> None:
    # A pass reads its budget plus the read that crosses it, ~16 ms of CPU a MiB; it holds the
    # leader's heartbeats, so a budget fit for 300 ms could let a shorter timeout expire.
    fits = pass_budget_max(300)
    assert 2 * pass_cpu_ms(fits) < 300 <= 2 * pass_cpu_ms(fits + 1)
    assert load_text(tmp_path, cluster_toml(secret_file, storage_read_bytes_per_pass_max=fits)).cluster is not None
    message = refused(tmp_path, cluster_toml(secret_file, storage_read_bytes_per_pass_max=fits + 1))
    assert f"cluster.storage_read_bytes_per_pass_max={fits + 1}: a pass of catch-up" in message
    assert "not under half cluster.election_timeout_ms=300" in message
    assert f"lower storage_read_bytes_per_pass_max to at most {fits}" in message
    # The default budget (~80 ms a pass) with a shorter timeout: refused at 160 ms, fine at 170.
    short = {"heartbeat_ms": 20, "election_timeout_ms": 160}
    message = refused(tmp_path, cluster_toml(secret_file, **short))
    assert f"storage_read_bytes_per_pass_max={4 << 20}: a pass of catch-up" in message
    assert f"to at most {pass_budget_max(160)}" in message
    assert load_text(tmp_path, cluster_toml(secret_file, heartbeat_ms=20, election_timeout_ms=170)).cluster is not None
    # So short that even the floor's pass is too long: only a longer timeout helps.
    tiny = refused(tmp_path, cluster_toml(secret_file, storage_read_bytes_per_pass_max=PASS_FLOOR, heartbeat_ms=10,
                                          election_timeout_ms=60))
    assert "cluster.election_timeout_ms=60" in tiny and tiny.endswith("raise election_timeout_ms")


def test_the_send_buffer_toward_a_peer_is_the_byte_window_plus_one_frame(tmp_path: Path, secret_file: Path) -> None:
    """A peer that does not drain costs the leader at most its byte window plus the one message
    that may cross it (tests/test_peer_transport_buffer.py holds the transport to the bound)."""
    from daemon.roles.replicator_setup import transport_config
    from sequencer.raft.peer_protocol import PEER_FRAME_BYTES_MAX

    small = load_text(tmp_path, cluster_toml(secret_file, inflight_bytes_max=64 << 10))
    assert transport_config(small).send_buffer_bytes_max == (64 << 10) + PEER_FRAME_BYTES_MAX
    default = load_text(tmp_path, cluster_toml(secret_file))
    assert transport_config(default).send_buffer_bytes_max == (4 << 20) + PEER_FRAME_BYTES_MAX


def test_a_node_listening_on_its_non_loopback_peer_address_needs_allow_non_loopback(
    tmp_path: Path, secret_file: Path
) -> None:
    text = cluster_toml(secret_file).replace("127.0.0.1:7101", "10.0.0.1:7101")
    assert "cluster.members id 1 peer_address" in refused(tmp_path, text)
    assert "allow_non_loopback = true" in refused(tmp_path, text)
    allowed = text.replace("[cluster]\n", "[cluster]\nallow_non_loopback = true\n")
    assert load_text(tmp_path, allowed).cluster.allow_non_loopback
    # Another member's network address needs nothing: this node only dials it.
    other = cluster_toml(secret_file).replace("127.0.0.1:7102", "10.0.0.2:7102")
    assert load_text(tmp_path, other).cluster.member(2).peer_address == "10.0.0.2:7102"


def test_ipv6_peer_addresses_are_understood(tmp_path: Path, secret_file: Path) -> None:
    text = cluster_toml(secret_file).replace("127.0.0.1:7101", "[::1]:7101")
    assert load_text(tmp_path, text).cluster.member(1).peer_address == "[::1]:7101"


def _with_learners(secret_file: Path, voters: int, learners: int, node_number: int = 1) -> str:
    text = cluster_toml(secret_file, members=voters, node_number=node_number)
    for number in range(voters + 1, voters + learners + 1):
        text += f'[[cluster.members]]\nid = {number}\npeer_address = "127.0.0.1:{7100 + number}"\nlearner = true\n'
    return text


def test_a_learner_member_loads_and_is_no_voter(tmp_path: Path, secret_file: Path) -> None:
    config = load_text(tmp_path, _with_learners(secret_file, 3, 2, node_number=5))
    cluster = config.cluster
    assert cluster is not None
    assert (cluster.voters, cluster.learners) == ((1, 2, 3), (4, 5))


@pytest.mark.parametrize(
    ("voters", "learners", "expected"),
    [
        (2, 1, "cluster.members lists 3 node(s), 1 of them learners: a cluster has 3 or 5 voters"),
        (3, 3, "cluster.members lists 3 voters and 3 learners: at most 5 members in all"),
        (5, 1, "at most 5 members in all"),
    ],
)
def test_voters_and_learners_are_counted_apart(tmp_path, secret_file, voters, learners, expected) -> None:
    assert expected in refused(tmp_path, _with_learners(secret_file, voters, learners))
