"""``--watch``: turn each batch of saved files into a reload plan and carry it out."""

from __future__ import annotations

import fnmatch
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import watchfiles

from rustic.guild import Guild
from rustic.hotswap import ReloadError
from rustic.reloading import project_files_of
from rustic.spec import AgentSpec, GuildSpec, SpecError, load_guild_spec

logger = logging.getLogger(__name__)

DEBOUNCE_MS = 30  # a burst of saves within this window becomes one batch
STEP_MS = 10


@dataclass
class ReloadPlan:
    """What one batch of changes asks of the running guild."""

    launch: list[AgentSpec] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    reload: dict[str, AgentSpec] = field(default_factory=dict)
    restart_needed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        """True when the batch changes nothing that is running."""
        return not (self.launch or self.stop or self.reload or self.restart_needed)


class WatchFilter(watchfiles.DefaultFilter):
    """Python files and the guild file; never VCS, venv, caches or the runtime dir."""

    def __init__(self, guild_file: Path, ignore_paths: Iterable[Path], excludes: Iterable[str]):
        super().__init__(ignore_paths=[str(p) for p in ignore_paths])
        self.guild_file = str(guild_file)
        self.excludes = list(excludes)

    def __call__(self, change: watchfiles.Change, path: str) -> bool:
        if path != self.guild_file and not path.endswith(".py"):
            return False
        if any(
            fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(Path(path).name, pattern)
            for pattern in self.excludes
        ):
            return False
        return super().__call__(change, path)


def plan_changes(
    changed: set[Path],
    guild_file: Path,
    running: GuildSpec,
    files_of: dict[str, set[Path]],
) -> tuple[ReloadPlan, GuildSpec]:
    """Map changed files to launches, stops and reloads; returns the plan and the new spec."""
    plan = ReloadPlan()
    spec = running
    if guild_file in changed:
        try:
            spec = load_guild_spec(guild_file)
        except SpecError as exc:
            plan.problems.append(f"guild file not applied: {exc}")
            spec = running
        else:
            _plan_spec_diff(plan, running, spec)

    for agent in spec.agents:
        if agent.id in plan.reload or any(a.id == agent.id for a in plan.launch):
            continue
        if changed & files_of.get(agent.id, set()):
            plan.reload[agent.id] = agent
    return plan, spec


def _plan_spec_diff(plan: ReloadPlan, old: GuildSpec, new: GuildSpec) -> None:
    before = {a.id: a for a in old.agents}
    after = {a.id: a for a in new.agents}
    plan.launch = [spec for agent_id, spec in after.items() if agent_id not in before]
    plan.stop = [agent_id for agent_id in before if agent_id not in after]
    plan.reload = {
        agent_id: spec
        for agent_id, spec in after.items()
        if agent_id in before and spec != before[agent_id]
    }
    guild_before = old.model_dump(exclude={"agents"})
    guild_after = new.model_dump(exclude={"agents"})
    plan.restart_needed = sorted(k for k in guild_after if guild_after[k] != guild_before.get(k))


class GuildWatcher:
    """Watches the project and hot-swaps the agents each save affects, one batch at a time.

    Batches are handled in order on one thread, so at most one reload per agent is in
    flight, and a save made during a reload becomes the next batch.
    """

    def __init__(
        self,
        guild: Guild,
        guild_file: Path,
        paths: list[Path],
        *,
        excludes: Iterable[str] = (),
        ignore_paths: Iterable[Path] = (),
        only: set[str] | None = None,
    ) -> None:
        self.guild = guild
        self.guild_file = guild_file.resolve()
        self.paths = paths
        self.only = only
        self.spec = guild.spec
        self.filter = WatchFilter(self.guild_file, ignore_paths, excludes)
        self.history: list[dict[str, Any]] = []  # guarded by the GIL: appended by one thread
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rustic-watch", daemon=True)

    def start(self) -> None:
        """Start watching on a thread of its own; returns once the watch is armed."""
        self._thread.start()
        self._ready.wait(5)

    def stop(self) -> None:
        """Stop watching and join the thread."""
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        watcher = watchfiles.watch(
            *self.paths,
            watch_filter=self.filter,
            debounce=DEBOUNCE_MS,
            step=STEP_MS,
            stop_event=self._stop,
            rust_timeout=200,
            yield_on_timeout=True,
            raise_interrupt=False,
        )
        logger.info("watching for changes paths=%s", ",".join(str(p) for p in self.paths))
        for changes in watcher:
            self._ready.set()
            if changes:
                try:
                    self.apply_batch({Path(path).resolve() for _, path in changes})
                except Exception:
                    logger.exception("watch batch failed; the guild keeps running")

    def apply_batch(self, changed: set[Path]) -> ReloadPlan:
        """Plan and carry out what ``changed`` files ask for."""
        seen_at = time.time()
        files_of = {agent_id: self._files_of(agent_id) for agent_id in self.guild.agent_ids()}
        plan, self.spec = plan_changes(changed, self.guild_file, self.spec, files_of)
        for problem in plan.problems:
            logger.error("%s", problem)
        if plan.restart_needed:
            logger.warning(
                "guild settings changed; restart to apply keys=%s", ",".join(plan.restart_needed)
            )
        saved_at = max((_mtime(p) for p in changed), default=seen_at)
        guild = self.guild
        steps: list[tuple[str, str, Callable[[], object]]] = [
            *(("stop", a, functools.partial(guild.stop_agent, a)) for a in plan.stop),
            *(
                ("reload", a, functools.partial(guild.reload_agent, a, new_spec=s))
                for a, s in plan.reload.items()
            ),
            *(("launch", s.id, functools.partial(guild.launch_agent, s)) for s in plan.launch),
        ]
        for action, agent_id, step in steps:
            if self._wanted(agent_id):
                self._apply(action, agent_id, saved_at, step)
        return plan

    def _apply(
        self, action: str, agent_id: str, saved_at: float, step: Callable[[], object]
    ) -> None:
        try:
            step()
        except ReloadError as exc:
            logger.error(
                "reload failed, old version still serving agent_id=%s error=%s",
                agent_id,
                exc.reason,
            )
            self.history.append({"action": action, "agent_id": agent_id, "ok": False})
            return
        except Exception as exc:
            logger.error("%s failed agent_id=%s error=%s", action, agent_id, exc)
            self.history.append({"action": action, "agent_id": agent_id, "ok": False})
            return
        latency_ms = max(0.0, time.time() - saved_at) * 1000
        logger.info(
            "agent %s by watch agent_id=%s latency_ms=%.0f", _past(action), agent_id, latency_ms
        )
        self.history.append(
            {"action": action, "agent_id": agent_id, "ok": True, "latency_ms": latency_ms}
        )

    def _wanted(self, agent_id: str) -> bool:
        return self.only is None or agent_id in self.only

    def _files_of(self, agent_id: str) -> set[Path]:
        app_dir = self.guild.app_dir
        if app_dir is None:
            return set()
        module = type(self.guild.wrapper(agent_id).agent).__module__
        return project_files_of(module, app_dir)


def _past(action: str) -> str:
    return {"stop": "stopped", "reload": "reloaded", "launch": "launched"}[action]


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return time.time()
