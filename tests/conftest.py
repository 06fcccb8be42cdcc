"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any, NoReturn

import pytest

# `runtime` and `rustic` fixtures: real `rustic` daemons on a private runtime dir.
pytest_plugins = ["daemon_harness"]

REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379
REDIS_TEST_DB = 11  # the only database the tests write to, and flush


@pytest.fixture(scope="session")
def _redis_client() -> Iterator[Any]:
    """One client on the test database, or `None` if Redis is unreachable (probed once)."""
    try:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry
    except ImportError:
        yield None
        return

    # no retries: an absent server should cost one refused connection, not seconds per test
    client = redis.Redis(
        host=REDIS_HOST,
        port=REDIS_PORT,
        db=REDIS_TEST_DB,
        socket_connect_timeout=1,
        retry=Retry(NoBackoff(), 0),
    )
    try:
        client.ping()
    except redis.RedisError:
        client.close()
        yield None
        return
    yield client
    client.close()


@pytest.fixture
def redis_url(_redis_client: Any) -> Iterator[str]:
    """The URL of Redis database 11, flushed before and after the test.

    Skips the test if Redis is not reachable, or fails it when the `CI` variable is set.
    """
    if _redis_client is None:
        _unavailable(f"redis not reachable on {REDIS_HOST}:{REDIS_PORT}")
    _redis_client.flushdb()
    yield f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_TEST_DB}"
    _redis_client.flushdb()


def _unavailable(reason: str) -> NoReturn:
    """Skip the current test, or fail it on CI where every backend must be present."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture
def fresh_imports(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Restore `sys.path` and forget modules imported from `tmp_path` after the test."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        del sys.modules[name]
