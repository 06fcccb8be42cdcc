"""Per-agent and guild JSON state: `StateHandle` over a memory, SQLite or Redis store."""

from __future__ import annotations

from rustic.state.base import (
    StateHandle,
    StateStore,
    merge_patch,
    state_key_for_agent,
    state_key_for_guild,
)
from rustic.state.memory import MemoryStateStore
from rustic.state.redis import RedisStateStore
from rustic.state.sqlite import SqliteStateStore

__all__ = [
    "MemoryStateStore",
    "RedisStateStore",
    "SqliteStateStore",
    "StateHandle",
    "StateStore",
    "merge_patch",
    "open_state_store",
    "state_key_for_agent",
    "state_key_for_guild",
]

_ACCEPTED_FORMS = (
    "'memory', 'sqlite:///relative/path.db', 'sqlite:////absolute/path.db' "
    "or 'redis://host:port/db'"
)


def open_state_store(url: str) -> StateStore:
    """Open the state store that a guild spec's `state:` URL names.

    Accepted forms: `memory`; `sqlite:///relative.db` (relative to the working directory)
    or `sqlite:////abs/path.db`; `redis://host:port/db` (or `rediss://` for TLS), which
    needs the redis extra. Anything else raises `ValueError`.
    """
    scheme, sep, rest = url.partition("://")
    if url == "memory" or (scheme == "memory" and sep and not rest):
        return MemoryStateStore()
    if scheme == "sqlite" and rest.startswith("/") and rest != "/":
        # `sqlite:///a.db` leaves `/a.db` (relative), `sqlite:////a.db` leaves `//a.db`
        return SqliteStateStore(rest[1:])
    if scheme in {"redis", "rediss"} and rest:
        return RedisStateStore(url)
    raise ValueError(f"unknown state store URL {url!r}: expected {_ACCEPTED_FORMS}")
