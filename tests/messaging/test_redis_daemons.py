"""Two real daemons sharing a guild over Redis, each running some agents (`--only`)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bus_agents import CHAIN_GUILD, guild_folder, ledger_lines
from daemon_harness import Daemon, Rustic, wait_until

pytest.importorskip("redis")
pytestmark = pytest.mark.redis

MESSAGES = 2000
UPSTREAM = "source,relay-0,relay-1"


@pytest.fixture
def elsewhere(tmp_path: Path) -> Iterator[Rustic]:
    """A second runtime dir, as a second host would have: its daemons are killed at the end."""
    path = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp")) / "run"
    harness = Rustic(path, tmp_path)
    try:
        yield harness
    finally:
        harness.kill_all()
        shutil.rmtree(path.parent, ignore_errors=True)


def shared_guild(folder: Path, url: str, ledger: Path) -> Path:
    execution = "{engine: multithreaded, max_workers: 4}"
    text = CHAIN_GUILD.format(
        guild_id="shared",
        name="Shared guild",
        messaging=url,
        execution=execution,
        ledger=ledger,
        work_s=0.0005,
    )
    return guild_folder(folder, text)


def kill(daemon: Daemon) -> None:
    daemon.proc.kill()
    daemon.wait()


def test_a_daemon_killed_mid_stream_loses_nothing_and_duplicates_nothing_downstream(
    rustic: Rustic, elsewhere: Rustic, tmp_path: Path, bus_redis_url: str
) -> None:
    # Given the upstream agents in one daemon and the ledger in another, sharing Redis
    ledger = tmp_path / "ledger.txt"
    guild_file = shared_guild(tmp_path / "guild", bus_redis_url, ledger)
    downstream = elsewhere.start(guild_file, "--only", "ledger")
    rustic.start(guild_file, "--only", UPSTREAM)

    # When a burst published in the upstream daemon is under way there
    sent = rustic.cli("send", "burst", f'{{"count": {MESSAGES}}}', "--format", "Burst")
    assert sent.exit_code == 0, sent.stderr
    wait_until(lambda: len(ledger_lines(ledger)) >= MESSAGES // 10, what="the first landings")

    # And the upstream daemon is killed with SIGKILL, then started again
    kill(rustic.daemons[-1])
    assert len(set(ledger_lines(ledger))) < MESSAGES, "the kill came too late to test anything"
    rustic.start(guild_file, "--only", UPSTREAM)

    # Then every message reaches the ledger in the other daemon exactly once: a relay's
    # turn that died unfinished had published nothing
    wait_until(
        lambda: set(ledger_lines(ledger)) == set(range(MESSAGES)),
        timeout=40,
        what="every message to land",
    )
    assert len(ledger_lines(ledger)) == MESSAGES
    assert rustic.cli("stop").exit_code == 0
    assert elsewhere.cli("stop").exit_code == 0
    assert downstream.wait() == 0


def test_a_killed_ledger_daemon_handles_again_at_most_the_message_in_flight(
    rustic: Rustic, elsewhere: Rustic, tmp_path: Path, bus_redis_url: str
) -> None:
    # Given the ledger in a daemon of its own, committing each turn before the next
    ledger = tmp_path / "ledger.txt"
    guild_file = shared_guild(tmp_path / "guild", f"{bus_redis_url}?window=0", ledger)
    elsewhere.start(guild_file, "--only", "ledger")
    upstream = rustic.start(guild_file, "--only", UPSTREAM)
    sent = rustic.cli("send", "burst", f'{{"count": {MESSAGES}}}', "--format", "Burst")
    assert sent.exit_code == 0, sent.stderr

    # When the ledger's daemon is killed mid-stream and started again
    wait_until(lambda: len(ledger_lines(ledger)) >= MESSAGES // 10, what="the first landings")
    kill(elsewhere.daemons[-1])
    assert len(set(ledger_lines(ledger))) < MESSAGES, "the kill came too late to test anything"
    restarted = elsewhere.start(guild_file, "--only", "ledger")

    # Then it claims what the dead one had taken, and every message lands, at most one twice
    wait_until(
        lambda: set(ledger_lines(ledger)) == set(range(MESSAGES)),
        timeout=40,
        what="every message to land",
    )
    assert len(ledger_lines(ledger)) - MESSAGES <= 1
    assert "pending deliveries claimed agent_id=ledger" in restarted.stderr()
    assert elsewhere.cli("stop").exit_code == 0
    assert rustic.cli("stop").exit_code == 0
    assert upstream.wait() == 0
