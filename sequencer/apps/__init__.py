"""Example apps shipped with seqd. `sequencer.apps.ledger:Ledger` is the embedded default: a
double-entry ledger with two-phase transfers (see docs/state-machine.md)."""
