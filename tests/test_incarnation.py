"""A node's start ids never repeat nor go back across restarts, whatever the wall clock does
(daemon/incarnation.py): a repeated session incarnation would be taken by the blp for a copy of
an earlier start's node_start (its sessions left open for good, the new start's opens refused,
its clients stalled: sequencer/dedup.py), and a Raft incarnation gone back would make a leader
drop every answer of the new start (sequencer/raft/tracker.py, "Incarnations")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from daemon.config import ClusterConfig, Config, MemberConfig, NodeConfig
from daemon.exits import ExitCode, FatalError
from daemon.incarnation import (
    INCARNATION_NAME,
    RAFT_INCARNATION_NAME,
    next_incarnation_id,
    next_raft_incarnation,
    previous_incarnation,
)
from daemon.layout import INCARNATION_BITS, incarnation_id
from daemon.roles import replicator_setup
from daemon.roles.replicator_setup import raft_config, start_raft_core
from sequencer.raft.messages import DurableState, HardState

NOW_S = 1.7e9


def test_a_clock_stepped_back_neither_repeats_nor_lowers_a_start_id(tmp_path: Path) -> None:
    # Each start a new `seqd run` (count 1); the third after the clock stepped back an hour, to
    # the very millisecond of the first (NTP, a VM restored): the clock's id would repeat it.
    ids = [next_incarnation_id(tmp_path, now_s, 1) for now_s in (NOW_S, NOW_S + 3600.0, NOW_S)]
    assert ids == [ids[0], ids[0] + 1, ids[0] + 2]
    # Each start knows the one before (its node_start names it: sequencer/dedup.py).
    assert (tmp_path / INCARNATION_NAME).read_text() == f"{ids[2]} {ids[1]}\n"
    assert previous_incarnation(tmp_path, ids[2]) == ids[1]
    assert previous_incarnation(tmp_path, ids[1]) is None  # not the last start: not known


def test_the_first_start_takes_the_clocks_id_and_the_ids_wrap_within_their_bits(tmp_path: Path) -> None:
    first = next_incarnation_id(tmp_path, NOW_S, 3)
    assert first == incarnation_id(NOW_S, 3)  # no start before
    assert previous_incarnation(tmp_path, first) is None
    (tmp_path / INCARNATION_NAME).write_text(f"{(1 << INCARNATION_BITS) - 1}\n")
    assert next_incarnation_id(tmp_path, NOW_S, 1) == 0


def test_the_raft_incarnation_grows_even_when_the_clock_steps_back_and_after_a_wipe(tmp_path: Path) -> None:
    now_ns = int(NOW_S * 1e9)
    first = next_raft_incarnation(tmp_path, now_ns)
    assert first == now_ns
    assert next_raft_incarnation(tmp_path, now_ns - 5_000_000_000) == first + 1  # stepped back 5 s
    assert next_raft_incarnation(tmp_path, now_ns + 10) == now_ns + 10  # the clock is past it again
    (tmp_path / RAFT_INCARNATION_NAME).unlink()  # a wiped data directory: the clock, newer than all
    assert next_raft_incarnation(tmp_path, now_ns + 20) == now_ns + 20


@pytest.mark.parametrize("damage", [b"12\xff 11\n", b"\0\0\0\0\n", b"twelve\n", b""])
def test_a_damaged_start_id_file_stops_the_start_with_an_error_naming_it_and_the_remedy(
    tmp_path: Path, damage: bytes
) -> None:
    # Taken for "no file", the clock's id would come back without a word: the never-repeat rule
    # silently gone. Undecodable, it ended the start with "unexpected UnicodeDecodeError".
    (tmp_path / INCARNATION_NAME).write_bytes(damage)
    with pytest.raises(FatalError) as raised:
        next_incarnation_id(tmp_path, NOW_S, 1)
    assert raised.value.code is ExitCode.DATAERR
    assert str(tmp_path / INCARNATION_NAME) in raised.value.message and "remove it" in raised.value.message


def cluster_config(data_dir: Path, **cluster: Any) -> Config:
    members = [MemberConfig(id=number, peer_address=f"127.0.0.1:{7100 + number}") for number in (1, 2, 3)]
    return Config(node=NodeConfig(number=1, data_dir=str(data_dir)), cluster=ClusterConfig(members=members, **cluster))


def test_raft_config_is_pure_it_takes_no_incarnation_and_reads_no_clock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It took the start's Raft incarnation itself, writing <data_dir>/raft.incarnation: a config
    # test then tried /var/lib/seqd. The replicator's start-up takes it (`start_raft_core`).
    config = cluster_config(tmp_path / "absent")

    def forbidden(*args: object) -> int:
        raise AssertionError(f"raft_config took an incarnation or read the clock {args}")

    monkeypatch.setattr(replicator_setup, "next_raft_incarnation", forbidden)
    monkeypatch.setattr(replicator_setup, "wall_clock_ns", forbidden)
    raft = raft_config(config, 1 << 20, 42)
    assert raft.incarnation == 42
    assert not (tmp_path / "absent").exists()


def test_the_replicators_core_carries_the_raft_incarnation_it_made_durable_first(tmp_path: Path) -> None:
    durable = DurableState(HardState(0, 0, 0))
    first = start_raft_core(cluster_config(tmp_path), 1 << 20, durable, None).config.incarnation
    assert (tmp_path / RAFT_INCARNATION_NAME).read_text() == f"{first}\n"
    (tmp_path / RAFT_INCARNATION_NAME).write_text(f"{first + 10**12}\n")  # a start "ahead" of the clock
    core = start_raft_core(cluster_config(tmp_path, storage_read_bytes_per_pass_max=2 << 20), 1 << 20, durable, None)
    second = core.config.incarnation
    assert second == first + 10**12 + 1  # max(clock, last + 1)
    assert core.config.storage_read_bytes_per_pass_max == 2 << 20  # [cluster]'s budget, in the core
    assert (tmp_path / RAFT_INCARNATION_NAME).read_text() == f"{second}\n"
