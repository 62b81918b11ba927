"""A Unix socket a seqd process serves clients on: created safely, and its peers checked.

Shared by the sequencer (the node's socket) and the query replicas (their own sockets).
"""

from __future__ import annotations

import os
import socket
import stat
import struct
from pathlib import Path
from typing import Final

from daemon.config import SocketConfig
from daemon.exits import ExitCode, FatalError

__all__ = ["bind_unix_socket", "peer_allowed", "peer_credentials"]

_PEER_CREDENTIALS: Final = struct.Struct("3i")  # SO_PEERCRED's struct ucred: pid, uid, gid
# When SO_PEERCRED cannot be read: a uid and gid that no config allows, so the peer is refused.
_PEER_UNKNOWN: Final = (0, -1, -1)


def bind_unix_socket(path: Path, config_field: str, backlog: int) -> socket.socket:
    """Create a listening socket at `path` (its directory 0750 when created, the socket 0660),
    replacing a stale socket of a dead process.

    Raises:
        FatalError: the path is taken (not a socket, or served by another process) or may not be
            created; the message names the path and `config_field`.
    """
    directory = path.parent
    try:
        if not directory.exists():
            directory.mkdir(mode=0o750, parents=True)
            os.chmod(directory, 0o750)
    except OSError as error:
        raise FatalError.from_os_error(error, f"create the socket directory {directory}", config_field) from error
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise FatalError(
                ExitCode.CANTCREAT, f"{path} exists and is not a socket: remove it or choose another {config_field}"
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            try:
                path.unlink()  # a stale socket of a dead process
            except OSError as error:
                raise FatalError.from_os_error(error, f"remove the stale socket {path}", config_field) from error
        else:
            raise FatalError(
                ExitCode.CANTCREAT, f"another process is serving {path}: stop it or choose another {config_field}"
            )
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    previous = os.umask(0o117)  # the socket file is born 0660: no window with wider access
    try:
        sock.bind(str(path))
        os.chmod(path, 0o660)
    except OSError as error:
        sock.close()
        raise FatalError.from_os_error(error, f"create the socket {path}", config_field) from error
    finally:
        os.umask(previous)
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer of a connected Unix socket (SO_PEERCRED)."""
    try:
        return _PEER_CREDENTIALS.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEER_CREDENTIALS.size)
        )
    except OSError:
        return _PEER_UNKNOWN


def peer_allowed(uid: int, gid: int, config: SocketConfig) -> bool:
    """The daemon's own uid, or one `socket.allowed_uids`/`allowed_gids` names."""
    return uid == os.getuid() or uid in config.allowed_uids or gid in config.allowed_gids
