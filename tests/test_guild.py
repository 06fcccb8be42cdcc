"""The guild as a library: the documented example, routing, dependencies, state, stop."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from library_agents import Chatty, Counting, Greeter, Greeting, Recorder, Reply, Twice
from rustic import AgentBuilder, DependencySpec, Guild, GuildStopping
from rustic.agent import inbox_topic


def recorder(agent_id: str, *topics: str, default: bool = True) -> object:
    builder = AgentBuilder(Recorder).set_id(agent_id).listen_to_default_topic(default)
    for topic in topics:
        builder.add_additional_topic(topic)
    return builder.build_spec()


@pytest.fixture(autouse=True)
def _clean_journal() -> None:
    Recorder.journal.clear()
    Twice.order.clear()


def test_the_documented_example_runs_as_written() -> None:
    from rustic_ai.core.guild import AgentBuilder, Guild
    from rustic_ai.core.guild.execution import (
        MultithreadedExecutionEngine,
        SyncExecutionEngine,
    )

    # Given the seed's guild, one agent on the default engine and one on named threads
    guild = Guild(id="demo", name="Demo", description="A demo guild")
    spec = (
        AgentBuilder(Greeter)
        .set_id("agent-1")
        .set_name("Agent1")
        .set_description("Greets on the sync engine")
        .build_spec()
    )
    guild.launch_agent(spec)
    spec2 = (
        AgentBuilder(Greeter)
        .set_id("agent-2")
        .set_name("Agent2")
        .set_description("Greets on threads")
        .set_properties({"greeting": "Hi"})
        .build_spec()
    )
    engine = MultithreadedExecutionEngine(max_workers=8, thread_name_prefix="agent-")
    guild.launch_agent(spec2, execution_engine=engine)
    guild.launch_agent(recorder("listener"))

    # When a greeting is published and the guild settles
    guild.publish(guild.default_topic, Greeting(name="Ada"))
    assert guild.run_until_idle(timeout=10)

    # Then each greeter answered, the threaded one on a thread carrying the prefix
    texts = sorted(p["text"] for f, p in Recorder.of("listener") if f.endswith("Reply"))
    assert texts[0].startswith("Hello, Ada [")
    assert texts[1].startswith("Hi, Ada [agent-")
    assert isinstance(guild.default_engine, SyncExecutionEngine)
    report = guild.stop()
    assert report.clean
    assert report.pending == 0


def test_agents_on_different_engines_of_one_guild_talk_to_each_other() -> None:
    from rustic import MultithreadedExecutionEngine

    with Guild(id="mixed") as guild:
        guild.launch_agent(AgentBuilder(Greeter).set_id("g").build_spec())
        guild.launch_agent(
            recorder("r"), execution_engine=MultithreadedExecutionEngine(max_workers=2)
        )
        guild.publish("default_topic", Greeting(name="Bo"))
        assert guild.run_until_idle(timeout=10)
        assert next(p for f, p in Recorder.of("r") if f.endswith("Reply"))["text"].startswith(
            "Hello, Bo"
        )


def test_an_agent_never_receives_what_it_sent_itself_and_reply_reaches_the_sender() -> None:
    with Guild(id="chat") as guild:
        guild.launch_agent(
            AgentBuilder(Chatty).set_id("chatty").add_additional_topic("chat").build_spec()
        )
        guild.launch_agent(recorder("peer", "chat"))
        guild.launch_agent(recorder("outsider", default=False))

        # peer writes to chatty's inbox; chatty sends on "chat" (which it hears) and replies
        guild.publish(inbox_topic("chatty"), Greeting(name="peer"), sender="peer")
        assert guild.run_until_idle(timeout=5)

        assert guild.wrapper("chatty").processed == 1  # not its own "chat" message
        formats = [f.rpartition(".")[2] for f, _ in Recorder.of("peer")]
        assert formats == ["Greeting", "Reply"]
        assert Recorder.of("outsider") == []


def test_every_matching_handler_runs_in_declaration_order() -> None:
    with Guild(id="order") as guild:
        guild.launch_agent(AgentBuilder(Twice).set_id("twice").build_spec())
        guild.publish("default_topic", Greeting(name="x"))
        guild.publish("default_topic", Reply(text="y"))
        assert guild.run_until_idle(timeout=5)
    assert Twice.order == ["first", "any", "second", "any"]


def test_messages_from_one_publisher_arrive_in_order_and_fan_out() -> None:
    with Guild(id="fan") as guild:
        for agent_id in ("r1", "r2", "r3"):
            guild.launch_agent(recorder(agent_id, "news", default=False))
        for n in range(100):
            guild.publish("news", {"n": n})
        assert guild.run_until_idle(timeout=5)
        for agent_id in ("r1", "r2", "r3"):
            assert [p["n"] for _, p in Recorder.of(agent_id)] == list(range(100))


def test_dependencies_are_injected_by_name_shared_per_scope_and_closed_at_stop() -> None:
    # Given a guild-wide store and one agent with a store of its own
    guild = Guild(
        id="deps",
        dependency_map={"store": DependencySpec(class_name="rustic.deps.KeyValueStore")},
    )
    shared_a = AgentBuilder(Counting).set_id("a").build_spec()
    shared_b = AgentBuilder(Counting).set_id("b").build_spec()
    own = (
        AgentBuilder(Counting)
        .set_id("own")
        .set_dependency_map({"store": {"class_name": "rustic.deps.KeyValueStore"}})
        .build_spec()
    )
    for spec in (shared_a, shared_b, own):
        guild.launch_agent(spec)

    # When a greeting reaches all three
    guild.publish("default_topic", Greeting(name="x"))
    assert guild.run_until_idle(timeout=5)
    shared = guild.wrapper("a").dependencies["store"]
    private = guild.wrapper("own").dependencies["store"]

    # Then a and b share one store, "own" has its own; both close after the hooks ran
    assert guild.wrapper("b").dependencies["store"] is shared
    assert private is not shared
    assert (shared.get("a"), shared.get("b"), shared.get("own")) == (1, 1, None)
    assert private.get("own") == 1
    report = guild.stop()
    assert report.clean
    assert shared.closed
    assert private.closed
    assert shared.get("a:bye") is True
    assert private.get("own:bye") is True


def test_a_handler_parameter_naming_no_dependency_is_refused_at_launch() -> None:
    with Guild(id="nodeps") as guild, pytest.raises(LookupError, match="store"):
        guild.launch_agent(AgentBuilder(Counting).set_id("c").build_spec())


def test_sqlite_state_survives_a_restart_of_the_guild(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    deps = {"store": DependencySpec(class_name="rustic.deps.KeyValueStore")}
    for _run in range(2):
        guild = Guild(id="durable", state=url, dependency_map=deps)
        guild.launch_agent(AgentBuilder(Counting).set_id("counter").build_spec())
        for _ in range(3):
            guild.publish("default_topic", Greeting(name="x"))
        guild.state.update({"runs": guild.state.get().get("runs", 0) + 1})
        assert guild.run_until_idle(timeout=5)
        guild.stop()
    guild = Guild(id="durable", state=url)
    assert guild.state.get() == {"runs": 2}
    from rustic.state import StateHandle, state_key_for_agent

    handle = StateHandle(guild.state_store, state_key_for_agent("durable", "counter"))
    assert handle.get() == {"seen": 6}
    assert handle.version == 6
    guild.stop()


def test_a_stopping_guild_refuses_messages_from_outside() -> None:
    guild = Guild(id="closing")
    guild.close_intake()
    with pytest.raises(GuildStopping):
        guild.publish("default_topic", {"x": 1})
    guild.stop()


def test_stop_accounts_for_messages_left_when_the_deadline_passes() -> None:
    # Given a sync guild nobody drives, with mail queued, stopped with no time to drain
    guild = Guild(id="left")
    guild.launch_agent(recorder("r"))
    guild.hurry()
    for n in range(5):
        guild.publish("default_topic", {"n": n})

    # Then the report counts them as pending
    report = guild.stop(timeout=0.1)
    assert (report.handled, report.pending, report.drained) == (0, 5, False)


def test_launching_a_second_agent_with_the_same_id_is_refused() -> None:
    with Guild(id="dup") as guild:
        guild.launch_agent(recorder("r"))
        with pytest.raises(ValueError, match="already has an agent 'r'"):
            guild.launch_agent(recorder("r"))


def test_status_totals_add_up_the_agents() -> None:
    with Guild(id="status") as guild:
        guild.launch_agent(recorder("r1"))
        guild.launch_agent(recorder("r2"))
        guild.publish("default_topic", {"n": 1})
        assert guild.run_until_idle(timeout=5)
        status = guild.status()
        assert status["totals"]["processed"] == 2
        assert {a["id"] for a in status["agents"]} == {"r1", "r2"}


def test_run_until_idle_waits_for_threaded_agents_that_feed_sync_ones() -> None:
    from rustic import MultithreadedExecutionEngine

    with Guild(id="chain") as guild:
        guild.launch_agent(
            AgentBuilder(Greeter).set_id("g").build_spec(),
            execution_engine=MultithreadedExecutionEngine(max_workers=2),
        )
        guild.launch_agent(recorder("r"))
        for n in range(50):
            guild.publish("default_topic", Greeting(name=str(n)))
        assert guild.run_until_idle(timeout=10)
        assert len([f for f, _ in Recorder.of("r") if f.endswith("Reply")]) == 50
    assert threading.active_count() < 50
    assert Reply
