"""Execution engines, selectable by name: sync, multithreaded, asyncio, multiprocess, ray."""

from __future__ import annotations

import threading
from importlib.metadata import entry_points
from typing import Any

from rustic.engines.aio import AsyncioExecutionEngine
from rustic.engines.base import AgentInfo, AgentState, BaseExecutionEngine, EngineReport
from rustic.engines.processes import MultiprocessExecutionEngine
from rustic.engines.ray import RayExecutionEngine
from rustic.engines.sync import SyncExecutionEngine
from rustic.engines.threads import MultithreadedExecutionEngine
from rustic.imports import import_object
from rustic.spec import EngineSpec

__all__ = [
    "AgentInfo",
    "AgentState",
    "AsyncioExecutionEngine",
    "BaseExecutionEngine",
    "EngineError",
    "EngineReport",
    "EngineSet",
    "MultiprocessExecutionEngine",
    "MultithreadedExecutionEngine",
    "RayExecutionEngine",
    "SyncExecutionEngine",
    "create_engine",
    "engine_names",
]

# Built-in engines by name, as ``module:Class`` so that optional ones import only when used.
BUILTIN_ENGINES = {
    "sync": "rustic.engines.sync:SyncExecutionEngine",
    "multithreaded": "rustic.engines.threads:MultithreadedExecutionEngine",
    "asyncio": "rustic.engines.aio:AsyncioExecutionEngine",
    "multiprocess": "rustic.engines.processes:MultiprocessExecutionEngine",
    "ray": "rustic.engines.ray:RayExecutionEngine",
}
ENTRY_POINT_GROUP = "rustic.engines"


class EngineError(ValueError):
    """An engine name or class that cannot be used."""


def engine_names() -> list[str]:
    """Every engine name that ``create_engine`` accepts, built-in first."""
    plugins = sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    return [*BUILTIN_ENGINES, *(name for name in plugins if name not in BUILTIN_ENGINES)]


def engine_class(name: str) -> type[BaseExecutionEngine]:
    """Find the engine class for a built-in name, an entry point or ``pkg.module:Class``."""
    target: Any
    if name in BUILTIN_ENGINES:
        target = import_object(BUILTIN_ENGINES[name])
    elif matches := entry_points(group=ENTRY_POINT_GROUP, name=name):
        target = next(iter(matches)).load()
    elif ":" in name or "." in name:
        try:
            target = import_object(name)
        except ImportError as exc:
            raise EngineError(f"engine {name!r}: {exc}") from exc
    else:
        raise EngineError(
            f"unknown engine {name!r} (expected one of {', '.join(engine_names())}, "
            "or pkg.module:Class)"
        )
    if not (isinstance(target, type) and issubclass(target, BaseExecutionEngine)):
        raise EngineError(
            f"engine {name!r} is {target!r}, which does not implement "
            "rustic.engines.BaseExecutionEngine"
        )
    if getattr(target, "__abstractmethods__", None):
        missing = ", ".join(sorted(target.__abstractmethods__))
        raise EngineError(f"engine {name!r} does not implement the contract: missing {missing}")
    return target


def create_engine(spec: EngineSpec | str) -> BaseExecutionEngine:
    """Build the engine that ``spec`` (or an engine name) describes."""
    if isinstance(spec, str):
        spec = EngineSpec(engine=spec)
    cls = engine_class(spec.engine)
    return cls.from_spec(spec)


class EngineSet:
    """The engines of one guild: one per distinct engine spec, plus any passed in built."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._engines: list[BaseExecutionEngine] = []  # guarded by `_lock`
        self._by_spec: dict[str, BaseExecutionEngine] = {}  # guarded by `_lock`

    def get(self, engine: BaseExecutionEngine | EngineSpec | str) -> BaseExecutionEngine:
        """The engine for ``engine``: the instance itself, or the one built for that spec."""
        if isinstance(engine, BaseExecutionEngine):
            with self._lock:
                if not any(known is engine for known in self._engines):
                    self._engines.append(engine)
            return engine
        spec = EngineSpec(engine=engine) if isinstance(engine, str) else engine
        key = spec.model_dump_json()
        with self._lock:
            found = self._by_spec.get(key)
            if found is None:
                found = self._by_spec[key] = create_engine(spec)
                self._engines.append(found)
            return found

    def all(self) -> list[BaseExecutionEngine]:
        """Every engine, in the order the guild first used them."""
        with self._lock:
            return list(self._engines)
