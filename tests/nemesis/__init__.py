"""The nemesis: `python -m tests.nemesis` runs a seeded fault schedule (`schedule`) against a real
cluster with recorded clients and judges the run (`run`); `planted` proves it catches planted
bugs; `tally` totals many seeds. The history recorder and checker live in `sequencer.history`
(`history` and `checker` here re-export them). See docs/cluster.md, "The nemesis"."""
