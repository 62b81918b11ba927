#!/usr/bin/env python3
"""The project's two entry points on a fresh machine with only Python.

    python3 dev.py demo     # create .venv, install seqd, run `seqd demo` on the embedded ledger app
    python3 dev.py test     # create .venv, install seqd with test extras, lint, type-check, test

Extra arguments after the command are passed through (to `seqd demo` or to pytest).
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PYTHON = VENV / "bin" / "python"


def run(*argv: str | os.PathLike[str]) -> None:
    print("+", " ".join(str(a) for a in argv), flush=True)
    subprocess.run([str(a) for a in argv], cwd=ROOT, check=True)


def ensure_venv(extras: str) -> None:
    if not PYTHON.exists():
        venv.EnvBuilder(with_pip=True).create(VENV)
    stamp = VENV / f".installed-{extras or 'base'}"
    pyproject = ROOT / "pyproject.toml"
    if stamp.exists() and stamp.stat().st_mtime >= pyproject.stat().st_mtime:
        return
    target = f".[{extras}]" if extras else "."
    run(PYTHON, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-e", target)
    stamp.touch()


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test", "bench"):
        print(__doc__)
        return 2
    command, rest = argv[0], argv[1:]
    try:
        if command == "demo":
            ensure_venv("")
            run(VENV / "bin" / "seqd", "demo", *rest)
        elif command == "bench":
            ensure_venv("bench")
            run(PYTHON, "-m", *(rest or ["benches.ring", "--quick"]))
        else:
            ensure_venv("test")
            run(PYTHON, "-m", "ruff", "check", "ipc", "sequencer", "daemon", "tests", "benches", "dev.py")
            run(PYTHON, "-m", "mypy")
            run(PYTHON, "-m", "pytest", *rest)
    except subprocess.CalledProcessError as error:
        return error.returncode or 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
