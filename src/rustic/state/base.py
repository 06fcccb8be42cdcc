"""The state store contract, RFC 7386 merge patch and the per-key `StateHandle`."""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from typing import Any

logger = logging.getLogger(__name__)


def state_key_for_agent(guild_id: str, agent_id: str) -> str:
    """Return the store key holding the state of agent `agent_id` in guild `guild_id`."""
    return f"agent:{guild_id}:{agent_id}"


def state_key_for_guild(guild_id: str) -> str:
    """Return the store key holding the shared state of guild `guild_id`."""
    return f"guild:{guild_id}"


def _json_copy(value: Any) -> Any:
    """Copy a JSON-shaped value: dicts and lists are rebuilt, everything else is shared.

    Much faster than `copy.deepcopy` because scalars (str, int, float, bool, None) are
    immutable and need no copying or memo bookkeeping.
    """
    if isinstance(value, dict):
        return {name: _json_copy(item) for name, item in value.items()}
    if isinstance(value, list):
        return [_json_copy(item) for item in value]
    return value


def _copy_document(data: dict[str, Any]) -> dict[str, Any]:
    """Copy a state document with `_json_copy`, keeping its dict type for the checker."""
    return {name: _json_copy(value) for name, value in data.items()}


def merge_patch(target: Any, patch: Any) -> Any:
    """Apply an RFC 7386 JSON merge patch to `target` and return the result.

    A dict patch merges key by key: a `None` value deletes the key, any other value is
    merged recursively. A patch that is not a dict replaces the target. Neither argument is
    mutated and the result shares no dict or list with them.
    """
    if not isinstance(patch, dict):
        return _json_copy(patch)
    base: dict[str, Any] = target if isinstance(target, dict) else {}

    # keys the patch does not mention are carried over unchanged
    result = {name: _json_copy(value) for name, value in base.items() if name not in patch}

    # keys the patch mentions are deleted (None) or merged
    for name, value in patch.items():
        if value is not None:
            result[name] = merge_patch(base.get(name), value)
    return result


class StateStore(ABC):
    """Contract for a state backend: JSON documents with a version, stored by key.

    Every method must be safe to call from several threads at once. A store keeps no
    reference to the dicts it is given or returns: callers may mutate them freely.
    """

    @abstractmethod
    def load(self, key: str) -> tuple[dict[str, Any], int]:
        """Return the document stored under `key` and its version, or `({}, 0)` if absent."""

    @abstractmethod
    def save(self, key: str, data: dict[str, Any], version: int) -> None:
        """Store `data` as the whole document under `key`, with `version`, in one atomic write.

        `data` must be JSON-serialisable. The store does not compare versions: the last
        write wins.
        """

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the document under `key`; a missing key is not an error."""

    @abstractmethod
    def keys(self, prefix: str = "") -> list[str]:
        """Return the stored keys that start with `prefix`, sorted."""

    @abstractmethod
    def close(self) -> None:
        """Release the store's connections; calling it twice is harmless."""


class StateHandle:
    """An open view of one key of a state store, as used by an agent or by the guild.

    The document is loaded lazily on first use and then cached: the handle assumes it is
    the only writer of its key. Another handle or process writing the same key is neither
    seen nor detected, and its writes are overwritten by this handle's next update.

    A handle holds no reference to its agent, so it can be re-attached to the new instance
    when the agent is hot-swapped.
    """

    def __init__(self, store: StateStore, key: str) -> None:
        self._store = store
        self._key = key
        self._lock = threading.Lock()
        self._loaded = False  # guarded by `_lock`
        self._data: dict[str, Any] = {}  # guarded by `_lock`
        self._version = 0  # guarded by `_lock`

    @property
    def key(self) -> str:
        """The store key this handle reads and writes."""
        return self._key

    @property
    def version(self) -> int:
        """The version of the current document: 0 before the first write, then +1 per write."""
        with self._lock:
            self._ensure_loaded()
            return self._version

    def get(self) -> dict[str, Any]:
        """Return a copy of the current document; mutating it does not change the state."""
        with self._lock:
            self._ensure_loaded()
            return _copy_document(self._data)

    def update(self, patch: dict[str, Any]) -> dict[str, Any]:
        """Apply an RFC 7386 merge patch, save it as the next version, and return a copy."""
        if not isinstance(patch, dict):
            raise TypeError(f"a state patch must be a dict: got {type(patch).__name__}")
        with self._lock:
            self._ensure_loaded()
            return self._write(merge_patch(self._data, patch))

    def replace(self, data: dict[str, Any]) -> dict[str, Any]:
        """Store `data` as the whole document, as the next version, and return a copy."""
        if not isinstance(data, dict):
            raise TypeError(f"a state document must be a dict: got {type(data).__name__}")
        with self._lock:
            self._ensure_loaded()
            return self._write(_copy_document(data))

    def _ensure_loaded(self) -> None:
        """Load the document from the store the first time; caller holds `_lock`."""
        if self._loaded:
            return
        self._data, self._version = self._store.load(self._key)
        self._loaded = True
        logger.debug("state loaded version=%d key=%s", self._version, self._key)

    def _write(self, data: dict[str, Any]) -> dict[str, Any]:
        """Save `data` as the next version, then adopt it; caller holds `_lock`.

        The cached document changes only after the store accepted the write, so a failed
        save leaves the handle as it was.
        """
        version = self._version + 1
        self._store.save(self._key, data, version)
        self._data, self._version = data, version
        return _copy_document(data)
