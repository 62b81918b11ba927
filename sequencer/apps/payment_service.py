"""A small payment service over HTTP: the external system of the withdrawals example.

    python -m sequencer.apps.payment_service --db payouts.db --port 8080 [faults...]

It stands for a bank's payout API with the contract an integration gateway needs
(docs/integration.md): every call carries an idempotency key, the service records the key's
outcome (SQLite) before it answers, and answers a key it has seen with
the recorded outcome instead of acting again.

    POST /payouts         {"key", "account", "amount", "destination"} -> {"key", "outcome", "reference"}
                          pays, unless the key is known; outcome "paid", "declined" (a destination
                          starting with "declined") or, for a key cancelled before, "cancelled"
    POST /payouts/cancel  {"key"} -> the key's outcome; an unknown key is recorded "cancelled"
                          (a tombstone: a later pay of it is refused)
    GET  /payouts?keys=1,2,3   {"payouts": {"1": {...}, ...}}: the keys it has seen (all without keys)
    GET  /calls                {"pay": {key: n}, "cancel": {key: n}}: the calls received, for tests

Faults, to test a gateway against (seeded): `--slow-ms-max` waits up to that long before each
call; `--fail-before-rate` answers 503 without doing anything; `--fail-after-rate` does the call,
records it, then drops the connection without an answer (the answer is lost; asking again gives
it). Listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = ["PaymentStore", "main"]

BODY_BYTES_MAX = 64 << 10  # a payout request is a few hundred bytes
KEYS_PER_LOOKUP_MAX = 1000  # GET /payouts?keys=...: a gateway asks per batch (256)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS payouts (
    key INTEGER PRIMARY KEY, outcome TEXT NOT NULL, account TEXT NOT NULL,
    amount INTEGER NOT NULL, destination TEXT NOT NULL, reference TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS calls (key INTEGER NOT NULL, kind TEXT NOT NULL);
"""


class PaymentStore:
    """The service's durable record of payouts, one outcome per key."""

    def __init__(self, path: Path | str) -> None:
        self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a payout answered survives the service's kill -9 (its writes are in
        # the kernel's page cache), not a power loss; a real payment service would run FULL (an
        # fsync per payout), which this example leaves out to keep the tests fast on a busy disk.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)
        self.lock = threading.Lock()  # one call at a time: per-key decisions never race

    def _record(self, key: int) -> dict[str, Any] | None:
        row = self.db.execute("SELECT outcome, account, amount, destination, reference FROM payouts "
                              "WHERE key = ?", (key,)).fetchone()  # fmt: skip
        if row is None:
            return None
        outcome, account, amount, destination, reference = row
        return {"key": key, "outcome": outcome, "account": account, "amount": amount,
                "destination": destination, "reference": reference}  # fmt: skip

    def _insert(self, key: int, kind: str, record: dict[str, Any] | None) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        self.db.execute("INSERT INTO calls (key, kind) VALUES (?, ?)", (key, kind))
        if record is not None:
            self.db.execute(
                "INSERT INTO payouts (key, outcome, account, amount, destination, reference) "
                "VALUES (:key, :outcome, :account, :amount, :destination, :reference)", record)
        self.db.execute("COMMIT")

    def pay(self, key: int, account: str, amount: int, destination: str) -> dict[str, Any]:
        with self.lock:
            known = self._record(key)
            if known is not None:
                self._insert(key, "pay", None)
                return known
            outcome = "declined" if destination.startswith("declined") else "paid"
            record = {"key": key, "outcome": outcome, "account": account, "amount": amount,
                      "destination": destination, "reference": f"po-{key}" if outcome == "paid" else ""}  # fmt: skip
            self._insert(key, "pay", record)
            return record

    def cancel(self, key: int) -> dict[str, Any]:
        with self.lock:
            known = self._record(key)
            if known is not None:
                self._insert(key, "cancel", None)
                return known
            record = {"key": key, "outcome": "cancelled", "account": "", "amount": 0,
                      "destination": "", "reference": ""}  # fmt: skip
            self._insert(key, "cancel", record)
            return record

    def lookup(self, keys: list[int] | None) -> dict[str, Any]:
        with self.lock:
            if keys is None:
                keys = [row[0] for row in self.db.execute("SELECT key FROM payouts ORDER BY key")]
            found = {key: self._record(key) for key in keys}
        return {str(key): record for key, record in found.items() if record is not None}

    def calls(self) -> dict[str, dict[str, int]]:
        counted: dict[str, dict[str, int]] = {"pay": {}, "cancel": {}}
        with self.lock:
            rows = self.db.execute("SELECT kind, key, COUNT(*) FROM calls GROUP BY kind, key").fetchall()
        for kind, key, count in rows:
            counted[kind][str(key)] = count
        return counted


class _Faults:
    def __init__(self, seed: int, slow_ms_max: float, fail_before_rate: float, fail_after_rate: float) -> None:
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.slow_ms_max = slow_ms_max
        self.fail_before_rate = fail_before_rate
        self.fail_after_rate = fail_after_rate

    def draw(self) -> tuple[float, bool, bool]:
        with self.lock:
            return (self.random.uniform(0, self.slow_ms_max) / 1000,
                    self.random.random() < self.fail_before_rate,
                    self.random.random() < self.fail_after_rate)  # fmt: skip


def _handler(store: PaymentStore, faults: _Faults) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # a line per request would drown the test logs

        def _send(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path == "/calls":
                self._send(HTTPStatus.OK, store.calls())
                return
            if url.path != "/payouts":
                self._send(HTTPStatus.NOT_FOUND, {"error": f"no resource {url.path}"})
                return
            raw = parse_qs(url.query).get("keys")
            try:
                keys = None if raw is None else [int(key) for key in raw[0].split(",") if key]
            except ValueError:
                self._send(HTTPStatus.BAD_REQUEST, {"error": "keys must be integers, comma-separated"})
                return
            if keys is not None and len(keys) > KEYS_PER_LOOKUP_MAX:
                self._send(HTTPStatus.BAD_REQUEST, {"error": f"at most {KEYS_PER_LOOKUP_MAX} keys"})
                return
            self._send(HTTPStatus.OK, {"payouts": store.lookup(keys)})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            if not 0 < length <= BODY_BYTES_MAX:
                self._send(HTTPStatus.BAD_REQUEST, {"error": f"a body of 1 to {BODY_BYTES_MAX} bytes"})
                return
            try:
                body = json.loads(self.rfile.read(length))
                key = int(body["key"])
            except (ValueError, KeyError, TypeError):
                self._send(HTTPStatus.BAD_REQUEST, {"error": "a JSON object with an integer key"})
                return
            delay_s, fail_before, fail_after = faults.draw()
            time.sleep(delay_s)
            if fail_before:
                self._send(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "try again later"})
                return
            if self.path == "/payouts":
                record = store.pay(key, str(body["account"]), int(body["amount"]), str(body["destination"]))
            elif self.path == "/payouts/cancel":
                record = store.cancel(key)
            else:
                self._send(HTTPStatus.NOT_FOUND, {"error": f"no resource {self.path}"})
                return
            if fail_after:
                self.close_connection = True  # done and recorded, the answer lost on the way
                return
            self._send(HTTPStatus.OK, record)

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--db", required=True, help="the SQLite file of payouts")
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument("--port-file", help="write the port here once listening")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slow-ms-max", type=float, default=0.0)
    parser.add_argument("--fail-before-rate", type=float, default=0.0)
    parser.add_argument("--fail-after-rate", type=float, default=0.0)
    args = parser.parse_args(argv)
    store = PaymentStore(args.db)
    faults = _Faults(args.seed, args.slow_ms_max, args.fail_before_rate, args.fail_after_rate)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), _handler(store, faults))
    server.daemon_threads = True
    if args.port_file:
        temporary = Path(args.port_file + ".tmp")
        temporary.write_text(str(server.server_address[1]))
        temporary.rename(args.port_file)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
