"""``--watch`` in the library: real saves seen by watchfiles become launches, stops, reloads."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from reload_project import Project
from rustic import Guild, MultithreadedExecutionEngine
from rustic.daemon.watch import GuildWatcher
from waiting import wait_until

AGENT = """
    from pydantic import BaseModel
    from rustic import Agent, ProcessContext, processor
    from {package} import words


    class Item(BaseModel):
        n: int


    class Echo(Agent):
        @processor(Item)
        def echo(self, ctx: ProcessContext[Item], store) -> None:
            store.set(f"{{self.id}}:{{ctx.payload.n}}", "{version}-" + words.WORD)
"""

GUILD = """
id: watched
name: Watched
dependency_map:
  store: {{class_name: rustic.deps.KeyValueStore}}
agents:
{agents}
"""

AGENT_ENTRY = """  - id: {agent_id}
    name: {agent_id}
    class_name: {package}.{module}.Echo
    additional_topics: [{topic}]
"""


class Watched:
    def __init__(self, project: Project) -> None:
        self.project = project
        self.guild_file = project.root / "guild.yaml"

    def write_guild(self, *agents: tuple[str, str, str], extra: str = "") -> None:
        entries = "".join(
            AGENT_ENTRY.format(agent_id=a, module=m, topic=t, package=self.project.package)
            for a, m, t in agents
        )
        self.guild_file.write_text(GUILD.format(agents=entries) + extra)

    def write_agent(self, module: str, version: str) -> None:
        self.project.write(module, AGENT.format(package=self.project.package, version=version))

    def start(self) -> None:
        self.guild = Guild.from_yaml(
            self.guild_file, execution_engine=MultithreadedExecutionEngine(max_workers=2)
        )
        self.watcher = GuildWatcher(self.guild, self.guild_file, [self.project.root])
        self.watcher.start()

    def store(self) -> object:
        return self.guild.dependencies.guild_scoped["store"]

    def said(self, agent_id: str, n: int, topic: str) -> object:
        self.guild.publish(topic, {"n": n}, format="Item")
        key = f"{agent_id}:{n}"
        wait_until(lambda: self.store().get(key) is not None)  # type: ignore[attr-defined]
        return self.store().get(key)  # type: ignore[attr-defined]

    def stop(self) -> None:
        self.watcher.stop()
        self.guild.stop(timeout=5)


@pytest.fixture
def watched(project: Project) -> Iterator[Watched]:
    w = Watched(project)
    project.write("words", 'WORD = "hello"\n')
    w.write_agent("echo_a", "v1")
    w.write_agent("echo_b", "v1")
    w.write_guild(("a", "echo_a", "ta"), ("b", "echo_b", "tb"))
    w.start()
    yield w
    w.stop()


def test_saving_an_agent_module_reloads_that_agent_only(watched: Watched) -> None:
    b_version = watched.guild.wrapper("b").version

    watched.write_agent("echo_a", "v2")

    wait_until(lambda: any(h["action"] == "reload" for h in watched.watcher.history))
    assert watched.said("a", 1, "ta") == "v2-hello"
    assert watched.said("b", 1, "tb") == "v1-hello"
    assert watched.guild.wrapper("b").version == b_version
    (entry,) = watched.watcher.history
    assert entry["agent_id"] == "a"
    assert entry["ok"] is True
    assert entry["latency_ms"] < 5000


def test_saving_a_shared_helper_reloads_every_agent_that_imports_it(watched: Watched) -> None:
    watched.project.write("words", 'WORD = "howdy"\n')

    wait_until(lambda: len(watched.watcher.history) == 2)
    assert {h["agent_id"] for h in watched.watcher.history} == {"a", "b"}
    assert watched.said("a", 2, "ta") == "v1-howdy"
    assert watched.said("b", 2, "tb") == "v1-howdy"


def test_a_broken_save_changes_nothing_and_the_next_good_save_recovers(
    watched: Watched,
) -> None:
    # Given a save that breaks the agent's module
    path = watched.project.root / watched.project.package / "echo_a.py"
    path.write_text(path.read_text() + "\ndef broken(:\n")
    wait_until(lambda: len(watched.watcher.history) == 1)

    # Then the reload failed and the old code still serves
    assert watched.watcher.history[0]["ok"] is False
    assert watched.said("a", 3, "ta") == "v1-hello"

    # When the next save is good, it takes effect
    watched.write_agent("echo_a", "v3")
    wait_until(lambda: len(watched.watcher.history) == 2)
    assert watched.said("a", 4, "ta") == "v3-hello"


def test_guild_file_edits_launch_stop_and_reload_agents(watched: Watched) -> None:
    # Given the guild file loses b, gains c, and moves a to another topic
    watched.write_agent("echo_c", "v1")
    watched.write_guild(("a", "echo_a", "ta2"), ("c", "echo_c", "tc"))

    # Then c is launched, b is stopped, a is reloaded onto its new topic
    wait_until(lambda: len(watched.watcher.history) >= 3)
    actions = {(h["action"], h["agent_id"]) for h in watched.watcher.history}
    assert {("launch", "c"), ("stop", "b"), ("reload", "a")} <= actions
    assert sorted(watched.guild.agent_ids()) == ["a", "c"]
    assert watched.said("c", 5, "tc") == "v1-hello"
    assert watched.said("a", 5, "ta2") == "v1-hello"


def test_guild_level_changes_are_reported_as_needing_a_restart(
    watched: Watched, caplog: pytest.LogCaptureFixture
) -> None:
    text = watched.guild_file.read_text().replace("name: Watched", "name: Renamed")
    watched.guild_file.write_text(text)
    wait_until(lambda: "restart to apply" in caplog.text)
    assert "keys=name" in caplog.text
    assert watched.guild.agent_ids() == ["a", "b"]


def test_an_invalid_guild_file_is_reported_and_nothing_changes(
    watched: Watched, caplog: pytest.LogCaptureFixture
) -> None:
    watched.guild_file.write_text(watched.guild_file.read_text() + "bogus_key: 1\n")
    wait_until(lambda: "guild file not applied" in caplog.text)
    assert "bogus_key" in caplog.text
    assert watched.guild.agent_ids() == ["a", "b"]


def test_files_in_caches_and_virtualenvs_are_ignored(watched: Watched) -> None:
    # Given saves in ignored places, then one real save
    for ignored in ("__pycache__", ".venv", ".git"):
        (watched.project.root / ignored).mkdir(exist_ok=True)
        (watched.project.root / ignored / "x.py").write_text("X = 1\n")
    (watched.project.root / "notes.txt").write_text("not code\n")
    watched.write_agent("echo_b", "v2")

    # Then only the real one caused a reload
    wait_until(lambda: len(watched.watcher.history) >= 1)
    assert [h["agent_id"] for h in watched.watcher.history] == ["b"]


def test_agents_module_text_is_valid_python() -> None:
    compile(textwrap.dedent(AGENT.format(package="p", version="v")), "agent", "exec")


def test_the_watch_filter_keeps_python_and_the_guild_file_and_honours_excludes(
    tmp_path: Path,
) -> None:
    from watchfiles import Change

    from rustic.daemon.watch import WatchFilter

    guild_file = tmp_path / "guild.yaml"
    runtime = tmp_path / "run"
    keep = WatchFilter(guild_file, [runtime], ["*_scratch.py", "*/vendor/*"])

    assert keep(Change.modified, str(guild_file))
    assert keep(Change.modified, str(tmp_path / "agents" / "a.py"))
    assert not keep(Change.modified, str(tmp_path / "other.yaml"))
    assert not keep(Change.modified, str(tmp_path / "notes_scratch.py"))
    assert not keep(Change.modified, str(tmp_path / "vendor" / "lib.py"))
    assert not keep(Change.modified, str(runtime / "x.py"))
    assert not keep(Change.modified, str(tmp_path / "__pycache__" / "a.py"))
