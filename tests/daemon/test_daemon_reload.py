"""Live reload through the real daemon: `rustic reload`, SIGHUP and `rustic run --watch`."""

from __future__ import annotations

import json
import signal
import textwrap
from pathlib import Path

import pytest

from daemon_harness import Daemon, Rustic, wait_until, write_guild

pytestmark = pytest.mark.timeout(40)

GUILD = """
    id: {guild_id}
    name: Reloadable
    agents:
      - id: writer
        name: Writer
        class_name: app.writer.Writer
        properties: {{log: "{log}"}}
        additional_topics: [jobs]
      - id: other
        name: Other
        class_name: app.other.Other
"""

WRITER = """
    from pathlib import Path
    from typing import Any

    from pydantic import BaseModel

    from rustic import Agent, ProcessContext, processor

    VERSION = "{version}"


    class Props(BaseModel):
        log: str


    class Writer(Agent[Props]):
        @processor(dict)
        def write(self, ctx: ProcessContext[dict[str, Any]]) -> None:
            if ctx.message.topic == "jobs":
                with Path(self.config.log).open("a") as log:
                    log.write(f"{{VERSION}}:{{ctx.payload['n']}}\\n")
"""

OTHER = """
    from typing import Any

    from rustic import Agent, ProcessContext, processor


    class Other(Agent):
        @processor(dict)
        def ignore(self, ctx: ProcessContext[dict[str, Any]]) -> None:
            pass
"""


def reloadable(folder: Path, guild_id: str = "reloadable") -> tuple[Path, Path]:
    log = folder / "writer.log"
    guild_file = write_guild(
        folder,
        GUILD.format(guild_id=guild_id, log=log),
        {
            "app/__init__.py": "",
            "app/writer.py": WRITER.format(version="v1"),
            "app/other.py": OTHER,
        },
    )
    return guild_file, log


def save_writer(folder: Path, version: str, extra: str = "") -> None:
    path = folder / "app" / "writer.py"
    path.write_text(textwrap.dedent(WRITER.format(version=version)) + extra)


def send_and_see(rustic: Rustic, log: Path, n: int) -> str:
    """Send job `n` and return the version that handled it."""
    assert rustic.cli("send", "jobs", json.dumps({"n": n})).exit_code == 0
    line = wait_until(
        lambda: next((x for x in _lines(log) if x.endswith(f":{n}")), None), what=f"job {n}"
    )
    return line.partition(":")[0]


def _lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def versions(daemon: Daemon) -> dict[str, str]:
    return {agent["id"]: agent["version"] for agent in daemon.status()["agents"]}


def test_rustic_reload_swaps_the_code_and_reports_each_agent(
    rustic: Rustic, tmp_path: Path
) -> None:
    # Given a running guild whose writer says v1
    guild_file, log = reloadable(tmp_path)
    daemon = rustic.start(guild_file)
    assert send_and_see(rustic, log, 1) == "v1"
    before = versions(daemon)

    # When the writer's module is saved as v2 and `rustic reload writer` runs
    save_writer(tmp_path, "v2")
    result = rustic.cli("reload", "writer")

    # Then it exits 0 with a table, the writer runs v2 and the other agent is untouched
    assert result.exit_code == 0, result.stderr
    assert "writer" in result.stdout
    assert "ok" in result.stdout
    assert send_and_see(rustic, log, 2) == "v2"
    after = versions(daemon)
    assert after["writer"] != before["writer"]
    assert after["other"] == before["other"]
    (writer,) = [a for a in daemon.status()["agents"] if a["id"] == "writer"]
    assert writer["last_reload"]["ok"] is True
    assert "last reload" in rustic.cli("status").stdout


def test_rustic_reload_of_broken_code_fails_and_the_old_version_keeps_serving(
    rustic: Rustic, tmp_path: Path
) -> None:
    guild_file, log = reloadable(tmp_path)
    rustic.start(guild_file)

    save_writer(tmp_path, "v2", extra="\ndef broken(:\n")
    result = rustic.cli("reload", "writer", "--json")

    assert result.exit_code == 1
    (entry,) = json.loads(result.stdout)
    assert entry["ok"] is False
    assert entry["step"] == "import"
    assert "syntax error" in entry["error"]
    assert "reload failed agent=writer step=import" in result.stderr
    assert send_and_see(rustic, log, 1) == "v1"


def test_rustic_reload_refuses_unknown_agents_and_needs_a_target(
    rustic: Rustic, tmp_path: Path
) -> None:
    guild_file, _ = reloadable(tmp_path)
    rustic.start(guild_file)

    unknown = rustic.cli("reload", "nobody")
    assert unknown.exit_code == 1
    assert "no running agent 'nobody'" in unknown.stderr

    nothing = rustic.cli("reload")
    assert nothing.exit_code == 2
    assert "--all" in nothing.stderr


def test_reload_all_and_sighup_reload_every_agent(rustic: Rustic, tmp_path: Path) -> None:
    # Given a running guild
    guild_file, log = reloadable(tmp_path)
    daemon = rustic.start(guild_file)

    # When all agents are reloaded over the socket, then by SIGHUP after a new save
    result = rustic.cli("reload", "--all", "--json")
    assert result.exit_code == 0
    assert sorted(r["agent_id"] for r in json.loads(result.stdout)) == ["other", "writer"]
    save_writer(tmp_path, "v3")
    daemon.signal(signal.SIGHUP)

    # Then the writer runs the new code and the daemon is still up
    wait_until(
        lambda: (
            all(a["last_reload"] and a["last_reload"]["at"] for a in daemon.status()["agents"])
            and "sighup reload done" in daemon.stderr()
        ),
        what="the SIGHUP reload",
    )
    assert send_and_see(rustic, log, 7) == "v3"
    assert daemon.proc.poll() is None


def test_watch_reloads_on_save_survives_a_broken_save_and_recovers(
    rustic: Rustic, tmp_path: Path
) -> None:
    # Given a daemon started with --watch
    guild_file, log = reloadable(tmp_path)
    daemon = rustic.start(guild_file, "--watch")
    wait_until(lambda: "watching for changes" in daemon.stderr(), what="the watch to start")
    assert send_and_see(rustic, log, 1) == "v1"

    # When the writer is saved as v2, the save reaches the running guild
    save_writer(tmp_path, "v2")
    wait_until(lambda: "agent reloaded by watch agent_id=writer" in daemon.stderr())
    assert send_and_see(rustic, log, 2) == "v2"

    # When a broken save follows, it is reported in one line and changes nothing
    save_writer(tmp_path, "v3", extra="\ndef broken(:\n")
    wait_until(lambda: "reload failed, old version still serving" in daemon.stderr())
    assert send_and_see(rustic, log, 3) == "v2"

    # And the next good save recovers
    save_writer(tmp_path, "v4")
    wait_until(lambda: daemon.stderr().count("agent reloaded by watch agent_id=writer") == 2)
    assert send_and_see(rustic, log, 4) == "v4"


def test_watch_launches_agents_added_to_the_guild_file(rustic: Rustic, tmp_path: Path) -> None:
    guild_file, _ = reloadable(tmp_path)
    daemon = rustic.start(guild_file, "--watch")
    wait_until(lambda: "watching for changes" in daemon.stderr(), what="the watch to start")

    extra = "  - id: third\n    name: Third\n    class_name: app.other.Other\n"
    guild_file.write_text(guild_file.read_text() + extra)

    wait_until(lambda: "third" in versions(daemon), what="the new agent")
    assert sorted(versions(daemon)) == ["other", "third", "writer"]
