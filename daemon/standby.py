"""Blue-green switch-over on one machine: the standby node (green) and the switch.

Theory of operation
-------------------
Blue is a node serving clients with the old app. Green is a second node, with its own name,
shared memory and data directory, started with `[standby]` in its config: the new app, and
the transform from blue's app to it (the same `Transform` as `seqd log migrate`). Green's
sequencer binds no socket while it stands by. Instead it is the writer of green's log ring for a
copy-and-transform that never ends (`Standby.records`):

- it reads blue's journal from index 1, up to blue's commit index (read from blue's counters;
  while blue does not run, every complete batch, as `seqd replica` does on a stopped node);
- it feeds each run to a `sequencer.migrate.Migration`, the core of `seqd log migrate`, so the
  carry-along rules are the same: sessions, client ids, request ids and acked ids, timestamps,
  terms and timer fires are copied, resends blue deduplicated and snapshots are dropped, and new
  indexes are dense from 1;
- it writes the new records into green's log ring as they are: green's journaller makes them
  durable and green's blp applies them (commit = green's durable index, as on any single node),
  so green's state, its dedup table (client id -> last request id and saved reply) and its timer
  schedule follow blue's a few milliseconds behind. Green sequences nothing of its own while it
  stands by (no `node_start`, no timer fire, no snapshot), so its journal is exactly the
  migration's output and a restart of green resumes: the migration is fed blue's journal again
  and the records green's journal already holds are skipped (`skip_through`).

The switch (`seqd bluegreen switch --blue BLUE.toml --green GREEN.toml`, `switch`):

1. It writes `switch.request` into green's data directory (green looks every `standby.poll_ms`),
   then sends SIGTERM to blue's supervisor: blue drains as on any stop (new connections refused,
   sessions no longer read, everything sequenced applied and replied, sessions closed, the
   socket file removed, the sequencer's state DRAINED).
2. Green, asked and seeing blue drained (or gone), reads blue's last records up to blue's final
   published index once blue's commit reaches it (or, blue gone, to the end of its journal),
   transforms them, ends the migration (`Migration.finish`: a SESSION_CLOSE for every session of
   blue still open), waits until its own journal has made all of it durable, and writes the index
   map (`migration.index-map`, as `seqd log migrate` does) and `switched.json` into its data
   directory: from then on green is a normal node, also after a restart.
3. Green sequences its `node_start`, binds the socket path blue served (the same path: blue
   removed it at the end of its drain, so green binds it after, never before) and serves.
   Clients reconnect (their library retries with backoff) and resend what was unanswered; a
   request blue applied is answered from the dedup table the migration carried (its saved reply,
   or DUPLICATE), never applied twice.

Why one stable path, bound in turn, and not a rename of a socket green bound beforehand: blue's
drain ends by unlinking its socket path, which would remove green's renamed socket; and a client
that connects between blue's drain and green's bind gets ECONNREFUSED or ENOENT, which the client
library already retries. The cost is the reconnect backoff on top of the gap (10 ms doubling).

Rollback: blue's data directory is untouched (green only reads it). Until blue is retired, the
operator can stop green and start blue again on its own journal with the old app: blue resumes at
its last record, but the records green accepted after the switch are not in blue's journal (there
is no transform back). So rollback is supported, and it loses what green accepted; do it only
before green has taken writes that matter, or replay them by hand.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.config import Config, ConfigError, load_config
from daemon.exits import ExitCode, FatalError
from daemon.incarnation import write_durably
from daemon.layout import (
    COMMIT_INDEX,
    JOURNAL_DURABLE_INDEX,
    LOG_PUBLISHED_INDEX,
    ROLE_COUNTERS,
    SUPERVISOR_PID,
    CounterView,
    Role,
    RoleState,
    attach_counters,
)
from sequencer.gateway import Gateway, SingleNodeStamping
from sequencer.journal import JournalReader
from sequencer.migrate import (
    INDEX_MAP_FILE,
    Migration,
    MigrationError,
    TransformLoadError,
    load_transform,
)
from sequencer.record import FRAME_HEADER_BYTES, RECORD_HEADER, walk_records
from sequencer.state_machine import load_app

__all__ = [
    "SWITCHED_FILE",
    "SWITCH_REQUEST_FILE",
    "BlueLook",
    "GreenPipeline",
    "Standby",
    "StandingStamping",
    "SwitchError",
    "stand_by",
    "switch",
    "switched",
]

log = logging.getLogger("seqd.standby")

SWITCH_REQUEST_FILE = "switch.request"  # in green's data_dir: `seqd bluegreen switch` asks
SWITCHED_FILE = "switched.json"  # in green's data_dir: the takeover is done; a normal node since
# Blue's records transformed per pass of green's loop: a pass of ~4096 records costs a few ms of
# Python, so green's egress (timer requests) and a switch request are looked at between passes.
RECORDS_PER_PASS_MAX = 4096
RING_RETRY_S = 0.001  # green's log ring full (its journaller or blp behind): look again this soon
SWITCH_TIMEOUT_S = 60.0  # `seqd bluegreen switch`: blue's drain and green's takeover, together
assert RECORDS_PER_PASS_MAX > 0


class SwitchError(Exception):
    """`seqd bluegreen switch` could not switch; the message says what to do."""


@dataclass(frozen=True)
class BlueLook:
    """What green sees of blue at one moment.

    running: blue's counters segment is there (its supervisor runs).
    commit_index: blue's commit (durable) index; None when blue does not run (every complete
        batch of its journal is then final).
    final_index: once blue's sequencer drained, its last sequenced index: blue sequences nothing
        after it. None while blue still sequences.
    """

    running: bool
    commit_index: int | None
    final_index: int | None


class Standby:
    """Green's side of a blue-green switch-over (see the module docstring).

    Args:
        config: green's config, with `[standby]`.
        skip_through: the last index green's journal holds (what recovery found): the records the
            migration gives up to there are already written.

    Raises:
        FatalError: blue's config cannot be read, the transform cannot be loaded or does not go
            from blue's app to green's, or the two nodes share a name or a data directory.
    """

    def __init__(self, config: Config, skip_through: int) -> None:
        standby = config.standby
        assert standby is not None
        try:
            blue = load_config(standby.blue_config)
        except ConfigError as error:
            raise FatalError(ExitCode.CONFIG, f"standby.blue_config: {error}") from error
        try:
            transform = load_transform(standby.transform)
        except TransformLoadError as error:
            raise FatalError(ExitCode.CONFIG, f"standby.transform: {error}") from error
        _check_pair(config, blue, transform.source, transform.target)
        self.config = config
        self.blue = blue
        self.data_dir = Path(config.node.data_dir)
        self.poll_s = standby.poll_ms / 1000
        self.migration = Migration(transform, blue.client_expiry_ns)
        self.skip_through = skip_through
        self.reader = JournalReader(blue.journal_dir, 1)
        self._counters: CounterView | None = None
        self.last_term = 0
        self.last_timestamp_ns = 0

    def close(self) -> None:
        self.reader.close()
        self._detach()

    # -- blue ------------------------------------------------------------------------------------

    def look(self) -> BlueLook:
        """Blue's commit index and whether it has drained, from its counters (read only)."""
        counters = self._counters
        if counters is None:
            try:
                counters = self._counters = CounterView(attach_counters(self.blue.node.name), owner=None)
            except Exception:  # no segment (blue stopped), or a stale one: blue does not run
                return BlueLook(False, None, None)
        pid = counters[SUPERVISOR_PID].get()
        if pid and not _alive(pid):  # blue's supervisor died and left its segment behind
            self._detach()
            return BlueLook(False, None, None)
        drained = counters[ROLE_COUNTERS[Role.SEQUENCER].state].get() == RoleState.DRAINED
        final_index = counters[LOG_PUBLISHED_INDEX].get() if drained else None
        return BlueLook(True, counters[COMMIT_INDEX].get(), final_index)

    def _detach(self) -> None:
        if self._counters is not None:
            self._counters.close()
            self._counters = None

    def switch_requested(self) -> bool:
        return (self.data_dir / SWITCH_REQUEST_FILE).exists()

    # -- records -----------------------------------------------------------------------------------

    @property
    def source_index(self) -> int:
        """The last of blue's indexes transformed."""
        return self.migration.source_last_index

    @property
    def target_index(self) -> int:
        """The last of green's indexes the migration has given."""
        return self.migration.target_last_index

    def records(self, to_index: int | None, records_max: int = RECORDS_PER_PASS_MAX) -> bytes:
        """Green's next records: blue's after `source_index` up to `to_index` (None: every
        complete batch), at most about `records_max` of them (whole batches), transformed.

        Raises:
            MigrationError, TransformError: as `Migration.feed` (a bug in the transform stops
                green's sequencer: the supervisor restarts it, and it meets the same record).
            JournalError: blue's journal is damaged, or lost segments green had not read.
        """
        last = self.source_index + records_max
        if to_index is not None:
            last = min(last, to_index)
        if last <= self.source_index:
            return b""
        pieces = [self.migration.feed(run) for run in self.reader.read_runs(last)]
        return self._unwritten(b"".join(pieces))

    def finish(self) -> bytes:
        """The records that end the migration (blue's sessions still open closed)."""
        return self._unwritten(self.migration.finish())

    def _unwritten(self, data: bytes) -> bytes:
        """`data` without the records green's journal already holds (a restart of green)."""
        if not data:
            return data
        headers = [(fields, start) for fields, start, _end in walk_records(data, RECORD_HEADER)]
        last_fields = headers[-1][0]
        self.last_term = max(self.last_term, last_fields[4])
        self.last_timestamp_ns = max(self.last_timestamp_ns, last_fields[5])
        if headers[0][0][3] > self.skip_through:
            return data
        for fields, start in headers:
            if fields[3] > self.skip_through:
                return data[start:]
        return b""

    # -- the takeover ----------------------------------------------------------------------------

    def write_switched(self, blue_last_index: int) -> None:
        """The index map and `switched.json`, durable, in green's data directory: the takeover
        is done, and a restart of green serves as a normal node."""
        index_map = self.migration.index_map()
        write_durably(self.config.journal_dir / INDEX_MAP_FILE, index_map.to_bytes())
        record = {
            "blue": self.blue.node.name,
            "blue_last_index": blue_last_index,
            "green_last_index": self.migration.target_last_index,
            "transform": self.config.standby.transform if self.config.standby else "",
            "switched_at_ns": time.time_ns(),
        }
        write_durably(self.data_dir / SWITCHED_FILE, (json.dumps(record, indent=2) + "\n").encode())
        (self.data_dir / SWITCH_REQUEST_FILE).unlink(missing_ok=True)


def switched(config: Config) -> bool:
    """Whether this node has taken over from blue already (then `[standby]` is ignored)."""
    return (Path(config.node.data_dir) / SWITCHED_FILE).exists()


def _check_pair(green: Config, blue: Config, source: Any, target: Any) -> None:
    problems = []
    if blue.node.name == green.node.name:
        problems.append(f"blue and green are both named {green.node.name!r}: give green another "
                        "node.name (it names its shared memory)")  # fmt: skip
    if Path(blue.node.data_dir).resolve() == Path(green.node.data_dir).resolve():
        problems.append(f"blue and green share node.data_dir={green.node.data_dir}: give green its own")
    if blue.socket.path != green.socket.path:
        problems.append(f"green's socket.path={green.socket.path} is not blue's ({blue.socket.path}): "
                        "green takes over the path blue's clients use; set it to blue's")  # fmt: skip
    if blue.cluster is not None:
        problems.append("blue runs in cluster mode: upgrade a cluster node by node instead")
    try:
        blue_app, green_app = load_app(blue.node.app), load_app(green.node.app)
    except Exception as error:
        problems.append(f"cannot load the apps: {error}")
    else:
        if source is not blue_app:
            problems.append(f"the transform's source is {source.__qualname__}, but blue runs {blue.node.app}")
        if target is not green_app:
            problems.append(f"the transform's target is {target.__qualname__}, but green runs {green.node.app}")
    if problems:
        raise FatalError(ExitCode.CONFIG, "[standby]: " + "; ".join(problems))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- the sequencer's standby loop ------------------------------------------------------------------


class StandingStamping(SingleNodeStamping):
    """Green's stamping while it stands by: blue's timer fires come through the migration, so
    green fires none (its timer schedule still follows its blp, for the moment it serves)."""

    __slots__ = ()

    @property
    def sequences_timers(self) -> bool:
        return False


@dataclass(frozen=True)
class GreenPipeline:
    """What the standby loop needs of green's sequencer (`daemon.roles.sequencer`)."""

    try_claim: Callable[[int, int], memoryview | None]  # the log ring writer's
    flush: Callable[[], None]  # publish what was claimed, up to the gateway's next_index - 1
    stop_requested: Callable[[], bool]
    durable_index: Callable[[], int]  # green's journal.durable index
    beat: Callable[[], object]  # the role's heartbeat: the supervisor's watchdog gate reads it


async def stand_by(standby: Standby, gateway: Gateway[Any], green: GreenPipeline) -> bool:
    """Follow blue until the switch is asked and blue has drained, then write the last records;
    green's gateway sequences nothing meanwhile and goes on from the last of them.

    Returns:
        True when green has taken over (every record of blue's transformed, durable in green's
        journal, `switched.json` written): the caller serves. False when green was stopped while
        standing by.
    """
    name = standby.config.node.name
    gateway.stamping = StandingStamping(0, name)

    def publish(last_index: int, last_timestamp_ns: int) -> None:
        gateway.next_index = last_index + 1
        gateway.last_timestamp_ns = max(gateway.last_timestamp_ns, last_timestamp_ns)
        green.flush()

    try:
        taken_over = await _follow(standby, publish, green)
    finally:
        standby.close()
    # Stamps go on from blue's last term and timestamp (time never goes backwards).
    gateway.stamping = SingleNodeStamping(standby.last_term, name)
    return taken_over


Publish = Callable[[int, int], None]


async def _follow(standby: Standby, publish: Publish, green: GreenPipeline) -> bool:
    log.info("standing by for %s: following its journal %s through %s", standby.blue.node.name,
             standby.blue.journal_dir, standby.migration.name)  # fmt: skip
    while not green.stop_requested():
        green.beat()
        blue = standby.look()
        if standby.switch_requested() and (blue.final_index is not None or not blue.running):
            return await _take_over(standby, publish, green, blue)
        before = standby.source_index
        data = standby.records(blue.commit_index if blue.running else None)
        if data:
            await _write(data, publish, green)
        # Nothing new: wait a poll. Else yield once, so egress (the blp's timer requests) is
        # drained between passes while green catches up.
        await asyncio.sleep(standby.poll_s if standby.source_index == before else 0)
    return False


async def _take_over(standby: Standby, publish: Publish, green: GreenPipeline, blue: BlueLook) -> bool:
    started = time.monotonic()
    final_index = blue.final_index
    while final_index is not None:  # blue drained: everything it sequenced becomes durable
        green.beat()
        look = standby.look()
        if not look.running or (look.commit_index or 0) >= final_index:
            break
        if green.stop_requested():
            return False
        await asyncio.sleep(standby.poll_s)
    while True:  # blue's last records (blue gone: every complete batch of its journal)
        before = standby.source_index
        data = standby.records(final_index)
        if data:
            await _write(data, publish, green)
        if standby.source_index == before:
            break
    if final_index is not None and standby.source_index < final_index:
        raise MigrationError(
            f"blue's journal ends at index {standby.source_index}, but blue sequenced up to "
            f"{final_index} before it drained: its journal lost records (look at blue's log)"
        )
    await _write(standby.finish(), publish, green)
    while green.durable_index() < standby.target_index:
        if green.stop_requested():
            return False
        await asyncio.sleep(standby.poll_s)
    standby.write_switched(standby.source_index)
    log.info("took over from %s: its records 1..%d are green's 1..%d (%.0f ms after blue drained)",
             standby.blue.node.name, standby.source_index, standby.target_index,
             (time.monotonic() - started) * 1000)  # fmt: skip
    return True


async def _write(data: bytes, publish: Publish, green: GreenPipeline) -> None:
    """Claim and fill each record in green's log ring, publishing once at the end (and whenever
    the ring is full, so its readers can free the room the writer waits for)."""
    last_index = last_timestamp_ns = 0
    view: Any
    for (length, type_, version, index, _term, timestamp_ns, _s, _r), start, _end in walk_records(data, RECORD_HEADER):
        view = green.try_claim(length - FRAME_HEADER_BYTES, type_ | version << 16)
        while view is None:
            if last_index:
                publish(last_index, last_timestamp_ns)
            await asyncio.sleep(RING_RETRY_S)
            view = green.try_claim(length - FRAME_HEADER_BYTES, type_ | version << 16)
        view[:] = data[start + FRAME_HEADER_BYTES : start + length]
        last_index, last_timestamp_ns = index, timestamp_ns
    if last_index:
        publish(last_index, last_timestamp_ns)


# -- the switch --------------------------------------------------------------------------------------


def switch(blue_config: Config, green_config: Config, say: Callable[[str], object] = print,
           timeout_s: float = SWITCH_TIMEOUT_S) -> float:  # fmt: skip
    """Switch clients from blue to green (see the module docstring): ask green, stop blue, wait
    until green serves. Returns the seconds from blue's SIGTERM to green serving.

    Raises:
        SwitchError: green does not stand by for this blue, blue or green does not run, or the
            takeover did not happen within `timeout_s` (nothing is undone: see the message).
    """
    if green_config.standby is None:
        raise SwitchError("green's config has no [standby] section: it does not follow blue")
    if switched(green_config):
        raise SwitchError(f"green ({green_config.node.name}) has taken over already "
                          f"({Path(green_config.node.data_dir) / SWITCHED_FILE})")  # fmt: skip
    try:
        green_counters = CounterView(attach_counters(green_config.node.name), owner=None)
    except Exception as error:
        raise SwitchError(f"green ({green_config.node.name}) does not run: start it first "
                          f"(seqd run --config GREEN) and let it catch up ({error})") from error  # fmt: skip
    try:
        blue_counters = CounterView(attach_counters(blue_config.node.name), owner=None)
    except Exception as error:
        green_counters.close()
        raise SwitchError(f"blue ({blue_config.node.name}) does not run ({error}): nothing to switch "
                          "from; green takes over when asked and blue is stopped") from error  # fmt: skip
    try:
        blue_pid = blue_counters[SUPERVISOR_PID].get()
        lag = blue_counters[COMMIT_INDEX].get()
        say(f"switching {blue_config.socket.path} from {blue_config.node.name} (pid {blue_pid}, "
            f"index {lag}) to {green_config.node.name}")  # fmt: skip
        request = Path(green_config.node.data_dir) / SWITCH_REQUEST_FILE
        write_durably(request, f"{blue_config.node.name}\n".encode())
        started = time.monotonic()
        os.kill(blue_pid, signal.SIGTERM)
        deadline = started + timeout_s
        while not switched(green_config):
            if time.monotonic() > deadline:
                raise SwitchError(
                    f"green did not take over within {timeout_s:.0f} s (blue was sent SIGTERM). "
                    f"Look at green's log; the request stays in {request}: green takes over when "
                    "it can. To go back instead, remove the request and start blue again"
                )
            time.sleep(0.001)
        while not os.path.exists(green_config.socket.path):  # green binds right after the file
            if time.monotonic() > deadline:
                raise SwitchError(f"green took over but did not bind {green_config.socket.path}: look at its log")
            time.sleep(0.001)
        elapsed_s = time.monotonic() - started
        durable = green_counters[JOURNAL_DURABLE_INDEX].get()
        say(f"switched: {green_config.node.name} serves {green_config.socket.path} (its index {durable}) "
            f"{elapsed_s * 1000:.0f} ms after blue was asked to stop. Blue's data directory "
            f"{blue_config.node.data_dir} is untouched: keep it for a rollback until you retire blue")  # fmt: skip
        return elapsed_s
    finally:
        blue_counters.close()
        green_counters.close()
