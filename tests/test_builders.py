"""Builders produce validated specs from code."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from library_agents import Greeter, GreeterProps
from rustic import AgentBuilder, GuildBuilder, GuildSpec


def test_agent_builder_fills_every_field_of_the_spec() -> None:
    spec = (
        AgentBuilder(Greeter)
        .set_id("g1")
        .set_name("Greeter one")
        .set_description("says hi")
        .set_properties(GreeterProps(greeting="Hey"))
        .add_additional_topic("greetings")
        .add_additional_topic("more")
        .listen_to_default_topic(False)
        .set_dependency_map({"store": {"class_name": "rustic.deps.KeyValueStore"}})
        .set_max_retries(0)
        .build_spec()
    )
    assert spec.class_name == "library_agents.Greeter"
    assert spec.properties == {"greeting": "Hey"}
    assert spec.additional_topics == ["greetings", "more"]
    assert spec.listen_to_default_topic is False
    assert spec.dependency_map["store"].class_name == "rustic.deps.KeyValueStore"
    assert spec.resolve_class() is Greeter


def test_agent_builder_refuses_properties_the_agent_model_rejects() -> None:
    with pytest.raises(ValidationError, match="greeting"):
        AgentBuilder(Greeter).set_id("g").set_properties({"greeting": 5}).build_spec()


def test_agent_builder_refuses_a_class_that_is_not_an_agent() -> None:
    with pytest.raises(TypeError, match=r"subclass of rustic\.Agent"):
        AgentBuilder(dict)  # type: ignore[type-var]


def test_guild_builder_produces_a_spec_that_round_trips() -> None:
    agent = AgentBuilder(Greeter).set_id("g").build_spec()
    spec = (
        GuildBuilder("demo", "Demo", "a demo")
        .set_execution_engine("multithreaded")
        .set_state("memory")
        .set_shutdown_timeout(3)
        .add_agent_spec(agent)
        .build_spec()
    )
    assert spec.execution.engine == "multithreaded"
    assert GuildSpec.model_validate(spec.model_dump()) == spec


def test_guild_builder_launches_a_working_guild() -> None:
    agent = AgentBuilder(Greeter).set_id("g").build_spec()
    guild = GuildBuilder("launched").add_agent_spec(agent).launch()
    try:
        assert guild.agent_ids() == ["g"]
    finally:
        guild.stop()
