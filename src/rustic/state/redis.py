"""A state store in Redis: one hash per key, shared by every process of the guild."""

from __future__ import annotations

import json
import logging
from typing import Any

from rustic.messaging.redis_conn import import_redis, redact
from rustic.state.base import StateStore

logger = logging.getLogger(__name__)

# every state key lives under this namespace, so it never meets the bus's keys
KEY_PREFIX = "rustic:state:"

_SCAN_BATCH = 500
_GLOB_SPECIALS = frozenset("*?[]\\")


class RedisStateStore(StateStore):
    """State in Redis: the hash `rustic:state:<key>` holds the fields `version` and `data`.

    Needs the `redis` extra. The client connects on first use, so an unreachable server
    shows up as a `redis.ConnectionError` from the first load or save.
    """

    def __init__(self, url: str) -> None:
        redis = import_redis("the redis state store")
        self._client = redis.Redis.from_url(url, decode_responses=True)
        logger.debug("redis state store opened url=%s", redact(url))

    def load(self, key: str) -> tuple[dict[str, Any], int]:
        """Return the document under `key` and its version, or `({}, 0)`."""
        version, data = self._client.hmget(KEY_PREFIX + key, ["version", "data"])
        if data is None:
            return {}, 0
        return json.loads(data), int(version)

    def save(self, key: str, data: dict[str, Any], version: int) -> None:
        """Write `data` and `version` under `key` in one MULTI/EXEC transaction."""
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        with self._client.pipeline(transaction=True) as pipe:
            pipe.hset(KEY_PREFIX + key, mapping={"version": version, "data": text})
            pipe.execute()

    def delete(self, key: str) -> None:
        """Delete the hash of `key`, if any."""
        self._client.delete(KEY_PREFIX + key)

    def keys(self, prefix: str = "") -> list[str]:
        """Return the sorted keys starting with `prefix`, found with SCAN (never KEYS)."""
        pattern = _glob_escape(KEY_PREFIX + prefix) + "*"
        found = self._client.scan_iter(match=pattern, count=_SCAN_BATCH, _type="hash")
        return sorted({name[len(KEY_PREFIX) :] for name in found})

    def close(self) -> None:
        """Close the client's connections."""
        self._client.close()


def _glob_escape(text: str) -> str:
    """Escape the characters Redis's MATCH pattern treats specially."""
    return "".join(f"\\{char}" if char in _GLOB_SPECIALS else char for char in text)
