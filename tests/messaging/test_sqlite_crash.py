"""A real daemon on the sqlite bus, killed with SIGKILL mid-stream and started again."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bus_agents import ledger_lines
from daemon_harness import Rustic, wait_until, write_guild

MESSAGES = 3000
HERE = Path(__file__).resolve().parent

GUILD = """\
id: crashy
name: Crash test
messaging: sqlite:///bus.db
execution: {{engine: {engine}}}
agents:
  - {{id: source, name: Source, class_name: bus_agents.Source,
      additional_topics: [burst], listen_to_default_topic: false}}
  - {{id: relay-0, name: Relay 0, class_name: bus_agents.Relay,
      properties: {{next_topic: hop-1}}, additional_topics: [hop-0],
      listen_to_default_topic: false}}
  - {{id: relay-1, name: Relay 1, class_name: bus_agents.Relay,
      properties: {{next_topic: hop-2}}, additional_topics: [hop-1],
      listen_to_default_topic: false}}
  - {{id: ledger, name: Ledger, class_name: bus_agents.Ledger,
      properties: {{path: {ledger}, work_s: 0.0002}}, additional_topics: [hop-2],
      listen_to_default_topic: false}}
"""


@pytest.mark.parametrize("engine", ["sync", "multithreaded"])
def test_a_daemon_killed_mid_stream_handles_every_message_after_a_restart(
    rustic: Rustic, tmp_path: Path, engine: str
) -> None:
    # Given a daemon on sqlite that accepted a burst of messages and is handling them
    folder = tmp_path / "guild"
    ledger = tmp_path / "ledger.txt"
    guild_file = write_guild(folder, GUILD.format(engine=engine, ledger=ledger), {})
    shutil.copy(HERE / "bus_agents.py", folder / "bus_agents.py")
    first = rustic.start(guild_file)
    sent = rustic.cli("send", "burst", f'{{"count": {MESSAGES}}}', "--format", "Burst")
    assert sent.exit_code == 0, sent.stderr

    # When it is killed with SIGKILL part way through
    wait_until(lambda: len(ledger_lines(ledger)) >= MESSAGES // 10, what="the first landings")
    first.proc.kill()
    first.wait()
    landed_before = len(ledger_lines(ledger))
    assert landed_before < MESSAGES, "the kill came too late to test anything"

    # And started again on the same file
    second = rustic.start(guild_file)

    # Then every message lands, and at most the one in flight at the kill lands twice
    wait_until(
        lambda: set(ledger_lines(ledger)) == set(range(MESSAGES)),
        timeout=40,
        what="every message to land",
    )
    lines = ledger_lines(ledger)
    assert len(lines) - MESSAGES <= 1, f"{len(lines) - MESSAGES} messages were handled twice"
    assert "pending deliveries loaded" in second.stderr()
    assert rustic.cli("stop").exit_code == 0
    assert second.wait() == 0
