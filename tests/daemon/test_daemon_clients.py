"""The client commands against real daemons: status, send, stop, guilds, validate, init."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from daemon_harness import EXAMPLES, WAIT_S, Rustic, wait_until, write_guild

pytestmark = pytest.mark.timeout(40)

HELLO = EXAMPLES / "hello" / "guild.yaml"


def test_status_shows_each_agent_with_engine_where_state_and_counters(rustic: Rustic) -> None:
    # Given the hello guild after one greeting
    daemon = rustic.start(HELLO)
    rustic.cli("send", "greetings", '{"name": "Ada"}')
    wait_until(lambda: daemon.status()["totals"]["processed"] == 2, what="the greeting")

    # When status is asked for, as JSON and as a table
    as_json = rustic.cli("status", "--json")
    as_table = rustic.cli("status")

    # Then both describe every agent and the totals
    assert as_json.exit_code == 0
    status = as_json.json()
    assert status["daemon"]["pid"] == daemon.proc.pid
    greeter = next(agent for agent in status["agents"] if agent["id"] == "greeter")
    assert greeter["engine"] == "sync"
    assert greeter["state"] == "running"
    assert greeter["where"] == "MainThread"
    assert (greeter["processed"], greeter["errors"], greeter["dead_letters"]) == (1, 0, 0)
    assert (greeter["queue_depth"], greeter["in_flight"]) == (0, 0)
    assert greeter["uptime"] > 0
    assert status["totals"]["processed"] == 2
    rows = {line.split()[0]: line.split() for line in as_table.stdout.splitlines() if line}
    assert rows["greeter"][:4] == ["greeter", "sync", "MainThread", "running"]
    assert rows["total"][1] == "2"


def test_send_refuses_invalid_json_before_looking_for_a_daemon(rustic: Rustic) -> None:
    # Given no daemon at all
    # When payloads that are not JSON objects are sent
    broken = rustic.cli("send", "greetings", "{name: Ada}")
    not_object = rustic.cli("send", "greetings", "[1, 2]")

    # Then each is refused as bad usage, for what it is, not for the missing daemon
    assert broken.exit_code == 2
    assert "PAYLOAD is not valid JSON" in broken.stderr
    assert not_object.exit_code == 2
    assert "must be a JSON object; got list" in not_object.stderr


def test_stop_waits_for_the_daemon_to_exit_and_prints_its_accounting_line(
    rustic: Rustic,
) -> None:
    # Given the hello guild after two greetings
    daemon = rustic.start(HELLO)
    for name in ("Ada", "Grace"):
        rustic.cli("send", "greetings", f'{{"name": "{name}"}}')
    wait_until(lambda: daemon.status()["totals"]["processed"] == 4, what="the greetings")

    # When it is stopped over the socket
    stopped = rustic.cli("stop", "--timeout", "5")

    # Then the command returns once the daemon exited, with the daemon's own last line
    assert stopped.exit_code == 0
    line = "stopped guild=hello handled=4 pending=0 dead_lettered=0 exit=0"
    assert stopped.stdout.strip() == line
    assert daemon.proc.poll() == 0
    assert daemon.last_line() == line
    assert daemon.stdout().splitlines()[-3:-1] == ["Hello, Ada!", "Hello, Grace!"]
    assert not daemon.socket.exists()


@pytest.mark.parametrize(
    "command",
    [["status"], ["send", "greetings", "{}"], ["stop"], ["status", "--guild", "ghost"]],
)
def test_client_commands_say_in_one_line_that_no_daemon_runs(
    rustic: Rustic, command: list[str]
) -> None:
    result = rustic.cli(*command)
    assert result.exit_code == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert "no daemon is running for guild 'ghost'" in result.stderr or (
        f"no rustic daemon is running in {rustic.runtime}" in result.stderr
    )


def test_with_several_daemons_a_client_asks_which_guild_it_means(
    rustic: Rustic, tmp_path: Path
) -> None:
    # Given two guilds running under one runtime dir
    other = tmp_path / "other.yaml"
    other.write_text(HELLO.read_text().replace("id: hello", "id: other"))
    rustic.start(HELLO, "--app-dir", str(HELLO.parent))
    second = rustic.start(other, "--app-dir", str(HELLO.parent))

    # When status is asked without naming a guild, and then naming one
    unnamed = rustic.cli("status")
    named = rustic.cli("status", "--guild", "other", "--json")
    listing = rustic.cli("guilds", "--json")

    # Then the first lists them and asks for --guild, the second answers, guilds lists both
    assert unnamed.exit_code == 2
    assert "hello, other" in unnamed.stderr
    assert "--guild" in unnamed.stderr
    assert named.json()["daemon"]["pid"] == second.proc.pid
    rows = {row["guild"]: row for row in listing.json()}
    assert sorted(rows) == ["hello", "other"]
    assert rows["other"]["pid"] == second.proc.pid
    assert rows["other"]["state"] == "running"
    assert rows["other"]["agents"] == 2


def test_status_watch_refreshes_until_the_daemon_stops(rustic: Rustic) -> None:
    # Given a running guild watched by `rustic status --watch`
    rustic.start(HELLO)
    watcher = subprocess.Popen(
        [sys.executable, "-m", "rustic", "status", "--watch", "--interval", "0.1", "--json"],
        stdout=subprocess.PIPE,
        env=rustic.env(),
        text=True,
    )
    try:
        assert watcher.stdout is not None
        first, second = watcher.stdout.readline(), watcher.stdout.readline()
        assert '"guild": {"id": "hello"' in first
        assert '"guild"' in second

        # When the daemon stops
        assert rustic.cli("stop").exit_code == 0

        # Then the watcher says so and ends by itself
        rest, _ = watcher.communicate(timeout=WAIT_S)
        assert rest.strip().splitlines()[-1] == "guild hello is no longer running"
        assert watcher.returncode == 0
    finally:
        if watcher.poll() is None:
            watcher.send_signal(signal.SIGKILL)
            watcher.wait()


def test_validate_accepts_a_good_guild_and_names_the_line_of_a_bad_property(
    rustic: Rustic, tmp_path: Path
) -> None:
    # Given the hello guild, and a copy whose printer writes to a stream that does not exist
    bad = write_guild(
        tmp_path / "bad",
        HELLO.read_text().replace("stream: stdout", "stream: printer-paper"),
        {},
    )

    # When both are validated
    good_result = rustic.run("validate", str(HELLO))
    bad_result = rustic.run("validate", str(bad), "--app-dir", str(HELLO.parent))

    # Then the good one passes and the bad one names file, line, key and the value found
    assert good_result.exit_code == 0, good_result.stderr
    assert "ok" in good_result.stdout
    assert "2 agents" in good_result.stdout
    assert bad_result.exit_code == 2
    line = next(n for n, text in enumerate(bad.read_text().splitlines(), 1) if "printer-" in text)
    assert f"{bad}:{line}:" in bad_result.stderr
    assert "agents[1].properties.stream" in bad_result.stderr
    assert "printer-paper" in bad_result.stderr


def test_init_scaffolds_a_guild_that_runs_at_once(rustic: Rustic, tmp_path: Path) -> None:
    # Given a scaffolded guild
    created = rustic.cli("init", "demo", "--dir", str(tmp_path))
    assert created.exit_code == 0, created.stderr
    guild_file = tmp_path / "demo" / "guild.yaml"
    assert guild_file.exists()
    assert (tmp_path / "demo" / "agents" / "echo.py").exists()

    # When it is run and sent a request
    daemon = rustic.start(guild_file)
    rustic.cli("send", "requests", '{"text": "hi"}')
    wait_until(lambda: daemon.status()["totals"]["processed"] == 1, what="the echo")
    stopped = rustic.cli("stop")

    # Then the echo agent printed it and the guild stopped cleanly
    assert stopped.exit_code == 0
    assert 'echo: {"text": "hi"}' in daemon.stdout()
    assert rustic.cli("init", "demo", "--dir", str(tmp_path)).exit_code == 2
