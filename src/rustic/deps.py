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


class DependencyScopes:
    """The dependencies one guild has built: guild-scoped ones shared by every agent,
    agent-scoped ones owned by a single agent and closed when it stops."""

    def __init__(self, guild_id: str, guild_map: dict[str, DependencySpec]) -> None:
        self.guild_id = guild_id
        self.guild_map = guild_map
        self._lock = threading.Lock()
        self.guild_scoped: dict[str, Any] = {}  # guarded by `_lock`
        self.agent_scoped: dict[str, dict[str, Any]] = {}  # by agent id; guarded by `_lock`

    def resolve(
        self, name: str, agent_id: str, agent_map: dict[str, DependencySpec], fresh: bool = False
    ) -> Any:
        """The object injected as ``name`` into ``agent_id``; built once per scope.

        ``fresh`` builds an agent-scoped dependency anew without keeping it: a hot swap
        whose spec changed that dependency adopts it only if the swap succeeds.
        """
        own = agent_map.get(name)
        with self._lock:
            if own is not None and own.scope != "guild":
                if fresh:
                    return resolve_dependency(own, self.guild_id, agent_id)
                owned = self.agent_scoped.setdefault(agent_id, {})
                if name not in owned:
                    owned[name] = resolve_dependency(own, self.guild_id, agent_id)
                return owned[name]
            spec = own or self.guild_map.get(name)
            if spec is None:
                known = sorted({*agent_map, *self.guild_map}) or ["none"]
                raise LookupError(
                    f"agent {agent_id!r}: parameter {name!r} names no dependency "
                    f"(dependency_map has: {', '.join(known)})"
                )
            if name not in self.guild_scoped:
                self.guild_scoped[name] = resolve_dependency(spec, self.guild_id, None)
            return self.guild_scoped[name]

    def adopt(self, agent_id: str, dependencies: dict[str, Any]) -> None:
        """Keep agent-scoped dependencies built ``fresh`` for a hot swap as the agent's own."""
        if dependencies:
            with self._lock:
                self.agent_scoped.setdefault(agent_id, {}).update(dependencies)

    def close_agent(self, agent_id: str) -> list[str]:
        """Close what ``agent_id`` owns; returns the names of those whose close failed."""
        with self._lock:
            owned = self.agent_scoped.pop(agent_id, {})
        return [
            f"{agent_id}.{name}" for name, obj in owned.items() if not close_dependency(name, obj)
        ]

    def close_all(self) -> list[str]:
        """Close every agent's dependencies, then the guild's; returns the failures."""
        with self._lock:
            agents = list(self.agent_scoped)
        failed = [name for agent_id in agents for name in self.close_agent(agent_id)]
        with self._lock:
            shared, self.guild_scoped = self.guild_scoped, {}
        return failed + [name for name, obj in shared.items() if not close_dependency(name, obj)]
