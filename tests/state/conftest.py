"""A `store` fixture that runs a test once per state backend."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from rustic.state import MemoryStateStore, RedisStateStore, SqliteStateStore, StateStore


@pytest.fixture(params=["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateStore]:
    """An empty state store of each backend in turn, closed after the test."""
    backend: StateStore
    if request.param == "memory":
        backend = MemoryStateStore()
    elif request.param == "sqlite":
        backend = SqliteStateStore(tmp_path / "state.db")
    else:
        backend = RedisStateStore(request.getfixturevalue("redis_url"))
    yield backend
    backend.close()
