"""``Guild``: owns the bus, the state store, the engines and the agents; launch, stop, reload."""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from pydantic import BaseModel

from rustic.agent import inbox_topic
from rustic.deps import DependencyScopes
from rustic.engines import BaseExecutionEngine, EngineSet
from rustic.engines.base import AgentInfo
from rustic.hotswap import ReloadError, ReloadReport, hot_swap
from rustic.logs import log_context
from rustic.message import Message, new_id
from rustic.messaging import MessageBus, open_bus
from rustic.shutdown import ShutdownReport
from rustic.spec import AgentSpec, DependencySpec, EngineSpec, GuildSpec, load_guild_spec
from rustic.state import (
    StateHandle,
    StateStore,
    open_state_store,
    state_key_for_agent,
    state_key_for_guild,
)
from rustic.wrapper import AgentWrapper, encode_payload

logger = logging.getLogger(__name__)

EXTERNAL_SENDER = "external"
DRAIN_SLICE = 0.05  # how often a drain looks up from waiting to check for a hurry-up
HURRIED_TIMEOUT = 1.0  # what teardown gets when a second signal skips the waiting


class GuildStopping(RuntimeError):
    """The guild no longer takes messages from outside: it is stopping."""


class Guild:
    """A group of agents sharing a bus, a state store and a default engine.

    ``Guild(id=..., name=..., description=...)`` makes an empty guild on the in-memory
    bus and state store with the sync engine; ``launch_agent`` adds agents;
    ``stop`` drains and tears everything down. ``Guild.from_yaml`` builds one from a
    guild file and launches its agents.
    """

    def __init__(
        self,
        id: str,
        name: str = "",
        description: str = "",
        *,
        messaging: str | MessageBus = "memory",
        state: str | StateStore = "memory",
        execution_engine: BaseExecutionEngine | EngineSpec | str | None = None,
        dependency_map: dict[str, DependencySpec] | None = None,
        default_topic: str = "default_topic",
        error_topic: str = "error_topic",
        shutdown_timeout: float = 10.0,
        spec: GuildSpec | None = None,
        app_dir: str | Path | None = None,
    ) -> None:
        self.spec = spec or GuildSpec(
            id=id,
            name=name or id,
            description=description,
            messaging=messaging if isinstance(messaging, str) else "memory",
            state=state if isinstance(state, str) else "memory",
            dependency_map=dependency_map or {},
            default_topic=default_topic,
            error_topic=error_topic,
            shutdown_timeout=shutdown_timeout,
        )
        self.id = self.spec.id
        self.name = self.spec.name
        self.description = self.spec.description
        self.default_topic = self.spec.default_topic
        self.error_topic = self.spec.error_topic
        self.started_at = time.time()
        self.app_dir = Path(app_dir).resolve() if app_dir is not None else self._default_app_dir()

        self.bus = (
            open_bus(self.spec.resolve_url(messaging), guild_id=self.id)
            if isinstance(messaging, str)
            else messaging
        )
        self.state_store = (
            open_state_store(self.spec.resolve_url(state)) if isinstance(state, str) else state
        )
        self.state = StateHandle(self.state_store, state_key_for_guild(self.id))

        self._lock = threading.RLock()
        self._agents: dict[str, tuple[AgentWrapper, BaseExecutionEngine]] = {}  # guarded by `_lock`
        self._engines = EngineSet()
        self.dependencies = DependencyScopes(self.id, self.spec.dependency_map)
        self._reload_locks: dict[str, threading.Lock] = {}  # guarded by `_lock`
        self._intake_open = True
        self._stopped = False
        self._hurry = threading.Event()
        self.default_engine = self._engines.get(execution_engine or self.spec.execution)

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def from_spec(
        cls,
        spec: GuildSpec,
        *,
        execution_engine: BaseExecutionEngine | EngineSpec | str | None = None,
        only: set[str] | None = None,
        app_dir: str | Path | None = None,
    ) -> Guild:
        """Build a guild from ``spec`` and launch its agents (or just those in ``only``)."""
        guild = cls(
            spec.id,
            spec=spec,
            messaging=spec.messaging,
            state=spec.state,
            execution_engine=execution_engine,
            app_dir=app_dir,
        )
        try:
            # A durable bus learns every agent's topics first, so that mail for agents that
            # launch later, or run in another daemon (`only`), is kept for them.
            guild.bus.register_agents({a.id: guild.agent_topics(a) for a in spec.agents})
            for agent_spec in spec.agents:
                if only is None or agent_spec.id in only:
                    guild.launch_agent(agent_spec)
        except BaseException:
            guild.stop(timeout=1.0)
            raise
        return guild

    @classmethod
    def from_yaml(
        cls,
        path: str | Path,
        *,
        execution_engine: BaseExecutionEngine | EngineSpec | str | None = None,
    ) -> Guild:
        """Load a guild file (its folder goes on ``sys.path``) and launch its agents."""
        spec = load_guild_spec(path)
        base = str(spec.base_dir)
        if base not in sys.path:
            sys.path.insert(0, base)
        return cls.from_spec(spec, execution_engine=execution_engine)

    def _default_app_dir(self) -> Path | None:
        return self.spec.base_dir if self.spec.source is not None else None

    # -- agents -----------------------------------------------------------------------------

    def launch_agent(
        self, spec: AgentSpec, execution_engine: BaseExecutionEngine | None = None
    ) -> AgentWrapper:
        """Build the agent of ``spec`` and start it on ``execution_engine`` (or its default).

        An agent's own ``execution`` spec picks its engine when no engine is passed.
        """
        if self._stopped:
            raise GuildStopping(f"guild {self.id!r} is stopped")
        with self._lock:
            if spec.id in self._agents:
                raise ValueError(f"guild {self.id!r} already has an agent {spec.id!r}")
        if execution_engine is not None:
            engine = self._engines.get(execution_engine)
        elif spec.execution is not None:
            engine = self._engines.get(self.spec.execution.merged(spec.execution))
        else:
            engine = self.default_engine

        # Build first: a class that fails to import or to validate leaves nothing behind.
        mailbox = self.bus.open_mailbox(spec.id)
        state = StateHandle(self.state_store, state_key_for_agent(self.id, spec.id))
        try:
            wrapper = AgentWrapper(
                self, spec, mailbox, state, engine.name, shadow=engine.out_of_process
            )
        except BaseException:
            self.bus.close_mailbox(spec.id)
            self.dependencies.close_agent(spec.id)
            raise

        # Subscribe, start up, then let the engine deliver what has queued. An engine that
        # runs agents elsewhere runs on_startup there, as part of its launch.
        self.bus.set_subscriptions(spec.id, wrapper.topics())
        if not engine.out_of_process:
            wrapper.run_fixtures("startup")
        with self._lock:
            self._agents[spec.id] = (wrapper, engine)
        try:
            engine.launch(wrapper)
        except BaseException:
            with self._lock:
                del self._agents[spec.id]
            self.bus.close_mailbox(spec.id)
            self.dependencies.close_agent(spec.id)
            raise
        with log_context(guild_id=self.id, agent_id=spec.id):
            logger.debug("agent launched engine=%s version=%s", engine.name, wrapper.version)
        return wrapper

    def stop_agent(self, agent_id: str, timeout: float = 5.0) -> bool:
        """Stop one agent for good: finish its in-flight message, run on_shutdown."""
        engine = self._agent(agent_id)[1]
        ok = engine.stop_agent(agent_id, timeout)
        with self._lock:
            del self._agents[agent_id]
        left = self.bus.close_mailbox(agent_id)
        if left:
            logger.warning(
                "agent stopped with mail queued agent_id=%s dropped=%d", agent_id, len(left)
            )
        self.dependencies.close_agent(agent_id)
        return ok

    def reload_agent(
        self, agent_id: str, new_spec: AgentSpec | None = None, timeout: float = 5.0
    ) -> ReloadReport:
        """Hot-swap one agent to its current code and ``new_spec`` (default: its spec).

        The agent's module and the project modules it imports (those under the app dir)
        are re-imported and a new instance is built while the old one serves; then the
        agent is paused (its in-flight handler finishes, new mail queues), the new
        instance takes over the same mailbox, state handle and dependencies, its
        on_reload hooks run with the previous instance, and delivery resumes. Raises
        ``ReloadError`` naming the failed step; the old version then keeps serving.
        """
        wrapper, engine = self._agent(agent_id)
        with self._reload_lock(agent_id):
            try:
                report = hot_swap(
                    self,
                    wrapper,
                    engine,
                    new_spec or wrapper.spec,
                    timeout=timeout,
                    app_dir=self.app_dir,
                )
            except ReloadError as exc:
                wrapper.last_reload = {"at": time.time(), "ok": False, "error": str(exc)}
                raise
        wrapper.last_reload = {"at": time.time(), "ok": True, "pause_ms": report.pause_ms}
        return report

    def _reload_lock(self, agent_id: str) -> threading.Lock:
        with self._lock:
            return self._reload_locks.setdefault(agent_id, threading.Lock())

    def adopt_dependencies(self, agent_id: str, dependencies: dict[str, Any]) -> None:
        """Record agent-scoped dependencies built for a hot swap as the agent's own."""
        self.dependencies.adopt(agent_id, dependencies)

    def agent_topics(self, spec: AgentSpec) -> set[str]:
        """The topics the agent of ``spec`` listens to in this guild."""
        topics = {inbox_topic(spec.id), *spec.additional_topics}
        if spec.listen_to_default_topic:
            topics.add(self.default_topic)
        return topics

    def wrapper(self, agent_id: str) -> AgentWrapper:
        """The wrapper of a running agent; raises KeyError for an unknown id."""
        return self._agent(agent_id)[0]

    def engine_of(self, agent_id: str) -> BaseExecutionEngine:
        """The engine a running agent is on."""
        return self._agent(agent_id)[1]

    def _agent(self, agent_id: str) -> tuple[AgentWrapper, BaseExecutionEngine]:
        with self._lock:
            try:
                return self._agents[agent_id]
            except KeyError:
                known = ", ".join(sorted(self._agents)) or "none"
                raise KeyError(
                    f"no agent {agent_id!r} in guild {self.id!r} (running: {known})"
                ) from None

    def agent_ids(self) -> list[str]:
        """Ids of the running agents, in launch order."""
        with self._lock:
            return list(self._agents)

    def engines(self) -> list[BaseExecutionEngine]:
        """The engines the guild runs agents on, the default one first."""
        return self._engines.all()

    # -- dependencies -----------------------------------------------------------------------

    def resolve_dependency(self, name: str, spec: AgentSpec, fresh: bool = False) -> Any:
        """The object injected as ``name`` into agent ``spec.id``; see DependencyScopes."""
        return self.dependencies.resolve(name, spec.id, spec.dependency_map, fresh)

    # -- messages ---------------------------------------------------------------------------

    def publish(
        self,
        topic: str,
        payload: BaseModel | dict[str, Any],
        *,
        format: str | None = None,
        sender: str = EXTERNAL_SENDER,
    ) -> Message:
        """Publish a message into the guild from outside it."""
        if not self._intake_open:
            raise GuildStopping(f"guild {self.id!r} is stopping and takes no new messages")
        fmt, data = encode_payload(payload)
        message = Message(new_id(), topic, sender, format or fmt, data)
        self.bus.publish(message)
        return message

    def run_until_idle(self, timeout: float | None = None) -> bool:
        """Deliver until no agent on any engine has work left; True if that was reached."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = 3600.0 if deadline is None else max(0.0, deadline - time.monotonic())
            if self._settled(remaining):
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False

    def _settled(self, slice_timeout: float) -> bool:
        """One pass over the engines; True when all were idle with nothing handled meanwhile."""
        engines = self._engines.all()
        handled_before = self._handled()
        idle = all(engine.wait_idle(slice_timeout) for engine in engines)
        # Mail a bus still carries through a server (redis) to agents here counts as work.
        delivered = self.bus.wait_delivered(min(slice_timeout, DRAIN_SLICE))
        return (
            idle
            and delivered
            and all(engine.wait_idle(0) for engine in engines)
            and self._handled() == handled_before
        )

    def _handled(self) -> int:
        with self._lock:
            return sum(wrapper.processed for wrapper, _ in self._agents.values())

    # -- status -----------------------------------------------------------------------------

    def agents(self) -> list[AgentInfo]:
        """A snapshot of every running agent."""
        engines = self._engines.all()
        return [info for engine in engines for info in engine.agents()]

    def status(self) -> dict[str, Any]:
        """The guild, its agents and its totals, as a JSON-able dict."""
        agents = [info.to_dict() for info in self.agents()]
        return {
            "guild": {"id": self.id, "name": self.name, "uptime": time.time() - self.started_at},
            "intake_open": self._intake_open,
            "agents": agents,
            "totals": {
                key: sum(agent[key] for agent in agents)
                for key in ("processed", "errors", "dead_letters", "queue_depth", "in_flight")
            },
        }

    # -- stopping ---------------------------------------------------------------------------

    def close_intake(self) -> None:
        """Refuse messages from outside from now on, so that the backlog can only shrink."""
        self._intake_open = False

    def hurry(self) -> None:
        """Skip the rest of a running stop's waiting; teardown still runs."""
        self._hurry.set()

    def stop(self, timeout: float | None = None) -> ShutdownReport:
        """Stop the guild gracefully and account for every message.

        Intake closes first so the backlog can only shrink; queued messages are handled
        until ``timeout`` (default: the spec's ``shutdown_timeout``); then on_shutdown
        hooks run, dependencies close and workers are joined. A handler that never returns
        cannot make this hang past the timeout (plus each hook's own short deadline).
        """
        if self._stopped:
            return ShutdownReport()
        started = time.monotonic()
        timeout = self.spec.shutdown_timeout if timeout is None else timeout
        deadline = started + timeout
        report = ShutdownReport()

        # (1) Stop intake.
        self.close_intake()

        # (2) Drain: handle what is queued until the deadline or a hurry-up.
        report.drained = self._drain(deadline)

        # (3) Teardown: engines stop delivery, run hooks, join their workers.
        self._stopped = True
        engines = self._engines.all()
        for engine in engines:
            left = max(0.0, deadline - time.monotonic())
            budget = min(left, HURRIED_TIMEOUT) if self._hurry.is_set() else left
            report.add(engine.shutdown(max(budget, 0.2)))

        # (4) Dependencies close after every hook that might still use them.
        report.dependencies_failed += self.dependencies.close_all()

        # (5) Account, then release the backends.
        report.duration = time.monotonic() - started
        self.bus.close()
        self.state_store.close()
        with log_context(guild_id=self.id):
            logger.info("guild stopped %s clean=%s", report.summary(), report.clean)
        return report

    def _drain(self, deadline: float) -> bool:
        while not self._hurry.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if self._settled(min(DRAIN_SLICE, remaining)):
                return True
        return False

    def __enter__(self) -> Guild:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<Guild id={self.id!r} agents={len(self._agents)}>"
