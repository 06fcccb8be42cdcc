"""A real daemon on the sqlite bus, killed with SIGKILL mid-stream and started again."""

from __future__ import annotations

from pathlib import Path

import pytest

from bus_agents import CHAIN_GUILD, guild_folder, ledger_lines
from daemon_harness import Rustic, wait_until

MESSAGES = 3000


@pytest.mark.parametrize("engine", ["sync", "multithreaded"])
def test_a_daemon_killed_mid_stream_handles_every_message_after_a_restart(
    rustic: Rustic, tmp_path: Path, engine: str
) -> None:
    # Given a daemon on sqlite that accepted a burst of messages and is handling them
    folder = tmp_path / "guild"
    ledger = tmp_path / "ledger.txt"
    text = CHAIN_GUILD.format(
        guild_id="crashy",
        name="Crash test",
        messaging="sqlite:///bus.db",
        execution=f"{{engine: {engine}}}",
        ledger=ledger,
        work_s=0.0002,
    )
    guild_file = guild_folder(folder, text)
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
