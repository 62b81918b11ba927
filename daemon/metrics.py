"""An optional metrics endpoint: the counters segment in the Prometheus text format.

`render_prometheus` turns a snapshot of the node's counters ({"log.published.position": 4096,
...}) into the text exposition format 0.0.4 (prometheus.io, "Exposition formats"): for each
metric family one `# HELP` line, one `# TYPE` line, then its samples. Names become
`seqd_<name>` with every character outside [a-zA-Z0-9_] turned into `_`. The per-process
counters (`blp.heartbeat`, `journaller.cpu`, `supervisor.heartbeat`, ...) become one family with
a `role` label (`seqd_role_heartbeat_total{role="blp"}`), so one query covers every role. Kinds
and help come from the node's counter table (daemon/layout.py): counters that only grow (totals,
errors, heartbeats) are typed `counter` and end in `_total`; positions, indexes and states are
`gauge`s. Each role counts its own errors (`seqd_role_errors_total{role=...}`); their sum, with
the snapshotter's and the query replicas', is served as `seqd_errors_total`. In a cluster the leader's per-follower slots
(`raft.peer<k>.node`, `raft.peer<k>.match_index`, `raft.peer<k>.inflight_bytes_peak`, served as
they are) are also served as families labelled by the follower's node number,
`seqd_raft_follower_match_index{follower="2"}`, `seqd_raft_follower_lag{...}` (records behind the
leader's `raft.last_index`) and `seqd_raft_follower_inflight_bytes_peak{...}`, so a query needs no
join with the slots; an empty slot gives no sample, and a node that does not lead none of these
three (its slots say 0: it tracks no match). Every node serves its peers' last contact the same way.

`MetricsServer` serves it from `http.server.ThreadingHTTPServer` in a daemon thread, so the
supervisor's loop never waits on a scraper. It binds to loopback unless told otherwise: the
numbers say how busy the node is and who leads, which is nobody else's business, and there is
no authentication. The snapshot is read on each scrape, straight from shared memory.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from daemon.layout import (
    ERRORS_TOTAL_NAME,
    RAFT_LAST_INDEX,
    SUPERVISOR,
    Kind,
    Role,
    counter_spec,
    errors_total,
)
from daemon.status_raft import lists_followers, peer_slots

__all__ = [
    "CONTENT_TYPE",
    "METRICS_PORT_DEFAULT",
    "REQUEST_TIMEOUT_S",
    "MetricsServer",
    "metric_kind",
    "render_prometheus",
]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# The processes whose `<process>.<field>` counters form one family per field, labelled by role.
_PROCESSES = frozenset({SUPERVISOR, *Role})
# A scraper that stops talking holds one thread; it is cut off after this. A scrape reads a few
# dozen counters and answers in well under a millisecond.
REQUEST_TIMEOUT_S = 5.0
# The config's default; any free port will do. Not a privileged port (CapabilityBoundingSet= is
# empty in the unit, so the daemon could not bind below 1024).
METRICS_PORT_DEFAULT = 9464
# How often the serving thread checks for stop(): stop() waits up to this long. The thread wakes
# this often even when idle, which costs nothing next to the node's roles.
SHUTDOWN_POLL_S = 0.5
# Waiting for the serving thread to finish its current request on stop().
STOP_TIMEOUT_S = 5.0

_logger = logging.getLogger(__name__)

_ERRORS_TOTAL_HELP = "Errors of every kind since start, summed over the roles."

_INVALID_NAME_CHARACTERS = re.compile(r"[^a-zA-Z0-9_]")


def metric_kind(name: str) -> str:
    """'counter' for a value that only grows while the node runs, else 'gauge' (also for a name
    the counter table does not know)."""
    if name == ERRORS_TOTAL_NAME:
        return "counter"
    spec = counter_spec(name)
    return "counter" if spec is not None and spec.kind is Kind.COUNTER else "gauge"


def _help(name: str, family_key: str) -> str:
    if name == ERRORS_TOTAL_NAME:
        return _ERRORS_TOTAL_HELP
    spec = counter_spec(name)
    return spec.help if spec is not None else f"seqd counter {family_key}."


def _sanitise(name: str) -> str:
    """Valid inside a metric name (which always starts with `seqd_`)."""
    return _INVALID_NAME_CHARACTERS.sub("_", name)


def _sanitise_label_name(name: str) -> str:
    sanitised = _sanitise(name)
    return "_" + sanitised if sanitised[:1].isdigit() else sanitised


def _escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


_FOLLOWER_HELP = {
    "seqd_raft_follower_match_index": "On the leader: the last index the follower holds durably in agreement with it.",
    "seqd_raft_follower_lag": "On the leader: records the follower's log is behind the leader's last index.",
    "seqd_raft_follower_last_contact_ms": "When this node last heard from that member (ms since the epoch, 0: never).",
    "seqd_raft_follower_inflight_bytes_peak": "On the leader: the most payload bytes of AppendEntries the follower had unanswered at once, this term.",
}


def _follower_samples(snapshot: Mapping[str, int]) -> dict[str, list[tuple[str, int]]]:
    """family -> [(follower node number, value)] from the per-member slots: every node's last
    contacts, and the leader's matches, lags and window peaks."""
    families: dict[str, list[tuple[str, int]]] = {family: [] for family in _FOLLOWER_HELP}
    last_index = snapshot.get(RAFT_LAST_INDEX.name)
    leads = lists_followers(snapshot)
    for node, match_index, contact_ms, peak in peer_slots(snapshot):
        if contact_ms is not None:
            families["seqd_raft_follower_last_contact_ms"].append((str(node), contact_ms))
        if not leads:
            continue
        if match_index is not None:
            families["seqd_raft_follower_match_index"].append((str(node), match_index))
            if last_index is not None:
                families["seqd_raft_follower_lag"].append((str(node), last_index - match_index))
        if peak is not None:
            families["seqd_raft_follower_inflight_bytes_peak"].append((str(node), peak))
    return families


def _split_role(name: str) -> tuple[str, str | None]:
    """('role.heartbeat', 'blp') for 'blp.heartbeat'; (name, None) for a node-wide counter.
    `blp.applied.position` is node-wide: only single-field names after a process are per role."""
    role, _, field = name.partition(".")
    if role in _PROCESSES and field and "." not in field:
        return f"role.{field}", role
    return name, None


def render_prometheus(
    snapshot: Mapping[str, int],
    labels: Mapping[str, str] | None = None,
    kinds: Mapping[str, str] | None = None,
) -> str:
    """The snapshot in the Prometheus text format 0.0.4.

    Args:
        snapshot: counter name -> value, as `Counters.snapshot()` returns. The node's error
            total (`errors.total`) is added as the sum of every process's `.errors` (`errors_total`).
        labels: put on every sample, e.g. {"node": "n1"}.
        kinds: 'counter' or 'gauge' for names `metric_kind` would type otherwise.

    Returns:
        The exposition text, ending in a newline.
    """
    labels = dict(labels or {})
    kinds = kinds or {}
    total = errors_total(snapshot)
    if total is not None:
        snapshot = {**snapshot, ERRORS_TOTAL_NAME: total}
    # family name -> (kind, help, [(labels, value)]); one family's samples must be contiguous.
    families: dict[str, tuple[str, str, list[tuple[dict[str, str], int]]]] = {}
    for follower_family, by_node in _follower_samples(snapshot).items():
        if by_node:
            samples = [({**labels, "follower": node}, value) for node, value in by_node]
            families[follower_family] = ("gauge", _FOLLOWER_HELP[follower_family], samples)
    for name in sorted(snapshot):
        value = snapshot[name]
        family_key, role = _split_role(name)
        kind = kinds.get(name, metric_kind(name))
        assert kind in ("counter", "gauge"), (name, kind)
        family = "seqd_" + _sanitise(family_key.replace("role.", "role_", 1))
        if kind == "counter" and not family.endswith("_total"):
            family += "_total"
        help_text = _help(name, family_key)
        sample_labels = dict(labels)
        if role is not None:
            sample_labels["role"] = role
        entry = families.setdefault(family, (kind, help_text, []))
        assert entry[0] == kind, (family, entry[0], kind)
        entry[2].append((sample_labels, int(value)))
    lines: list[str] = []
    for family, (kind, help_text, samples) in families.items():
        lines.append(f"# HELP {family} {_escape_help(help_text)}")
        lines.append(f"# TYPE {family} {kind}")
        for sample_labels, value in samples:
            if sample_labels:
                rendered = ",".join(
                    f'{_sanitise_label_name(key)}="{_escape_label_value(val)}"'
                    for key, val in sample_labels.items()
                )
                lines.append(f"{family}{{{rendered}}} {value}")
            else:
                lines.append(f"{family} {value}")
    return "\n".join(lines) + "\n"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Handler(BaseHTTPRequestHandler):
    server: _MetricsHTTPServer
    timeout = REQUEST_TIMEOUT_S
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _answer(self, send_body: bool) -> None:
        if self.path.split("?", 1)[0] != "/metrics":
            self._send(
                404, "text/plain; charset=utf-8", b"not found: metrics are at /metrics\n", send_body
            )
            return
        try:
            body = self.server.render().encode()
        except Exception as error:  # the scrape fails, the node does not
            self.server.owner.render_failures += 1
            _logger.warning("metrics scrape failed: %s: %s", type(error).__name__, error)
            self._send(
                500, "text/plain; charset=utf-8", f"scrape failed: {error}\n".encode(), send_body
            )
            return
        self.server.owner.scrapes += 1
        self._send(200, CONTENT_TYPE, body, send_body)

    def _send(self, status: int, content_type: str, body: bytes, send_body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        _logger.debug("metrics %s: " + format, self.address_string(), *args)


class _MetricsHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], family: socket.AddressFamily, owner: MetricsServer
    ) -> None:
        self.address_family = family
        self.owner = owner
        super().__init__(address, _Handler)

    def render(self) -> str:
        return render_prometheus(self.owner.snapshot_fn(), self.owner.labels, self.owner.kinds)


class MetricsServer:
    """Serves `render_prometheus(snapshot_fn())` at http://host:port/metrics from a thread."""

    def __init__(
        self,
        snapshot_fn: Callable[[], Mapping[str, int]],
        host: str = "127.0.0.1",
        port: int = METRICS_PORT_DEFAULT,
        *,
        allow_remote: bool = False,
        labels: Mapping[str, str] | None = None,
        kinds: Mapping[str, str] | None = None,
        shutdown_poll_s: float = SHUTDOWN_POLL_S,
    ) -> None:
        """Args:
        snapshot_fn: returns the counters to expose; called on every scrape, from the
            server's thread.
        host: address to bind; must be loopback unless `allow_remote`.
        port: TCP port; 0 picks a free one (see `.port` after `start()`).
        allow_remote: permit a non-loopback address (the endpoint has no authentication).
        labels: added to every sample, e.g. {"node": "n1"}.
        kinds: overrides of counter/gauge typing, passed to `render_prometheus`.
        shutdown_poll_s: how long stop() may wait for the serving thread to notice.

        Raises:
            ValueError: a non-loopback host without allow_remote.
        """
        if not allow_remote and not _is_loopback(host):
            raise ValueError(
                f"metrics host {host!r} is not a loopback address; the endpoint has no "
                "authentication, so it binds to 127.0.0.1 or ::1 unless the config sets "
                "metrics allow_remote = true"
            )
        assert 0 <= port <= 65535, port
        self.snapshot_fn = snapshot_fn
        self.host = host
        self.requested_port = port
        self.labels = dict(labels or {})
        self.kinds = dict(kinds or {})
        self.shutdown_poll_s = shutdown_poll_s
        self.scrapes = 0
        self.render_failures = 0
        self._server: _MetricsHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        assert self._server is not None, "start() first"
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def start(self) -> None:
        """Bind and serve in a daemon thread.

        Raises:
            OSError: the address cannot be bound (in use, not on this host); the message says
                which.
        """
        assert self._server is None, "already started"
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            self._server = _MetricsHTTPServer((self.host, self.requested_port), family, self)
        except OSError as error:
            raise OSError(
                error.errno,
                f"cannot bind the metrics endpoint to {self.host}:{self.requested_port}: "
                f"{error.strerror}. Choose another metrics port in the config, or turn "
                "metrics off",
            ) from error
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            args=(self.shutdown_poll_s,),
            name="seqd-metrics",
            daemon=True,
        )
        self._thread.start()
        _logger.info("metrics endpoint at %s", self.url)

    def stop(self) -> None:
        """Stop serving and close the socket; safe to call twice."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=STOP_TIMEOUT_S)
        self._server = None
        self._thread = None

    def __enter__(self) -> MetricsServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
