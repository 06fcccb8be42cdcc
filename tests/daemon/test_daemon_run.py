"""`rustic run` end to end: a real daemon process driven by the CLI and by signals."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import time
from pathlib import Path

import pytest

from daemon_harness import EXAMPLES, Rustic, wait_until, write_guild
from rustic.daemon.paths import spill_path
from rustic.daemon.protocol import MAX_REQUEST_BYTES

pytestmark = pytest.mark.timeout(40)

HELLO = EXAMPLES / "hello" / "guild.yaml"

WORK_MODULE = """
    import time
    from pathlib import Path
    from typing import Any

    from pydantic import BaseModel

    from rustic import Agent, AgentFixtures, ProcessContext, processor


    class WorkerProps(BaseModel):
        marker: str
        seconds: float = 0.002


    class Burst(Agent):
        @processor(dict)
        def burst(self, ctx: ProcessContext[dict[str, Any]]) -> None:
            for n in range(ctx.payload["count"]):
                ctx.send({"n": n}, topic="jobs")


    class Worker(Agent[WorkerProps]):
        @processor(dict)
        def work(self, ctx: ProcessContext[dict[str, Any]]) -> None:
            time.sleep(self.config.seconds)  # the work itself: the system under test

        @AgentFixtures.on_shutdown
        def bye(self) -> None:
            Path(self.config.marker).write_text("hooks ran")
"""


def work_guild(folder: Path, engine: str, seconds: float, timeout: float = 10) -> Path:
    """A guild whose `burst` agent fans a count out to a `worker` that takes `seconds` each."""
    return write_guild(
        folder,
        f"""
        id: work
        name: Work
        execution: {{engine: {engine}, max_workers: 2}}
        shutdown_timeout: {timeout}
        agents:
          - id: burst
            name: Burst
            class_name: agents.work.Burst
            additional_topics: [burst]
            listen_to_default_topic: false
          - id: worker
            name: Worker
            class_name: agents.work.Worker
            properties: {{marker: "{folder / "hooks-ran"}", seconds: {seconds}}}
            additional_topics: [jobs]
            listen_to_default_topic: false
        """,
        {"agents/__init__.py": "", "agents/work.py": WORK_MODULE},
    )


def accounting(line: str) -> dict[str, str]:
    """The key=value fields of an accounting line."""
    assert line.startswith("stopped "), line
    return dict(part.split("=", 1) for part in line.split()[1:])


@pytest.mark.parametrize("engine", ["sync", "multithreaded"])
def test_sigterm_under_a_backlog_handles_every_message_and_runs_hooks(
    rustic: Rustic, tmp_path: Path, engine: str
) -> None:
    # Given a daemon whose worker has a backlog of 300 slow jobs
    daemon = rustic.start(work_guild(tmp_path / "g", engine, seconds=0.003))
    assert rustic.cli("send", "burst", '{"count": 300}').exit_code == 0
    wait_until(lambda: daemon.status()["by_id"]["worker"]["queue_depth"] > 50, what="a backlog")

    # When it receives SIGTERM
    daemon.signal(signal.SIGTERM)

    # Then it drains the backlog, runs the hooks and accounts for every message
    assert daemon.wait() == 0, daemon.stderr()
    fields = accounting(daemon.last_line())
    assert fields == {
        "guild": "work",
        "handled": "301",
        "pending": "0",
        "dead_lettered": "0",
        "exit": "0",
    }
    assert (tmp_path / "g" / "hooks-ran").read_text() == "hooks ran"
    assert "stop requested by=signal SIGTERM" in daemon.stderr()


@pytest.mark.parametrize("engine", ["sync", "multithreaded"])
def test_a_second_sigint_abandons_a_stuck_handler_and_still_runs_hooks(
    rustic: Rustic, tmp_path: Path, engine: str
) -> None:
    # Given a daemon whose worker is blocked in a 60 s call
    daemon = rustic.start(work_guild(tmp_path / "g", engine, seconds=60, timeout=30))
    rustic.cli("send", "jobs", "{}")
    wait_until(lambda: daemon.status()["by_id"]["worker"]["in_flight"] == 1, what="in flight")

    # When SIGINT arrives, is taken as a stop request, and a second SIGINT follows
    daemon.signal(signal.SIGINT)
    wait_until(lambda: daemon.status()["daemon"]["stopping"], what="the stop to begin")
    forced_at = time.monotonic()
    daemon.signal(signal.SIGINT)

    # Then the daemon exits within seconds, with the hooks run and a failure code
    code = daemon.wait(timeout=10)
    assert time.monotonic() - forced_at < 5
    assert code == 1, daemon.stderr()
    assert (tmp_path / "g" / "hooks-ran").read_text() == "hooks ran"
    fields = accounting(daemon.last_line())
    assert (fields["handled"], fields["abandoned"], fields["exit"]) == ("0", "1", "1")
    assert "skipping the wait" in daemon.stderr()


def test_a_stop_that_outlives_its_timeout_is_forced_without_a_second_signal(
    rustic: Rustic, tmp_path: Path
) -> None:
    # Given a sync daemon (the main thread runs the handlers) blocked in a 60 s handler
    daemon = rustic.start(work_guild(tmp_path / "g", "sync", seconds=60, timeout=0.5))
    rustic.cli("send", "jobs", "{}")
    wait_until(lambda: daemon.status()["by_id"]["worker"]["in_flight"] == 1, what="in flight")

    # When a single SIGTERM asks it to stop within 0.5 s
    daemon.signal(signal.SIGTERM)

    # Then the watchdog abandons the handler shortly after the deadline; hooks still run
    assert daemon.wait(timeout=10) == 1
    assert (tmp_path / "g" / "hooks-ran").exists()
    assert "handler abandoned by a forced stop agent_id=worker" in daemon.stderr()


def test_pending_memory_messages_are_spilled_and_replayed_by_the_next_start(
    rustic: Rustic, tmp_path: Path
) -> None:
    # Given a daemon stopped with a short timeout while 100 slow jobs were queued
    guild_file = work_guild(tmp_path / "g", "sync", seconds=0.02)
    first = rustic.start(guild_file, "--shutdown-timeout", "0.2")
    rustic.cli("send", "burst", '{"count": 100}')
    wait_until(lambda: first.status()["by_id"]["worker"]["queue_depth"] > 50, what="a backlog")
    first.signal(signal.SIGTERM)
    assert first.wait() == 0
    pending = int(accounting(first.last_line())["pending"])
    assert pending > 0
    assert len(spill_path(rustic.runtime, "work").read_text().splitlines()) == pending

    # When the guild starts again
    second = rustic.start(guild_file)

    # Then it handles exactly the spilled messages, and the spill file is gone
    wait_until(lambda: second.status()["totals"]["processed"] == pending, what="the replay")
    assert not spill_path(rustic.runtime, "work").exists()
    stop = rustic.cli("stop")
    assert accounting(stop.stdout.strip())["handled"] == str(pending)


def test_a_second_daemon_for_the_same_guild_exits_3_naming_the_holder(rustic: Rustic) -> None:
    # Given a running hello guild
    first = rustic.start(HELLO)

    # When a second daemon starts for it
    second = rustic.spawn(HELLO)

    # Then the second leaves with code 3, saying which process holds the guild
    assert second.wait() == 3
    assert f"pid {first.proc.pid}" in second.stderr()
    assert first.proc.poll() is None
    assert first.ready()


def test_a_bad_spec_exits_2_naming_file_line_and_key(rustic: Rustic, tmp_path: Path) -> None:
    # Given a guild file whose third line holds a negative timeout
    guild_file = tmp_path / "bad.yaml"
    guild_file.write_text("id: bad\nname: Bad\nshutdown_timeout: -1\n")

    # When it is run
    daemon = rustic.spawn(guild_file)

    # Then nothing starts and the message points at the line
    assert daemon.wait() == 2
    assert f"{guild_file}:3:" in daemon.stderr()
    assert "shutdown_timeout" in daemon.stderr()
    assert not daemon.socket.exists()


def test_an_unknown_engine_exits_2_listing_the_valid_ones(rustic: Rustic) -> None:
    daemon = rustic.spawn(HELLO, "--engine", "warp-drive")
    assert daemon.wait() == 2
    assert "unknown engine 'warp-drive'" in daemon.stderr()
    assert "sync, multithreaded" in daemon.stderr()


def test_a_malformed_or_oversized_request_gets_an_error_and_the_daemon_carries_on(
    rustic: Rustic,
) -> None:
    # Given a running daemon and a raw connection to its socket
    daemon = rustic.start(HELLO)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(5)
        conn.connect(str(daemon.socket))
        reader = conn.makefile("rb")

        # When a line that is not JSON, then an unknown op, then an oversized line arrive
        conn.sendall(b"this is not json\n")
        malformed = json.loads(reader.readline())
        conn.sendall(b'{"v": 1, "op": "launch_missiles", "id": 7}\n')
        unknown = json.loads(reader.readline())
        conn.sendall(b"x" * (MAX_REQUEST_BYTES + 100) + b"\n")
        oversized = json.loads(reader.readline())

    # Then each gets an error reply and the daemon still answers
    assert malformed["ok"] is False
    assert malformed["error"]["code"] == "bad_request"
    assert unknown["error"]["code"] == "unknown_op"
    assert unknown["id"] == 7
    assert oversized["error"]["code"] == "too_large"
    assert rustic.cli("status", "--json").json()["guild"]["id"] == "hello"


def test_runtime_dir_is_0700_and_socket_0600(rustic: Rustic) -> None:
    daemon = rustic.start(HELLO)
    assert stat.S_IMODE(os.stat(rustic.runtime).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o600


def test_a_socket_left_by_a_killed_daemon_does_not_block_the_next_start(rustic: Rustic) -> None:
    # Given a daemon killed with SIGKILL, which leaves its socket file behind
    first = rustic.start(HELLO)
    first.proc.kill()
    first.wait()
    assert first.socket.is_socket()

    # When the guild starts again
    second = rustic.start(HELLO)

    # Then the stale socket is replaced and the new daemon answers
    assert "removed stale control socket" in second.stderr()
    assert rustic.cli("status", "--json").json()["daemon"]["pid"] == second.proc.pid


def test_engine_flags_override_the_spec(rustic: Rustic) -> None:
    # Given the hello guild (sync in its spec) run with thread flags
    daemon = rustic.start(HELLO, "--engine", "multithreaded", "--thread-name-prefix", "w-")

    # When a greeting goes through
    rustic.cli("send", "greetings", '{"name": "Ada"}')
    wait_until(lambda: daemon.status()["totals"]["processed"] == 2, what="the greeting")

    # Then both agents ran on the named threads
    agents = daemon.status()["agents"]
    assert {agent["engine"] for agent in agents} == {"multithreaded"}
    assert all(agent["where"].startswith("w-") for agent in agents)


def test_only_runs_the_named_agents(rustic: Rustic) -> None:
    daemon = rustic.start(HELLO, "--only", "greeter")
    assert [agent["id"] for agent in daemon.status()["agents"]] == ["greeter"]


def test_json_logs_carry_guild_agent_and_message_ids(rustic: Rustic) -> None:
    # Given the hello guild logging JSON lines
    daemon = rustic.start(HELLO, "--log-format", "json")

    # When a request that does not validate fails the greeter until it is dead-lettered
    sent = rustic.cli("send", "greetings", '{"name": 5}')
    message_id = int(re.findall(r"id=(\d+)", sent.stdout)[0])
    wait_until(lambda: daemon.status()["totals"]["dead_letters"] == 1, what="the dead letter")
    rustic.cli("stop")
    assert daemon.wait() == 0

    # Then every log line is JSON with the guild id, and the failure names agent and message
    records = [json.loads(line) for line in daemon.stderr().splitlines()]
    assert all(record["guild_id"] == "hello" for record in records)
    failures = [r for r in records if r["message"].startswith("handler failed")]
    assert failures
    assert all(r["agent_id"] == "greeter" for r in failures)
    assert all(r["message_id"] == message_id for r in failures)
    # and stdout holds no table, only the accounting line
    assert daemon.stdout().splitlines() == [daemon.last_line()]
    assert accounting(daemon.last_line())["dead_lettered"] == "1"
