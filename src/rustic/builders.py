"""Fluent builders that produce agent and guild specs in code."""

from __future__ import annotations

from typing import Any, Generic, Self, TypeVar

from pydantic import BaseModel

from rustic.agent import Agent
from rustic.imports import qualified_name
from rustic.spec import AgentSpec, DependencySpec, EngineSpec, GuildSpec

A = TypeVar("A", bound=Agent[Any])


class _SpecBuilder:
    """What agent and guild builders share: fields set one call at a time."""

    _fields: dict[str, Any]

    def set_name(self, name: str) -> Self:
        """Set the display name."""
        self._fields["name"] = name
        return self

    def set_description(self, description: str) -> Self:
        """Set what it is for."""
        self._fields["description"] = description
        return self

    def set_dependency_map(
        self, dependency_map: dict[str, DependencySpec | dict[str, Any]]
    ) -> Self:
        """Set the dependencies injected into handlers by parameter name."""
        self._fields["dependency_map"] = dependency_map
        return self


class AgentBuilder(_SpecBuilder, Generic[A]):
    """Builds the spec of one agent: ``AgentBuilder(Greeter).set_id("g").build_spec()``."""

    def __init__(self, agent_class: type[A]) -> None:
        if not (isinstance(agent_class, type) and issubclass(agent_class, Agent)):
            raise TypeError(f"AgentBuilder takes a subclass of rustic.Agent, got {agent_class!r}")
        self._class = agent_class
        self._fields: dict[str, Any] = {"class_name": qualified_name(agent_class)}

    def set_id(self, agent_id: str) -> Self:
        """Set the agent's id, unique in its guild."""
        self._fields["id"] = agent_id
        return self

    def set_properties(self, properties: BaseModel | dict[str, Any]) -> Self:
        """Set the agent's properties (validated against its properties model at build)."""
        if isinstance(properties, BaseModel):
            properties = properties.model_dump(mode="json")
        self._fields["properties"] = dict(properties)
        return self

    def add_additional_topic(self, topic: str) -> Self:
        """Subscribe the agent to ``topic`` as well."""
        self._fields.setdefault("additional_topics", []).append(topic)
        return self

    def listen_to_default_topic(self, listen: bool = True) -> Self:
        """Choose whether the agent hears the guild's default topic (it does by default)."""
        self._fields["listen_to_default_topic"] = listen
        return self

    def set_execution(self, execution: EngineSpec | dict[str, Any]) -> Self:
        """Run this agent on an engine of its own rather than the guild's default."""
        self._fields["execution"] = execution
        return self

    def set_max_retries(self, retries: int) -> Self:
        """How many times a raising handler is retried before the message is dead-lettered."""
        self._fields["max_retries"] = retries
        return self

    def build_spec(self) -> AgentSpec:
        """Validate and return the spec; properties are checked against the agent's model."""
        fields = dict(self._fields)
        fields.setdefault("name", fields.get("id", self._class.__name__))
        spec = AgentSpec.model_validate(fields)
        self._class.properties_model.model_validate(spec.properties)
        spec._agent_class = self._class
        return spec


class GuildBuilder(_SpecBuilder):
    """Builds a guild spec: ``GuildBuilder("demo").add_agent_spec(spec).build_spec()``."""

    def __init__(self, guild_id: str, name: str | None = None, description: str = "") -> None:
        self._fields: dict[str, Any] = {
            "id": guild_id,
            "name": name or guild_id,
            "description": description,
        }
        self._agents: list[AgentSpec] = []

    def set_execution_engine(self, engine: EngineSpec | str) -> Self:
        """Set the guild's default engine, by name or spec."""
        self._fields["execution"] = EngineSpec(engine=engine) if isinstance(engine, str) else engine
        return self

    def set_messaging(self, url: str) -> Self:
        """Set the bus backend: ``memory``, ``sqlite:///path.db`` or ``redis://host/db``."""
        self._fields["messaging"] = url
        return self

    def set_state(self, url: str) -> Self:
        """Set the state backend: ``memory``, ``sqlite:///path.db`` or ``redis://host/db``."""
        self._fields["state"] = url
        return self

    def set_shutdown_timeout(self, seconds: float) -> Self:
        """Set how long a stop may drain before teardown."""
        self._fields["shutdown_timeout"] = seconds
        return self

    def add_agent_spec(self, spec: AgentSpec) -> Self:
        """Add an agent to launch with the guild."""
        self._agents.append(spec)
        return self

    def build_spec(self) -> GuildSpec:
        """Validate and return the guild spec."""
        return GuildSpec.model_validate({**self._fields, "agents": self._agents})

    def launch(self) -> Any:
        """Build the spec, then the guild, and launch its agents."""
        from rustic.guild import Guild

        return Guild.from_spec(self.build_spec())
