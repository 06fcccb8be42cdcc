"""Scheduling shared by the engines that run agents inside this process (sync, threads).

Each agent is an actor: it is *scheduled* when it has mail and is not paused or stopped,
and a scheduled agent sits in exactly one run queue or is being *run* by exactly one
thread. That single rule is what keeps an agent on one thread at a time.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from abc import abstractmethod

from rustic.engines.base import (
    AgentInfo,
    AgentState,
    BaseExecutionEngine,
    EngineReport,
    call_with_deadline,
)
from rustic.wrapper import AgentWrapper

logger = logging.getLogger(__name__)

HOOK_TIMEOUT = 5.0  # the most any single on_shutdown hook may take


class LocalEngine(BaseExecutionEngine):
    """An engine whose agents run on threads of this process."""

    batch_size = 32  # messages one agent handles per turn before yielding its thread

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._wrappers: dict[str, AgentWrapper] = {}  # guarded by `_cond`
        self._running: set[str] = set()  # agents a thread is running now; guarded by `_cond`
        self._scheduled = 0  # agents scheduled or running; guarded by `_cond`

    @abstractmethod
    def _enqueue(self, wrapper: AgentWrapper) -> None:
        """Put a newly scheduled agent on a run queue."""

    # -- the contract ------------------------------------------------------------------------

    def launch(self, wrapper: AgentWrapper) -> None:
        with self._cond:
            if wrapper.agent_id in self._wrappers:
                raise ValueError(f"agent {wrapper.agent_id!r} already runs on {self!r}")
            self._wrappers[wrapper.agent_id] = wrapper
        wrapper.mailbox.notify = functools.partial(self._notify, wrapper)
        self._notify(wrapper)

    def stop_agent(self, agent_id: str, timeout: float) -> bool:
        wrapper = self.wrapper(agent_id)

        # No new delivery; the in-flight handler, if any, may finish.
        with self._cond:
            wrapper.stopped = True
            finished = self._cond.wait_for(lambda: agent_id not in self._running, timeout)

        # on_shutdown runs even when the handler did not finish: the agent is going away.
        hooks_ok = self._run_shutdown_hooks(wrapper, timeout)
        with self._cond:
            del self._wrappers[agent_id]
        self._forget(wrapper)
        return finished and hooks_ok

    def pause(self, agent_id: str, timeout: float) -> bool:
        wrapper = self.wrapper(agent_id)
        with self._cond:
            wrapper.paused = True
            return self._cond.wait_for(lambda: agent_id not in self._running, timeout)

    def resume(self, agent_id: str) -> None:
        wrapper = self.wrapper(agent_id)
        with self._cond:
            wrapper.paused = False
        self._notify(wrapper)

    def wait_idle(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(self._idle, timeout)

    def shutdown(self, timeout: float) -> EngineReport:
        deadline = time.monotonic() + timeout

        # Stop delivery everywhere, then give in-flight handlers what is left of the time.
        with self._cond:
            wrappers = list(self._wrappers.values())
            for wrapper in wrappers:
                wrapper.stopped = True
            self._cond.wait_for(lambda: not self._running, _remaining(deadline))
            stuck = sorted(self._running)
        for agent_id in stuck:
            logger.warning("handler still running at shutdown agent_id=%s", agent_id)

        # Hooks run after delivery stopped, each under its own deadline.
        report = EngineReport(engine=self.name, stuck_agents=stuck)
        for wrapper in wrappers:
            if not self._run_shutdown_hooks(wrapper, _remaining(deadline)):
                report.hooks_failed.append(wrapper.agent_id)

        # Join the workers with whatever time is left; name those that would not exit.
        report.not_joined = self._join(_remaining(deadline))
        for wrapper in wrappers:
            report.handled += wrapper.processed
            report.pending += len(wrapper.mailbox)
            report.dead_lettered += wrapper.dead_lettered
        return report

    def agents(self) -> list[AgentInfo]:
        with self._cond:
            wrappers = list(self._wrappers.values())
        return [self._info(wrapper) for wrapper in wrappers]

    def wrapper(self, agent_id: str) -> AgentWrapper:
        with self._cond:
            try:
                return self._wrappers[agent_id]
            except KeyError:
                raise KeyError(f"agent {agent_id!r} does not run on {self!r}") from None

    # -- scheduling -------------------------------------------------------------------------

    def _notify(self, wrapper: AgentWrapper) -> None:
        """Schedule ``wrapper`` if it has mail and may run; called after every delivery.

        The unlocked check is the hot path: an agent that is already scheduled will see
        this message, because `_end_turn` checks the mailbox again after unscheduling.
        """
        if wrapper.scheduled:
            return
        with self._cond:
            if wrapper.scheduled or wrapper.paused or wrapper.stopped or not len(wrapper.mailbox):
                return
            wrapper.scheduled = True
            self._scheduled += 1
        self._enqueue(wrapper)

    def _begin_turn(self, wrapper: AgentWrapper) -> bool:
        """Claim a dequeued agent for this thread; False if it must not run now."""
        with self._cond:
            if wrapper.paused or wrapper.stopped:
                self._unschedule(wrapper)
                return False
            self._running.add(wrapper.agent_id)
            wrapper.where = threading.current_thread().name
            return True

    def _turn(self, wrapper: AgentWrapper) -> int:
        """Handle up to ``batch_size`` messages of one agent; returns how many."""
        mailbox = wrapper.mailbox
        dispatch = wrapper.dispatch
        handled = 0
        while handled < self.batch_size:
            message = mailbox.get_nowait()
            if message is None:
                break
            dispatch(message)
            handled += 1
            if wrapper.paused or wrapper.stopped:
                break
        return handled

    def _end_turn(self, wrapper: AgentWrapper) -> bool:
        """Release the agent; True when it still has mail and goes back on a run queue."""
        with self._cond:
            self._running.discard(wrapper.agent_id)
            if len(wrapper.mailbox) and not (wrapper.paused or wrapper.stopped):
                return True
            self._unschedule(wrapper)

        # A delivery may have seen `scheduled` still set just before we cleared it, and
        # skipped scheduling: look once more, now that any such delivery is in the mailbox.
        if len(wrapper.mailbox):
            self._notify(wrapper)
        return False

    def _unschedule(self, wrapper: AgentWrapper) -> None:
        # Caller holds `_cond`. Waiters on pause, stop and idleness re-check here.
        wrapper.scheduled = False
        self._scheduled -= 1
        self._cond.notify_all()

    def _idle(self) -> bool:
        return self._scheduled == 0 and not self._running

    # -- teardown ---------------------------------------------------------------------------

    def _run_shutdown_hooks(self, wrapper: AgentWrapper, budget: float) -> bool:
        if not wrapper.has_fixtures("shutdown"):
            return True
        return call_with_deadline(
            lambda: wrapper.run_fixtures("shutdown"),
            max(0.1, min(HOOK_TIMEOUT, budget)),
            f"{wrapper.agent_id}.on_shutdown",
        )

    def _forget(self, wrapper: AgentWrapper) -> None:
        """Release what the engine keeps for one stopped agent (a dedicated thread, say)."""

    def _join(self, timeout: float) -> list[str]:
        """Join worker threads; return the names of those still alive at the deadline."""
        return []

    def _info(self, wrapper: AgentWrapper) -> AgentInfo:
        if wrapper.failed:
            state = AgentState.FAILED
        elif wrapper.stopped:
            state = AgentState.STOPPED
        elif wrapper.paused:
            state = AgentState.PAUSED
        else:
            state = AgentState.RUNNING
        return AgentInfo(
            id=wrapper.agent_id,
            engine=self.name,
            state=state,
            processed=wrapper.processed,
            errors=wrapper.errors,
            dead_letters=wrapper.dead_lettered,
            queue_depth=len(wrapper.mailbox),
            in_flight=1 if wrapper.in_flight is not None else 0,
            where=wrapper.where or self._home(wrapper),
            uptime=time.time() - wrapper.started_at,
            version=wrapper.version,
            last_reload=wrapper.last_reload,
        )

    def _home(self, wrapper: AgentWrapper) -> str:
        return ""


def _remaining(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())
