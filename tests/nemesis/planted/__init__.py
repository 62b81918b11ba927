"""Planted bugs: proof that the nemesis and its checker catch what they are for.

Each `*.patch` here breaks one safety rule in a few lines:

    commit_on_leader_alone.patch     the leader commits an entry on its own durable write (no
                                     majority): Raft 5.3/5.4's commit rule broken
    ack_before_fsync.patch           the journaller publishes records as durable before their
                                     fdatasync, so followers acknowledge and leaders commit them
    follower_skips_truncation.patch  a follower whose log conflicts with the leader's keeps its
                                     conflicting suffix in the journal (Raft 5.3, step 3)
    raft_id_from_clock.patch         a replicator's start takes its Raft incarnation from the wall
                                     clock alone, not past the recorded one (daemon/incarnation.py):
                                     behind after the clock stepped back, so the leader drops the
                                     new start's answers as an older start's

`python -m tests.nemesis.planted [--seeds N] [--duration S] [BUG...]` copies the source tree to a
temporary directory, applies one patch there (the working tree is never touched), runs seeds of
`python -m tests.nemesis` against the copy until one reports a violation, and prints which seed
caught which bug with the first violation. Each bug draws from the fault kinds that can expose it
(`KINDS`): an fdatasync that comes late matters only when the power goes, so ack_before_fsync
runs power cuts (with slow disks and kills beside them); the other two need a leader cut off
from the majority (isolated, in a minority, or killed) while its clients are sending. With every
kind drawn they are caught too, but fewer seeds show it: a lone leader steps down within an
election timeout (CheckQuorum), and on a loaded machine its clients may get no reply in that
window.
"""
