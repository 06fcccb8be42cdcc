"""Hot swap of one agent: stage, quiesce, swap, resume (DESIGN §9)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rustic.agent import Agent
from rustic.deps import close_dependency
from rustic.logs import log_context
from rustic.reloading import CodeLoadError, module_file, reimport, resolve_in
from rustic.spec import AgentSpec

if TYPE_CHECKING:
    from rustic.engines.base import BaseExecutionEngine
    from rustic.guild import Guild
    from rustic.wrapper import AgentWrapper

logger = logging.getLogger(__name__)


class ReloadError(RuntimeError):
    """A hot swap failed at ``step``; the previous version is still serving."""

    def __init__(self, agent_id: str, step: str, reason: str) -> None:
        super().__init__(f"reload of agent {agent_id!r} failed at {step}: {reason}")
        self.agent_id = agent_id
        self.step = step
        self.reason = reason


@dataclass
class ReloadReport:
    """What a successful hot swap did."""

    agent_id: str
    old_version: str
    new_version: str
    pause_ms: float
    stage_ms: float
    carried_over: int
    topics_added: list[str]
    topics_removed: list[str]

    def to_dict(self) -> dict[str, Any]:
        """Return the report as a JSON-able dict."""
        return dict(vars(self))


def hot_swap(
    guild: Guild,
    wrapper: AgentWrapper,
    engine: BaseExecutionEngine,
    new_spec: AgentSpec,
    *,
    timeout: float,
    app_dir: Path | None,
) -> ReloadReport:
    """Replace ``wrapper``'s agent with a new build of ``new_spec``; see Guild.reload_agent."""
    agent_id = wrapper.agent_id
    if new_spec.id != agent_id:
        raise ReloadError(agent_id, "stage", f"the new spec is for agent {new_spec.id!r}")
    old_spec, old_version = wrapper.spec, wrapper.version
    fresh = _changed_dependencies(old_spec, new_spec)

    # (1) Stage: new code and a new instance, built while the old one keeps serving.
    staged_at = time.perf_counter()
    agent = _stage(wrapper, new_spec, app_dir, fresh)
    stage_ms = (time.perf_counter() - staged_at) * 1000

    # (2) Quiesce: no new delivery; the in-flight handler finishes; mail keeps queueing.
    if not engine.pause(agent_id, timeout):
        engine.resume(agent_id)
        _close_unused(agent, fresh)
        raise ReloadError(
            agent_id, "quiesce", f"the in-flight handler did not finish within {timeout}s"
        )
    paused_at = time.perf_counter()
    try:
        # (3) Swap: same mailbox, state handle and dependencies; on_reload may refuse it.
        carried = len(wrapper.mailbox)
        old_topics = wrapper.topics(old_spec)
        previous_deps = dict(wrapper.dependencies)
        try:
            engine.swap(wrapper, agent, new_spec)
        except ReloadError:
            _close_unused(agent, fresh)
            raise
        added, removed = _resubscribe(guild, agent_id, old_topics, wrapper.topics(new_spec))
    finally:
        # (4) Resume: queued mail goes to whichever version is installed now.
        engine.resume(agent_id)
    pause_ms = (time.perf_counter() - paused_at) * 1000

    guild.adopt_dependencies(agent_id, {name: wrapper.dependencies[name] for name in fresh})
    for name in fresh:
        if name in previous_deps:
            close_dependency(name, previous_deps[name])
    report = ReloadReport(
        agent_id=agent_id,
        old_version=old_version,
        new_version=wrapper.version,
        pause_ms=pause_ms,
        stage_ms=stage_ms,
        carried_over=carried,
        topics_added=added,
        topics_removed=removed,
    )
    with log_context(guild_id=guild.id, agent_id=agent_id):
        logger.info(
            "agent reloaded old=%s new=%s pause_ms=%.2f carried_over=%d",
            old_version,
            wrapper.version,
            pause_ms,
            carried,
        )
    return report


def _stage(
    wrapper: AgentWrapper, spec: AgentSpec, app_dir: Path | None, fresh: frozenset[str]
) -> Agent[Any]:
    agent_id = wrapper.agent_id
    try:
        cls = _load_class(spec, app_dir)
    except CodeLoadError as exc:
        raise ReloadError(agent_id, "import", str(exc)) from exc
    except Exception as exc:
        raise ReloadError(agent_id, "import", f"{type(exc).__name__}: {exc}") from exc
    try:
        return wrapper.build(spec, cls, fresh)
    except Exception as exc:
        raise ReloadError(agent_id, "build", f"{type(exc).__name__}: {exc}") from exc


def _load_class(spec: AgentSpec, app_dir: Path | None) -> type[Any]:
    """The agent class of ``spec``, from freshly re-imported code when it is project code."""
    current = spec.resolve_class()
    module_name = current.__module__
    if app_dir is None or module_name == "__main__":
        return current
    if module_file(module_name, app_dir.resolve()) is None:
        return current  # not the project's code: never re-imported
    found = resolve_in(reimport(module_name, app_dir), current.__qualname__)
    if not isinstance(found, type):
        raise CodeLoadError(f"{spec.class_name} is no longer a class")
    return found


def _changed_dependencies(old: AgentSpec, new: AgentSpec) -> frozenset[str]:
    names = old.dependency_map.keys() | new.dependency_map.keys()
    return frozenset(n for n in names if old.dependency_map.get(n) != new.dependency_map.get(n))


def _close_unused(agent: Agent[Any], fresh: frozenset[str]) -> None:
    for name in fresh:
        if name in agent._dependencies:
            close_dependency(name, agent._dependencies[name])


def _resubscribe(
    guild: Guild, agent_id: str, old: set[str], new: set[str]
) -> tuple[list[str], list[str]]:
    added, removed = sorted(new - old), sorted(old - new)
    for topic in added:
        guild.bus.subscribe(topic, agent_id)
    for topic in removed:
        guild.bus.unsubscribe(topic, agent_id)
    return added, removed
