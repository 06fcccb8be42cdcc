"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import pytest

from redis_support import REDIS_HOST, REDIS_PORT, probe_redis, unavailable
from redis_support import redis_url as redis_url_of

# `runtime` and `rustic` fixtures: real `rustic` daemons on a private runtime dir.
pytest_plugins = ["daemon_harness"]

REDIS_TEST_DB = 11  # the only database the tests write to, and flush


@pytest.fixture(scope="session")
def _redis_client() -> Iterator[Any]:
    """One client on the test database, or `None` if Redis is unreachable (probed once)."""
    client = probe_redis(REDIS_TEST_DB)
    yield client
    if client is not None:
        client.close()


@pytest.fixture
def redis_url(_redis_client: Any) -> Iterator[str]:
    """The URL of Redis database 11, flushed before and after the test.

    Skips the test if Redis is not reachable, or fails it when the `CI` variable is set.
    """
    if _redis_client is None:
        unavailable(f"redis not reachable on {REDIS_HOST}:{REDIS_PORT}")
    _redis_client.flushdb()
    yield redis_url_of(REDIS_TEST_DB)
    _redis_client.flushdb()


@pytest.fixture
def fresh_imports(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Restore `sys.path` and forget modules imported from `tmp_path` after the test."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        del sys.modules[name]
