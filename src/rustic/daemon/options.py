"""What `rustic run` was asked for, and the guild spec that its flags turn the guild file into."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from rustic.engines import EngineError, engine_class
from rustic.spec import GuildSpec, check_agent_classes, load_guild_spec


class UsageError(Exception):
    """A flag or argument that cannot be used; the CLI prints it and exits with `EXIT_USAGE`."""


@dataclass(frozen=True)
class RunOptions:
    """The flags of `rustic run`; `None` leaves the spec's own value in place."""

    guild_file: Path
    engine: str | None = None
    max_workers: int | None = None
    thread_name_prefix: str | None = None
    messaging: str | None = None
    state: str | None = None
    only: frozenset[str] | None = None
    shutdown_timeout: float | None = None
    app_dir: Path | None = None
    runtime_dir: Path | None = None
    log_level: str = "info"
    log_format: str = "text"
    watch: bool = False
    watch_paths: tuple[Path, ...] = ()
    watch_excludes: tuple[str, ...] = ()


def load_checked_spec(guild_file: Path, app_dir: Path | None = None) -> GuildSpec:
    """Load a guild file, import every class it names and check its engines.

    The guild file's folder goes on `sys.path`, and `app_dir` (when given) in front of it,
    so that the app dir's modules win. Raises `SpecError` or `UsageError`.
    """
    spec = load_guild_spec(guild_file)
    _put_first_on_path(spec.base_dir.absolute(), only_if_absent=True)
    if app_dir is not None:
        _put_first_on_path(app_dir.absolute())
    check_agent_classes(spec)
    check_engines(spec)
    return spec


def load_run_spec(options: RunOptions) -> GuildSpec:
    """Load and check the guild file of `options`, then layer the flags over it."""
    spec = load_checked_spec(options.guild_file, options.app_dir)
    spec = apply_overrides(spec, options)
    check_engines(spec)
    if options.only is not None:
        check_only(spec, options.only)
    return spec


def apply_overrides(spec: GuildSpec, options: RunOptions) -> GuildSpec:
    """Return a copy of `spec` with the flags of `options` in place of its own values.

    The engine flags win over per-agent `execution` overrides too: `--engine sync` runs
    every agent on the sync engine.
    """
    fields = {
        "messaging": options.messaging,
        "state": options.state,
        "shutdown_timeout": options.shutdown_timeout,
    }
    updated = spec.model_copy(
        update={name: value for name, value in fields.items() if value is not None}, deep=True
    )
    flags = {
        "engine": options.engine,
        "max_workers": options.max_workers,
        "thread_name_prefix": options.thread_name_prefix,
    }
    if any(value is not None for value in flags.values()):
        updated.execution = updated.execution.merged(None, **flags)
        for agent in updated.agents:
            if agent.execution is not None:
                agent.execution = updated.execution.merged(agent.execution, **flags)
    return updated


def check_engines(spec: GuildSpec) -> None:
    """Raise `UsageError` when the guild's engine, or an agent's, cannot be loaded."""
    named = [("execution.engine", spec.execution.engine)]
    named += [
        (f"agents[{index}].execution.engine", agent.execution.engine)
        for index, agent in enumerate(spec.agents)
        if agent.execution is not None and "engine" in agent.execution.model_fields_set
    ]
    for key, name in named:
        try:
            engine_class(name)
        except (EngineError, ImportError) as exc:
            raise UsageError(f"{spec.source or spec.id}: {key}: {exc}") from None


def check_only(spec: GuildSpec, only: frozenset[str]) -> None:
    """Raise `UsageError` when `--only` names an agent the guild does not have."""
    known = [agent.id for agent in spec.agents]
    unknown = sorted(only - set(known))
    if unknown:
        raise UsageError(
            f"--only: no agent {', '.join(map(repr, unknown))} in guild {spec.id!r} "
            f"(agents: {', '.join(known) or 'none'})"
        )


def _put_first_on_path(folder: Path, *, only_if_absent: bool = False) -> None:
    """Put `folder` at the front of `sys.path`, moving it there if it is already listed."""
    entry = str(folder)
    if entry in sys.path:
        if only_if_absent:
            return
        sys.path.remove(entry)
    sys.path.insert(0, entry)
