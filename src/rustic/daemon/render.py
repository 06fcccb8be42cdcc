"""What the CLI and the daemon show: agent and status tables, drain progress, accounting line."""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from rustic.shutdown import ShutdownReport

PROGRESS_REFRESH_S = 0.1
_STATE_STYLES = {"running": "green", "paused": "yellow", "failed": "bold red", "stopped": "dim"}
_STATUS_COLUMNS = (
    ("agent", "left"),
    ("engine", "left"),
    ("where", "left"),
    ("state", "left"),
    ("processed", "right"),
    ("errors", "right"),
    ("dead letters", "right"),
    ("queue", "right"),
    ("in flight", "right"),
    ("uptime", "right"),
    ("version", "left"),
    ("last reload", "left"),
)


def make_console(*, stderr: bool = False) -> Console:
    """A console for stdout (or stderr): plain text, wide and uncoloured when not a terminal."""
    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal:
        console = Console(stderr=stderr, highlight=False, width=200, no_color=True)
    return console


def _table(console: Console, title: str | None = None) -> Table:
    """A table with box lines on a terminal and aligned plain columns elsewhere."""
    if console.is_terminal:
        return Table(title=title, box=box.ROUNDED, title_justify="left")
    return Table(title=title, box=None, title_justify="left", pad_edge=False)


def agents_table(console: Console, rows: Sequence[dict[str, str]], title: str) -> Table:
    """The agents of a starting guild: id, class, engine and topics."""
    table = _table(console, title)
    for column in ("agent", "class", "engine", "topics"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["id"], row["class"], row["engine"], row["topics"])
    return table


def status_table(console: Console, status: dict[str, Any]) -> Table:
    """Every agent of a running guild with its counters, and the guild's totals."""
    guild = status.get("guild", {})
    daemon = status.get("daemon", {})
    title = f"guild {guild.get('id', '?')}  pid {daemon.get('pid', '?')}"
    title += f"  up {format_duration(guild.get('uptime', 0.0))}"
    if daemon.get("stopping"):
        title += "  stopping"
    table = _table(console, title)
    for name, justify in _STATUS_COLUMNS:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for agent in status.get("agents", []):
        state = str(agent["state"])
        style = _STATE_STYLES.get(state, "")
        table.add_row(
            agent["id"],
            agent["engine"],
            agent["where"],
            f"[{style}]{state}[/]" if style and console.is_terminal else state,
            *(str(agent[key]) for key in _COUNTERS),
            format_duration(agent["uptime"]),
            str(agent.get("version", "")),
            last_reload_text(agent.get("last_reload")),
        )
    totals = status.get("totals", {})
    table.add_section()
    table.add_row("total", "", "", "", *(str(totals.get(key, 0)) for key in _COUNTERS), "", "", "")
    return table


def last_reload_text(last: dict[str, Any] | None) -> str:
    """`12s ago ok 0.3 ms` or `4s ago failed`, for the status table."""
    if not last:
        return "-"
    ago = format_duration(max(0.0, time.time() - float(last.get("at", time.time()))))
    if last.get("ok"):
        return f"{ago} ago ok {float(last.get('pause_ms', 0.0)):.1f} ms"
    return f"{ago} ago failed"


def reload_table(console: Console, results: Sequence[dict[str, Any]]) -> Table:
    """One row per agent of a `rustic reload`: the versions and pause, or why it failed."""
    table = _table(console, "reload")
    for name in ("agent", "result", "old", "new", "pause ms", "carried over"):
        table.add_column(name)
    for result in results:
        if result["ok"]:
            table.add_row(
                result["agent_id"],
                "ok",
                result["old_version"],
                result["new_version"],
                f"{result['pause_ms']:.2f}",
                str(result["carried_over"]),
            )
        else:
            reason = f"failed at {result['step']}: {result['error']}"
            table.add_row(result["agent_id"], reason, "", "", "", "")
    return table


_COUNTERS = ("processed", "errors", "dead_letters", "queue_depth", "in_flight")


def guilds_table(console: Console, rows: Sequence[dict[str, Any]]) -> Table:
    """The daemons of a runtime dir: guild, pid, state and counters."""
    table = _table(console)
    for name, justify in (
        ("guild", "left"),
        ("pid", "right"),
        ("state", "left"),
        ("agents", "right"),
        ("processed", "right"),
        ("queue", "right"),
        ("socket", "left"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row in rows:
        table.add_row(
            row["guild"],
            str(row.get("pid") or "?"),
            row["state"],
            str(row.get("agents", "")),
            str(row.get("processed", "")),
            str(row.get("queue_depth", "")),
            row["socket"],
        )
    return table


def format_duration(seconds: float) -> str:
    """Render a duration as `42s`, `3m07s` or `5h02m`."""
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def accounting_line(
    guild_id: str, report: ShutdownReport, exit_code: int, abandoned_sync: int = 0
) -> str:
    """The last line of a daemon: every message handled, pending, dead-lettered or abandoned.

    A message is abandoned when its handler was still running as the stop gave up on it:
    on a worker that did not join (`report.stuck_agents`), or on the main thread, where a
    forced stop broke it off (`abandoned_sync`). Neither counts as handled.
    """
    line = f"stopped guild={guild_id} handled={report.handled} pending={report.pending}"
    line += f" dead_lettered={report.dead_lettered}"
    abandoned = abandoned_sync + len(report.stuck_agents)
    if abandoned:
        line += f" abandoned={abandoned}"
    return f"{line} exit={exit_code}"


@contextlib.contextmanager
def drain_progress(console: Console, backlog: Callable[[], int]) -> Iterator[None]:
    """Show the backlog shrinking while the body runs; nothing when not on a terminal.

    `backlog` is polled from a helper thread every `PROGRESS_REFRESH_S` seconds.
    """
    if not console.is_terminal:
        yield
        return
    done = threading.Event()
    progress = Progress(
        TextColumn("draining"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} handled, {task.fields[left]} left"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    thread = threading.Thread(
        target=_follow_backlog, args=(progress, backlog, done), name="rustic-drain", daemon=True
    )
    with progress, _logs_through_live_display():
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join(1.0)


@contextlib.contextmanager
def _logs_through_live_display() -> Iterator[None]:
    """Point the root logger's terminal handlers at the `sys.stderr` a live display put in.

    The display prints what goes through its stand-in above itself; a handler that kept
    the real stream would write under the display, which then erases the line.
    """
    moved = [
        (handler, handler.stream)
        for handler in logging.getLogger().handlers
        if type(handler) is logging.StreamHandler and _is_terminal(handler.stream)
    ]
    for handler, _ in moved:
        handler.setStream(sys.stderr)
    try:
        yield
    finally:
        for handler, stream in moved:
            handler.setStream(stream)


def _is_terminal(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _follow_backlog(progress: Progress, backlog: Callable[[], int], done: threading.Event) -> None:
    """Update the progress bar from the backlog until `done` is set."""
    start = max(backlog(), 1)
    task = progress.add_task("drain", total=start, left=start)
    while not done.wait(PROGRESS_REFRESH_S):
        left = backlog()
        start = max(start, left)
        progress.update(task, total=start, completed=start - left, left=left)
