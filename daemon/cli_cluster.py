"""`seqd cluster ...`: operating a cluster from the machine of one of its nodes.

    seqd cluster transfer-leader [--config FILE] [--to N] [--timeout S]
    seqd cluster raise-version [--config FILE] [--to V] [--timeout S]

Like `seqd status` and `seqd snapshot`, the tool talks to its local node through shared memory,
never a socket: it writes `raft.transfer.request` (its one writer is this tool, owner `operator`
in daemon/layout.py), the replicator acts on it in its next tick's pass (within a tick on a leader; up to
`QUIET_PASS_S`, 0.1 s, on an idle follower, which answers NOT_LEADER) and echoes the
value in `raft.transfer.handled` after setting `raft.transfer.outcome`; the tool then watches
the outcome and the node's `raft.leader` until leadership has moved or the timeout passes. Why
the counters: the request needs no reply beyond what the counters show anyway, it reaches the
replicator without a new listener or a new frame in the client protocol, and it works when the
node's socket is busy or its sessions are full. Two operators asking at the same moment: the
later request replaces the earlier (one counter), and the earlier tool says so.

`raise-version` works the same way (`app.version.raise_request`, owner `operator`): the
sequencer sequences an ADMIN raise_version record (like any input, so it takes effect at one
index on every node), echoes the request in `app.version.raise_handled`, and the tool waits for
the blp's `app.version.active` to reach the version, or for `app.version.raises_refused` to grow
(a member's code does not know it: the node's log names which). docs/evolution.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

from daemon.config import Config, load_config
from daemon.layout import (
    APP_VERSION_ACTIVE,
    APP_VERSION_RAISE_HANDLED,
    APP_VERSION_RAISE_REQUEST,
    APP_VERSION_RAISES_REFUSED,
    OPERATOR,
    RAFT_LEADER,
    RAFT_ROLE,
    RAFT_TERM,
    RAFT_TRANSFER_HANDLED,
    RAFT_TRANSFER_OUTCOME,
    RAFT_TRANSFER_REQUEST,
    RAFT_TRANSFER_TARGET_BITS,
    CounterView,
    TransferOutcome,
    attach_counters,
)
from ipc.segment import SegmentError
from sequencer.raft.raft_role import RaftRole

__all__ = ["TRANSFER_POLL_S", "TRANSFER_TIMEOUT_S", "add_cluster_commands", "raise_version", "transfer_leader"]

_VERSION_BITS = 16  # app.version.raise_request: number << 16 | version (VERSION_MAX is 0xFFFF)

# A transfer takes a catch-up round trip and an election round; the replicator gives it up after
# an election timeout (300..600 ms by default). The default wait covers a slow catch-up on a
# loaded machine and still fails fast enough for a script to act on.
TRANSFER_TIMEOUT_S = 10.0
TRANSFER_POLL_S = 0.01

EXIT_OK = 0
EXIT_FAILED = 1  # not the leader, unknown target, timed out, aborted: the message says which


def _attach_as_operator(node: str, say: Callable[[str], None]) -> CounterView | None:
    """The node's counters as the operator tools' owner, or None (said why) if it is not running."""
    try:
        return CounterView(attach_counters(node), owner=OPERATOR)
    except (SegmentError, FileNotFoundError) as error:
        say(f"seqd: node {node} is not running ({error})")
        return None


def _next_request(previous: int, value_bits: int, value: int) -> int:
    """An operator request counter's next value: the request number above the previous one,
    shifted past the `value_bits` that carry `value` (so each request is told from the last)."""
    return (((previous >> value_bits) + 1) << value_bits) | value


def transfer_leader(config: Config, target: int, timeout_s: float, say: Callable[[str], None],
                    clock: Callable[[], float] = time.monotonic) -> int:  # fmt: skip
    """Hand the leadership of the cluster from this node to `target` (0: the most caught-up
    follower). Returns EXIT_OK once another node leads (`target` if given), else EXIT_FAILED with
    one line through `say` naming what went wrong and what to do."""
    node, number = config.node.name, config.node.number
    if config.cluster is None:
        say(f"seqd: node {node} is a single node (no [cluster] in its config): there is no leadership to transfer")
        return EXIT_FAILED
    members = tuple(member.id for member in config.cluster.members)
    if target and (target not in members or target == number):
        others = ", ".join(str(m) for m in members if m != number)
        say(f"seqd: cannot hand leadership to node {target}: "
            f"{'that is this node' if target == number else 'it is not a member'}; the other members are {others}")
        return EXIT_FAILED
    counters = _attach_as_operator(node, say)
    if counters is None:
        return EXIT_FAILED
    try:
        return _transfer(counters, number, target, timeout_s, say, clock)
    finally:
        counters.close()


def _transfer(counters: CounterView, number: int, target: int, timeout_s: float,
              say: Callable[[str], None], clock: Callable[[], float]) -> int:  # fmt: skip
    role, term, leader = counters[RAFT_ROLE], counters[RAFT_TERM], counters[RAFT_LEADER]
    if role.get() != RaftRole.LEADER:
        say(_not_leader(number, role.get(), term.get(), leader.get()))
        return EXIT_FAILED
    request_counter = counters[RAFT_TRANSFER_REQUEST]
    request = _next_request(request_counter.get(), RAFT_TRANSFER_TARGET_BITS, target)
    start_term = term.get()
    request_counter.set(request)
    handled, outcome = counters[RAFT_TRANSFER_HANDLED], counters[RAFT_TRANSFER_OUTCOME]
    deadline = clock() + timeout_s
    acted = False
    while clock() < deadline:
        if not acted and handled.get() == request:
            acted = True
            answer = TransferOutcome(outcome.get())
            if answer is TransferOutcome.NOT_LEADER:
                say(_not_leader(number, role.get(), term.get(), leader.get()))
                return EXIT_FAILED
            if answer is TransferOutcome.UNKNOWN_TARGET:
                say(f"seqd: node {number} refused: node {target} is not another member of its cluster")
                return EXIT_FAILED
            if answer is TransferOutcome.NO_FOLLOWER:
                say(f"seqd: node {number} has heard from no follower within an election timeout: "
                    "there is no one to hand leadership to; start or reconnect the others first")
                return EXIT_FAILED
        if acted:
            now_leader = leader.get()
            if role.get() != RaftRole.LEADER and now_leader not in (0, number):
                if target and now_leader != target:
                    say(f"seqd: leadership moved, but to node {now_leader} (term {term.get()}), not node "
                        f"{target}: another election overtook the transfer; run it again on node {now_leader}")
                    return EXIT_FAILED
                say(f"leadership moved from node {number} to node {now_leader} (term {start_term} -> {term.get()})")
                return EXIT_OK
            if outcome.get() == TransferOutcome.ABORTED and role.get() == RaftRole.LEADER:
                say(f"seqd: the transfer did not complete within an election timeout (the target did not catch "
                    f"up or did not win); node {number} leads again and accepts commands. Check the "
                    "followers' lag in `seqd status`, then retry")
                return EXIT_FAILED
        elif handled.get() != request and (request_counter.get() != request):
            say("seqd: another transfer request replaced this one (two operators at once); see `seqd status`")
            return EXIT_FAILED
        time.sleep(TRANSFER_POLL_S)
    if not acted:
        say(f"seqd: node {number}'s replicator did not take the request within {timeout_s:g} s "
            "(is it running? see `seqd status`)")
    else:
        say(f"seqd: leadership had not moved after {timeout_s:g} s (node {number} is "
            f"{RaftRole(role.get()).name.lower()}, leader {leader.get() or 'unknown'}); see `seqd status`")
    return EXIT_FAILED


def _not_leader(number: int, role: int, term: int, leader: int) -> str:
    where = f"node {leader} leads: run this on its machine" if leader not in (0, number) else \
        "no leader is known (an election is under way): retry in a second"
    return (f"seqd: node {number} is not the leader ({RaftRole(role).name.lower().replace('_', '-')}, "
            f"term {term}); {where}")


def raise_version(config: Config, version: int, timeout_s: float, say: Callable[[str], None],
                  clock: Callable[[], float] = time.monotonic) -> int:  # fmt: skip
    """Make app schema `version` (0: this node's app's) active on the whole log, through this
    node. Returns EXIT_OK once it is active here, else EXIT_FAILED with one line."""
    from sequencer.state_machine import load_app

    node = config.node.name
    code_version = load_app(config.node.app).schema.version
    version = version or code_version
    if version > code_version:
        say(f"seqd: node {node}'s app knows versions up to {code_version}: install the app version that "
            f"knows version {version} on every node first")
        return EXIT_FAILED
    counters = _attach_as_operator(node, say)
    if counters is None:
        return EXIT_FAILED
    try:
        active, refused = counters[APP_VERSION_ACTIVE], counters[APP_VERSION_RAISES_REFUSED]
        if active.get() >= version:
            say(f"app version {active.get()} is active already (asked for {version}): nothing to do")
            return EXIT_OK
        refused_before = refused.get()
        request_counter = counters[APP_VERSION_RAISE_REQUEST]
        request = _next_request(request_counter.get(), _VERSION_BITS, version)
        request_counter.set(request)
        handled = counters[APP_VERSION_RAISE_HANDLED]
        deadline = clock() + timeout_s
        while clock() < deadline:
            if active.get() >= version:
                say(f"app version {version} is active on node {node} (and from the same index on every node)")
                return EXIT_OK
            if handled.get() == request and refused.get() > refused_before:
                say(f"seqd: the raise to version {version} was refused: not every member's code knows it "
                    f"(node {node}'s log names the nodes). Upgrade and restart them, then raise again")
                return EXIT_FAILED
            time.sleep(TRANSFER_POLL_S)
        say(f"seqd: version {version} was not active after {timeout_s:g} s "
            f"({'sequenced' if handled.get() == request else 'not even sequenced'}: does the cluster have a "
            "leader? see `seqd status`)")
        return EXIT_FAILED
    finally:
        counters.close()


def command_raise_version(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    return raise_version(config, args.to, args.timeout, lambda line: print(
        line, file=sys.stderr if line.startswith("seqd:") else sys.stdout))


def command_transfer_leader(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    return transfer_leader(config, args.to, args.timeout, lambda line: print(
        line, file=sys.stderr if line.startswith("seqd:") else sys.stdout))


def add_cluster_commands(commands: Any, add_config_arguments: Callable[[argparse.ArgumentParser], None]) -> None:
    cluster = commands.add_parser("cluster", help="operate a cluster through this machine's node (docs/cluster.md)")
    actions = cluster.add_subparsers(dest="action", required=True, metavar="ACTION")
    transfer = actions.add_parser(
        "transfer-leader", help="hand leadership from this node (the leader) to another, e.g. before a restart"
    )
    add_config_arguments(transfer)
    transfer.add_argument("--to", type=int, default=0, metavar="N",
                          help="the member to hand leadership to (default: the most caught-up follower)")
    transfer.add_argument("--timeout", type=float, default=TRANSFER_TIMEOUT_S, metavar="S",
                          help=f"give up after this many seconds (default {TRANSFER_TIMEOUT_S:g})")
    transfer.set_defaults(func=command_transfer_leader)
    raising = actions.add_parser(
        "raise-version", help="make a new app version active on every node, once every node runs code that knows it"
    )
    add_config_arguments(raising)
    raising.add_argument("--to", type=int, default=0, metavar="V",
                         help="the app schema version (default: the version of this node's app)")
    raising.add_argument("--timeout", type=float, default=TRANSFER_TIMEOUT_S, metavar="S",
                         help=f"give up after this many seconds (default {TRANSFER_TIMEOUT_S:g})")
    raising.set_defaults(func=command_raise_version)
