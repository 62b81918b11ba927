"""Deterministic simulation of seqd's Raft core: one seed, a whole cluster, every fault.

    python -m tests.sim --seeds 1000          # sweep seeds 0..999, stop at the first failure
    python -m tests.sim --seed 4242 --trace   # replay one seed, printing every event

See docs/consensus.md for the fault model and the checks.
"""

from tests.sim.checks import Checker, SafetyViolation
from tests.sim.scenario import CONVERGENCE_MS_MAX, SeedResult, run_seed
from tests.sim.simulator import LivenessFailure, NetworkProfile, Simulation

__all__ = [
    "CONVERGENCE_MS_MAX",
    "Checker",
    "LivenessFailure",
    "NetworkProfile",
    "SafetyViolation",
    "SeedResult",
    "Simulation",
    "run_seed",
]
