"""An in-process state store: fast, and gone when the process exits."""

from __future__ import annotations

import threading
from typing import Any

from rustic.state.base import StateStore, _copy_document


class MemoryStateStore(StateStore):
    """State kept in a dict of this process; nothing survives a restart."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._documents: dict[str, tuple[dict[str, Any], int]] = {}  # guarded by `_lock`

    def load(self, key: str) -> tuple[dict[str, Any], int]:
        """Return a copy of the document under `key` and its version, or `({}, 0)`."""
        with self._lock:
            data, version = self._documents.get(key, ({}, 0))
        return _copy_document(data), version

    def save(self, key: str, data: dict[str, Any], version: int) -> None:
        """Keep a copy of `data` under `key` with `version`."""
        document = _copy_document(data)
        with self._lock:
            self._documents[key] = (document, version)

    def delete(self, key: str) -> None:
        """Forget the document under `key`, if any."""
        with self._lock:
            self._documents.pop(key, None)

    def keys(self, prefix: str = "") -> list[str]:
        """Return the sorted keys starting with `prefix`."""
        with self._lock:
            return sorted(key for key in self._documents if key.startswith(prefix))

    def close(self) -> None:
        """Do nothing: the documents stay readable until the store is dropped."""
