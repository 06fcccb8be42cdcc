"""The contract every execution engine keeps, and the reports engines hand back."""

from __future__ import annotations

import contextvars
import logging
import sys
import threading
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar, Self

if TYPE_CHECKING:
    from rustic.agent import Agent
    from rustic.spec import AgentSpec, EngineSpec
    from rustic.wrapper import AgentWrapper

logger = logging.getLogger(__name__)


class AgentState(StrEnum):
    """Where an agent is in its life on an engine."""

    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass
class AgentInfo:
    """A snapshot of one agent, as ``agents()`` and ``rustic status`` show it."""

    id: str
    engine: str
    state: AgentState
    processed: int
    errors: int
    dead_letters: int
    queue_depth: int
    in_flight: int
    where: str
    uptime: float
    version: str
    last_reload: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the snapshot as a JSON-able dict."""
        data = dict(vars(self))
        data["state"] = str(self.state)
        return data


@dataclass
class EngineReport:
    """What an engine's shutdown finished and what it did not."""

    engine: str
    handled: int = 0
    pending: int = 0
    dead_lettered: int = 0
    hooks_failed: list[str] = field(default_factory=list)
    not_joined: list[str] = field(default_factory=list)
    stuck_agents: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """True when every hook ran and every worker joined."""
        return not (self.hooks_failed or self.not_joined or self.stuck_agents)


class BaseExecutionEngine(ABC):
    """Decides where and how agents' handlers run.

    An engine delivers each launched agent's mailbox to its handlers, one message at a
    time per agent, and tracks what it runs. ``pause``/``resume`` quiesce one agent for a
    hot swap; ``shutdown`` drains nothing itself (the guild drains first through
    ``wait_idle``) but stops delivery, runs ``on_shutdown`` hooks and joins workers.
    """

    name: ClassVar[str] = "custom"
    # True for engines whose agents run in other processes: the guild then builds only a
    # shadow instance here (no __init__, no dependencies) and leaves hooks to the engine.
    out_of_process: ClassVar[bool] = False

    @abstractmethod
    def launch(self, wrapper: AgentWrapper) -> None:
        """Start delivering ``wrapper``'s mailbox; on_startup hooks have already run."""

    @abstractmethod
    def stop_agent(self, agent_id: str, timeout: float) -> bool:
        """Stop delivery to one agent, let its in-flight handler finish, run on_shutdown.

        Returns False if the in-flight handler did not finish within ``timeout``.
        """

    @abstractmethod
    def pause(self, agent_id: str, timeout: float) -> bool:
        """Start no new delivery to the agent and wait for its in-flight handler.

        Mail keeps queueing. Returns False (and stays paused) if the handler outlasted
        ``timeout``.
        """

    @abstractmethod
    def resume(self, agent_id: str) -> None:
        """Deliver to a paused agent again, starting with what queued meanwhile."""

    @abstractmethod
    def wait_idle(self, timeout: float) -> bool:
        """Deliver until every agent's mailbox is empty and nothing is in flight.

        Returns False if work remained at the deadline.
        """

    @abstractmethod
    def shutdown(self, timeout: float) -> EngineReport:
        """Stop every agent (running its on_shutdown hooks) and join the workers."""

    @abstractmethod
    def agents(self) -> list[AgentInfo]:
        """A snapshot of every agent this engine runs."""

    def swap(self, wrapper: AgentWrapper, agent: Agent[Any], spec: AgentSpec) -> None:
        """Install a staged instance of a paused agent (the swap step of a hot reload).

        Runs the new instance's on_reload hooks with the previous instance, then makes it
        the one that handles messages. Raises ``ReloadError`` (the previous instance stays)
        when a hook fails. Engines whose agents run elsewhere override this to start the
        new version there.
        """
        from rustic.hotswap import ReloadError

        if not wrapper.run_fixtures("reload", agent, wrapper.agent):
            raise ReloadError(wrapper.agent_id, "on_reload", "an on_reload hook raised (logged)")
        wrapper.install(agent, spec)

    @classmethod
    def from_spec(cls, spec: EngineSpec) -> Self:
        """Build the engine from a spec's knobs; the default passes ``spec.options`` through."""
        return cls(**spec.options)

    def wrapper(self, agent_id: str) -> AgentWrapper:
        """The wrapper of an agent this engine runs; raises KeyError for an unknown id."""
        raise KeyError(agent_id)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} name={self.name!r}>"


def call_with_deadline(func: Callable[[], object], timeout: float, label: str) -> bool:
    """Run ``func`` on a helper thread and wait at most ``timeout`` seconds for it.

    Returns False when it returned False, raised (logged with its traceback) or did not
    finish in time (logged with the thread's stack). Used for hooks: one that hangs must
    not hang a stop.
    """
    outcome: list[bool] = []

    def run() -> None:
        try:
            outcome.append(func() is not False)
        except Exception:
            logger.exception("hook failed hook=%s", label)
            outcome.append(False)

    # The hook logs with the caller's guild and agent ids, which live in contextvars.
    context = contextvars.copy_context()
    thread = threading.Thread(
        target=context.run, args=(run,), name=f"rustic-hook-{label}", daemon=True
    )
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        logger.error(
            "hook did not finish hook=%s timeout=%.1fs stack=\n%s",
            label,
            timeout,
            thread_stack(thread),
        )
        return False
    return outcome == [True]


def thread_stack(thread: threading.Thread) -> str:
    """Return the current stack of ``thread`` as text, or an empty string."""
    frame = sys._current_frames().get(thread.ident or -1)
    return "".join(traceback.format_stack(frame)) if frame is not None else ""
