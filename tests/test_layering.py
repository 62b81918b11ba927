"""The architecture's parts import only what they may, transitively; the I/O-free cores reach no
I/O and the sequencer no process control, even through other project modules.

The import graph is read from the source (`ast`), never by importing it: an edge is an `import`
or `from ... import` anywhere in a module (inside functions and `if TYPE_CHECKING:` too) naming a
project module; `from package import name` is an edge to `package.name` when that is a module, else
to the package. The package `__init__` modules that Python runs on the way to a submodule are not
edges: a module that imports `a.b.c` depends on `a.b.c`, not on what `a.b` re-exports (importing
`a.b` itself is an edge to it). `importlib.import_module` (apps named by "module:Class") is not
followed.

Each rule is parametrised and proved on a planted bad import (`test_rule_reports_a_planted_*`):
the self-test scans the real tree with one file changed or added in memory, so CI keeps proving
that every rule still catches what it is for. The rules are described in docs/architecture.md
("Layering").
"""

from __future__ import annotations

import ast
import functools
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ipc", "sequencer", "daemon", "benches", "tests")

# The parts of the architecture, by module prefix; a module belongs to the first that matches.
PARTS = (
    ("raft", "sequencer.raft"),
    ("client", "sequencer.client"),
    ("records", "sequencer"),  # the event log: records, journal, snapshots, processor, apps
    ("ipc", "ipc"),
    ("daemon", "daemon"),
    ("benches", "benches"),
    ("tests", "tests"),
)

# What each part may reach, transitively, besides itself; tests may reach anything, and nothing
# but tests reaches tests.
MAY_REACH: dict[str, tuple[str, ...]] = {
    # Shared memory knows no records, apps, clients or roles: it carries (type, bytes) frames.
    "ipc": (),
    # The event log knows nothing of the daemon's processes and roles (DESIGN.md: daemon ->
    # sequencer -> ipc); it may use the ring, and the Raft core and client codec it builds on.
    "records": ("ipc", "raft", "client"),
    # The Raft core is sans-I/O and simulated without shared memory: no ipc, not even through
    # a records module.
    "raft": ("records",),
    # The client library talks to a node over its socket only: no ipc, no daemon.
    "client": ("records",),
    # The daemon wires everything together, but ships without the benchmarks and the tests.
    "daemon": ("ipc", "records", "raft", "client"),
    # Benchmarks may measure anything; only the tests import them.
    "benches": ("ipc", "records", "raft", "client", "daemon"),
}

# Modules that must stay I/O-free, and whether each must exist (False: tolerated while it is
# still being written; its rule is proved on a planted module meanwhile).
IO_FREE: dict[str, bool] = {
    "sequencer.raft.core": True,
    "sequencer.raft.log": True,
    "sequencer.raft.quorum": True,
    "sequencer.raft.messages": True,
    "sequencer.raft.config": True,
    "sequencer.raft.election": True,
    "sequencer.raft.tracker": True,
    "sequencer.raft.leader": True,
    "sequencer.raft.read_index": True,
    "sequencer.raft.peer_protocol": True,
    "sequencer.raft.peer_wire": True,  # the peer protocol, split by concept (issue 10)
    "sequencer.raft.peer_handshake": True,
    "sequencer.raft.backoff": True,
    "sequencer.raft.candidate": True,
    "sequencer.raft.raft_role": True,
    "sequencer.raft.storage": True,
    "sequencer.raft.errors": True,  # the core, split by concept again (issue 10)
    "sequencer.raft.durability": True,
    "sequencer.raft.follower": True,
    "sequencer.raft.restart": True,
    "sequencer.raft.readies": True,  # the core's ready/advance side (commitcoal)
    "sequencer.raft.reason_kinds": True,  # the transport's refusal log throttle (issue 11)
    "sequencer.processor": True,
    "sequencer.dedup": True,  # the processor, split by concept (issue 10)
    "sequencer.app_versions": True,  # the active app version of a log (issue 16, rolling upgrades)
    "sequencer.rules_versions": True,  # the active session rules of a log (issue 11)
    "sequencer.dedup_rules1": True,
    "sequencer.processor_state": True,
    "sequencer.record": True,
    "sequencer.egress": True,
    "sequencer.schema": True,
    "sequencer.snapshot_format": True,
    "sequencer.journal.errors": True,
    "sequencer.journal.format": True,  # a follower checks batches it received with it
    "sequencer.client.protocol": True,
    "sequencer.client.replica": True,  # subscriptions and queries, the sans-I/O core
    "sequencer.client.wire": True,  # the client protocol, split by concept (issue 10)
    "sequencer.client.frames": True,
    "sequencer.client.connection": True,
    "sequencer.client.session": True,  # the client session core (issue 10, item 1)
    "sequencer.client.reconnect": True,
    "sequencer.client.view": True,
    "sequencer.gateway": True,  # the sequencer's gateway core (issue 10, item 2), a package
    "sequencer.gateway.core": True,
    "sequencer.gateway.sessions": True,
    "sequencer.gateway.stamping": True,
    "sequencer.cluster": True,  # the replicator's helpers (issue 11), a package
    "sequencer.cluster.stamper": True,
    "sequencer.cluster.forwards": True,
    "sequencer.cluster.positions": True,
    "sequencer.cluster.ring_entries": True,
    "sequencer.cluster.gate": True,
    "sequencer.timers": True,  # both halves of the timer schedule (processor and gateway)
    "sequencer.projection.projection": True,  # what a projection returns, positions (issue 14)
    "sequencer.migrate": True,  # the copy-and-transform core (issue 16), split by concept
    "sequencer.migrate.errors": True,
    "sequencer.migrate.transform": True,
    "sequencer.migrate.dedup_mirror": True,
    "sequencer.migrate.index_map": True,
    "sequencer.migrate.migration": True,
    "sequencer.export.message": True,  # the exporter's ids, headers and resume rule (issue 15)
    "sequencer.integration.keys": True,  # integration requests: the state machine's half (issue 15)
    "sequencer.apps.withdrawals": True,  # a state machine: its reactions are a function of the log
    "sequencer.bridge": True,  # a bridge target's inbox (issue 15); the loop is bridge.bridge
    "sequencer.bridge.inbox": True,
    "sequencer.apps.sharded_ledger": True,  # an app: runs on the blp
}
# What an I/O-free module may not reach: sockets, files, clocks, threads, event loops,
# processes, shared memory. The first eight are the ones the architecture names.
IO_MODULES = frozenset({
    "socket", "os", "pathlib", "time", "asyncio", "threading", "subprocess", "select",
    "selectors", "uvloop", "mmap", "posix_ipc", "io", "shutil", "tempfile", "multiprocessing",
    "signal", "ctypes", "fcntl", "psutil", "builtins",
})  # fmt: skip
IO_BUILTINS = frozenset({"open"})
# Imports of I/O modules that do no I/O, each with its reason. Narrow on purpose: the module may
# import these names only; anything else it imports is checked as usual.
TRIPWIRES: dict[str, tuple[frozenset[str], str]] = {
    "sequencer.determinism": (
        frozenset({"os", "time"}),
        "guard() replaces the clock functions and os.urandom with functions that raise, so an "
        "app that reads them fails in debug mode; it never calls them",
    ),
}

# "sequencer knows nothing of processes": no module of records, raft or client reaches these.
PROCESS_MODULES = frozenset({"subprocess", "multiprocessing", "signal", "ctypes"})
PROCESS_OS_FUNCTIONS = frozenset({
    "fork", "forkpty", "register_at_fork", "wait", "wait3", "wait4", "waitid", "waitpid", "kill",
    "killpg", "_exit", "setsid", "getppid", "execl", "execle", "execlp", "execlpe", "execv",
    "execve", "execvp", "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv",
    "spawnve", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "pidfd_open",
})  # fmt: skip
SEQUENCER_PARTS = ("records", "raft", "client")
# Where that walk goes: the sequencer's parts and what they may reach (the part rules keep them
# out of the rest).
_PROCESS_WALK = frozenset({*SEQUENCER_PARTS, *MAY_REACH["records"]})


# ---- the import graph -------------------------------------------------------------------------


@dataclass
class Module:
    name: str
    is_package: bool
    imports: list[tuple[str, int]] = field(default_factory=list)  # project module, line
    externals: list[tuple[str, int]] = field(default_factory=list)  # top-level name, line
    io_calls: list[tuple[str, int]] = field(default_factory=list)  # "open()", line
    process_calls: list[tuple[str, int]] = field(default_factory=list)  # "os.fork", line


@dataclass(frozen=True)
class _Parsed:
    # (module, names, level, line): `import a.b` is ("a.b", (), 0, line); `from .x import y` is
    # ("x", ("y",), 1, line).
    imports: tuple[tuple[str, tuple[str, ...] | None, int, int], ...]
    io_calls: tuple[tuple[str, int], ...]
    process_calls: tuple[tuple[str, int], ...]


@functools.cache
def module_name(relative: str) -> str:
    parts = list(Path(relative).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def part_of(module: str) -> str:
    for part, prefix in PARTS:
        if module == prefix or module.startswith(prefix + "."):
            return part
    raise AssertionError(f"{module} belongs to no part; add its package to PARTS")


def _line(item: tuple[str, int]) -> int:
    return item[1]


@functools.cache
def _parse(relative: str, source: str) -> _Parsed:
    tree = ast.parse(source, relative)
    imports: list[tuple[str, tuple[str, ...] | None, int, int]] = []
    io_calls: list[tuple[str, int]] = []
    process_calls: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imports.extend((alias.name, None, 0, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names = tuple(alias.name for alias in node.names)
            imports.append((node.module or "", names, node.level, node.lineno))
            if node.module == "os" and node.level == 0:
                process_calls.extend(
                    (f"os.{name}", node.lineno) for name in names if name in PROCESS_OS_FUNCTIONS
                )
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id in IO_BUILTINS:
                io_calls.append((f"{node.func.id}()", node.lineno))
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "os"
            and node.attr in PROCESS_OS_FUNCTIONS
        ):
            process_calls.append((f"os.{node.attr}", node.lineno))
    return _Parsed(
        tuple(imports), tuple(sorted(io_calls, key=_line)), tuple(sorted(process_calls, key=_line))
    )


@functools.cache
def _sources(root: Path) -> dict[str, str]:
    sources: dict[str, str] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            sources[path.relative_to(root).as_posix()] = path.read_text()
    return sources


def scan(root: Path = ROOT, planted: Mapping[str, str] | None = None) -> dict[str, Module]:
    """Every module of the project packages under `root`, with its resolved imports.

    Args:
        planted: relative path -> source that replaces that file or adds it (the self-test).
    """
    sources = {**_sources(root), **(planted or {})}
    names = {module_name(relative) for relative in sources}
    modules: dict[str, Module] = {}
    for relative, source in sorted(sources.items()):
        name = module_name(relative)
        parsed = _parse(relative, source)
        module = Module(name, relative.endswith("__init__.py"))
        module.io_calls.extend(parsed.io_calls)
        module.process_calls.extend(parsed.process_calls)
        for target, imported, level, line in parsed.imports:
            if level:
                base = name.split(".") if module.is_package else name.split(".")[:-1]
                base = base[: len(base) - (level - 1)]
                target = ".".join([*base, target] if target else base)
            if target.split(".")[0] not in PACKAGES:
                module.externals.append((target.split(".")[0], line))
                continue
            for submodule in imported or ("",):
                candidate = f"{target}.{submodule}" if submodule else target
                while candidate and candidate not in names:
                    candidate = candidate.rpartition(".")[0]
                if candidate and candidate != name:
                    module.imports.append((candidate, line))
        modules[name] = module
    return modules


@functools.cache
def project() -> dict[str, Module]:
    """The project as it is (scanned once per test session)."""
    return scan()


Parents = dict[str, "tuple[str, int] | None"]


def walk(modules: dict[str, Module], sources: list[str], stop: Callable[[str], bool]) -> Parents:
    """Breadth first from `sources` over project imports, not expanding modules where `stop` is
    true. Returns each module reached -> (the module that imports it, line), None for a source."""
    parents: Parents = dict.fromkeys(sources)
    queue = deque(sorted(sources))
    while queue:
        name = queue.popleft()
        if stop(name):
            continue
        for target, line in modules[name].imports:
            if target not in parents:
                parents[target] = (name, line)
                queue.append(target)
    return parents


def chain(parents: Parents, name: str) -> str:
    """`a:12 -> b:3 -> c`: a imports b at its line 12, b imports c at its line 3."""
    steps = [name]
    step = parents[name]
    while step is not None:
        name, line = step
        steps.append(f"{name}:{line}")
        step = parents[name]
    return " -> ".join(reversed(steps))


# ---- the rules --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plant:
    """A bad import to plant (files replaced or added) and the violation it must produce."""

    files: dict[str, str]
    expected: str


def _with_line(relative: str, line: str) -> tuple[str, int]:
    """The source of `relative` with `line` appended, and that line's number."""
    source = (ROOT / relative).read_text() if (ROOT / relative).exists() else ""
    source = source.rstrip("\n") + "\n" if source else ""
    return source + line + "\n", source.count("\n") + 1


def _relative_path(module: str) -> str:
    path = module.replace(".", "/")
    if (ROOT / path / "__init__.py").exists():
        return f"{path}/__init__.py"  # a package: its __init__ is the module
    return path + ".py"


PLANTED = "_planted_layering"
PLANTED_DEEP = "_planted_layering_deep"
# Per part: a module of it, which plants import (as the forbidden target) and plant into (as the
# source of the chain).
_TARGET = {
    "ipc": "ipc.ring", "records": "sequencer.journal.writer", "raft": "sequencer.raft.core",
    "client": "sequencer.client.protocol", "daemon": "daemon.config", "benches": "benches.ring",
    "tests": "tests.conftest",
}  # fmt: skip
# Per part: the package where a plant adds its intermediate module.
_PACKAGE = {
    "ipc": "ipc", "records": "sequencer", "raft": "sequencer.raft", "client": "sequencer.client",
    "daemon": "daemon", "benches": "benches",
}  # fmt: skip


class Rule:
    id: str

    def describe(self) -> str:
        raise NotImplementedError

    def violations(self, modules: dict[str, Module]) -> list[str]:
        raise NotImplementedError

    def plants(self) -> Iterator[Plant]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.id


class PartRule(Rule):
    """Every module of `part` reaches, transitively, only modules of MAY_REACH[part]."""

    def __init__(self, part: str) -> None:
        self.part = part
        self.allowed = frozenset({part, *MAY_REACH[part]})
        self.id = f"part-{part}"

    def describe(self) -> str:
        allowed = ", ".join(MAY_REACH[self.part]) or "nothing"
        return f"{self.part} may reach only {allowed} (MAY_REACH), but:"

    def violations(self, modules: dict[str, Module]) -> list[str]:
        sources = [name for name in modules if part_of(name) == self.part]
        parents = walk(modules, sources, lambda name: part_of(name) not in self.allowed)
        return [
            f"{chain(parents, name)} ({part_of(name)})"
            for name in sorted(parents)
            if part_of(name) not in self.allowed
        ]

    def plants(self) -> Iterator[Plant]:
        # Through a module of another, allowed part where there is one (the chain the old,
        # direct-only test missed: raft -> records -> ipc), imported relatively where the
        # packages allow it (raft and client: `from .. import ...`); ipc may reach no other part,
        # so its plant is direct.
        source = _relative_path(_TARGET[self.part])
        for forbidden in sorted(set(_TARGET) - self.allowed):
            target = _TARGET[forbidden]
            if not MAY_REACH[self.part]:
                planted_source, number = _with_line(source, f"import {target}")
                yield Plant(
                    {source: planted_source},
                    f"{_TARGET[self.part]}:{number} -> {target} ({forbidden})",
                )
                continue
            via = _PACKAGE[MAY_REACH[self.part][0]]
            intermediate = f"{via}.{PLANTED}"
            package = _PACKAGE[self.part]
            if package.startswith(via + "."):
                level = package.count(".") - via.count(".") + 1
                line = f"from {'.' * level} import {PLANTED}"
            else:
                line = f"import {intermediate}"
            planted_source, number = _with_line(source, line)
            yield Plant(
                files={source: planted_source, _relative_path(intermediate): f"import {target}\n"},
                expected=f"{_TARGET[self.part]}:{number} -> {intermediate}:1 -> {target} ({forbidden})",
            )


class IoFreeRule(Rule):
    """`module` reaches no I/O module and calls no I/O builtin, through any project module."""

    def __init__(self, module: str, required: bool, example: str) -> None:
        self.module = module
        self.required = required
        self.example = example  # the I/O module its plant imports
        self.id = f"io-free-{module}"

    def describe(self) -> str:
        return f"{self.module} must stay I/O-free, but:"

    def violations(self, modules: dict[str, Module]) -> list[str]:
        if self.module not in modules:
            return []
        parents = walk(modules, [self.module], lambda name: False)
        found = []
        for name in sorted(parents):
            module = modules[name]
            exempt = TRIPWIRES.get(name, (frozenset(), ""))[0]
            for external, line in module.externals:
                if external in IO_MODULES and external not in exempt:
                    found.append(f"{chain(parents, name)}:{line} -> {external}")
            for call, line in module.io_calls:
                found.append(f"{chain(parents, name)}:{line} calls {call}")
        return found

    def plants(self) -> Iterator[Plant]:
        # Two project modules deep, so a walk that stopped at the module's own imports fails.
        source = _relative_path(self.module)
        planted_source, number = _with_line(source, f"import sequencer.{PLANTED}")
        files = {
            source: planted_source,
            _relative_path(f"sequencer.{PLANTED}"): f"from sequencer import {PLANTED_DEEP}\n",
        }
        deep = _relative_path(f"sequencer.{PLANTED_DEEP}")
        head = f"{self.module}:{number} -> sequencer.{PLANTED}:1 -> sequencer.{PLANTED_DEEP}"
        yield Plant({**files, deep: f"import {self.example}\n"}, f"{head}:1 -> {self.example}")
        yield Plant(
            {**files, deep: "def load():\n    return open('x')\n"}, f"{head}:2 calls open()"
        )
        if self.module == "sequencer.processor":
            # A tripwire exempts only its own names: anything else it imports is still caught.
            tripwire = _relative_path("sequencer.determinism")
            tripped, line = _with_line(tripwire, "import socket")
            imported_at = dict(project()[self.module].imports)["sequencer.determinism"]
            yield Plant(
                {tripwire: tripped},
                f"{self.module}:{imported_at} -> sequencer.determinism:{line} -> socket",
            )


class NoProcessRule(Rule):
    """No module of records, raft or client reaches process control (fork, wait, signals, ...)."""

    id = "sequencer-knows-no-processes"

    def describe(self) -> str:
        return "sequencer knows nothing of processes (process control belongs in daemon), but:"

    def violations(self, modules: dict[str, Module]) -> list[str]:
        sources = [name for name in modules if part_of(name) in SEQUENCER_PARTS]
        parents = walk(modules, sources, lambda name: part_of(name) not in _PROCESS_WALK)
        found = []
        for name in sorted(parents):
            module = modules[name]
            for external, line in module.externals:
                if external in PROCESS_MODULES:
                    found.append(f"{chain(parents, name)}:{line} -> {external}")
            for call, line in module.process_calls:
                found.append(f"{chain(parents, name)}:{line} calls {call}")
        return found

    def plants(self) -> Iterator[Plant]:
        # The snapshot writer as it was: sequencer/snapshot.py forked and reaped its child.
        snapshot, line = _with_line(
            "sequencer/snapshot.py", "def fork_writer():\n    return os.waitpid(os.fork(), 0)"
        )
        yield Plant(
            {"sequencer/snapshot.py": snapshot}, f"sequencer.snapshot:{line + 1} calls os.fork"
        )
        yield Plant(
            {"sequencer/snapshot.py": snapshot}, f"sequencer.snapshot:{line + 1} calls os.waitpid"
        )
        # Through ipc, which records may use, two modules deep.
        record, number = _with_line("sequencer/record.py", f"import ipc.{PLANTED}")
        yield Plant(
            {
                "sequencer/record.py": record,
                f"ipc/{PLANTED}.py": f"from . import {PLANTED_DEEP}\n",
                f"ipc/{PLANTED_DEEP}.py": "import subprocess\n",
            },
            f"sequencer.record:{number} -> ipc.{PLANTED}:1 -> ipc.{PLANTED_DEEP}:1 -> subprocess",
        )
        yield Plant(
            {f"sequencer/raft/{PLANTED}.py": "from os import fork\n"},
            f"sequencer.raft.{PLANTED}:1 calls os.fork",
        )


_EXAMPLES = ("socket", "os", "pathlib", "time", "asyncio", "threading", "subprocess", "select")
RULES: list[Rule] = [
    *(PartRule(part) for part in MAY_REACH),
    *(
        IoFreeRule(module, required, _EXAMPLES[number % len(_EXAMPLES)])
        for number, (module, required) in enumerate(IO_FREE.items())
    ),
    NoProcessRule(),
]


# ---- the tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", RULES, ids=repr)
def test_the_architecture_holds_transitively(rule: Rule) -> None:
    if isinstance(rule, IoFreeRule) and rule.module not in project():
        if rule.required:
            pytest.fail(
                f"{rule.module} is listed in IO_FREE but does not exist: renamed? Update IO_FREE"
            )
        pytest.skip(f"{rule.module} does not exist yet")
    found = rule.violations(project())
    assert not found, "\n  ".join([rule.describe(), *found])


@pytest.mark.parametrize(
    ("rule", "plant"),
    [(rule, plant) for rule in RULES for plant in rule.plants()],
    ids=lambda value: repr(value) if isinstance(value, Rule) else value.expected,
)
def test_rule_reports_a_planted_bad_import(rule: Rule, plant: Plant) -> None:
    found = rule.violations(scan(planted=plant.files))
    assert plant.expected in found, f"planted {sorted(plant.files)}; {rule} reported {found}"


def test_every_part_has_a_rule_and_every_module_a_part() -> None:
    assert set(MAY_REACH) | {"tests"} == {part for part, _ in PARTS}
    assert {part_of(name) for name in project()} == {part for part, _ in PARTS}


def test_tripwire_imports_are_still_imported() -> None:
    """An exemption that no longer matches an import is stale: remove it."""
    for name, (exempt, _reason) in TRIPWIRES.items():
        assert exempt <= {external for external, _ in project()[name].externals}, name
