"""`snapshot.writer = "replica"`: the snapshotter, a follower of the committed journal, writes the
snapshot files; the blp forks nothing. Real nodes: processes, shared memory, journal, socket."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from daemon.cluster_harness import Cluster
from daemon.config import Config, NodeConfig, load_config
from daemon.fault_hooks import FAULT_SNAPSHOT_HOLD_ENV
from daemon.harness import NodeProcess
from daemon.layout import SNAPSHOTTER, SNAPSHOTTER_COUNTERS, CounterView, create_counters
from daemon.roles.snapshotter import Snapshotter
from sequencer import recovery
from sequencer import snapshot as snapshots
from sequencer.apps.ledger import Deposit, Ledger, OpenAccount, Transfer
from sequencer.follow import start_follower
from sequencer.journal import Journal
from sequencer.processor import Processor
from sequencer.record import (
    FRAME_HEADER_BYTES,
    RecordType,
    encode_command,
    encode_record,
    encode_session_open,
    iter_records,
)
from sequencer.snapshot_format import encode_header
from tests.node_fixtures import DEPOSIT, TransferDriver, balances, node_factory, open_accounts  # noqa: F401

WAIT_S = 60.0
ACCOUNTS = [f"s{number}" for number in range(8)]


def wait_for(predicate: Any, what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def snapshot_under_load(node: NodeProcess, written: str) -> tuple[int, TransferDriver]:
    """A SNAPSHOT record sequenced while a client's transfers stream in (so the records after it
    share its journal batch); the index once the counter `written` shows it written."""
    open_accounts(node.socket_path, ACCOUNTS)
    driver = TransferDriver(node.socket_path, ACCOUNTS, seed=13).start()
    driver.wait_acknowledged(200)
    os.kill(node.role_pid("sequencer"), signal.SIGUSR1)  # what `seqd snapshot` does
    wait_for(lambda: node.read_counters()[written] > 0, f"{written} > 0")
    index = node.read_counters()[written]
    acknowledged = len(driver.acknowledged)
    driver.wait_acknowledged(acknowledged + 200)  # the log goes on past the snapshot
    return index, driver


def blp_state_file(node: NodeProcess, index: int) -> bytes:
    """The snapshot file the blp's code makes of its state at `index`: its recovery path (a replay
    of the journal with the node's name), encoded as its fork encodes it."""
    recovered = recovery.recover(Ledger, node.config.journal_dir, None, index, node=node.config.node.name)
    assert recovered.processor.applied_index == index
    return file_bytes(recovered.processor)


def file_bytes(processor: Processor[Any]) -> bytes:
    header, body = processor.snapshot_file_contents()
    return encode_header(header, body) + body


def test_advance_calls_on_snapshot_with_the_state_of_the_snapshot_records_index_mid_batch(tmp_dir: Path) -> None:
    """A SNAPSHOT record in the middle of a journal batch (and of a turn's `records_max`): the
    state handed to `on_snapshot` is the state right after it, as a record-by-record apply has it
    (what the blp's fork encodes), not the state at the end of the batch."""
    records = [encode_record(RecordType.SESSION_OPEN, 1, 1, 1, 1, 5, 0, encode_session_open(9, "n1"))]
    commands = [OpenAccount("a"), OpenAccount("b"), Deposit("a", 10_000)]
    commands += [Transfer("a", "b", 1 + number % 7) for number in range(60)]
    snapshot_at = {17, 40, 41}  # mid-batch, and two in a row
    request = 0
    for command in commands:
        index = len(records) + 1
        while index in snapshot_at:
            records.append(encode_record(RecordType.SNAPSHOT, 1, index, 1, index, 0, 0))
            index += 1
        request += 1
        version, payload = Ledger.schema.encode_command(command)
        records.append(encode_record(RecordType.COMMAND, version, index, 1, index, 5, request, encode_command(request, payload)))
    journal_dir = tmp_dir / "journal"
    with Journal.open(journal_dir, segment_bytes=1 << 20) as journal:
        for start in range(0, len(records), 25):  # batches of 25 records
            journal.append(b"".join(records[start : start + 25]))
        journal.sync()
    expected: dict[int, bytes] = {}
    genesis = Processor(Ledger)
    for index, record in enumerate(records, start=1):
        genesis.apply_frame(*_frame(record))
        if genesis.snapshot_requested:
            genesis.snapshot_requested = False
            expected[index] = file_bytes(genesis)
        genesis.drain_outputs()
    assert sorted(expected) == sorted(snapshot_at)

    follower = start_follower(Ledger, journal_dir, tmp_dir, 1)
    written: dict[int, bytes] = {}
    try:
        while follower.advance(len(records), 7, lambda processor: written.setdefault(processor.applied_index, file_bytes(processor))):
            pass
    finally:
        follower.close()
    assert follower.applied_index == len(records)
    assert written == expected


def _frame(record: bytes) -> tuple[int, memoryview]:
    (header, _payload, offset), = iter_records(memoryview(record))
    return header.type | header.version << 16, memoryview(record)[offset + FRAME_HEADER_BYTES : offset + header.length]


def test_in_replica_mode_the_blp_forks_nothing_and_the_snapshotter_writes_the_blps_state(node_factory) -> None:  # noqa: F811
    node = node_factory({"snapshot": {"writer": "replica"}})
    index, driver = snapshot_under_load(node, SNAPSHOTTER_COUNTERS.snapshot_index.name)
    values = node.read_counters()
    assert values["snapshot.writes"] == 0 and values["snapshot.last.index"] == 0  # no fork of the blp
    assert values[SNAPSHOTTER_COUNTERS.writes.name] == 1
    assert [info.index for info in snapshots.list_snapshots(node.config.snapshot_dir)] == [index]
    assert snapshots.snapshot_path(node.config.snapshot_dir, index).read_bytes() == blp_state_file(node, index)

    result = subprocess.run([sys.executable, "-m", "daemon.cli", "status", "--config", str(node.config_path), "--json"],
                            capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    status = json.loads(result.stdout)["snapshot"]
    assert status["last_index"] == index
    snapshotter = status["snapshotter"]
    assert snapshotter["running"] is True and snapshotter["snapshot_index"] == index
    assert snapshotter["applied_index"] > index and snapshotter["lag_records"] >= 0
    driver.stop()
    assert node.stop() == 0


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="keeping off the blp's CPU needs another CPU")
def test_the_snapshotter_runs_at_sched_idle_and_off_a_pinned_blps_cpu_so_it_never_takes_the_pipelines_cpu_time(node_factory) -> None:  # noqa: F811
    node = node_factory({"snapshot": {"writer": "replica"}, "roles": {"blp": {"cpu": 0}}})
    wait_for(lambda: node.read_counters()[SNAPSHOTTER_COUNTERS.pid.name] > 0, "the snapshotter's start")
    pid = node.read_counters()[SNAPSHOTTER_COUNTERS.pid.name]
    # It sets its policy and CPUs itself, first thing: wait for them rather than race its start.
    wait_for(lambda: os.sched_getscheduler(pid) == os.SCHED_IDLE, f"the snapshotter (pid {pid}) at SCHED_IDLE")
    wait_for(lambda: "running on CPUs" in node.log_text(), "the snapshotter's log of its CPUs")
    assert "running at SCHED_IDLE" in node.log_text()
    assert os.sched_getaffinity(node.role_pid("blp")) == {0}
    assert os.sched_getaffinity(pid) == set(range(1, os.cpu_count() or 1)) & os.sched_getaffinity(0)
    for role in ("sequencer", "journaller", "blp"):  # the pipeline keeps the normal policy
        assert os.sched_getscheduler(node.role_pid(role)) == os.SCHED_OTHER, role
    open_accounts(node.socket_path, ACCOUNTS)  # and so placed it still writes its snapshots
    os.kill(node.role_pid("sequencer"), signal.SIGUSR1)
    wait_for(lambda: node.read_counters()[SNAPSHOTTER_COUNTERS.writes.name] == 1, "the snapshotter's write")
    assert node.stop() == 0


def test_where_sched_idle_is_refused_the_snapshotter_runs_at_nice_19_and_says_so() -> None:
    refused = ("import os, sys\n"
               "def refuse(*args): raise PermissionError(1, 'Operation not permitted')\n"
               "os.sched_setscheduler = refuse\n"
               "from daemon.roles.snapshotter import run_at_idle_priority\n"
               "print(run_at_idle_priority(), os.nice(0), os.sched_getscheduler(0) == os.SCHED_OTHER)\n")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", refused], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.split() == ["nice", "19", "19", "True"]
    assert "SCHED_IDLE refused" in result.stderr and "nice 19" in result.stderr


def test_a_snapshotter_killed_mid_write_leaves_no_torn_snapshot_and_writes_it_when_restarted(node_factory, tmp_dir: Path) -> None:  # noqa: F811
    hold = tmp_dir / "snapshot-hold"
    hold.write_text("1")
    node = node_factory({"snapshot": {"writer": "replica"}}, environment={FAULT_SNAPSHOT_HOLD_ENV: str(hold)})
    directory = node.config.snapshot_dir
    open_accounts(node.socket_path, ACCOUNTS)
    os.kill(node.role_pid("sequencer"), signal.SIGUSR1)
    held = Path(f"{hold}.held")
    wait_for(held.exists, "the snapshotter to hold before its rename")
    index = int(held.read_text())
    final = snapshots.snapshot_path(directory, index)
    assert final.with_name(final.name + snapshots.TMP_SUFFIX).exists() and not final.exists()
    # The blp goes on while the snapshot is being written: nothing waits for the snapshotter.
    open_accounts(node.socket_path, ["during"])
    # (The blp publishes its applied index after the batch's replies: wait, a reply can come first.)
    wait_for(lambda: node.read_counters()["blp.applied.index"] > index, "the blp past the snapshot's index")

    values = node.read_counters()
    os.kill(values[SNAPSHOTTER_COUNTERS.pid.name], signal.SIGKILL)
    hold.write_text("0")
    wait_for(lambda: node.read_counters()[SNAPSHOTTER_COUNTERS.restarts.name] == 1, "the snapshotter's restart")
    # Restarted from the newest snapshot (none) and the journal, it writes the SNAPSHOT record's file.
    wait_for(lambda: node.read_counters()[SNAPSHOTTER_COUNTERS.snapshot_index.name] == index, "the snapshot's rewrite")
    assert sorted(path.name for path in directory.iterdir()) == [final.name]  # no *.tmp left
    assert final.read_bytes() == blp_state_file(node, index)
    assert node.read_counters()["supervisor.restarts"] == 0  # the pipeline never noticed

    node.kill()
    node.start()
    assert f"restored snapshot at index {index}" in node.log_text()
    names = [*ACCOUNTS, "during"]
    assert balances(node.socket_path, names) == dict.fromkeys(names, DEPOSIT)


@pytest.mark.timeout(240)
def test_in_a_cluster_fork_and_replica_writers_write_the_same_snapshot_files(tmp_dir: Path, unique: str) -> None:
    """Three nodes over one log: node 1's blp forks its writer, nodes 2 and 3 run snapshotters
    (each node chooses). At each SNAPSHOT record every node writes the same file, byte for byte."""
    cluster = Cluster(tmp_dir / "cluster", unique, 3, cluster={"tick_ms": 10, "heartbeat_ms": 50, "election_timeout_ms": 300},
                      settings={"snapshot": {"every_records": 150}})  # fmt: skip
    try:
        for number in (2, 3):
            node = cluster[number]
            text = node.config_path.read_text()
            assert "[snapshot]\n" in text
            node.config_path.write_text(text.replace("[snapshot]\n", '[snapshot]\nwriter = "replica"\n'))
            node.config = load_config(node.config_path)
            assert node.config.snapshot.writer == "replica"
        cluster.start()
        leader = cluster.wait_leader().number
        open_accounts(cluster[leader].socket_path, ACCOUNTS)
        driver = TransferDriver(cluster[leader].socket_path, ACCOUNTS, seed=3).start()
        driver.wait_acknowledged(400)
        driver.stop()
        cluster.wait_converged()
        directories = [cluster[number].config.snapshot_dir for number in (1, 2, 3)]

        seen: list[set[int]] = []  # each node's newest snapshot index, one sample per look

        def one_newest_index() -> bool:
            # One sample judged and kept: another SNAPSHOT record (the leader asks every 150
            # records; the driver's session close may cross one) can be written between looks.
            seen.append({snapshots.newest_snapshot_index(directory) for directory in directories})
            return len(seen[-1]) == 1 and seen[-1] != {0}

        wait_for(one_newest_index, "every node's snapshot of the last SNAPSHOT record")
        # Who wrote, from each node's log: the counters are per incarnation, and a node whose
        # pipeline restarted since its last write (a conflict after an election under load) reads 0.
        # The fork writer's line is the blp's when it reaps the child, after the file is in place:
        # waited for, not read at once.
        writers = ((1, "blp", "snapshotter"), (2, "snapshotter", "blp"), (3, "snapshotter", "blp"))

        def written_by(number: int, role: str) -> bool:
            text = cluster[number].log_text()
            return re.search(rf"seqd\[{role}:\d+\] INFO snapshot at index \d+ written", text) is not None

        wait_for(lambda: all(written_by(number, writer) for number, writer, _ in writers),
                 "each node's writer to log its snapshot")  # fmt: skip
        for number, _writer, other in writers:
            assert not written_by(number, other), (number, other)
        for number in (2, 3):  # and this incarnation's counters agree
            values = cluster[number].read_counters()
            assert values["snapshot.writes"] == 0, number
        (index,) = seen[-1]  # kept on every node (snapshot.keep = 3) if a newer one came since
        files = {snapshots.snapshot_path(directory, index).read_bytes() for directory in directories}
        assert len(files) == 1
    finally:
        cluster.close()


def test_a_snapshot_that_fails_to_encode_or_write_is_counted_and_the_snapshotter_goes_on(tmp_dir: Path, unique: str) -> None:
    """As a forked writer's failure: counted in `snapshotter.errors`, no file, and the next
    SNAPSHOT record writes one (a bug in the app's snapshot() must not crash-loop the process)."""
    data_dir = tmp_dir / "data"
    config = Config(node=NodeConfig(name=unique, data_dir=str(data_dir)))
    config.snapshot_dir.mkdir(parents=True)
    view = CounterView(create_counters(unique), SNAPSHOTTER)
    try:
        snapshotter = Snapshotter(None, config, view[SNAPSHOTTER_COUNTERS.applied_index], view)  # type: ignore[arg-type]

        class Broken:
            applied_index = 7

            def snapshot_file_contents(self) -> Any:
                raise RuntimeError("the app's snapshot() is broken")

        snapshotter.write(Broken())  # type: ignore[arg-type]
        assert view[SNAPSHOTTER_COUNTERS.errors].get() == 1 and list(config.snapshot_dir.iterdir()) == []
        processor = Processor(Ledger)
        processor.applied_index = 7
        config.snapshot_dir.rmdir()
        config.snapshot_dir.write_bytes(b"")  # not a directory: the write fails with an OSError
        snapshotter.write(processor)
        assert view[SNAPSHOTTER_COUNTERS.errors].get() == 2
        config.snapshot_dir.unlink()
        config.snapshot_dir.mkdir()
        snapshotter.write(processor)
        assert view[SNAPSHOTTER_COUNTERS.snapshot_index].get() == 7
        assert [info.index for info in snapshots.list_snapshots(config.snapshot_dir) if info.valid] == [7]
    finally:
        view.close()
        view.counters.unlink()
