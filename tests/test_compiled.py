"""The mypyc experiment's build (benches/compiled.py; docs/dependencies.md, "A compiled helper").

The compiled tree is a measurement, not a way seqd runs: nothing here is needed by the README's
commands. The build itself needs mypy and a C compiler and takes about a minute on this machine,
so the test that builds it runs only with `SEQD_COMPILED=1`; the refusal below needs neither.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from benches import compiled

BUILD = os.environ.get("SEQD_COMPILED", "") not in ("", "0")


def test_build_refuses_a_module_that_defines_a_msgspec_struct(tmp_path: Path) -> None:
    # mypyc drops class keywords: a Struct's frozen=True would vanish without an error.
    with pytest.raises(SystemExit, match=r"sequencer/record.py define msgspec Structs"):
        compiled.build(tmp_path / "tree", ["sequencer/processor.py", "sequencer/record.py"])
    assert not (tmp_path / "tree").exists()


@pytest.mark.skipif(not BUILD, reason="SEQD_COMPILED=1 builds the mypyc tree (mypy, a C compiler, ~1 min)")
@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None, reason="no C compiler")
@pytest.mark.timeout(600)
def test_compiled_processor_reaches_the_same_rolling_and_state_hashes_as_the_pure_one(tmp_path: Path) -> None:
    tree = tmp_path / "compiled"
    compiled.build(tree, list(compiled.HOT_MODULES))
    pure_rolling, pure_state, pure_is_compiled = compiled.rolling_hash(compiled.REPO).split()
    rolling, state, is_compiled = compiled.rolling_hash(tree).split()
    assert (pure_is_compiled, is_compiled) == ("False", "True")
    assert int(rolling) != 0, "no output was hashed"
    assert (rolling, state) == (pure_rolling, pure_state)
