"""The memory bus's spill file: what a stop could not handle, replayed by the next start.

The daemon round trip (a stop that runs out of time, a restart that replays) is tested in
tests/daemon/test_daemon_run.py; these pin down the file's rules.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from bus_agents import Collect, Hop
from rustic import AgentBuilder, AgentSpec, Guild
from rustic.daemon.spill import replay_spilled, spill_pending


@pytest.fixture(autouse=True)
def _clean_journal() -> None:
    Collect.journal.clear()


def collector(agent_id: str) -> AgentSpec:
    return AgentBuilder(Collect).set_id(agent_id).add_additional_topic("t").build_spec()


def test_spilled_messages_come_back_in_their_order_to_the_same_agents(tmp_path: Path) -> None:
    # Given a sync guild stopped with three messages never handled, spilled to a file
    spill = tmp_path / "g.spill.jsonl"
    first = Guild(id="g")
    first.launch_agent(collector("a"))
    sent = [first.publish("t", Hop(seq=n)) for n in range(3)]
    assert spill_pending(first, spill) == 3
    first.stop()

    # When the guild starts again and replays the file
    second = Guild(id="g")
    second.launch_agent(collector("a"))
    assert replay_spilled(second, spill) == 3
    assert second.run_until_idle(timeout=10)

    # Then the agent handles them, in order, and the file is gone
    assert [m.id for m in Collect.seen("a")] == [m.id for m in sent]
    assert not spill.exists()
    second.stop()


def test_lines_for_agents_not_running_stay_and_broken_lines_are_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a spill file with a line for a, one for b, and a broken one
    spill = tmp_path / "g.spill.jsonl"
    first = Guild(id="g")
    first.launch_agent(collector("a"))
    first.launch_agent(collector("b"))
    first.publish("t", Hop(seq=1))
    spill_pending(first, spill)
    first.stop()
    with spill.open("a") as lines:
        lines.write("{not json\n")

    # When a start runs only a (as `--only a` would)
    second = Guild(id="g")
    second.launch_agent(collector("a"))
    with caplog.at_level(logging.WARNING):
        assert replay_spilled(second, spill) == 1

    # Then b's line waits in the file for a later start, and the broken line is reported
    kept = [json.loads(line) for line in spill.read_text().splitlines()]
    assert [record["agent_id"] for record in kept] == ["b"]
    assert "spilled line dropped" in caplog.text
    second.stop()


def test_a_durable_bus_spills_nothing_its_store_keeps_the_backlog(tmp_path: Path) -> None:
    spill = tmp_path / "g.spill.jsonl"
    guild = Guild(id="g", messaging=f"sqlite:///{tmp_path}/bus.db")
    guild.launch_agent(collector("a"))
    guild.publish("t", Hop(seq=1))

    assert spill_pending(guild, spill) == 0
    assert not spill.exists()
    guild.bus.close()
