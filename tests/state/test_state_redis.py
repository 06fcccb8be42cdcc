"""`RedisStateStore`: key layout in Redis."""

from __future__ import annotations

import json

import pytest

from rustic.state.redis import RedisStateStore

redis = pytest.importorskip("redis")
pytestmark = pytest.mark.redis


def test_redis_state_is_a_hash_with_version_and_data_fields(redis_url: str) -> None:
    store = RedisStateStore(redis_url)
    store.save("agent:g:a", {"count": 2}, 5)
    store.close()

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    fields = client.hgetall("rustic:state:agent:g:a")
    client.close()

    assert fields.keys() == {"version", "data"}
    assert fields["version"] == "5"
    assert json.loads(fields["data"]) == {"count": 2}


def test_redis_keys_ignore_other_keys_in_the_database(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    client.set("rustic:state:agent:not-a-hash", "x")
    client.set("unrelated", "y")
    client.close()
    store = RedisStateStore(redis_url)

    store.save("agent:g:a", {}, 1)

    assert store.keys() == ["agent:g:a"]
    store.close()


def test_redis_state_survives_a_new_store_on_the_same_url(redis_url: str) -> None:
    first = RedisStateStore(redis_url)
    first.save("guild:g", {"phase": "up"}, 3)
    first.close()

    second = RedisStateStore(redis_url)

    assert second.load("guild:g") == ({"phase": "up"}, 3)
    second.close()
