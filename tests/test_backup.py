"""`seqd backup`'s refusals (the backup itself is proved on a running cluster in
tests/test_cluster_learners.py): each says what was wrong and what to do."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.backup import BackupError, take_backup
from daemon.cli import main
from daemon.config import load_config


def _config(tmp_dir: Path, unique: str):  # type: ignore[no-untyped-def]
    return load_config(None, [f"node.name={unique}", f"node.data_dir={tmp_dir / 'data'}"])


def test_a_backup_of_a_node_that_does_not_run_says_to_copy_its_directory(tmp_dir: Path, unique: str) -> None:
    with pytest.raises(BackupError, match=r"is not running.*copy its data directory"):
        take_backup(_config(tmp_dir, unique), tmp_dir / "backup")
    assert not (tmp_dir / "backup").exists()


def test_a_backup_is_never_written_into_an_existing_directory(tmp_dir: Path, unique: str) -> None:
    (tmp_dir / "backup").mkdir()
    with pytest.raises(BackupError, match="exists: back up into a new directory"):
        take_backup(_config(tmp_dir, unique), tmp_dir / "backup")


def test_seqd_backup_reports_the_refusal_and_exits_1(tmp_dir: Path, unique: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    code = main(["backup", "--set", f"node.name={unique}", "--to", str(tmp_dir / "b")])
    assert code == 1
    assert "seqd backup:" in capsys.readouterr().err
