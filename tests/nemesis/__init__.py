"""The nemesis's tools: client histories (`history`) and the checker that judges them against
every node's journal (`checker`). See docs/cluster.md, "Checking a cluster's history"."""
