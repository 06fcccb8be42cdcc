"""``MultithreadedExecutionEngine``: a pool of named threads, or a thread per agent."""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

from rustic.engines.base import thread_stack
from rustic.engines.local import LocalEngine
from rustic.spec import EngineSpec
from rustic.wrapper import AgentWrapper

logger = logging.getLogger(__name__)

_Queue = queue.SimpleQueue[AgentWrapper | None]


class MultithreadedExecutionEngine(LocalEngine):
    """Runs agents on threads named ``<thread_name_prefix><n>``.

    With the default pool, ``max_workers`` threads take turns serving whichever agents
    have mail; an agent is never on two threads at once. With ``dedicated_threads=True``
    each agent gets a thread of its own, named ``<thread_name_prefix><agent_id>``, and
    ``max_workers`` is ignored. Threads are daemons: a handler that never returns cannot
    keep the process alive, and ``shutdown`` names the threads that did not join.
    """

    name = "multithreaded"

    def __init__(
        self,
        max_workers: int = 8,
        thread_name_prefix: str = "rustic-worker-",
        dedicated_threads: bool = False,
        batch_size: int = 32,
    ) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, got {max_workers}")
        super().__init__()
        self.max_workers = max_workers
        self.thread_name_prefix = thread_name_prefix
        self.dedicated_threads = dedicated_threads
        self.batch_size = batch_size
        self._pool_queue: _Queue = queue.SimpleQueue()
        self._queues: dict[str, _Queue] = {}  # dedicated mode; guarded by `_cond`
        self._threads: dict[str, threading.Thread] = {}  # by name; guarded by `_cond`

    @classmethod
    def from_spec(cls, spec: EngineSpec) -> MultithreadedExecutionEngine:
        """Build the engine from ``max_workers``, ``thread_name_prefix``, ``dedicated_threads``."""
        knobs: dict[str, Any] = dict(spec.options)
        if spec.max_workers is not None:
            knobs["max_workers"] = spec.max_workers
        if spec.thread_name_prefix is not None:
            knobs["thread_name_prefix"] = spec.thread_name_prefix
        knobs["dedicated_threads"] = spec.dedicated_threads
        return cls(**knobs)

    def launch(self, wrapper: AgentWrapper) -> None:
        if self.dedicated_threads:
            self._start_dedicated(wrapper.agent_id)
        else:
            self._start_pool()
        super().launch(wrapper)

    def _enqueue(self, wrapper: AgentWrapper) -> None:
        if self.dedicated_threads:
            self._queues[wrapper.agent_id].put(wrapper)
        else:
            self._pool_queue.put(wrapper)

    def _start_pool(self) -> None:
        with self._cond:
            if self._threads:
                return
            for n in range(self.max_workers):
                self._spawn(f"{self.thread_name_prefix}{n}", self._pool_queue)

    def _start_dedicated(self, agent_id: str) -> None:
        with self._cond:
            work: _Queue = queue.SimpleQueue()
            self._queues[agent_id] = work
            self._spawn(f"{self.thread_name_prefix}{agent_id}", work)

    def _spawn(self, name: str, work: _Queue) -> None:
        # Caller holds `_cond`.
        thread = threading.Thread(target=self._work, args=(work,), name=name, daemon=True)
        self._threads[name] = thread
        thread.start()

    def _work(self, work: _Queue) -> None:
        """A worker's loop: take a scheduled agent, give it a turn, requeue it if it has more."""
        while (wrapper := work.get()) is not None:
            if not self._begin_turn(wrapper):
                continue
            try:
                self._turn(wrapper)
            finally:
                if self._end_turn(wrapper):
                    work.put(wrapper)

    def _forget(self, wrapper: AgentWrapper) -> None:
        with self._cond:
            work = self._queues.pop(wrapper.agent_id, None)
            thread = self._threads.pop(f"{self.thread_name_prefix}{wrapper.agent_id}", None)
        if work is not None and thread is not None:
            work.put(None)
            thread.join(timeout=1.0)

    def _join(self, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        with self._cond:
            threads = list(self._threads.values())
            queues = list(self._queues.values()) or [self._pool_queue]
        # One sentinel per thread that reads each queue, so each worker exits its loop.
        for work in queues:
            readers = 1 if self.dedicated_threads else len(threads)
            for _ in range(readers):
                work.put(None)
        not_joined = []
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                not_joined.append(thread.name)
                logger.error(
                    "worker did not join thread=%s stack=\n%s", thread.name, thread_stack(thread)
                )
        with self._cond:
            for thread in threads:
                if not thread.is_alive():
                    self._threads.pop(thread.name, None)
        return not_joined

    def _home(self, wrapper: AgentWrapper) -> str:
        if self.dedicated_threads:
            return f"{self.thread_name_prefix}{wrapper.agent_id}"
        return f"pool {self.thread_name_prefix}*"
