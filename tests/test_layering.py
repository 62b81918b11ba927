"""Imports point one way (daemon -> sequencer -> ipc) and the sans-I/O cores touch no I/O."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"ipc": 0, "sequencer": 1, "daemon": 2}
# Modules that must stay sans-I/O: no sockets, files, clocks, threads or event loops.
SANS_IO = ["sequencer/raft/core.py", "sequencer/raft/log.py", "sequencer/raft/quorum.py",
           "sequencer/client/protocol.py", "sequencer/processor.py", "sequencer/egress.py",
           "sequencer/record.py", "sequencer/schema.py", "sequencer/client/session.py"]
IO_MODULES = {"socket", "asyncio", "threading", "time", "select", "selectors", "subprocess", "uvloop",
              "mmap", "posix_ipc", "io", "shutil", "tempfile"}


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def package_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_imports_point_only_downwards(package: str) -> None:
    level = LAYERS[package]
    wrong = []
    for path in package_files(package):
        for name in imports(path):
            top = name.split(".")[0]
            if top in LAYERS and LAYERS[top] > level:
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not wrong, "layering is daemon -> sequencer -> ipc:\n" + "\n".join(wrong)


@pytest.mark.parametrize("relative", [p for p in SANS_IO if (ROOT / p).exists()])
def test_sans_io_cores_import_no_io(relative: str) -> None:
    found = {name for name in imports(ROOT / relative) if name.split(".")[0] in IO_MODULES}
    assert not found, f"{relative} must stay sans-I/O but imports {sorted(found)}"
