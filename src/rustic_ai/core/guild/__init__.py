"""``rustic_ai.core.guild``: the guild, agents and builders, re-exported from rustic."""

from rustic import (
    Agent,
    AgentBuilder,
    AgentFixtures,
    AgentSpec,
    Guild,
    GuildBuilder,
    GuildSpec,
    ProcessContext,
    processor,
)

__all__ = [
    "Agent",
    "AgentBuilder",
    "AgentFixtures",
    "AgentSpec",
    "Guild",
    "GuildBuilder",
    "GuildSpec",
    "ProcessContext",
    "processor",
]
