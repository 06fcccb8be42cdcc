"""rustic: run guilds of message-driven agents; reload them live; stop them without loss."""

from __future__ import annotations

from rustic.agent import Agent, AgentFixtures, NoProperties, ProcessContext, processor
from rustic.builders import AgentBuilder, GuildBuilder
from rustic.engines import (
    AgentInfo,
    AgentState,
    AsyncioExecutionEngine,
    BaseExecutionEngine,
    EngineReport,
    MultiprocessExecutionEngine,
    MultithreadedExecutionEngine,
    RayExecutionEngine,
    SyncExecutionEngine,
)
from rustic.guild import Guild, GuildStopping
from rustic.message import ErrorReport, Message
from rustic.shutdown import ShutdownReport
from rustic.spec import AgentSpec, DependencySpec, EngineSpec, GuildSpec, SpecError
from rustic.state import StateHandle

__version__ = "0.1.0"

__all__ = [
    "Agent",
    "AgentBuilder",
    "AgentFixtures",
    "AgentInfo",
    "AgentSpec",
    "AgentState",
    "AsyncioExecutionEngine",
    "BaseExecutionEngine",
    "DependencySpec",
    "EngineReport",
    "EngineSpec",
    "ErrorReport",
    "Guild",
    "GuildBuilder",
    "GuildSpec",
    "GuildStopping",
    "Message",
    "MultiprocessExecutionEngine",
    "MultithreadedExecutionEngine",
    "NoProperties",
    "ProcessContext",
    "RayExecutionEngine",
    "ShutdownReport",
    "SpecError",
    "StateHandle",
    "SyncExecutionEngine",
    "processor",
]
