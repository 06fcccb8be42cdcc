"""Immutable messages and their time-ordered 64-bit ids."""

from __future__ import annotations

import json
import os
import random
import threading
import time
from typing import Any, NamedTuple

from pydantic import BaseModel

# An id is 41 bits of milliseconds since EPOCH_MS, 10 bits of node and 12 bits of sequence.
# The node is drawn at random per process (and again after a fork), so two processes that
# publish in the same millisecond collide only if they drew the same node: 1 in 1,024.
EPOCH_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z
_NODE_BITS = 10
_SEQ_BITS = 12
_SEQ_MASK = (1 << _SEQ_BITS) - 1


class _IdGenerator:
    """Hands out strictly increasing ids; borrows the next millisecond when one runs out."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reseed()

    def _reseed(self) -> None:
        self._node = (random.getrandbits(_NODE_BITS) ^ os.getpid()) & ((1 << _NODE_BITS) - 1)
        self._last_ms = 0  # guarded by `_lock`
        self._seq = 0  # guarded by `_lock`

    def next(self) -> int:
        now = time.time_ns() // 1_000_000 - EPOCH_MS
        with self._lock:
            if now > self._last_ms:
                self._last_ms = now
                self._seq = 0
            else:
                self._seq += 1
                if self._seq > _SEQ_MASK:
                    self._last_ms += 1
                    self._seq = 0
            return (
                (self._last_ms << (_NODE_BITS + _SEQ_BITS)) | (self._node << _SEQ_BITS) | self._seq
            )


_ids = _IdGenerator()
os.register_at_fork(after_in_child=_ids._reseed)


def new_id() -> int:
    """Return a fresh message id, larger than every id this process handed out before."""
    return _ids.next()


def id_timestamp(message_id: int) -> float:
    """Return the Unix time, in seconds, at which ``message_id`` was made."""
    return ((message_id >> (_NODE_BITS + _SEQ_BITS)) + EPOCH_MS) / 1000.0


class Message(NamedTuple):
    """One message on the bus; immutable, cheap to create and to pass between threads.

    ``payload`` is JSON-able data (a dict for pydantic payloads). ``format`` names the
    payload's model (``module.ClassName``) so that receivers can pick their handlers.
    ``thread`` is the id of the first message of the conversation.
    """

    id: int
    topic: str
    sender: str
    format: str
    payload: Any
    in_response_to: int | None = None
    thread: int | None = None

    @property
    def created_at(self) -> float:
        """Unix time at which the message was made, read off its id."""
        return id_timestamp(self.id)

    def to_dict(self) -> dict[str, Any]:
        """Return the message as a JSON-able dict."""
        return self._asdict()

    def to_json(self) -> str:
        """Return the message as one line of JSON."""
        return json.dumps(self._asdict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Message:
        """Rebuild a message from :meth:`to_dict` output."""
        return cls(
            id=int(data["id"]),
            topic=data["topic"],
            sender=data["sender"],
            format=data["format"],
            payload=data.get("payload"),
            in_response_to=data.get("in_response_to"),
            thread=data.get("thread"),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Message:
        """Rebuild a message from :meth:`to_json` output."""
        return cls.from_dict(json.loads(text))


class ErrorReport(BaseModel):
    """Published on the guild's error topic each time a handler raises."""

    guild_id: str
    agent_id: str
    message_id: int
    message_format: str
    handler: str
    error_type: str
    error: str
    attempt: int
    final: bool
