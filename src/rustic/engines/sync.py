"""``SyncExecutionEngine``: every handler on the thread that drives the guild, in order."""

from __future__ import annotations

import threading
import time
from collections import deque

from rustic.engines.local import LocalEngine
from rustic.wrapper import AgentWrapper


class SyncExecutionEngine(LocalEngine):
    """Runs handlers on the calling thread, one message at a time; deterministic.

    Nothing runs until a thread drives the engine with :meth:`run_until_idle` (the
    guild's ``run_until_idle`` and ``stop`` do) or :meth:`serve` (the daemon does). Agents
    take turns in the order they received mail, each handling up to ``batch_size``
    messages per turn, so a given input always produces the same order of handling.
    Only one thread may drive the engine at a time.
    """

    name = "sync"

    def __init__(self, batch_size: int = 32) -> None:
        super().__init__()
        self.batch_size = batch_size
        self._ready: deque[AgentWrapper] = deque()
        self._wake = threading.Event()
        self._driving = threading.Lock()  # held by the one thread delivering right now

    def _enqueue(self, wrapper: AgentWrapper) -> None:
        self._ready.append(wrapper)
        self._wake.set()

    def run_until_idle(self, timeout: float | None = None) -> int:
        """Handle messages until no agent has mail (or ``timeout`` passes); returns how many."""
        deadline = None if timeout is None else time.monotonic() + timeout
        # Another thread may be driving (the daemon's main loop, say): wait our turn, but
        # never past the deadline, since that thread may be stuck in a handler.
        if not self._driving.acquire(timeout=-1 if timeout is None else timeout):
            return 0
        try:
            return self._deliver(deadline)
        finally:
            self._driving.release()

    def _deliver(self, deadline: float | None) -> int:
        ready = self._ready
        handled = 0
        while ready:
            wrapper = ready.popleft()
            if not self._begin_turn(wrapper):
                continue
            requeue = False
            try:
                handled += self._turn(wrapper)
            finally:
                # Runs even when a forced stop interrupts a handler, so that the agent
                # is not left marked as running.
                requeue = self._end_turn(wrapper)
            if requeue:
                ready.append(wrapper)
            if deadline is not None and time.monotonic() >= deadline:
                break
        return handled

    def serve(self, stop: threading.Event, poll: float = 0.1) -> None:
        """Drive the engine on this thread until ``stop`` is set."""
        while not stop.is_set():
            self._wake.clear()
            self.run_until_idle(timeout=poll)
            if not self._ready:
                self._wake.wait(poll)

    def wake(self) -> None:
        """Interrupt :meth:`serve`'s wait so that it notices a change at once."""
        self._wake.set()

    def wait_idle(self, timeout: float) -> bool:
        self.run_until_idle(timeout)
        return self._idle()

    def _home(self, wrapper: AgentWrapper) -> str:
        return "driver thread"
