"""Redis for the messaging tests: database 12 of the shared server, or a private server."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from redis_support import REDIS_HOST, REDIS_PORT, probe_redis, redis_url, unavailable

BUS_DB = 12  # the messaging tests' own database on the shared server: only it is flushed
REDIS_SERVER = "/usr/bin/redis-server"


@pytest.fixture(scope="session")
def _bus_redis() -> Iterator[Any]:
    """A client on database 12, or None when Redis cannot be reached (probed once)."""
    client = probe_redis(BUS_DB)
    yield client
    if client is not None:
        client.close()


@pytest.fixture
def bus_redis_url(_bus_redis: Any) -> Iterator[str]:
    """The URL of Redis database 12, flushed before and after the test."""
    if _bus_redis is None:
        unavailable(f"redis not reachable on {REDIS_HOST}:{REDIS_PORT}")
    _bus_redis.flushdb()
    yield redis_url(BUS_DB)
    _bus_redis.flushdb()


@pytest.fixture
def bus_redis(bus_redis_url: str, _bus_redis: Any) -> Any:
    """A client on the flushed database 12, to look at what a bus stored."""
    return _bus_redis


class PrivateRedis:
    """A redis-server of the test's own, on a free port, without persistence."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{REDIS_HOST}:{self.port}/0"

    def start(self) -> None:
        """Start the server and wait until it answers."""
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", REDIS_HOST, "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        tick = threading.Event()
        while not self._answers():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"private redis-server did not start on port {self.port}")
            tick.wait(0.01)

    def kill(self) -> None:
        """SIGKILL the server, as a crash or a lost host would end it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def _answers(self) -> bool:
        try:
            with socket.create_connection((REDIS_HOST, self.port), timeout=0.2) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A running private redis-server, killed after the test."""
    if not shutil.which(REDIS_SERVER):
        unavailable(f"{REDIS_SERVER} not installed")
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.kill()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((REDIS_HOST, 0))
        return int(probe.getsockname()[1])
