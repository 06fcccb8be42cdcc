"""The daemon behind `rustic run`: launch a guild, serve its control socket, stop on request."""

from __future__ import annotations

import contextvars
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from rustic.daemon.control import ControlServer, DaemonAlreadyRunning
from rustic.daemon.exitcodes import EXIT_ALREADY_RUNNING, EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from rustic.daemon.ops import control_handlers
from rustic.daemon.options import RunOptions, UsageError, load_run_spec
from rustic.daemon.paths import ensure_runtime_dir, pid_path, runtime_dir, socket_path, spill_path
from rustic.daemon.reloads import LiveReload
from rustic.daemon.render import accounting_line, agents_table, drain_progress
from rustic.daemon.signals import STOP_SIGNALS, SignalRelay
from rustic.daemon.spill import replay_spilled, spill_pending
from rustic.engines import SyncExecutionEngine
from rustic.guild import Guild
from rustic.logs import bind_guild, configure_logging
from rustic.shutdown import ShutdownReport
from rustic.spec import GuildSpec, SpecError
from rustic.wrapper import AgentWrapper

logger = logging.getLogger(__name__)

FORCED_STOP_TIMEOUT = 1.0  # what a stop gets once a stuck sync handler was abandoned
WATCHDOG_GRACE = 1.0  # past the shutdown timeout, a stop still waiting on a handler is forced
STUCK_AFTER = 0.5  # a forced stop abandons a sync handler that has not returned by then
POLL_S = 0.02
ALWAYS_ALLOWED = frozenset({"ping", "status", "stop"})  # ops still served while stopping


class ForcedStop(BaseException):
    """Raised on the main thread by a second stop signal to abandon stuck sync handlers.

    A `BaseException`, so that the agent wrapper, which contains handlers' `Exception`s,
    lets it through to the runner.
    """

    def __init__(self, agent_ids: list[str]) -> None:
        super().__init__(f"handlers abandoned: {', '.join(agent_ids)}")
        self.agent_ids = agent_ids


def run_daemon(options: RunOptions, console: Console, err: Console) -> int:
    """Run the guild file of `options` in the foreground until stopped; return the exit code."""
    configure_logging(options.log_level, options.log_format)
    try:
        spec = load_run_spec(options)
        runtime = ensure_runtime_dir(runtime_dir(options.runtime_dir))
        socket_path(runtime, spec.id)  # refuses a path too long for a socket address
    except SpecError as exc:
        err.print(str(exc), markup=False)
        return EXIT_USAGE
    except (UsageError, ValueError, OSError) as exc:
        err.print(f"error: {exc}", markup=False)
        return EXIT_USAGE
    return Daemon(spec, options, runtime, console, err).run()


class Daemon:
    """One guild run in the foreground: its control socket, its signals and its stop.

    The main thread launches the guild, then drives its sync engine (or waits) until a
    stop is requested by a signal or over the socket, then stops the guild. Control
    requests are answered on the control server's threads.
    """

    def __init__(
        self,
        spec: GuildSpec,
        options: RunOptions,
        runtime: Path,
        console: Console,
        err: Console,
    ) -> None:
        self.spec = spec
        self.options = options
        self.runtime = runtime
        self.console = console
        self.err = err
        self.socket = socket_path(runtime, spec.id)
        self.pid_file = pid_path(runtime, spec.id)
        self.server = ControlServer(
            self.socket, control_handlers(self), guild_id=spec.id, always_allowed=ALWAYS_ALLOWED
        )
        self.relay = SignalRelay(
            self._on_signal, self._interrupt_on_signal, (*STOP_SIGNALS, signal.SIGHUP)
        )
        self.live: LiveReload | None = None  # set once launched
        self.guild: Guild | None = None  # set once launched, before `up` is set
        self.up = threading.Event()  # the guild launched, or failed to
        self.stop_event = threading.Event()  # a stop was requested
        self.finished = threading.Event()  # `result` holds the outcome
        self.result: dict[str, Any] = {}
        self.abandoned: list[str] = []  # sync agents whose handler a forced stop interrupted
        self._lock = threading.Lock()
        self._stop_reason = ""  # guarded by `_lock`
        self._stop_timeout = spec.shutdown_timeout  # guarded by `_lock`
        # Read by the signal handler on the main thread, so plain values, never locks.
        self._abandon_stuck = False  # set just before the main thread is interrupted
        self._sync_wrappers: list[AgentWrapper] = []

    # -- lifecycle --------------------------------------------------------------------------

    def run(self) -> int:
        """Claim the socket, launch, serve until asked to stop, stop; return the exit code."""
        bind_guild(self.spec.id)

        # Claim the control socket first: a second daemon for this guild leaves before
        # launching anything.
        try:
            self.server.start()
        except DaemonAlreadyRunning as exc:
            holder = f"pid {exc.pid}" if exc.pid is not None else "a process that did not say"
            self.err.print(
                f"error: guild {self.spec.id!r} is already running ({holder}, socket {exc.path})",
                markup=False,
            )
            return EXIT_ALREADY_RUNNING
        self.pid_file.write_text(f"{os.getpid()}\n")

        # From here a signal requests a stop, even during the launch.
        self.relay.install()
        code, line = EXIT_FAILURE, ""
        try:
            code, line = self._lifecycle()
        except (Exception, ForcedStop):
            logger.exception("daemon failed")
        finally:
            if not self.finished.is_set():
                self._finish({"exit": code, "line": line})
            self.relay.restore()
            self.server.stop()
            self.pid_file.unlink(missing_ok=True)
        logger.info("daemon stopped exit=%d", code)

        # The accounting line is the last line on stdout.
        if line:
            print(line, flush=True)
        return code

    def _lifecycle(self) -> tuple[int, str]:
        """Launch, serve and stop the guild; return the exit code and the accounting line."""
        try:
            guild = self._launch()
        except Exception as exc:
            code = EXIT_USAGE if isinstance(exc, (ValueError, ImportError)) else EXIT_FAILURE
            logger.debug("launch failed", exc_info=exc)
            self.err.print(f"error: guild {self.spec.id!r} did not start: {exc}", markup=False)
            self._finish({"exit": code, "line": ""})
            return code, ""
        finally:
            self.up.set()

        # Serve: the main thread drives the sync engines until a stop is requested.
        self._serve(guild)

        # Stop, then account for every message and publish the outcome to `rustic stop`.
        report = self._shutdown(guild)
        code = EXIT_OK if report.clean and not self.abandoned else EXIT_FAILURE
        line = accounting_line(self.spec.id, report, code, len(self.abandoned))
        self._finish({**report.to_dict(), "abandoned": self.abandoned, "exit": code, "line": line})
        return code, line

    def _launch(self) -> Guild:
        """Build the guild, launch its agents and replay what the last run spilled."""
        only = set(self.options.only) if self.options.only is not None else None
        guild = Guild.from_spec(self.spec, only=only, app_dir=self.options.app_dir)
        try:
            replay_spilled(guild, spill_path(self.runtime, self.spec.id))
        except BaseException:
            guild.stop(timeout=FORCED_STOP_TIMEOUT)
            raise
        self._sync_wrappers = [
            guild.wrapper(agent_id)
            for agent_id in guild.agent_ids()
            if isinstance(guild.engine_of(agent_id), SyncExecutionEngine)
        ]
        self.guild = guild
        self.live = self._live_reload(guild)

        engines = sorted({engine.name for engine in guild.engines()})
        logger.info(
            "agents launched count=%d engines=%s", len(guild.agent_ids()), ",".join(engines)
        )
        self._show_agents(guild)
        logger.info("daemon started pid=%d socket=%s", os.getpid(), self.socket)
        return guild

    def _live_reload(self, guild: Guild) -> LiveReload:
        """SIGHUP and `rustic reload` work in every daemon; `--watch` also follows saves."""
        live = LiveReload(guild, self.options.guild_file.resolve())
        if self.options.watch:
            only = set(self.options.only) if self.options.only is not None else None
            live.watch(
                list(self.options.watch_paths),
                list(self.options.watch_excludes),
                [self.runtime],
                only,
            )
        return live

    def _serve(self, guild: Guild) -> None:
        """Drive the guild's sync engines on this thread (or just wait) until a stop request."""
        engines = [e for e in guild.engines() if isinstance(e, SyncExecutionEngine)]
        try:
            if len(engines) == 1:
                engines[0].serve(self.stop_event)
            elif engines:
                # Several sync engines take turns; each returns after a short slice.
                while not self.stop_event.is_set():
                    if not sum(engine.run_until_idle(timeout=0.05) for engine in engines):
                        self.stop_event.wait(0.02)
            else:
                self.stop_event.wait()
        except ForcedStop as exc:
            self._abandoned(exc)

    def _shutdown(self, guild: Guild) -> ShutdownReport:
        """Stop the guild in the order of a graceful shutdown and spill what is left."""
        with self._lock:
            reason, timeout = self._stop_reason, self._stop_timeout
        logger.info("stop requested by=%s", reason)
        if self.live is not None:
            self.live.stop()  # no reload starts once the stop began

        # (1) Stop intake: the socket refuses `send` and the guild refuses publishers, so the
        # backlog can only shrink from here.
        self.server.close_intake(reason)
        guild.close_intake()

        # (2)-(5) The guild drains, runs the teardown hooks, closes dependencies, joins its
        # workers and accounts, in that order; a terminal shows the backlog shrinking.
        logger.info("draining backlog=%d timeout_s=%.1f", _backlog(guild), timeout)
        with drain_progress(self.console, lambda: _backlog(guild)):
            report = self._stop_guild(guild, timeout)

        # Messages the memory bus still holds go to the spill file for the next start.
        spill_pending(guild, spill_path(self.runtime, self.spec.id))
        return report

    def _stop_guild(self, guild: Guild, timeout: float) -> ShutdownReport:
        """Run `guild.stop`, again with a short timeout after each abandoned handler."""
        while True:
            try:
                return guild.stop(timeout)
            except ForcedStop as exc:
                # The stop had not reached its teardown, so calling it again runs it; the
                # hurry makes it skip the drain.
                self._abandoned(exc)
                timeout = FORCED_STOP_TIMEOUT

    def _abandoned(self, exc: ForcedStop) -> None:
        """Record sync handlers that a forced stop interrupted, and make the stop hurry."""
        self._abandon_stuck = False
        if self.guild is not None:
            self.guild.hurry()
        self.abandoned += exc.agent_ids
        for agent_id in exc.agent_ids:
            logger.warning("handler abandoned by a forced stop agent_id=%s", agent_id)

    def _finish(self, result: dict[str, Any]) -> None:
        """Publish the outcome, waking `stop` requests that wait for it."""
        self.result = result
        self.finished.set()

    def _show_agents(self, guild: Guild) -> None:
        """Print the table of launched agents, except when stdout carries JSON lines."""
        if self.options.log_format == "json":
            return
        rows = [
            {
                "id": agent_id,
                "class": guild.wrapper(agent_id).spec.class_name,
                "engine": guild.engine_of(agent_id).name,
                "topics": ", ".join(sorted(guild.wrapper(agent_id).topics())),
            }
            for agent_id in guild.agent_ids()
        ]
        title = f"guild {guild.id}: {len(rows)} agents"
        self.console.print(agents_table(self.console, rows, title))
        sys.stdout.flush()

    # -- stop requests ------------------------------------------------------------------------

    def request_stop(self, reason: str, timeout: float | None = None) -> bool:
        """Ask the main thread to stop the guild; True for the first request, False after.

        Safe from any thread but not from a signal handler (it takes locks).
        """
        with self._lock:
            first = not self.stop_event.is_set()
            if first:
                self._stop_reason = reason
                if timeout is not None:
                    self._stop_timeout = timeout
            deadline = self._stop_timeout
        if not first:
            return False

        # Wake the main thread, wherever it waits, and bound the stop with a watchdog.
        self.stop_event.set()
        self._wake_sync_engines()
        threading.Thread(
            target=contextvars.copy_context().run,
            args=(self._watch_stop, deadline),
            name="rustic-stop-watchdog",
            daemon=True,
        ).start()
        return True

    def force(self, why: str) -> None:
        """Skip the rest of a stop's waiting and abandon stuck sync handlers; teardown still runs.

        Safe from any thread but not from a signal handler (it takes locks).
        """
        logger.warning("stop forced, skipping the wait reason=%s", why)
        guild = self.guild
        if guild is not None:
            guild.hurry()
        self._wake_sync_engines()

        # A sync handler runs on the main thread: only a signal there can break it off.
        # One that is merely busy gets a moment to return, so that it is not abandoned.
        if self._handler_stays_in_flight(STUCK_AFTER):
            self._abandon_stuck = True
            self.relay.interrupt_main()

    def _on_signal(self, sig: signal.Signals) -> None:
        """React to a stop signal on the relay thread: the first stops, the next ones force.

        SIGHUP reloads every agent from the guild file instead.
        """
        if sig == signal.SIGHUP:
            if self.live is not None and not self.stop_event.is_set():
                logger.info("reload requested by=signal SIGHUP")
                self.live.reload_all_in_background()
            return
        if not self.request_stop(f"signal {sig.name}"):
            self.force(f"signal {sig.name}")

    def _interrupt_on_signal(self) -> BaseException | None:
        """On the main thread, in a signal handler: once forced, abandon stuck sync handlers."""
        if not self._abandon_stuck:
            return None
        stuck = self._stuck_sync_agents()
        return ForcedStop(stuck) if stuck else None

    def _handler_stays_in_flight(self, seconds: float) -> bool:
        """True when a sync handler is still handling the same message after `seconds`."""
        watched = [(wrapper, wrapper.in_flight) for wrapper in self._sync_wrappers]
        watched = [(wrapper, message) for wrapper, message in watched if message is not None]
        deadline = time.monotonic() + seconds
        while watched and not self.finished.wait(POLL_S):
            watched = [(w, message) for w, message in watched if w.in_flight is message]
            if time.monotonic() >= deadline:
                return bool(watched)
        return False

    def _stuck_sync_agents(self) -> list[str]:
        """Sync agents with a handler in flight: it runs on the main thread, which is in it."""
        return [wrapper.agent_id for wrapper in self._sync_wrappers if wrapper.in_flight]

    def _watch_stop(self, timeout: float) -> None:
        """Force a stop that outlives its timeout, interrupting a stuck sync handler."""
        if self.finished.wait(timeout + WATCHDOG_GRACE):
            return
        self.force(f"stop still running {timeout + WATCHDOG_GRACE:.1f}s after it was requested")

    def _wake_sync_engines(self) -> None:
        guild = self.guild
        if guild is None:
            return
        for engine in guild.engines():
            if isinstance(engine, SyncExecutionEngine):
                engine.wake()


def _backlog(guild: Guild) -> int:
    """Messages queued or in flight across the guild's agents."""
    try:
        totals = guild.status()["totals"]
    except Exception:  # a backend closing under us: the backlog is what it last was
        return 0
    return int(totals["queue_depth"]) + int(totals["in_flight"])
