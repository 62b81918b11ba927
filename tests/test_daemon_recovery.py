"""Start-up and recovery of a real node: damaged journals, retention, pinning, metrics, debug mode."""

from __future__ import annotations

import os
import re
import signal
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from daemon.exits import ExitCode
from sequencer import snapshot as snapshots
from sequencer.apps.ledger import Balance, Ledger, OpenAccount
from sequencer.client import Client, CommandRejected, ConnectionLost, TimedOut
from sequencer.journal.format import BATCH_MAGIC_BYTES
from sequencer.journal.scan import list_segments
from tests.fixtures.nondeterministic import ClockReading, Tag
from tests.node_fixtures import DEPOSIT, balances, node_factory, open_accounts  # noqa: F401


def last_segment(node) -> Path:  # type: ignore[no-untyped-def]
    return sorted(node.config.journal_dir.glob("*.seg"))[-1]


def test_torn_journal_tail_is_cut_once_with_a_copy_kept_and_the_node_serves(node_factory) -> None:  # noqa: F811
    node = node_factory({"journal": {"preallocate": False}})
    open_accounts(node.socket_path, ["a", "b"])
    assert node.stop() == 0
    segment = last_segment(node)
    size = segment.stat().st_size
    with open(segment, "r+b") as file:
        file.truncate(size - 5)  # a crash mid-write of the last batch
    node.start()
    assert "torn tail" in node.log_text()
    assert list(segment.parent.glob("*.broken*"))
    # The torn batch held the last acknowledged-or-not records; what remains is intact.
    with Client(node.socket_path, schema=Ledger.schema, timeout_s=10) as client:
        assert client.call(Balance("a")).balance in (0, DEPOSIT)


def test_flipped_bit_mid_log_refuses_to_start_naming_the_file_and_offset(node_factory) -> None:  # noqa: F811
    node = node_factory()
    open_accounts(node.socket_path, [f"m{number}" for number in range(5)])
    open_accounts(node.socket_path, [f"n{number}" for number in range(5)])
    assert node.stop() == 0
    segment = last_segment(node)
    data = bytearray(segment.read_bytes())
    target = data.index(b"m0")  # inside an early batch, with valid batches after it
    batch_offset = data.rindex(BATCH_MAGIC_BYTES, 0, target)  # where the damaged batch starts
    data[target] ^= 0x10
    segment.write_bytes(bytes(data))
    node.start(wait=False)
    assert node.process is not None
    assert node.process.wait(timeout=60) == ExitCode.DATAERR
    text = node.log_text()
    named = re.search(re.escape(str(segment)) + r"[^\n0-9]*offset (\d+)", text)
    assert named is not None, text[-2000:]
    assert int(named.group(1)) == batch_offset
    assert not os.path.exists(node.socket_path)


@pytest.mark.parametrize("writer", ["fork", "replica"])
def test_journal_segments_wholly_before_the_oldest_retained_snapshot_are_deleted(node_factory, writer: str) -> None:  # noqa: F811
    """Whichever process writes the snapshots (`snapshot.writer`: the blp's fork, or the
    snapshotter, which may be behind the blp), the journal keeps every record after the oldest
    snapshot kept."""
    node = node_factory({
        "journal": {"segment_bytes": 1 << 20, "batch_bytes_max": 256 << 10, "preallocate": False},
        "snapshot": {"keep": 1, "delete_journal": True, "every_records": 10000, "writer": writer},
    })
    names = [f"r{number}" for number in range(15000)]
    open_accounts(node.socket_path, names)  # 30000 records of ~88 bytes: three segments
    deadline = time.monotonic() + 60
    writes = "snapshot.writes" if writer == "fork" else "snapshotter.writes"
    while node.read_counters()[writes] < 2:
        assert time.monotonic() < deadline, "no snapshots"
        time.sleep(0.05)

    def first_index() -> int:
        return int(sorted(node.config.journal_dir.glob("*.seg"))[0].name.split(".")[0])

    while first_index() == 1:  # the journaller deletes once it sees the new snapshot
        assert time.monotonic() < deadline, sorted(path.name for path in node.config.journal_dir.glob("*.seg"))
        time.sleep(0.05)
    # Never a segment still needed: the oldest kept snapshot's successor is still in the journal.
    kept = snapshots.list_snapshots(node.config.snapshot_dir)
    assert first_index() <= min(info.index for info in kept if info.valid) + 1
    assert node.stop() == 0
    # Recovery still works from the retained snapshot and the remaining segments.
    node.start()
    assert balances(node.socket_path, names[:10] + names[-10:]) == dict.fromkeys(names[:10] + names[-10:], DEPOSIT)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two CPUs to pin to")
def test_roles_are_pinned_to_the_configured_cpus(node_factory) -> None:  # noqa: F811
    node = node_factory({"roles.blp": {"cpu": 1}, "roles.journaller": {"cpu": 0}})
    values = node.read_counters()
    assert psutil.Process(values["blp.pid"]).cpu_affinity() == [1]
    assert psutil.Process(values["journaller.pid"]).cpu_affinity() == [0]
    assert values["blp.cpu"] == 1
    assert values["sequencer.cpu"] == -1


def test_metrics_endpoint_serves_the_counters_on_loopback(node_factory) -> None:  # noqa: F811
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    node = node_factory({"metrics": {"enabled": True, "port": port}})
    open_accounts(node.socket_path, ["a"])
    deadline = time.monotonic() + 10
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                text = response.read().decode()
            break
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert "seqd_journal_durable_index" in text
    assert 'node="' in text


def test_debug_determinism_mode_stops_an_app_that_reads_the_clock(node_factory) -> None:  # noqa: F811
    node = node_factory(
        {"node": {"app": "tests.fixtures.nondeterministic:ClockReading", "debug_determinism": True}},
    )
    with Client(node.socket_path, schema=ClockReading.schema, timeout_s=3, reconnect_timeout_s=3) as client:
        with pytest.raises((TimedOut, ConnectionLost)):
            client.call(Tag("now"))
    deadline = time.monotonic() + 30
    while "NondeterminismError" not in node.log_text():
        assert time.monotonic() < deadline, node.log_text()[-2000:]
        time.sleep(0.1)


def test_failed_fdatasync_stops_the_journaller_and_recovery_drops_what_was_never_durable(node_factory) -> None:  # noqa: F811
    """fsyncgate: a failed fdatasync is never retried; the node restarts, and records the page
    cache still shows past the last durable index are dropped, not trusted."""
    from daemon.roles.journaller import FAULT_FDATASYNC_ENV

    node = node_factory(start=False)
    flag = node.directory / "fail-fdatasync-once"
    flag.touch()
    node.start(environment={FAULT_FDATASYNC_ENV: f"3:{flag}"})
    names = [f"f{number}" for number in range(40)]
    for name in names:  # one at a time: many fdatasyncs, and the clients resend through the restart
        open_accounts(node.socket_path, [name])
    text = node.log_text()
    assert not flag.exists(), "the fault was not injected"
    assert "journal failed, stopping the node (fail-stop, never retried)" in text
    assert "restarting the pipeline" in text
    assert "written before the failed fdatasync" in text  # the unsynced batch was dropped
    assert balances(node.socket_path, names) == dict.fromkeys(names, DEPOSIT)


def test_the_journal_keeps_every_segment_from_the_raft_retention_index_a_snapshot_covers(node_factory) -> None:  # noqa: F811
    """`raft.retain.index` (a leader's replicator holds the journal for a follower catching up
    after a snapshot: it still needs those records) bounds the deletion as the oldest snapshot
    does: a segment holding the held index stays though the snapshot covers it, and an idle
    journaller deletes it once the hold moves past it or ends (it looks every COMPACTION_LOOK_S).
    A single node runs no replicator: this test is the counter's one writer."""
    node = node_factory({
        "journal": {"segment_bytes": 1 << 20, "batch_bytes_max": 256 << 10, "preallocate": False},
        "snapshot": {"keep": 1, "delete_journal": True},
    })
    journal = node.config.journal_dir
    counters = node.counters()
    try:
        hold = counters["raft.retain.index"]
        hold.set(1)  # the whole journal held
        # ~30 KiB records (each refused by the ledger, bad_account_name, and journaled all the
        # same): 110 of them fill three 1 MiB segments and start a fourth.
        with Client(node.socket_path, schema=Ledger.schema, timeout_s=30) as client:
            for request in [client.submit(OpenAccount("x" * (30 << 10))) for _ in range(110)]:
                with pytest.raises(CommandRejected):
                    request.result()
        os.kill(node.role_pid("sequencer"), signal.SIGUSR1)  # `seqd snapshot`
        deadline = time.monotonic() + 30
        while not (snapshot_index := counters["snapshot.oldest.index"].get()):
            assert time.monotonic() < deadline, "no snapshot"
            time.sleep(0.02)
        listed = list_segments(journal)
        segments = [first for first, _path in listed]
        assert len(segments) >= 4 and segments[0] == 1, segments
        assert segments[2] <= snapshot_index, (segments, snapshot_index)  # the snapshot covers the second

        def first_kept(deleted: Path) -> int:
            """The first segment once the journaller logged `deleted`: it logs the paths a look
            deleted after deleting them all, so one look's deletions are whole by then."""
            while f"deleted {deleted.name}" not in node.log_text():
                assert time.monotonic() < deadline, (deleted, list_segments(journal))
                time.sleep(0.02)
            return list_segments(journal)[0][0]

        # The hold's edges: held at the second segment's last record, that segment stays (a
        # journaller deleting from the hold + 1 fails here); held at the third's first record,
        # the second goes and the third stays (one keeping from the hold - 1 fails here).
        assert segments[3] <= snapshot_index + 1, (segments, snapshot_index)  # the last step deletes
        hold.set(segments[2] - 1)
        assert first_kept(listed[0][1]) == segments[1]
        hold.set(segments[2])
        assert first_kept(listed[1][1]) == segments[2]
        hold.set(0)  # it caught up: no hold
        assert first_kept(listed[2][1]) == max(first for first in segments if first <= snapshot_index + 1)
    finally:
        counters.close()
