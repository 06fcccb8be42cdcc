"""`open_state_store`: the URL forms a guild spec may use."""

from __future__ import annotations

from pathlib import Path

import pytest

from rustic.state import (
    MemoryStateStore,
    RedisStateStore,
    SqliteStateStore,
    open_state_store,
)


@pytest.mark.parametrize("url", ["memory", "memory://"])
def test_memory_url_opens_a_memory_store(url: str) -> None:
    store = open_state_store(url)

    assert isinstance(store, MemoryStateStore)


def test_sqlite_url_with_three_slashes_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    store = open_state_store("sqlite:///data/state.db")
    store.save("guild:g", {}, 1)
    store.close()

    assert isinstance(store, SqliteStateStore)
    assert (tmp_path / "data" / "state.db").is_file()


def test_sqlite_url_with_four_slashes_is_an_absolute_path(tmp_path: Path) -> None:
    path = tmp_path / "abs" / "state.db"

    store = open_state_store(f"sqlite:///{path}")
    store.save("guild:g", {}, 1)
    store.close()

    assert isinstance(store, SqliteStateStore)
    assert store.path == path
    assert path.is_file()


@pytest.mark.redis
def test_redis_url_opens_a_redis_store_on_that_database(redis_url: str) -> None:
    store = open_state_store(redis_url)
    store.save("guild:g", {"ok": True}, 1)

    assert isinstance(store, RedisStateStore)
    assert open_state_store(redis_url).load("guild:g") == ({"ok": True}, 1)
    store.close()


@pytest.mark.parametrize(
    "url", ["", "memory://x", "sqlite://state.db", "sqlite:///", "postgres://h/db", "redis://"]
)
def test_an_unknown_url_is_refused_naming_it_and_the_accepted_forms(url: str) -> None:
    with pytest.raises(ValueError) as caught:
        open_state_store(url)

    assert str(caught.value) == (
        f"unknown state store URL {url!r}: expected 'memory', 'sqlite:///relative/path.db', "
        "'sqlite:////absolute/path.db' or 'redis://host:port/db'"
    )
