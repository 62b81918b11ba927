"""Random client ids, from the operating system's entropy (kept out of the I/O-free session core)."""

from __future__ import annotations

import random
from typing import Final

__all__ = ["new_client_id"]

# Client ids are unsigned 64-bit on the wire; random ones use 63 bits so they also fit a signed
# 64-bit column in whatever the application stores them in.
_CLIENT_ID_BITS: Final = 63


def new_client_id() -> int:
    """A random client id. Store it and pass it again after a restart to keep exactly-once."""
    return random.SystemRandom().randrange(1, 1 << _CLIENT_ID_BITS)
