"""Each example guild in `guilds/`, run through the daemon the way its guild file says."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from daemon_harness import EXAMPLES, Rustic, wait_until

pytestmark = pytest.mark.timeout(40)


def copy_example(name: str, tmp_path: Path) -> Path:
    """A copy of an example guild, so that files it writes stay out of the repository."""
    folder = shutil.copytree(EXAMPLES / name, tmp_path / name)
    return folder / "guild.yaml"


def test_hello_greets_whoever_is_named(rustic: Rustic, tmp_path: Path) -> None:
    # Given the hello guild
    daemon = rustic.start(copy_example("hello", tmp_path))

    # When two greetings are requested
    for name in ("Ada", "Alan"):
        assert rustic.cli("send", "greetings", f'{{"name": "{name}"}}').exit_code == 0
    wait_until(lambda: daemon.status()["by_id"]["printer"]["processed"] == 2, what="greetings")
    stopped = rustic.cli("stop")

    # Then the printer printed both and the stop accounted for four deliveries
    assert stopped.exit_code == 0
    assert "Hello, Ada!\nHello, Alan!\n" in daemon.stdout()
    assert daemon.last_line() == "stopped guild=hello handled=4 pending=0 dead_lettered=0 exit=0"


def test_pipeline_keeps_its_counts_in_sqlite_across_restarts(
    rustic: Rustic, tmp_path: Path
) -> None:
    # Given the pipeline guild, run once with one line
    guild_file = copy_example("pipeline", tmp_path)
    first = rustic.start(guild_file)
    rustic.cli("send", "lines", '{"text": "the cat and the hat"}')
    wait_until(lambda: first.status()["by_id"]["reporter"]["processed"] == 1, what="a report")
    assert rustic.cli("stop").exit_code == 0
    assert "top words: the=2, and=1, cat=1 (total 5)" in first.stdout()

    # When it runs again and gets another line
    second = rustic.start(guild_file)
    rustic.cli("send", "lines", '{"text": "The end"}')
    wait_until(lambda: second.status()["by_id"]["reporter"]["processed"] == 1, what="a report")
    assert rustic.cli("stop").exit_code == 0

    # Then the counter carried on from the counts the state store kept next to the guild file
    assert "top words: the=3, and=1, cat=1 (total 7)" in second.stdout()
    assert (guild_file.parent / "state.db").exists()


def test_mixed_runs_each_agent_on_its_own_engine(rustic: Rustic, tmp_path: Path) -> None:
    # Given the mixed guild: sync by default, thread-pool squarers, an asyncio auditor
    daemon = rustic.start(copy_example("mixed", tmp_path))

    # When a job of ten numbers goes through
    rustic.cli("send", "jobs", '{"count": 10}')

    def all_in() -> bool:
        agents = daemon.status()["by_id"]
        return agents["tally"]["processed"] == agents["auditor"]["processed"] == 10

    wait_until(all_in, what="the tally and the audit")
    status = daemon.status()["by_id"]
    stopped = rustic.cli("stop")

    # Then each agent ran where its spec put it, and the sum is right
    assert {agent_id: status[agent_id]["engine"] for agent_id in status} == {
        "dispatcher": "sync",
        "squarer-a": "multithreaded",
        "squarer-b": "multithreaded",
        "tally": "sync",
        "auditor": "asyncio",
    }
    assert status["auditor"]["processed"] == 10
    assert status["squarer-a"]["where"].startswith("mixed-")
    assert status["tally"]["where"] == "MainThread"
    assert "job of 10: sum of squares 385 (threads mixed-" in daemon.stdout()
    assert stopped.exit_code == 0
