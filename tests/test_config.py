"""Configuration: defaults work, bad values are refused with a message naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import Config, ConfigError, load_config


def test_defaults_are_valid_and_round_trip_through_json() -> None:
    config = load_config()
    assert config.node.app == "sequencer.apps.ledger:Ledger"
    assert Config.from_json(config.to_json()) == config


def test_toml_file_and_overrides_are_merged(tmp_path: Path) -> None:
    path = tmp_path / "seqd.toml"
    path.write_text('[node]\nname = "alpha"\n[roles.blp]\nidle = "blocking"\n')
    config = load_config(path, ["roles.blp.cpu=0", "node.data_dir=/tmp/x"])
    assert config.node.name == "alpha"
    assert config.roles.blp.idle == "blocking"
    assert config.roles.blp.cpu == 0
    assert config.node.data_dir == "/tmp/x"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[ring]\nlog_capacity_bytes = 1000\n', "ring.log_capacity_bytes=1000"),
        ('[roles.blp]\nidle = "sleepy"\n', "roles.blp.idle"),
        ('[node]\nnumber = 0\n', "node.number=0"),
        ('[node]\nname = "a/b"\n', "node.name='a/b'"),
        ('[node]\nbogus = 1\n', "bogus"),
        ('[roles.sequencer]\ncpu = 4096\n', "roles.sequencer.cpu=4096"),
        ('[socket]\npath = "/' + "x" * 120 + '"\n', "socket.path"),
        ("[node\n", "not valid TOML"),
        ('[ring]\nlog_capacity_bytes = 1048576\n', "cannot hold two records"),
        ('[ring]\negress_capacity_bytes = 1048576\n', "ring.egress_capacity_bytes=1048576 cannot hold one reply"),
        ('[journal]\nbatch_bytes_max = 65536\n', "could never take it from the ring"),
    ],
)
def test_invalid_settings_are_refused_naming_the_field(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "seqd.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert expected in str(raised.value)


def test_missing_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.toml")


def test_malformed_override_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        load_config(None, ["roles.blp.idle"])


def test_the_example_config_is_valid_and_states_every_default() -> None:
    from pathlib import Path

    import msgspec

    example = Path(__file__).resolve().parent.parent / "systemd" / "seqd.toml.example"
    assert load_config(example) == Config(), "systemd/seqd.toml.example must state the defaults"
    # Every field of the config appears in the example, so the documented list stays complete.
    text = example.read_text()
    for section in msgspec.structs.fields(Config):
        fields = getattr(section.type, "__struct_fields__", (section.name,))
        for field in fields:
            if section.name not in ("roles", "cluster", "standby"):  # optional tables: commented out
                assert f"{field} =" in text, f"{section.name}.{field} is missing from the example"
