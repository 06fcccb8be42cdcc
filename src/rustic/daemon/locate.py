"""Find the daemon a client command talks to, and wait for a daemon to exit."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from rustic.daemon.client import ControlClient, DaemonNotRunning
from rustic.daemon.paths import list_guild_sockets, pid_path, socket_path
from rustic.daemon.protocol import ControlError

PROBE_TIMEOUT_S = 2.0
POLL_S = 0.02


class NoDaemon(Exception):
    """No daemon answers for the guild asked for, or none at all."""


class SeveralDaemons(Exception):
    """Several daemons run and the command did not say which one it means."""

    def __init__(self, runtime: Path, guild_ids: list[str]) -> None:
        super().__init__(
            f"several daemons are running in {runtime}: {', '.join(guild_ids)}; "
            "choose one with --guild"
        )
        self.guild_ids = guild_ids


@dataclass(frozen=True)
class DaemonRef:
    """A daemon that answered a ping: its guild, its control socket and its pid."""

    guild_id: str
    socket: Path
    pid: int | None


def probe(runtime: Path, guild_id: str) -> DaemonRef | None:
    """Ping the daemon of `guild_id`; None when nothing listens on its socket."""
    path = socket_path(runtime, guild_id)
    try:
        with ControlClient(path, timeout=PROBE_TIMEOUT_S) as client:
            reply = client.request("ping")
    except DaemonNotRunning:
        return None
    except (ControlError, OSError):
        # Something listens but does not answer in time: a busy daemon, still alive.
        return DaemonRef(guild_id, path, None)
    pid = reply.get("pid") if isinstance(reply, dict) else None
    return DaemonRef(guild_id, path, pid if isinstance(pid, int) else None)


def live_daemons(runtime: Path) -> list[DaemonRef]:
    """Every daemon in `runtime` that answers, sorted by guild id; stale sockets are skipped."""
    found = (probe(runtime, guild_id) for guild_id in list_guild_sockets(runtime))
    return [ref for ref in found if ref is not None]


def find_daemon(runtime: Path, guild_id: str | None) -> DaemonRef:
    """The daemon of `guild_id`, or the only one running when no guild is named.

    Raises `NoDaemon` when nothing answers and `SeveralDaemons` when the choice is not
    obvious.
    """
    if guild_id is not None:
        ref = probe(runtime, guild_id)
        if ref is None:
            raise NoDaemon(f"no daemon is running for guild {guild_id!r} in {runtime}")
        return ref
    running = live_daemons(runtime)
    if not running:
        raise NoDaemon(f"no rustic daemon is running in {runtime}")
    if len(running) > 1:
        raise SeveralDaemons(runtime, [ref.guild_id for ref in running])
    return running[0]


def wait_for_exit(runtime: Path, ref: DaemonRef, timeout: float) -> bool:
    """Wait until the daemon removed its pid file and its process ended; False at the deadline.

    A daemon that is a child of a process that has not reaped it yet counts as ended.
    """
    deadline = time.monotonic() + timeout
    pid_file = pid_path(runtime, ref.guild_id)
    while pid_file.exists() or (ref.pid is not None and _process_alive(ref.pid)):
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_S)
    return True


def _process_alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (exited, not yet reaped) is not alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: the kill probe is all we know
    return stat.rpartition(")")[2].split()[:1] != ["Z"]
