"""Determinism checks: `seqd verify` and `seqd snapshot verify`.

`seqd verify` replays the journal twice, each time in a fresh interpreter (`python -m
daemon.verify replay`): once with the blp's PYTHONHASHSEED and once with another. Each replay
writes the processor's rolling output hash after every record to a file (8 bytes a record), and
the state hash at the end. A state machine that reads the clock, draws random numbers or iterates a
set of strings produces different outputs under the two runs; the first index where the hashes
differ is reported.

`seqd snapshot verify` replays from an older snapshot (or from the start of the journal) up to
each newer snapshot's index and compares the state hash with the one in the newer file's header.
"""

from __future__ import annotations

import argparse
import os
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from daemon.config import Config
from daemon.supervisor import BLP_HASH_SEED

__all__ = ["replay_hashes", "verify_journal", "verify_snapshots"]

_HASH = struct.Struct("<Q")
_MASK = (1 << 64) - 1


def replay_hashes(config: Config, output: Path, to_index: int | None = None, debug: bool = False) -> tuple[int, str]:
    """Replay the journal in this process from its earliest start (`recovery.earliest_start`),
    writing the rolling hash after each record to `output`.

    Returns:
        (last index, state hash hex).
    """
    from sequencer import recovery
    from sequencer.state_machine import load_app

    app_class = load_app(config.node.app)
    start = recovery.earliest_start(config.snapshot_dir, config.journal_dir)
    pack = _HASH.pack
    with open(output, "wb", buffering=1 << 20) as sink:
        recovered = recovery.recover(
            app_class, config.journal_dir, start, to_index, debug=debug,
            client_expiry_ns=config.client_expiry_ns,
            after_each=lambda processor: sink.write(pack(processor.rolling_hash & _MASK)),
        )  # fmt: skip
    processor = recovered.processor
    return processor.applied_index, processor.state_hash().hex()


def _replay_in_child(config: Config, hash_seed: str, output: Path, to_index: int | None) -> tuple[int, str]:
    environment = dict(os.environ)
    environment["PYTHONHASHSEED"] = hash_seed
    environment["SEQD_CONFIG_JSON"] = config.to_json().decode()
    argv = [sys.executable, "-m", "daemon.verify", "replay", "--output", str(output)]
    if to_index is not None:
        argv += ["--to", str(to_index)]
    result = subprocess.run(argv, env=environment, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"replay under PYTHONHASHSEED={hash_seed} failed:\n{result.stderr[-4000:]}")
    last_index, state_hash = result.stdout.strip().split()
    return int(last_index), state_hash


def verify_journal(config: Config, say: Callable[[str], object], hash_seed: int = 12345) -> int:
    """Replay under the blp's hash seed and under `hash_seed`; 0 if every hash agrees."""
    with tempfile.TemporaryDirectory(prefix="seqd-verify-") as temporary:
        first_path = Path(temporary) / "first.hashes"
        second_path = Path(temporary) / "second.hashes"
        first = _replay_in_child(config, BLP_HASH_SEED, first_path, None)
        second = _replay_in_child(config, str(hash_seed), second_path, first[0])
        if first == second:
            say(f"ok: {first[0]} records replay to the same outputs and state hash {first[1][:16]} "
                f"under PYTHONHASHSEED={BLP_HASH_SEED} and {hash_seed}")
            return 0
        diverging = _first_difference(first_path, second_path)
        where = f"first diverging output at index {diverging}" if diverging else "outputs agree"
        say(f"MISMATCH: {where}; state hash {first[1][:16]} (seed {BLP_HASH_SEED}) vs {second[1][:16]} "
            f"(seed {hash_seed}). The state machine is not deterministic: look for clock reads, random "
            "numbers or iteration over sets of str/bytes in what it does at that index.")
        return 1


def _first_difference(first: Path, second: Path) -> int | None:
    with open(first, "rb") as a, open(second, "rb") as b:
        index = 0
        while True:
            chunk_a = a.read(1 << 16)
            chunk_b = b.read(1 << 16)
            if not chunk_a and not chunk_b:
                return None
            if chunk_a != chunk_b:
                for offset in range(0, min(len(chunk_a), len(chunk_b)), _HASH.size):
                    if chunk_a[offset : offset + 8] != chunk_b[offset : offset + 8]:
                        return index + offset // _HASH.size + 1
                return index + min(len(chunk_a), len(chunk_b)) // _HASH.size + 1
            index += len(chunk_a) // _HASH.size


def verify_snapshots(config: Config, say: Callable[[str], object]) -> int:
    """Check each valid snapshot by rebuilding its state from the one before it (or genesis)."""
    from sequencer import recovery
    from sequencer import snapshot as snapshots
    from sequencer.state_machine import load_app

    app_class = load_app(config.node.app)
    infos = [info for info in snapshots.list_snapshots(config.snapshot_dir) if info.valid]
    infos.sort(key=lambda info: info.index)
    if not infos:
        say(f"no valid snapshots in {config.snapshot_dir}")
        return 0
    failures = 0
    for position, info in enumerate(infos):
        assert info.header is not None
        base = infos[position - 1] if position else None
        start = None
        source = "the start of the journal"
        if base is not None:
            header, body = snapshots.read_snapshot(base.path)
            start = snapshots.LoadedSnapshot(base.path, header, body, [])
            source = f"snapshot {base.index}"
        processor = recovery.recover(app_class, config.journal_dir, start, info.index,
                                     client_expiry_ns=config.client_expiry_ns).processor  # fmt: skip
        if processor.applied_index != info.index:
            say(f"snapshot {info.index}: the journal ends at {processor.applied_index} (segments deleted?); not checked")
            continue
        rebuilt = processor.state_hash()
        if rebuilt == info.header.state_hash:
            say(f"snapshot {info.index}: ok (rebuilt from {source})")
        else:
            failures += 1
            say(f"snapshot {info.index}: MISMATCH: rebuilt from {source} gives {rebuilt.hex()[:16]}, "
                f"the file says {info.header.state_hash.hex()[:16]}")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m daemon.verify")
    parser.add_argument("command", choices=("replay",))
    parser.add_argument("--output", required=True)
    parser.add_argument("--to", type=int, default=None)
    args = parser.parse_args(argv)
    config = Config.from_json(os.environ["SEQD_CONFIG_JSON"])
    last_index, state_hash = replay_hashes(config, Path(args.output), args.to)
    print(last_index, state_hash)
    return 0


if __name__ == "__main__":
    sys.exit(main())
