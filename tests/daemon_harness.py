"""Run `rustic` for real: daemons as subprocesses on a private runtime dir, clients in-process.

Loaded as a plugin by `tests/conftest.py`; its fixtures are `runtime` and `rustic`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from rustic.cli import app
from rustic.daemon.client import ControlClient, DaemonNotRunning
from rustic.daemon.paths import socket_path
from rustic.daemon.protocol import ControlError
from waiting import WAIT_S, wait_until

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "guilds"


def write_guild(folder: Path, guild_yaml: str, modules: dict[str, str]) -> Path:
    """Write a guild file and its agent modules (`{"agents/x.py": source}`) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, source in modules.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    guild_file = folder / "guild.yaml"
    guild_file.write_text(textwrap.dedent(guild_yaml))
    return guild_file


@dataclass
class CliResult:
    """What an in-process `rustic` command printed and returned."""

    exit_code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        """The stdout, parsed as one JSON document."""
        return json.loads(self.stdout)


@dataclass
class Daemon:
    """A `rustic run` subprocess with its output in files."""

    proc: subprocess.Popen[bytes]
    runtime: Path
    guild_id: str
    out: Path
    err: Path

    @property
    def socket(self) -> Path:
        """The daemon's control socket."""
        return socket_path(self.runtime, self.guild_id)

    def request(self, op: str, **args: Any) -> Any:
        """One control request, straight over the socket (for polling conditions)."""
        with ControlClient(self.socket, timeout=WAIT_S) as client:
            return client.request(op, **args)

    def status(self) -> dict[str, Any]:
        """The daemon's status, with agents by id under `by_id`."""
        status: dict[str, Any] = self.request("status")
        status["by_id"] = {agent["id"]: agent for agent in status["agents"]}
        return status

    def ready(self) -> bool:
        """True once the guild launched and answers; fails the test if the daemon died."""
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited {self.proc.returncode}: {self.stderr()}")
        try:
            self.request("status")
        except (DaemonNotRunning, ControlError):
            return False
        return True

    def signal(self, sig: signal.Signals) -> None:
        """Send `sig` to the daemon process."""
        self.proc.send_signal(sig)

    def wait(self, timeout: float = WAIT_S) -> int:
        """Wait for the daemon to exit and return its exit code."""
        return self.proc.wait(timeout)

    def stdout(self) -> str:
        """Everything the daemon printed on stdout so far."""
        return self.out.read_text()

    def stderr(self) -> str:
        """Everything the daemon logged on stderr so far."""
        return self.err.read_text()

    def last_line(self) -> str:
        """The last line on stdout: the accounting line once the daemon exited."""
        lines = self.stdout().strip().splitlines()
        return lines[-1] if lines else ""


@dataclass
class Rustic:
    """Starts daemons and runs client commands against one runtime dir."""

    runtime: Path
    workdir: Path
    daemons: list[Daemon] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        """The environment of a daemon: the runtime dir set, colours and debug unset."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RUSTIC_")}
        return {**env, "RUSTIC_RUNTIME_DIR": str(self.runtime), "NO_COLOR": "1"}

    def spawn(self, guild_file: Path, *flags: str) -> Daemon:
        """Start `rustic run guild_file flags…` without waiting for it."""
        index = len(self.daemons)
        out, err = self.workdir / f"daemon{index}.out", self.workdir / f"daemon{index}.err"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            proc = subprocess.Popen(
                [sys.executable, "-m", "rustic", "run", str(guild_file), *flags],
                stdout=stdout,
                stderr=stderr,
                env=self.env(),
                cwd=self.workdir,
            )
        guild_id = _guild_id(guild_file)
        daemon = Daemon(proc, self.runtime, guild_id, out, err)
        self.daemons.append(daemon)
        return daemon

    def start(self, guild_file: Path, *flags: str) -> Daemon:
        """Start a daemon and wait until its guild answers `status`."""
        daemon = self.spawn(guild_file, *flags)
        wait_until(daemon.ready, what=f"daemon of {guild_file} to answer")
        return daemon

    def run(self, *args: str, timeout: float = WAIT_S) -> CliResult:
        """Run `rustic args…` as a subprocess and wait for it."""
        done = subprocess.run(
            [sys.executable, "-m", "rustic", *args],
            capture_output=True,
            env=self.env(),
            cwd=self.workdir,
            timeout=timeout,
            check=False,
        )
        return CliResult(done.returncode, done.stdout.decode(), done.stderr.decode())

    def cli(self, *args: str) -> CliResult:
        """Run a client command (`status`, `send`, `stop`, …) in this process."""
        result = CliRunner().invoke(app, list(args), env={"RUSTIC_RUNTIME_DIR": str(self.runtime)})
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return CliResult(result.exit_code, result.stdout, result.stderr)

    def kill_all(self) -> None:
        """SIGKILL whatever daemon still runs."""
        for daemon in self.daemons:
            if daemon.proc.poll() is None:
                daemon.proc.kill()
                daemon.proc.wait(WAIT_S)


def _guild_id(guild_file: Path) -> str:
    """The `id:` line of a guild file (the harness's guilds keep it on one line)."""
    for line in guild_file.read_text().splitlines():
        if line.startswith("id:"):
            return line.partition(":")[2].strip()
    return "unknown"


@pytest.fixture
def runtime() -> Iterator[Path]:
    """A fresh runtime dir with a short path (a socket path holds at most 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp")) / "run"
    yield path
    shutil.rmtree(path.parent, ignore_errors=True)


@pytest.fixture
def rustic(runtime: Path, tmp_path: Path) -> Iterator[Rustic]:
    """Start daemons and run clients on `runtime`; every daemon is killed at the end."""
    harness = Rustic(runtime, tmp_path)
    try:
        yield harness
    finally:
        harness.kill_all()
