"""``ShutdownReport``: the accounting of a guild's stop."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rustic.engines.base import EngineReport


@dataclass
class ShutdownReport:
    """The accounting of a guild's stop: every message is handled, pending or dead."""

    handled: int = 0
    pending: int = 0
    dead_lettered: int = 0
    drained: bool = True
    hooks_failed: list[str] = field(default_factory=list)
    not_joined: list[str] = field(default_factory=list)
    stuck_agents: list[str] = field(default_factory=list)
    dependencies_failed: list[str] = field(default_factory=list)
    duration: float = 0.0

    @property
    def clean(self) -> bool:
        """True when every hook ran, every dependency closed and every worker joined."""
        return not (
            self.hooks_failed or self.not_joined or self.stuck_agents or self.dependencies_failed
        )

    def add(self, report: EngineReport) -> None:
        """Fold one engine's report into this one."""
        self.handled += report.handled
        self.pending += report.pending
        self.dead_lettered += report.dead_lettered
        self.hooks_failed += report.hooks_failed
        self.not_joined += report.not_joined
        self.stuck_agents += report.stuck_agents

    def to_dict(self) -> dict[str, Any]:
        """Return the report as a JSON-able dict."""
        return {**vars(self), "clean": self.clean}

    def summary(self) -> str:
        """One line accounting for every message."""
        return f"handled={self.handled} pending={self.pending} dead_lettered={self.dead_lettered}"
