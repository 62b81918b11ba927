"""The code examples of README.md and docs/*.md run against a real node: an example that stops
working fails the suite.

The conventions, in the Markdown:

- A fenced `python` block is an example. It runs as a script in a fresh interpreter; if it names
  the documented socket path `/run/seqd/seqd.sock`, a node of its own is started first and the
  path is replaced by that node's, as is the documented data directory `/var/lib/seqd`. It
  passes if it exits 0, so an example asserts what it claims.
- `<!-- not-run: reason -->` on the line before the fence skips a block (an abridged excerpt of
  code the tests run elsewhere). Keep these rare: NOT_RUN_MAX bounds them.
- `<!-- app: module:Class -->` before a block makes it a state machine: it is saved as
  `module.py`, and the examples after it in the same file run against a node serving
  `node.app = "module:Class"`, with the module's directory on PYTHONPATH (for the node and the
  example alike).
- No API example may hide from this: an indented code block or a fence of another language that
  imports `sequencer` or makes a client fails the suite.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemon.harness import NodeProcess
from tests.nats_server import nats_server  # noqa: F401  (the fixture, for the exporter's example)
from tests.node_fixtures import node_factory  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
DOCUMENTED_SOCKET_PATH = "/run/seqd/seqd.sock"
DOCUMENTED_DATA_DIR = "/var/lib/seqd"
DOCUMENTED_NATS_URL = "nats://127.0.0.1:4222"  # an example naming it gets a nats-server of its own
# Blocks that may be skipped: today the ledger and tally excerpts and the Raft outline (code whose own
# tests run it). Raising this needs a reason as good.
NOT_RUN_MAX = 4
EXAMPLE_TIMEOUT_S = 120.0  # an example takes a second or two; this only bounds a hang

_FENCE = re.compile(r"^(?P<indent>\s*)```(?P<language>[\w+-]*)\s*$")
_MARKER = re.compile(r"^<!--\s*(?P<kind>not-run|app):\s*(?P<value>.*?)\s*-->$")
_API_USE = re.compile(r"^\s*(from|import)\s+sequencer\b|\b(Async)?Client\(")


@dataclass(frozen=True)
class Block:
    """One fenced code block of a document."""

    document: Path
    line: int  # of the opening fence, counted from 1
    language: str
    code: str
    marker: str | None  # "not-run" or "app"
    marker_value: str  # the reason, or the app's "module:Class"
    app: tuple[str, str] | None  # the app in force for an example: ("module:Class", its code)

    @property
    def name(self) -> str:
        return f"{self.document.name}:{self.line}"


def read_blocks(document: Path) -> list[Block]:
    """Every fenced block of `document`, with its marker and the app block in force before it."""
    lines = document.read_text().splitlines()
    blocks: list[Block] = []
    app: tuple[str, str] | None = None
    number = 0
    while number < len(lines):
        fence = _FENCE.match(lines[number])
        if fence is None:
            number += 1
            continue
        opening = number
        indent = fence.group("indent")
        body = []
        number += 1
        while number < len(lines) and lines[number].strip() != "```":
            line = lines[number]
            body.append(line[len(indent) :] if line.startswith(indent) else line)
            number += 1
        number += 1  # the closing fence
        previous = next((lines[j].strip() for j in range(opening - 1, -1, -1) if lines[j].strip()), "")
        marker = _MARKER.match(previous)
        code = "\n".join(body) + "\n"
        kind = marker.group("kind") if marker else None
        value = marker.group("value") if marker else ""
        if kind == "app":
            app = (value, code)
        blocks.append(Block(document, opening + 1, fence.group("language"), code, kind, value, app))
    return blocks


BLOCKS = [block for document in DOCUMENTS for block in read_blocks(document)]
PYTHON = [block for block in BLOCKS if block.language == "python"]
EXAMPLES = [block for block in PYTHON if block.marker is None]


def test_the_documents_have_examples_to_run() -> None:
    """The extraction itself works: the README's and the client guide's examples are found."""
    names = {block.document.name for block in EXAMPLES}
    assert {"README.md", "client.md", "state-machine.md"} <= names, names


@pytest.mark.parametrize("block", EXAMPLES, ids=lambda block: block.name)
def test_example_runs_against_a_real_node(
    block: Block, node_factory: Callable[..., NodeProcess], tmp_dir: Path,  # noqa: F811
    request: pytest.FixtureRequest,
) -> None:
    environment = dict(os.environ)
    settings: dict[str, dict[str, object]] = {}
    if block.app is not None:
        spec, app_code = block.app
        apps = tmp_dir / "apps"
        apps.mkdir()
        (apps / f"{spec.partition(':')[0]}.py").write_text(app_code)
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(apps), environment.get("PYTHONPATH")]))
        settings = {"node": {"app": spec}}
    code = block.code
    if ".subscribe(" in code or ".query(" in code:  # the query side: the node runs a replica
        settings = {**settings, "replicas": {"count": 1}}
    node: NodeProcess | None = None
    if DOCUMENTED_SOCKET_PATH in code:
        node = node_factory(settings, environment=environment)
        code = code.replace(DOCUMENTED_SOCKET_PATH, node.socket_path)
        code = code.replace(DOCUMENTED_DATA_DIR, node.config.node.data_dir)
    if DOCUMENTED_NATS_URL in code:  # docs/integration.md: the JetStream exporter
        code = code.replace(DOCUMENTED_NATS_URL, request.getfixturevalue("nats_server").url)
    script = tmp_dir / "example.py"
    script.write_text(code)
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=EXAMPLE_TIMEOUT_S,
        check=False, cwd=tmp_dir, env=environment,
    )
    node_log = node.log_text()[-3000:] if node is not None else ""
    assert result.returncode == 0, (
        f"the example at {block.name} failed (exit {result.returncode}):\n{block.code}\n"
        f"stdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-4000:]}\nnode log:\n{node_log}"
    )


def test_blocks_not_run_say_why_and_stay_rare() -> None:
    skipped = [block for block in PYTHON if block.marker == "not-run"]
    for block in skipped:
        assert block.marker_value, f"{block.name}: <!-- not-run: ... --> needs a reason"
    assert len(skipped) <= NOT_RUN_MAX, [block.name for block in skipped]


def test_every_app_block_is_used_by_an_example() -> None:
    for app_block in (block for block in PYTHON if block.marker == "app"):
        assert re.fullmatch(r"[A-Za-z_]\w*:[A-Za-z_]\w*", app_block.marker_value), app_block.name
        users = [block for block in EXAMPLES if block.app is not None and block.app[1] == app_block.code]
        assert users, f"{app_block.name}: an app block needs an example after it that uses it"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_api_examples_are_python_blocks_so_they_run(document: Path) -> None:
    """An indented code block or another fence that uses the API would escape the test above."""
    hidden = [
        f"{block.name} (```{block.language})"
        for block in read_blocks(document)
        if block.language != "python" and any(_API_USE.search(line) for line in block.code.splitlines())
    ]
    in_fence = False
    for number, line in enumerate(document.read_text().splitlines(), start=1):
        if _FENCE.match(line) or (in_fence and line.strip() == "```"):
            in_fence = not in_fence
            continue
        if not in_fence and line.startswith("    ") and _API_USE.search(line):
            hidden.append(f"{document.name}:{number} (indented)")
    assert not hidden, f"make these fenced ```python blocks (or mark them not-run): {hidden}"
