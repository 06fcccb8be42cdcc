"""The daemon's parts in-process: flags over a spec, what it prints, the signal relay."""

from __future__ import annotations

import io
import os
import signal
import threading
from pathlib import Path

import pytest
from rich.console import Console

from daemon_harness import write_guild
from rustic.daemon.options import RunOptions, UsageError, apply_overrides, check_only
from rustic.daemon.render import accounting_line, drain_progress, format_duration
from rustic.daemon.signals import SignalRelay
from rustic.shutdown import ShutdownReport
from rustic.spec import load_guild_spec

pytestmark = pytest.mark.timeout(10)

GUILD = """
    id: flags
    name: Flags
    execution: {engine: sync}
    state: sqlite:///state.db
    agents:
      - id: a
        name: A
        class_name: x.A
      - id: b
        name: B
        class_name: x.B
        execution: {engine: multithreaded, max_workers: 2}
"""


def test_engine_flags_win_over_the_guild_default_and_per_agent_overrides(
    tmp_path: Path,
) -> None:
    spec = load_guild_spec(write_guild(tmp_path, GUILD, {}))
    options = RunOptions(tmp_path / "guild.yaml", engine="multithreaded", max_workers=8)

    updated = apply_overrides(spec, options)

    assert (updated.execution.engine, updated.execution.max_workers) == ("multithreaded", 8)
    override = updated.agents[1].execution
    assert override is not None
    assert (override.engine, override.max_workers) == ("multithreaded", 8)
    assert spec.agents[1].execution is not None
    assert spec.agents[1].execution.max_workers == 2


def test_backend_flags_replace_the_spec_values_and_keep_paths_relative_to_the_file(
    tmp_path: Path,
) -> None:
    spec = load_guild_spec(write_guild(tmp_path, GUILD, {}))
    options = RunOptions(tmp_path / "guild.yaml", state="sqlite:///other.db", shutdown_timeout=3)

    updated = apply_overrides(spec, options)

    assert updated.shutdown_timeout == 3
    assert updated.base_dir == tmp_path.absolute()
    assert updated.resolve_url(updated.state) == f"sqlite:///{tmp_path.absolute()}/other.db"
    assert updated.execution.engine == "sync"


def test_only_refuses_agent_ids_the_guild_does_not_have(tmp_path: Path) -> None:
    spec = load_guild_spec(write_guild(tmp_path, GUILD, {}))
    check_only(spec, frozenset({"a"}))
    with pytest.raises(UsageError, match=r"--only: no agent 'zed' in guild 'flags' \(agents: a, b"):
        check_only(spec, frozenset({"a", "zed"}))


def test_the_accounting_line_names_every_count_and_the_exit_code() -> None:
    report = ShutdownReport(handled=120, pending=3, dead_lettered=1)
    line = accounting_line("hello", report, 1)
    assert line == "stopped guild=hello handled=120 pending=3 dead_lettered=1 exit=1"


def test_abandoned_handlers_are_counted_apart_from_the_handled_messages() -> None:
    report = ShutdownReport(handled=10, stuck_agents=["slow"])
    line = accounting_line("hello", report, 1, abandoned_sync=1)
    assert line == "stopped guild=hello handled=10 pending=0 dead_lettered=0 abandoned=2 exit=1"


@pytest.mark.parametrize(("seconds", "text"), [(5.9, "5s"), (187, "3m07s"), (18_120, "5h02m")])
def test_durations_read_as_seconds_minutes_or_hours(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_drain_progress_follows_the_backlog_on_a_terminal_and_stays_silent_elsewhere() -> None:
    # Given a backlog that shrinks each time it is read
    left = [30, 20, 10, 0]
    read_twice = threading.Event()

    def backlog() -> int:
        if len(left) <= 3:
            read_twice.set()
        return left.pop(0) if len(left) > 1 else 0

    terminal_out, plain_out = io.StringIO(), io.StringIO()
    terminal = Console(file=terminal_out, force_terminal=True, width=100)
    plain = Console(file=plain_out, force_terminal=False)

    # When a drain runs under the progress display on each console
    with drain_progress(terminal, backlog):
        assert read_twice.wait(5)
    with drain_progress(plain, backlog):
        pass

    # Then the terminal showed the drain and the plain console got nothing
    assert "draining" in terminal_out.getvalue()
    assert "left" in terminal_out.getvalue()
    assert plain_out.getvalue() == ""


def test_a_real_sigterm_reaches_the_relay_thread_and_the_handler_is_restored_after() -> None:
    # Given a relay installed on the main thread
    heard: list[signal.Signals] = []
    reacted = threading.Event()

    def react(sig: signal.Signals) -> None:
        heard.append(sig)
        reacted.set()

    previous = signal.getsignal(signal.SIGTERM)
    relay = SignalRelay(react, lambda: None)
    relay.install()
    try:
        # When this process gets SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)

        # Then the relay thread reacts to it
        assert reacted.wait(5)
        assert heard == [signal.SIGTERM]
    finally:
        relay.restore()
    assert signal.getsignal(signal.SIGTERM) == previous


class Abandon(BaseException):
    """What the interrupt callback hands the signal handler to raise."""


def test_interrupt_main_breaks_the_main_thread_out_of_a_blocking_call() -> None:
    # Given a relay whose interrupt callback asks for an exception
    relay = SignalRelay(lambda sig: None, Abandon)
    relay.install()
    try:
        # When another thread interrupts the main thread blocked in a long wait
        timer = threading.Timer(0.05, relay.interrupt_main)
        timer.start()

        # Then the wait ends with the exception at once
        with pytest.raises(Abandon):
            threading.Event().wait(30)
        timer.join()
    finally:
        relay.restore()
    assert not relay.interrupt_main()
