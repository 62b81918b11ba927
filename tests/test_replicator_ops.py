"""The replicator's operating counters off a running node: what `publish` stores each tick, with
the clocks handed in through the module's `time` (real shared-memory counters, a real core)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

import ipc
from daemon.layout import COUNTER_NAMES, RAFT_PEER_LAST_CONTACT_MS, ROLE_COUNTERS, CounterView, Role
from daemon.roles import replicator_ops
from daemon.roles.replicator_ops import ReplicatorOperations
from ipc.counters import Counters
from sequencer.raft import DurableState, HardState, RaftConfig, RaftCore
from sequencer.raft.transport_config import TransportCounters

# The wall clock less the monotonic one, in ns, on this imagined host: a contact heard at
# monotonic HEARD_S is at wall-clock ms CONTACT_MS and 400 us, far from a whole ms either way.
OFFSET_NS = 1_700_000_000_000_000_000 - 100_000
HEARD_S = 5000.0005
CONTACT_MS = (round(HEARD_S * 1e9) + OFFSET_NS) // 1_000_000
TICK_S = 0.0003  # a tick here is 0.3 ms: each crosses the two clocks' whole ms at other instants
# The two clocks are read up to this far apart (publish reads the wall clock first; the sign
# does not change what is tested: one value per contact).
READS_APART_NS = 700


@pytest.fixture
def operations(unique: str) -> Iterator[tuple[ReplicatorOperations, Counters]]:
    counters = Counters.create(ipc.segment_name(unique, "counters"), COUNTER_NAMES)
    view = CounterView(counters, Role.REPLICATOR)
    yield ReplicatorOperations(view, (2, 3), 1.0, view[ROLE_COUNTERS[Role.REPLICATOR].errors]), counters
    counters.close()
    counters.unlink()


def test_a_peers_last_contact_is_one_wall_clock_ms_for_as_long_as_it_is_the_last(operations, monkeypatch) -> None:
    """`raft.peer<k>.last_contact_ms` is the wall-clock ms of the last message heard, the same on
    every tick until another comes, however the two clocks' whole ms fall (it moved by 1 ms
    between ticks, and `seqd status`' age with it, when each tick derived it again)."""
    ops, counters = operations
    core = RaftCore(RaftConfig(1, (1, 2, 3)), random.Random(0), DurableState(HardState(1, 0, 0), None, [], []))
    clock = SimpleNamespace(monotonic=lambda: clock.now_s, time_ns=lambda: clock.wall_ns)
    monkeypatch.setattr(replicator_ops, "time", clock)

    def contacts_at(now_s: float, apart_ns: int) -> tuple[int, int]:
        clock.now_s, clock.wall_ns = now_s, round(now_s * 1e9) + OFFSET_NS + apart_ns
        ops.publish(core, TransportCounters(), 0)
        return counters[RAFT_PEER_LAST_CONTACT_MS[0].name].get(), counters[RAFT_PEER_LAST_CONTACT_MS[1].name].get()

    ops.heard_from(2, HEARD_S)
    shown = {contacts_at(HEARD_S + 0.002 + tick * TICK_S, tick * 100 % READS_APART_NS) for tick in range(20)}
    assert shown == {(CONTACT_MS, 0)}  # node 3 never heard from: 0
    ops.heard_from(2, HEARD_S + 0.1)
    assert contacts_at(HEARD_S + 0.2, READS_APART_NS) == (CONTACT_MS + 100, 0)
    # A contact 300 ns before a whole ms, closer than the clock reads are apart: which ms it is
    # depends on one tick's reads, and it stays the one the first tick after it said.
    ops.heard_from(2, HEARD_S + 0.2995997)
    shown = {contacts_at(HEARD_S + 0.3 + tick * TICK_S, tick * 100 % READS_APART_NS) for tick in range(20)}
    assert shown == {(CONTACT_MS + 299, 0)}, shown
