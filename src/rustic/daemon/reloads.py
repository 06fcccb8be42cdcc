"""Live reload in the daemon: `rustic reload`, SIGHUP and `--watch`."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from rustic.daemon.watch import GuildWatcher
from rustic.guild import Guild
from rustic.hotswap import ReloadError
from rustic.spec import GuildSpec, SpecError, load_guild_spec

logger = logging.getLogger(__name__)


class ReloadRequestError(Exception):
    """A reload request that names no agent, or whose guild file cannot be read."""


def reload_from_file(
    guild: Guild, guild_file: Path, agent_ids: list[str] | None, timeout: float = 5.0
) -> list[dict[str, Any]]:
    """Re-read ``guild_file`` and hot-swap ``agent_ids`` (None: every running agent).

    Returns one result per agent: ``ok`` with the reload report, or the failed step and
    why. A guild file that no longer loads reloads nothing and raises.
    """
    try:
        spec = load_guild_spec(guild_file)
    except SpecError as exc:
        raise ReloadRequestError(f"guild file not reloaded: {exc}") from None
    running = guild.agent_ids()
    targets = running if agent_ids is None else agent_ids
    unknown = [agent_id for agent_id in targets if agent_id not in running]
    if unknown:
        raise ReloadRequestError(
            f"no running agent {', '.join(map(repr, unknown))} (running: {', '.join(running)})"
        )
    return [_reload_one(guild, spec, agent_id, timeout) for agent_id in targets]


def _reload_one(guild: Guild, spec: GuildSpec, agent_id: str, timeout: float) -> dict[str, Any]:
    try:
        new_spec = spec.agent(agent_id)
    except KeyError:
        reason = "the guild file no longer defines this agent"
        return {"agent_id": agent_id, "ok": False, "step": "spec", "error": reason}
    try:
        report = guild.reload_agent(agent_id, new_spec=new_spec, timeout=timeout)
    except ReloadError as exc:
        logger.error(
            "reload failed, old version still serving agent_id=%s step=%s error=%s",
            agent_id,
            exc.step,
            exc.reason,
        )
        return {"agent_id": agent_id, "ok": False, "step": exc.step, "error": exc.reason}
    return {"ok": True, **report.to_dict()}


class LiveReload:
    """The daemon's reload machinery: SIGHUP reloads everything; `--watch` follows saves."""

    def __init__(self, guild: Guild, guild_file: Path) -> None:
        self.guild = guild
        self.guild_file = guild_file
        self.watcher: GuildWatcher | None = None
        self._lock = threading.Lock()  # one SIGHUP-triggered reload at a time

    def watch(
        self,
        paths: list[Path],
        excludes: list[str],
        ignore: list[Path],
        only: set[str] | None,
    ) -> None:
        """Start following saves under ``paths`` (default: the guild's app dir)."""
        folders = paths or [self.guild.app_dir or self.guild_file.parent]
        self.watcher = GuildWatcher(
            self.guild, self.guild_file, folders, excludes=excludes, ignore_paths=ignore, only=only
        )
        self.watcher.start()

    def reload_all_in_background(self) -> None:
        """SIGHUP: reload every agent from the guild file, off the signal relay thread."""
        threading.Thread(target=self._reload_all, name="rustic-sighup-reload", daemon=True).start()

    def _reload_all(self) -> None:
        with self._lock:
            try:
                results = reload_from_file(self.guild, self.guild_file, None)
            except ReloadRequestError as exc:
                logger.error("%s", exc)
                return
        failed = [r["agent_id"] for r in results if not r["ok"]]
        logger.info("sighup reload done agents=%d failed=%s", len(results), ",".join(failed) or "-")

    def stop(self) -> None:
        """Stop following saves; reloads already started finish."""
        if self.watcher is not None:
            self.watcher.stop()
