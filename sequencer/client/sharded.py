"""`ShardedClient`: the client of a sharded ledger, routing each command to its account's shard.

    with ShardedClient([shard0_socket, shard1_socket, shard2_socket]) as client:
        client.init_shards()                        # once, when the shards are new
        client.call(OpenAccount("alice"))           # to shard_of("alice", 3)
        client.call(Transfer("alice", "bob", 5))    # one Transfer, or a SendTransfer saga

A transfer between accounts of one shard is one `Transfer` command on that shard; across shards
it is a `SendTransfer` on the source's shard, answered `TransferPending` at once; the rest of
the saga runs through the logs and the bridges (`sequencer/apps/sharded_ledger.py`). One
`Client` per shard, opened on first use, each with its own client id (exactly-once per shard).
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

from sequencer.apps.ledger import Transfer
from sequencer.apps.sharded_ledger import (
    SHARDED_LEDGER_SCHEMA,
    TRANSFER_TIMEOUT_MS_DEFAULT,
    InitShard,
    SendTransfer,
    shard_of,
)

from .blocking import Client, PendingRequest

__all__ = ["ShardedClient"]


class ShardedClient:
    """Routes the sharded ledger's commands to their shards.

    Args:
        socket_paths: shard k's node socket at position k (their number is the shard count).
        transfer_timeout_ms: a cross-shard transfer's deadline (refunded when no credit came).
        client_args: passed to each shard's `Client` (timeout_s, in_flight_max, ...).
    """

    def __init__(self, socket_paths: list[str], *,
                 transfer_timeout_ms: int = TRANSFER_TIMEOUT_MS_DEFAULT, **client_args: Any) -> None:  # fmt: skip
        if not socket_paths:
            raise ValueError("a sharded ledger has at least one shard: pass its socket")
        self.socket_paths = list(socket_paths)
        self.shard_count = len(socket_paths)
        self.transfer_timeout_ms = transfer_timeout_ms
        self.client_args = client_args
        self._clients: list[Client | None] = [None] * self.shard_count

    def shard_of(self, account: str) -> int:
        return shard_of(account, self.shard_count)

    def client(self, shard: int) -> Client:
        """Shard `shard`'s client (connected on first use)."""
        client = self._clients[shard]
        if client is None:
            client = Client(self.socket_paths[shard], schema=SHARDED_LEDGER_SCHEMA, **self.client_args)
            self._clients[shard] = client
        return client

    def init_shards(self) -> None:
        """Tell each node which shard it is (idempotent; refused if a node is another shard)."""
        for shard in range(self.shard_count):
            self.client(shard).call(InitShard(shard, self.shard_count))

    def route(self, command: Any) -> tuple[int, Any]:
        """The shard a command goes to, and the command to send there (a cross-shard Transfer
        becomes a SendTransfer)."""
        if isinstance(command, Transfer):
            source_shard = self.shard_of(command.source)
            if source_shard != self.shard_of(command.target):
                return source_shard, SendTransfer(command.source, command.target, command.amount,
                                                  self.transfer_timeout_ms)  # fmt: skip
            return source_shard, command
        if isinstance(command, SendTransfer):
            return self.shard_of(command.source), command
        account = getattr(command, "account", None)
        if not isinstance(account, str):
            raise TypeError(f"{type(command).__name__} names no account to route it by: send it "
                            "to one shard with client(shard).call(...)")  # fmt: skip
        return self.shard_of(account), command

    def submit(self, command: Any, timeout_s: float | None = None) -> PendingRequest:
        shard, routed = self.route(command)
        return self.client(shard).submit(routed, timeout_s)

    def call(self, command: Any, timeout_s: float | None = None) -> Any:
        return self.submit(command, timeout_s).result(timeout_s)

    def close(self) -> None:
        for client in self._clients:
            if client is not None:
                client.close()
        self._clients = [None] * self.shard_count

    def __enter__(self) -> ShardedClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:  # fmt: skip
        self.close()
