"""Connections to Redis: redis-py imported lazily, clients that fail fast, links, redaction.

The bus uses all of it; the Redis state store imports redis-py and redacts URLs through it.
"""

from __future__ import annotations

import threading
from typing import Any

SOCKET_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 2.0


def import_redis(user: str = "the redis bus") -> Any:
    """Import redis-py, or say that ``user`` needs it and which extra installs it."""
    try:
        import redis
    except ImportError as exc:
        raise ImportError(f"{user} needs redis-py: pip install 'rustic[redis]'") from exc
    return redis


def connect(url: str) -> Any:
    """A client for ``url`` that fails fast (the bus does its own retrying), on RESP2."""
    redis = import_redis()
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(
        url,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        retry=Retry(NoBackoff(), 0),
        protocol=2,
    )


def redact(url: str) -> str:
    """Hide the password of a Redis URL before it is shown."""
    scheme, sep, rest = url.partition("://")
    credentials, at, location = rest.rpartition("@")
    if not at or ":" not in credentials:
        return url
    return f"{scheme}{sep}{credentials.split(':', 1)[0]}:***@{location}"


class Link:
    """One connection of a client's pool, for the bus's hot paths, one call at a time.

    The client's own calls check a connection out of the pool, record metrics and run
    reply callbacks for every command, which costs more CPU than the round trip itself;
    a link sends and reads directly and hands back the raw (RESP2) reply. After any
    failure but an error reply the connection is dropped, so the next call reconnects.
    """

    def __init__(self, client: Any) -> None:
        self._redis = import_redis()
        self._connection = client.connection_pool.make_connection()
        self._lock = threading.Lock()

    def call(self, *args: Any) -> Any:
        """Send one command and return its raw reply; an error reply raises its exception."""
        with self._lock:
            try:
                self._connection.send_command(*args)
                return self._connection.read_response()
            except self._redis.ResponseError:
                raise
            except BaseException:
                self._connection.disconnect()
                raise

    def close(self) -> None:
        """Drop the connection."""
        with self._lock:
            self._connection.disconnect()
