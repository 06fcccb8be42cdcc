"""``AsyncioExecutionEngine``: agents served by tasks on one event loop, sync handlers in a pool."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, ParamSpec, TypeVar

from rustic.engines.base import EngineReport, thread_stack
from rustic.engines.local import LocalEngine
from rustic.spec import EngineSpec
from rustic.wrapper import AgentWrapper

logger = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

LOOP_CLOSE_TIMEOUT = 1.0  # what cancelled tasks and the loop's default executor get at the end
JOIN_FLOOR = 0.1  # idle pool threads need a moment to see their sentinel, even past the deadline

_WorkItem = tuple["Future[Any]", Callable[[], Any]]


class HandlerPool(Executor):
    """A bounded pool of named daemon threads, for the handlers that must not block the loop.

    Threads start on demand, up to ``max_workers``. Unlike ``ThreadPoolExecutor`` they are
    daemons: a handler that never returns cannot keep the process from exiting, and
    :meth:`close` names the threads it could not join.
    """

    def __init__(self, max_workers: int, thread_name_prefix: str) -> None:
        if max_workers < 1:
            raise ValueError(f"executor_workers must be at least 1, got {max_workers}")
        self.max_workers = max_workers
        self.thread_name_prefix = thread_name_prefix
        self._work: queue.SimpleQueue[_WorkItem | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []  # guarded by `_lock`
        self._idle = 0  # threads waiting for work that no submit has claimed; guarded by `_lock`
        self._closed = False  # guarded by `_lock`

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """Run ``fn(*args, **kwargs)`` on a pool thread; the future gets its outcome."""
        future: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError(f"handler pool {self.thread_name_prefix!r} is closed")
            self._work.put((future, lambda: fn(*args, **kwargs)))
            if self._idle:
                self._idle -= 1
            elif len(self._threads) < self.max_workers:
                self._spawn()
        return future

    def close(self, timeout: float) -> list[threading.Thread]:
        """Let the threads finish what they run; return those still alive after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        for _ in threads:
            self._work.put(None)
        for thread in threads:
            thread.join(_left(deadline))
        return [thread for thread in threads if thread.is_alive()]

    def _spawn(self) -> None:
        # Caller holds `_lock`.
        name = f"{self.thread_name_prefix}{len(self._threads)}"
        thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _serve(self) -> None:
        """A pool thread's loop: run one call at a time until a sentinel arrives."""
        while (item := self._work.get()) is not None:
            future, call = item
            del item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(call())
                except BaseException as exc:
                    future.set_exception(exc)
            del future, call
            with self._lock:
                self._idle += 1


class AsyncioExecutionEngine(LocalEngine):
    """Runs agents on one event loop, on a daemon thread named ``thread_name_prefix``.

    Each agent with mail is served by one task at a time, so it handles one message at a
    time, in order. ``async def`` handlers are awaited on the loop: many IO-bound agents
    wait at once without a thread each. Sync handlers never run on the loop: they run in a
    pool of ``executor_workers`` daemon threads (``<thread_name_prefix>-sync-<n>``); an
    agent whose handlers are all sync hands a whole batch of up to ``batch_size`` messages
    to the pool in one hop. At most ``max_concurrency`` agents handle a message at once;
    the others wait their turn in order. The loop starts at the first launch.

    Limits: code on the loop must not block it (a sync call inside an ``async def``
    handler stalls every agent of the engine); and this engine's ``pause``, ``stop_agent``,
    ``wait_idle`` and ``shutdown`` wait for the loop, so they refuse to run on it.
    """

    name = "asyncio"

    def __init__(
        self,
        max_concurrency: int = 256,
        executor_workers: int = 8,
        thread_name_prefix: str = "rustic-asyncio",
        batch_size: int = 64,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        super().__init__()
        self.max_concurrency = max_concurrency
        self.thread_name_prefix = thread_name_prefix
        self.batch_size = batch_size
        self.pool = HandlerPool(executor_workers, f"{thread_name_prefix}-sync-")
        self._slots = asyncio.Semaphore(max_concurrency)  # bound to the loop at first wait
        self._loop: asyncio.AbstractEventLoop | None = None  # set once; guarded by `_cond`
        self._thread: threading.Thread | None = None  # the loop's thread; guarded by `_cond`
        self._tasks: dict[str, asyncio.Task[None]] = {}  # each agent's current turn; loop only

    @classmethod
    def from_spec(cls, spec: EngineSpec) -> AsyncioExecutionEngine:
        """Build the engine from ``max_concurrency``, ``max_workers`` (the sync pool), options."""
        knobs: dict[str, Any] = dict(spec.options)
        if spec.max_concurrency is not None:
            knobs["max_concurrency"] = spec.max_concurrency
        if spec.max_workers is not None:
            knobs["executor_workers"] = spec.max_workers
        if spec.thread_name_prefix is not None:
            knobs["thread_name_prefix"] = spec.thread_name_prefix
        return cls(**knobs)

    # -- the contract ------------------------------------------------------------------------

    def launch(self, wrapper: AgentWrapper) -> None:
        # Async shutdown and reload hooks run on the loop too, beside the handlers.
        wrapper.loop = self._start_loop()
        super().launch(wrapper)

    def stop_agent(self, agent_id: str, timeout: float) -> bool:
        self._refuse_on_loop("stop_agent")
        return super().stop_agent(agent_id, timeout)

    def pause(self, agent_id: str, timeout: float) -> bool:
        self._refuse_on_loop("pause")
        return super().pause(agent_id, timeout)

    def wait_idle(self, timeout: float) -> bool:
        self._refuse_on_loop("wait_idle")
        return super().wait_idle(timeout)

    def shutdown(self, timeout: float) -> EngineReport:
        self._refuse_on_loop("shutdown")
        return super().shutdown(timeout)

    # -- the loop ----------------------------------------------------------------------------

    def _start_loop(self) -> asyncio.AbstractEventLoop:
        """Start the loop's thread once, and wait until the loop runs."""
        with self._cond:
            if self._loop is not None:
                if self._loop.is_closed():
                    raise RuntimeError(f"{self!r} is shut down and launches no more agents")
                return self._loop
            loop = self._loop = asyncio.new_event_loop()
            running = threading.Event()
            loop.call_soon(running.set)
            self._thread = threading.Thread(
                target=self._run_loop, args=(loop,), name=self.thread_name_prefix, daemon=True
            )
            self._thread.start()
        running.wait()
        logger.debug("event loop started thread=%s", self.thread_name_prefix)
        return loop

    def _run_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop thread: run until ``_join`` stops it, then close what the loop owns."""
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(_close_default_executor(loop))
        finally:
            loop.close()

    def _on_loop(self) -> bool:
        thread = self._thread
        return thread is not None and thread.ident == threading.get_ident()

    def _refuse_on_loop(self, what: str) -> None:
        if self._on_loop():
            raise RuntimeError(
                f"{what}() waits for the event loop of {self!r}, so it cannot run on it; "
                "call it from another thread (loop.run_in_executor)"
            )

    # -- scheduling --------------------------------------------------------------------------

    def _enqueue(self, wrapper: AgentWrapper) -> None:
        # Agents scheduled by a handler on the loop start their turn without a wake-up.
        if self._on_loop():
            self._start_turn(wrapper)
        else:
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._start_turn, wrapper)

    def _start_turn(self, wrapper: AgentWrapper) -> None:
        """Give a scheduled agent a task that will serve one turn (on the loop)."""
        assert self._loop is not None
        task = self._loop.create_task(self._serve(wrapper), name=f"agent:{wrapper.agent_id}")
        self._tasks[wrapper.agent_id] = task

    async def _serve(self, wrapper: AgentWrapper) -> None:
        """One turn of one agent: wait for a slot, handle a batch, then hand the agent back."""
        try:
            await self._slots.acquire()
        except asyncio.CancelledError:
            self._abandon(wrapper)
            raise
        more = False
        try:
            if self._begin_turn(wrapper):
                more = await self._serve_turn(wrapper)
        finally:
            self._slots.release()
            if self._tasks.get(wrapper.agent_id) is asyncio.current_task():
                del self._tasks[wrapper.agent_id]

        # Back of the line: agents waiting for a slot go before this one's next batch.
        if more:
            self._start_turn(wrapper)

    async def _serve_turn(self, wrapper: AgentWrapper) -> bool:
        """Handle a batch of the claimed agent's mail; True when it has more to handle."""
        try:
            if any(handler.is_async for handler in type(wrapper.agent).handlers):
                await self._turn_on_loop(wrapper)
            else:
                await asyncio.get_running_loop().run_in_executor(self.pool, self._turn, wrapper)
        finally:
            more = self._end_turn(wrapper)
        return more

    async def _turn_on_loop(self, wrapper: AgentWrapper) -> None:
        """Handle up to ``batch_size`` messages, awaiting async handlers on the loop."""
        for _ in range(self.batch_size):
            message = wrapper.mailbox.get_nowait()
            if message is None:
                return
            await wrapper.dispatch_async(message, self.pool)
            if wrapper.paused or wrapper.stopped:
                return

    def _abandon(self, wrapper: AgentWrapper) -> None:
        """Unschedule an agent whose turn was cancelled before it began."""
        with self._cond:
            self._unschedule(wrapper)

    # -- teardown ----------------------------------------------------------------------------

    def _forget(self, wrapper: AgentWrapper) -> None:
        # A handler still running after stop_agent's deadline is cancelled if it awaits.
        with self._cond:
            loop = self._loop
            stuck = wrapper.agent_id in self._running
        if stuck and loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._cancel_turn, wrapper.agent_id)

    def _cancel_turn(self, agent_id: str) -> None:
        task = self._tasks.get(agent_id)
        if task is not None:
            task.cancel()

    def _join(self, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        with self._cond:
            loop, thread = self._loop, self._thread

        # Cancel the turns still running (delivery stopped and hooks ran), then stop the loop.
        if loop is not None and thread is not None and not loop.is_closed():
            asyncio.run_coroutine_threadsafe(self._stop_loop(), loop)
            thread.join(_left(deadline) + LOOP_CLOSE_TIMEOUT)

        # Sync handlers that never return keep their pool thread: name them with their stack.
        alive = self.pool.close(max(JOIN_FLOOR, _left(deadline)))
        if thread is not None and thread.is_alive():
            alive.insert(0, thread)
        for stuck in alive:
            logger.error(
                "worker did not join thread=%s stack=\n%s", stuck.name, thread_stack(stuck)
            )
        return [stuck.name for stuck in alive]

    async def _stop_loop(self) -> None:
        """Cancel every turn, give them a moment to unwind, then stop the loop (on the loop)."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=LOOP_CLOSE_TIMEOUT)
            for task in pending:
                logger.warning("task ignored its cancellation task=%s", task.get_name())
        asyncio.get_running_loop().stop()

    def _home(self, wrapper: AgentWrapper) -> str:
        return self.thread_name_prefix


async def _close_default_executor(loop: asyncio.AbstractEventLoop) -> None:
    """Join the threads of ``asyncio.to_thread``, bounded: one stuck must not hold the loop."""
    try:
        await asyncio.wait_for(loop.shutdown_default_executor(), LOOP_CLOSE_TIMEOUT)
    except TimeoutError:
        logger.warning("default executor did not shut down timeout=%.1fs", LOOP_CLOSE_TIMEOUT)


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())
