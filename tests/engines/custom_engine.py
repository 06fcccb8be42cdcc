"""Example custom engines, selected by ``custom_engine:Class`` or by an entry point."""

from __future__ import annotations

import threading
from typing import Any

from rustic import BaseExecutionEngine, MultithreadedExecutionEngine
from rustic.wrapper import AgentWrapper


class CountingEngine(MultithreadedExecutionEngine):
    """The multithreaded engine, counting every message it dispatches."""

    name = "counting"

    def __init__(self, max_workers: int = 2, **knobs: Any) -> None:
        super().__init__(max_workers=max_workers, **knobs)
        self.dispatched = 0  # guarded by `_count_lock`
        self._count_lock = threading.Lock()

    def _turn(self, wrapper: AgentWrapper) -> int:
        handled = super()._turn(wrapper)
        with self._count_lock:
            self.dispatched += handled
        return handled


class NotAnEngine:
    """A class that has nothing to do with engines."""


class HalfEngine(BaseExecutionEngine):
    """An engine that implements only part of the contract."""

    def launch(self, wrapper: AgentWrapper) -> None:
        raise NotImplementedError
