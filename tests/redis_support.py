"""Reaching the shared Redis on 127.0.0.1:6379 from tests, one database per test area."""

from __future__ import annotations

import os
from typing import Any, NoReturn

import pytest

REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379


def unavailable(reason: str) -> NoReturn:
    """Skip the current test, or fail it on CI, where every backend must be present."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def probe_redis(db: int) -> Any | None:
    """A client on database ``db``, or None when redis-py is missing or Redis is down.

    No retries: an absent server costs one refused connection, not seconds per test.
    """
    try:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry
    except ImportError:
        return None
    client = redis.Redis(
        host=REDIS_HOST,
        port=REDIS_PORT,
        db=db,
        socket_connect_timeout=1,
        retry=Retry(NoBackoff(), 0),
    )
    try:
        client.ping()
    except redis.RedisError:
        client.close()
        return None
    return client


def redis_url(db: int) -> str:
    """The URL of database ``db`` on the shared server."""
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}"
