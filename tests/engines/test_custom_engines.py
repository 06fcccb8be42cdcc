"""Custom engines: chosen by ``pkg.module:Class`` or entry point, refused when not engines."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from conformance_agents import Item
from rustic import EngineSpec, Guild
from rustic.engines import EngineError, create_engine, engine_class, engine_names
from rustic.spec import load_guild_spec

HERE = Path(__file__).parent


@pytest.fixture(autouse=True)
def _tests_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``custom_engine`` and ``conformance_agents`` importable by name."""
    monkeypatch.syspath_prepend(str(HERE))


@pytest.fixture
def plugin_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An installed distribution whose entry point names CountingEngine ``counting``."""
    site = tmp_path / "site"
    dist_info = site / "rustic_counting_plugin-1.0.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: rustic-counting-plugin\nVersion: 1.0\n"
    )
    (dist_info / "entry_points.txt").write_text(
        "[rustic.engines]\ncounting = custom_engine:CountingEngine\n"
    )
    monkeypatch.syspath_prepend(str(site))
    return site


def write_guild(folder: Path, engine: str) -> Path:
    path = folder / "guild.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            id: custom
            name: Custom engine guild
            execution:
              engine: {engine}
              max_workers: 3
            agents:
              - id: counter
                name: Counter
                class_name: conformance_agents.Counter
                additional_topics: [work]
            """
        )
    )
    return path


def run_counter(guild: Guild, messages: int) -> None:
    for n in range(messages):
        guild.publish("work", Item(n=n))
    assert guild.run_until_idle(timeout=10)


def test_a_guild_file_runs_its_agents_on_a_custom_engine_named_by_module_and_class(
    tmp_path: Path,
) -> None:
    from custom_engine import CountingEngine

    # Given a guild file whose engine is custom_engine:CountingEngine
    spec = load_guild_spec(write_guild(tmp_path, "custom_engine:CountingEngine"))

    # When the guild runs 20 messages
    guild = Guild.from_spec(spec)
    run_counter(guild, 20)

    # Then the custom engine, built with the spec's knobs, dispatched every one of them
    engine = guild.engine_of("counter")
    assert isinstance(engine, CountingEngine)
    assert engine.max_workers == 3
    assert engine.dispatched == 20
    assert guild.wrapper("counter").state.get()["count"] == 20
    assert guild.stop(timeout=5).clean


def test_create_engine_builds_a_custom_engine_from_a_name_or_a_spec() -> None:
    from custom_engine import CountingEngine

    by_colon = create_engine("custom_engine:CountingEngine")
    by_dots = create_engine("custom_engine.CountingEngine")
    by_spec = create_engine(
        EngineSpec(engine="custom_engine:CountingEngine", options={"thread_name_prefix": "c-"})
    )
    assert all(isinstance(e, CountingEngine) for e in (by_colon, by_dots, by_spec))
    assert isinstance(by_spec, CountingEngine)
    assert by_spec.thread_name_prefix == "c-"


@pytest.mark.usefixtures("plugin_dist")
def test_an_entry_point_in_group_rustic_engines_makes_an_engine_selectable_by_its_name(
    tmp_path: Path,
) -> None:
    from custom_engine import CountingEngine

    # Given a distribution that declares the entry point counting = custom_engine:CountingEngine
    # Then its name is listed and resolves to the class
    assert "counting" in engine_names()
    assert engine_class("counting") is CountingEngine

    # And a guild file can name it
    guild = Guild.from_spec(load_guild_spec(write_guild(tmp_path, "counting")))
    run_counter(guild, 5)
    engine = guild.engine_of("counter")
    assert isinstance(engine, CountingEngine)
    assert engine.dispatched == 5
    guild.stop(timeout=5)


def refusal(name: str) -> str:
    """The message of the EngineError that ``create_engine(name)`` raises."""
    with pytest.raises(EngineError) as caught:
        create_engine(name)
    return str(caught.value)


def test_a_class_that_is_not_an_engine_is_refused_with_the_contract_it_lacks() -> None:
    assert refusal("custom_engine:NotAnEngine") == (
        "engine 'custom_engine:NotAnEngine' is <class 'custom_engine.NotAnEngine'>, "
        "which does not implement rustic.engines.BaseExecutionEngine"
    )


def test_an_engine_with_abstract_methods_left_is_refused_with_the_methods_it_misses() -> None:
    assert refusal("custom_engine:HalfEngine") == (
        "engine 'custom_engine:HalfEngine' does not implement the contract: missing "
        "agents, pause, resume, shutdown, stop_agent, wait_idle"
    )


def test_an_unknown_engine_name_lists_the_valid_ones() -> None:
    message = refusal("turbo")
    assert message.startswith("unknown engine 'turbo' (expected one of sync, multithreaded, ")
    for name in ("asyncio", "multiprocess", "ray", "or pkg.module:Class"):
        assert name in message


def test_a_custom_engine_whose_module_does_not_import_says_why() -> None:
    assert "no_such_module" in refusal("no_such_module:Engine")
