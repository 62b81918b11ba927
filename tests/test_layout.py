"""The node's layout (daemon/layout.py): one table declares every counter and its one writer, and
the rule is enforced, statically over the table and the sources, and at run time by the views
every role attaches through, on a real node."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemon.config import Config
from daemon.layout import (
    COUNTER_NAMES,
    COUNTERS,
    COUNTERS_LAYOUT_VERSION,
    ERROR_KIND_COUNTERS,
    ERRORS_TOTAL_NAME,
    LOG_PUBLISHED_INDEX,
    LOG_PUBLISHED_POSITION,
    OPERATOR,
    REPLICA_COUNTERS,
    ROLE_COUNTERS,
    SNAPSHOTTER,
    SNAPSHOTTER_COUNTERS,
    SUPERVISOR,
    CounterView,
    Kind,
    Role,
    RoleCounters,
    counters_name,
    create_counters,
    drain_order,
    errors_total,
    incarnation_id,
    node_roles,
)
from daemon.metrics import render_prometheus
from daemon.status import StatusTracker
from ipc.counters import COUNTERS_MAX, NAME_BYTES_MAX, Counter, Counters, CounterWriteError
from ipc.segment import SegmentError
from sequencer import snapshot as snapshots
from tests.node_fixtures import node_factory, open_accounts  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
# Each layout version and the fingerprint of the table it names. A change of the table (a counter
# added, removed, renamed, moved, or given to another owner or kind) is a new layout: bump
# COUNTERS_LAYOUT_VERSION and record the new fingerprint here.
LAYOUT_FINGERPRINTS = {1: "5303d08d3b565003", 2: "6e89ba6aacfd2344", 3: "bccbb1641679aae1", 4: "ad51b2ce1a19e361", 5: "c3a0c411e83af760", 6: "14b58bfdd54450ea", 7: "e9594b7e43e07a89", 8: "5b8aab814c88e6ae", 9: "07897bf7fa58fbf0", 10: "66fb976a9db774b7", 11: "2e48af32632f4d1a"}
# Bounds every wait on a real node; a healthy run meets each condition within a second or two.
WAIT_S = 60.0
POLL_S = 0.02
_OWNERS = (SUPERVISOR, OPERATOR, SNAPSHOTTER, *Role, *(block.owner for block in REPLICA_COUNTERS))
_BLOCK_FIELDS = tuple(
    field.name for field in dataclasses.fields(RoleCounters) if field.name != "role"
)


# ---- the table --------------------------------------------------------------------------------


def test_every_counter_has_one_owner_a_unique_name_and_its_slot_as_id() -> None:
    assert [spec.id for spec in COUNTERS] == list(range(len(COUNTERS)))
    assert len(set(COUNTER_NAMES)) == len(COUNTERS)
    assert len(COUNTERS) <= COUNTERS_MAX
    for spec in COUNTERS:
        assert spec.owner in _OWNERS, spec
        assert 0 < len(spec.name) <= NAME_BYTES_MAX and spec.name.isascii(), spec
        assert spec.help.endswith(".") and len(spec.help) > 10, spec
        assert (spec.kind is Kind.ENUM) == (spec.values is not None), spec
        if spec.values is not None:
            for member in spec.values:
                assert f"{member.value} {spec.value_name(member.value)}" in spec.help, (
                    spec,
                    member,
                )


def test_each_role_has_its_block_the_supervisor_owning_the_launch_and_the_role_the_rest() -> None:
    assert set(ROLE_COUNTERS) == set(Role)
    launch = {"pid", "start_time_ms", "cpu", "idle", "stop"}
    for role, block in ROLE_COUNTERS.items():
        assert block.role is role
        for field in _BLOCK_FIELDS:
            spec = getattr(block, field)
            assert spec.name == f"{role}.{field}"
            assert spec.owner == (SUPERVISOR if field in launch else role), spec


def test_errors_are_counted_per_role_and_no_counter_is_a_node_wide_total() -> None:
    """`errors.total` was written by three roles with a load and a store: increments were lost.
    Now each role counts its own, and readers sum them."""
    assert ERRORS_TOTAL_NAME not in COUNTER_NAMES
    assert {block.errors.owner for block in ROLE_COUNTERS.values()} == set(Role)
    assert all(block.errors.kind is Kind.COUNTER for block in ROLE_COUNTERS.values())
    assert {spec.owner for spec in ERROR_KIND_COUNTERS} <= set(Role)


def test_the_error_total_counts_every_process_that_has_an_error_counter() -> None:
    # The snapshotter (snapshot.writer = replica) and the query replicas are processes of the node
    # as much as the roles are: a snapshot the snapshotter failed to write is in the total.
    error_counters = [spec.name for spec in COUNTERS if spec.name.endswith(".errors")]
    values = dict.fromkeys(error_counters, 1)
    assert errors_total(values) == len(error_counters)
    assert errors_total({SNAPSHOTTER_COUNTERS.errors.name: 2, REPLICA_COUNTERS[0].errors.name: 3}) == 5
    assert errors_total({}) is None


def test_a_changed_counter_table_comes_with_a_new_layout_version() -> None:
    """The segment header carries COUNTERS_LAYOUT_VERSION, so a reader of another release refuses
    the segment; that only works if the version changes whenever the table does."""
    table = [
        (spec.id, spec.name, str(spec.owner), spec.kind.value, getattr(spec.values, "__name__", ""))
        for spec in COUNTERS
    ]
    fingerprint = hashlib.sha256(repr(table).encode()).hexdigest()[:16]
    assert LAYOUT_FINGERPRINTS.get(COUNTERS_LAYOUT_VERSION) == fingerprint, (
        f"the counter table (fingerprint {fingerprint}) is not the one recorded for layout version "
        f"{COUNTERS_LAYOUT_VERSION}: bump COUNTERS_LAYOUT_VERSION in daemon/layout.py and record "
        "the new fingerprint in LAYOUT_FINGERPRINTS"
    )


def _counter_name_spellings(source: str) -> list[tuple[int, str]]:
    """String literals of `source` that spell a counter name (`"commit.index"`) or a role block
    counter built from a role (`f"{role}.heartbeat"`)."""
    names = {*COUNTER_NAMES, ERRORS_TOTAL_NAME}
    suffixes = {f".{field}" for field in _BLOCK_FIELDS}
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and node.value in names:
            found.append((node.lineno, node.value))
        elif isinstance(node, ast.JoinedStr) and len(node.values) >= 2:
            *_, value, suffix = node.values
            if (
                isinstance(value, ast.FormattedValue)
                and isinstance(suffix, ast.Constant)
                and suffix.value in suffixes
            ):
                found.append((node.lineno, f"{{...}}{suffix.value}"))
    return found


def test_counter_names_are_spelled_only_in_the_layout() -> None:
    """The daemon and the benchmarks look counters up through the table's declarations, never by
    a string: a renamed or removed counter is then a type error, not a silent 0."""
    sources = [*sorted((ROOT / "daemon").rglob("*.py")), *sorted((ROOT / "benches").rglob("*.py"))]
    spelled = {
        f"{path.relative_to(ROOT)}:{line}": name
        for path in sources
        if path != ROOT / "daemon" / "layout.py"
        for line, name in _counter_name_spellings(path.read_text())
    }
    assert spelled == {}


def test_the_source_check_catches_a_counter_looked_up_by_name() -> None:
    planted = 'counters["errors.total"].add(1)\nvalue = counters[f"{role}.heartbeat"].get()\n'
    assert _counter_name_spellings(planted) == [(1, "errors.total"), (2, "{...}.heartbeat")]


def test_roles_start_readers_first_and_drain_in_pipeline_order() -> None:
    assert drain_order(Role) == (Role.SEQUENCER, Role.JOURNALLER, Role.REPLICATOR, Role.BLP)
    single = node_roles()
    assert single == (Role.SEQUENCER, Role.JOURNALLER, Role.BLP)
    assert (
        max(role.start_phase for role in single if role is not Role.SEQUENCER)
        < Role.SEQUENCER.start_phase
    )
    assert node_roles(clustered=True) == tuple(Role)


def test_the_config_has_a_section_for_each_role_a_node_can_run() -> None:
    # [roles.replicator] sets the replicator's CPU and idle strategy; only a cluster reads it.
    import msgspec

    sections = [field.name for field in msgspec.structs.fields(type(Config().roles))]
    assert sections == [role.value for role in node_roles(clustered=True)]


def test_incarnation_ids_fit_the_bits_session_ids_give_them() -> None:
    from daemon.layout import INCARNATION_BITS

    for now_s in (0.0, 1.7e9, 2.0**40):
        for incarnation in (1, 2, 1 << 30):
            assert 0 <= incarnation_id(now_s, incarnation) < 1 << INCARNATION_BITS
    assert incarnation_id(1.7e9, 1) != incarnation_id(1.7e9, 2)


def test_consecutive_incarnations_never_share_an_id() -> None:
    # A restart loop: each incarnation a little later than the one before, within the same
    # second or seconds apart (the old formula, second xor count, repeated at seconds 2 and 3).
    for start_s in (2.0, 1.7e9, 1.7e9 + 0.999):
        for gap_s in (0.0, 0.001, 0.25, 1.0, 7.0):
            ids = [incarnation_id(start_s + count * gap_s, count) for count in range(1, 64)]
            assert len(set(ids)) == len(ids), (start_s, gap_s)


# ---- views over real shared memory ------------------------------------------------------------


@pytest.fixture
def counters(unique: str) -> Iterator[Counters]:
    created = create_counters(unique)
    yield created
    created.close()
    created.unlink()


def test_a_view_hands_its_owner_plain_counters_and_every_other_one_read_only(
    counters: Counters,
) -> None:
    for owner in (*_OWNERS, None):
        view = CounterView(counters, owner)
        for spec in COUNTERS:
            handle = view[spec]
            assert handle.name == spec.name
            assert (type(handle) is Counter) == (spec.owner == owner), (owner, spec.name)
            if spec.owner != owner:
                with pytest.raises(CounterWriteError, match=f"its one writer is the {spec.owner}"):
                    handle.add(1)
                with pytest.raises(CounterWriteError):
                    handle.set(1)
    assert set(counters.snapshot().values()) == {0}  # no refused write reached the segment


def test_the_log_rings_writer_writes_log_published_on_a_single_node_and_in_a_cluster(
    counters: Counters,
) -> None:
    """The sequencer writes the log ring on a single node, the replicator in a cluster: each is
    the one writer of `log.published.*` in its mode, and the other is refused."""
    for clustered, writer, other in ((False, Role.SEQUENCER, Role.REPLICATOR), (True, Role.REPLICATOR, Role.SEQUENCER)):
        for spec in (LOG_PUBLISHED_INDEX, LOG_PUBLISHED_POSITION):
            assert spec.writer(clustered) == writer
            CounterView(counters, writer, clustered=clustered)[spec].set(7)
            with pytest.raises(CounterWriteError, match=f"its one writer is the {writer}"):
                CounterView(counters, other, clustered=clustered)[spec].set(1)
    for spec in COUNTERS:  # every other counter has the same writer in both modes
        if spec not in (LOG_PUBLISHED_INDEX, LOG_PUBLISHED_POSITION):
            assert spec.writer(True) == spec.writer(False) == spec.owner, spec.name


def test_a_role_writing_another_owners_counter_is_told_who_owns_it(counters: Counters) -> None:
    blp = CounterView(counters, Role.BLP)
    sequencer = CounterView(counters, Role.SEQUENCER)
    sequencer_errors = ROLE_COUNTERS[Role.SEQUENCER].errors
    sequencer[sequencer_errors].add(2)
    assert blp[sequencer_errors].get() == 2
    with pytest.raises(
        CounterWriteError,
        match=r"the blp may not write sequencer\.errors: its one writer is the sequencer",
    ):
        blp[sequencer_errors].add(1)
    assert sequencer[sequencer_errors].get() == 2


def test_a_view_refuses_a_segment_that_names_other_counters(unique: str) -> None:
    other = Counters.create(
        counters_name(unique), ["supervisor.pid"], layout_version=COUNTERS_LAYOUT_VERSION
    )
    try:
        with pytest.raises(SegmentError, match="names other counters than this seqd's table"):
            CounterView(other, Role.BLP)
    finally:
        other.close()
        other.unlink()


# ---- every role of a real node under its view -------------------------------------------------


def _wait_for(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(POLL_S)


def test_every_role_runs_under_a_view_that_lets_it_write_only_its_own_counters(
    node_factory,  # noqa: F811
) -> None:
    """Each role meets its error paths on a real node (the blp an invalid snapshot at recovery,
    the journaller a failed fdatasync, the sequencer a bad frame), counts them in its own
    counters, and drains; a write to another process's counter would raise and kill the role."""
    from daemon.roles.journaller import FAULT_FDATASYNC_ENV

    node = node_factory()
    open_accounts(node.socket_path, ["a"])
    os.kill(node.role_pid("sequencer"), signal.SIGUSR1)
    _wait_for(lambda: node.read_counters()["snapshot.writes"] >= 1, "a snapshot")
    assert node.stop() == 0
    newest = snapshots.list_snapshots(node.config.snapshot_dir)[0]
    data = bytearray(newest.path.read_bytes())
    data[len(data) // 2] ^= 0x40
    newest.path.write_bytes(bytes(data))

    flag = node.directory / "fail-fdatasync-once"
    flag.touch()
    node.start(environment={FAULT_FDATASYNC_ENV: f"2:{flag}"})
    for number in range(
        40
    ):  # one at a time: many fdatasyncs; the client resends through the restart
        open_accounts(node.socket_path, [f"f{number}"])
        if not flag.exists():
            break
    assert not flag.exists(), "the fdatasync fault was not injected"
    node.wait_serving(after_restarts=1)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bad:
        bad.settimeout(10)
        bad.connect(node.socket_path)
        bad.sendall(b"\xde\xad\xbe\xef" * 64)
        while bad.recv(65536):
            pass
    _wait_for(lambda: node.read_counters()["sequencer.errors"] >= 1, "the bad frame to be counted")

    values = node.read_counters()
    text = node.log_text()
    assert "CounterWriteError" not in text
    # The journaller counted its failure (both its counters) before saying so and failing stop.
    assert "journal failed, stopping the node (fail-stop, never retried)" in text
    assert values["supervisor.restarts"] == 1  # that fail-stop, and nothing else
    assert values["blp.errors"] >= 1 and values["errors.snapshot"] >= 1  # this incarnation's replay
    assert values["sequencer.errors"] >= 1 and values["errors.protocol"] >= 1
    total = sum(values[block.errors.name] for block in ROLE_COUNTERS.values())
    status = StatusTracker(node.node).observe(values, now_s=0.0)
    assert status.errors["total"] == total
    assert f"seqd_errors_total {total}\n" in render_prometheus(values)
    assert node.stop() == 0  # every role drained, writing its state under its view
