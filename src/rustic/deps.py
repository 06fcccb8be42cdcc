"""Dependencies injected into handlers by parameter name, and resolvers that build them."""

from __future__ import annotations

import logging
import threading
from typing import Any

from rustic.imports import import_object
from rustic.spec import DependencySpec

logger = logging.getLogger(__name__)


class DependencyResolver:
    """Builds a dependency; subclass it when a plain ``Class(**properties)`` is not enough.

    The resolver is made with the spec's ``properties`` as keyword arguments, then asked
    for the object with ``resolve(guild_id, agent_id)``; ``agent_id`` is None for a
    guild-scoped dependency.
    """

    def __init__(self, **properties: Any) -> None:
        self.properties = properties

    def resolve(self, guild_id: str, agent_id: str | None) -> Any:
        """Return the object to inject."""
        raise NotImplementedError


def resolve_dependency(spec: DependencySpec, guild_id: str, agent_id: str | None) -> Any:
    """Build the object that ``spec`` describes for one guild (and agent)."""
    factory = import_object(spec.class_name)
    if isinstance(factory, type) and issubclass(factory, DependencyResolver):
        return factory(**spec.properties).resolve(guild_id, agent_id)
    return factory(**spec.properties)


def close_dependency(name: str, obj: Any) -> bool:
    """Call ``obj.close()`` if it has one; log and contain a failure. Returns success."""
    close = getattr(obj, "close", None)
    if not callable(close):
        return True
    try:
        close()
    except Exception:
        logger.exception("dependency close failed dependency=%s", name)
        return False
    return True


class KeyValueStore:
    """A small thread-safe in-process key-value store, handy as a shared dependency."""

    def __init__(self, **initial: Any) -> None:
        self._lock = threading.Lock()
        self._data: dict[str, Any] = dict(initial)  # guarded by `_lock`
        self.closed = False

    def get(self, key: str, default: Any = None) -> Any:
        """Return the value of ``key``, or ``default``."""
        with self._lock:
            return self._data.get(key, default)

    def set(self, key: str, value: Any) -> None:
        """Set ``key`` to ``value``."""
        with self._lock:
            self._data[key] = value

    def incr(self, key: str, by: int = 1) -> int:
        """Add ``by`` to the integer at ``key`` (0 when missing) and return it."""
        with self._lock:
            value = int(self._data.get(key, 0)) + by
            self._data[key] = value
            return value

    def close(self) -> None:
        """Mark the store closed; the guild calls this at shutdown."""
        self.closed = True
