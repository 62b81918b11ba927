"""Copy-and-transform of the journal: `seqd log migrate` on a ledger journal (issue 16).

    python -m benches.migrate [--quick] [--json] [--records N] [--accounts A] [--dir DIR]

Napkin math. A migration reads each old record (a journal batch is one read and one CRC), and
for a client command decodes it (msgspec, ~0.3 us), calls the transform (a Python call, ~0.3
us), encodes what it returns (~0.3 us per command) and packs a 48-byte header per new record
(~0.2 us), then appends the batch (the journal writer checks each record's header, ~0.3 us) and
fdatasyncs once at the end. About 2-3 us per transfer (one old record, two new ones): 300-500k
old records/s. The verification replays the new journal under the new app and the old one under
the old app, each at the blp's replay speed (~3 us per transfer, benches/recovery.py), so it
costs more than the migration itself; it is measured apart (`verify_records_per_s`).

What runs: `daemon.migrate.migrate` (the code behind `seqd log migrate`), with
`sequencer.apps.ledger_v2:FromLedgerV1` (a Transfer becomes a Debit and a Credit, a Balance is
dropped), on a journal of real ledger v1 records written with the journal writer: one
SESSION_OPEN, OpenAccount + Deposit per account, then transfers between random accounts with a
Balance every BALANCE_EVERY commands and a SNAPSHOT record every SNAPSHOT_EVERY. Each run migrates
into a fresh directory; runs repeat until MEASURE_S_MIN seconds of migration were measured. The
journals are read from and written to the page cache (and fdatasynced once).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benches.recovery import BATCH_RECORDS, RecordSource
from daemon.migrate import migrate
from sequencer.apps.ledger import Balance
from sequencer.apps.ledger_v2 import FromLedgerV1
from sequencer.journal import Journal

BALANCE_EVERY = 20  # one read in 20 commands, dropped by the migration
SNAPSHOT_EVERY = 100_000  # SNAPSHOT records, dropped by the migration
MEASURE_S_MIN = 2.0  # measure at least this much migration, even in --quick mode
RUNS_MIN = 1
TARGET_RECORDS_PER_S = 300_000  # issue 16


class MixedSource(RecordSource):
    """benches.recovery's ledger records, with reads and snapshot requests among the transfers."""

    def mixed(self, count: int) -> bytes:
        parts = []
        while count > 0:
            if self.index % SNAPSHOT_EVERY == SNAPSHOT_EVERY - 1:
                parts.append(self.snapshot())
            elif self.index % BALANCE_EVERY == 0:
                account = self.rng.randrange(self.accounts)
                parts.append(self._command(Balance(f"acct-{account:07d}")))
            else:
                parts.append(self.transfers(1))
            count -= 1
        return b"".join(parts)


def write_source(directory: Path, accounts: int, records: int) -> float:
    source = MixedSource(accounts)
    started = time.perf_counter()
    with Journal.open(directory) as journal:
        journal.append(source.session_open())
        for first in range(0, accounts, BATCH_RECORDS // 2):
            journal.append(source.setup(first, min(BATCH_RECORDS // 2, accounts - first)))
        while source.index < records:
            journal.append(source.mixed(min(BATCH_RECORDS, records - source.index)))
        journal.sync()
        assert journal.last_index == records, (journal.last_index, records)
    return time.perf_counter() - started


def run(accounts: int, records: int, runs: int, directory: Path | None,
        measure_s_min: float = MEASURE_S_MIN) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="seqd-bench-migrate-", dir=directory))
    results: dict[str, Any] = {"source_records": records, "accounts": accounts}
    try:
        results["source_write_s"] = write_source(root / "old", accounts, records)
        results["source_bytes"] = sum(path.stat().st_size for path in (root / "old").glob("*.seg"))
        migrate_s: list[float] = []
        migrate_cpu_s: list[float] = []
        writer_cpu_s: list[float] = []
        verify_s: list[float] = []
        report = None
        while len(migrate_s) < max(runs, RUNS_MIN) or sum(migrate_s) < measure_s_min:
            target = root / f"new-{len(migrate_s)}"
            report = migrate(root / "old", target, FromLedgerV1(), say=lambda line: None)
            migrate_s.append(report.migrate_s)
            migrate_cpu_s.append(report.migrate_cpu_s)
            writer_cpu_s.append(report.writer_cpu_s)
            verify_s.append(report.verify_s)
            shutil.rmtree(target)
        assert report is not None
        assert report.source_last_index == records, report.source_last_index
        results["target_records"] = report.target_last_index
        results["counts_in"] = report.counts_in
        results["counts_out"] = report.counts_out
        results["runs"] = len(migrate_s)
        results["migrate_s"] = statistics.median(migrate_s)
        results["measured_migrate_s"] = sum(migrate_s)
        results["verify_s"] = statistics.median(verify_s)
        results["migrate_records_per_s"] = records / results["migrate_s"]
        # CPU time, which a busy machine does not stretch: the transform's process, and the
        # journal writer's child beside it.
        results["migrate_cpu_s"] = statistics.median(migrate_cpu_s)
        results["writer_cpu_s"] = statistics.median(writer_cpu_s)
        results["migrate_records_per_cpu_s"] = records / results["migrate_cpu_s"]
        results["verify_records_per_s"] = records / results["verify_s"]
        results["migrate_and_verify_records_per_s"] = records / (results["migrate_s"] + results["verify_s"])
        results["target_met"] = results["migrate_records_per_s"] >= TARGET_RECORDS_PER_S
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results["python"] = sys.version.split()[0]
    results["cpus"] = os.cpu_count()
    results["load_average_1m"] = os.getloadavg()[0]
    return {key: round(value, 4) if isinstance(value, float) else value for key, value in results.items()}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="500k records, runs until 2 s measured")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--records", type=int, default=None, help="records in the old journal")
    parser.add_argument("--accounts", type=int, default=None, help="ledger accounts")
    parser.add_argument("--runs", type=int, default=None, help="migrations (at least; see MEASURE_S_MIN)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default /tmp)")
    parser.add_argument("--min-seconds", type=float, default=MEASURE_S_MIN,
                        help=f"repeat until this much migration was measured (default {MEASURE_S_MIN})")
    args = parser.parse_args(argv)
    if args.quick:
        accounts, records, runs = 10_000, 500_000, 1
    else:
        accounts, records, runs = 100_000, 5_000_000, 3
    accounts = args.accounts or accounts
    records = args.records or records
    runs = args.runs or runs
    if records < 2 * accounts + 2:
        parser.error(f"--records={records} must exceed the setup: 2 * accounts + 2 = {2 * accounts + 2}")
    results = run(accounts, records, runs, args.dir, args.min_seconds)
    if args.json:
        print(json.dumps(results))
    else:
        for key, value in results.items():
            print(f"{key:36} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
