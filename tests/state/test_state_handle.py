"""`StateHandle` over every state backend."""

from __future__ import annotations

import threading

import pytest

from rustic.state import (
    MemoryStateStore,
    StateHandle,
    StateStore,
    state_key_for_agent,
    state_key_for_guild,
)

THREADS = 8
UPDATES_PER_THREAD = 25


def test_a_new_handle_starts_empty_at_version_zero(store: StateStore) -> None:
    handle = StateHandle(store, "agent:g:a")

    assert handle.get() == {}
    assert handle.version == 0
    assert handle.key == "agent:g:a"


def test_update_merges_the_patch_bumps_the_version_and_returns_the_new_state(
    store: StateStore,
) -> None:
    handle = StateHandle(store, "agent:g:a")
    handle.update({"count": 1, "tags": ["x"], "nested": {"a": 1, "b": 2}})

    state = handle.update({"count": 2, "nested": {"b": None, "c": 3}})

    assert state == {"count": 2, "tags": ["x"], "nested": {"a": 1, "c": 3}}
    assert handle.get() == state
    assert handle.version == 2


def test_update_writes_through_to_the_store(store: StateStore) -> None:
    handle = StateHandle(store, "agent:g:a")

    handle.update({"seen": 3})

    assert store.load("agent:g:a") == ({"seen": 3}, 1)


def test_a_handle_loads_what_the_store_already_holds(store: StateStore) -> None:
    store.save("guild:g", {"phase": "running"}, 7)

    handle = StateHandle(store, "guild:g")

    assert handle.get() == {"phase": "running"}
    assert handle.version == 7
    assert handle.update({"phase": "draining"}) == {"phase": "draining"}
    assert store.load("guild:g") == ({"phase": "draining"}, 8)


def test_mutating_what_get_returns_does_not_change_the_state(store: StateStore) -> None:
    handle = StateHandle(store, "agent:g:a")
    handle.update({"items": [1], "inner": {"k": "v"}})

    copy = handle.get()
    copy["items"].append(2)
    copy["inner"]["k"] = "changed"
    copy["extra"] = True

    assert handle.get() == {"items": [1], "inner": {"k": "v"}}


def test_mutating_what_update_returns_or_the_patch_does_not_change_the_state(
    store: StateStore,
) -> None:
    handle = StateHandle(store, "agent:g:a")
    patch = {"items": [1]}

    returned = handle.update(patch)
    returned["items"].append(2)
    patch["items"].append(3)

    assert handle.get() == {"items": [1]}


def test_replace_stores_the_whole_document_as_the_next_version(store: StateStore) -> None:
    handle = StateHandle(store, "agent:g:a")
    handle.update({"old": 1})

    state = handle.replace({"new": 2})

    assert state == {"new": 2}
    assert handle.version == 2
    assert store.load("agent:g:a") == ({"new": 2}, 2)


def test_concurrent_updates_from_eight_threads_all_land(store: StateStore) -> None:
    handle = StateHandle(store, "agent:g:a")
    start = threading.Barrier(THREADS)

    def work(thread_no: int) -> None:
        start.wait(timeout=10)
        for n in range(1, UPDATES_PER_THREAD + 1):
            handle.update({f"t{thread_no}": n})

    threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert not any(thread.is_alive() for thread in threads)
    assert handle.version == THREADS * UPDATES_PER_THREAD
    assert handle.get() == {f"t{i}": UPDATES_PER_THREAD for i in range(THREADS)}
    assert store.load("agent:g:a")[1] == THREADS * UPDATES_PER_THREAD


def test_a_handle_reopened_on_the_same_key_continues_from_the_saved_version(
    store: StateStore,
) -> None:
    StateHandle(store, "agent:g:a").update({"step": 1})

    handle = StateHandle(store, "agent:g:a")
    handle.update({"step": 2})

    assert handle.version == 2
    assert store.load("agent:g:a") == ({"step": 2}, 2)


def test_a_failed_save_leaves_the_handle_unchanged() -> None:
    class FailingStore(StateStore):
        def load(self, key: str) -> tuple[dict[str, object], int]:
            return {"kept": True}, 4

        def save(self, key: str, data: dict[str, object], version: int) -> None:
            raise OSError("disk full")

        def delete(self, key: str) -> None:
            pass

        def keys(self, prefix: str = "") -> list[str]:
            return []

        def close(self) -> None:
            pass

    handle = StateHandle(FailingStore(), "agent:g:a")

    with pytest.raises(OSError, match="disk full"):
        handle.update({"kept": False})

    assert handle.get() == {"kept": True}
    assert handle.version == 4


def test_a_patch_that_is_not_a_dict_is_refused() -> None:
    handle = StateHandle(MemoryStateStore(), "agent:g:a")

    with pytest.raises(TypeError, match=r"^a state patch must be a dict: got list$"):
        handle.update(["not", "a", "dict"])  # type: ignore[arg-type]

    assert handle.version == 0


def test_state_keys_name_the_guild_and_the_agent() -> None:
    assert state_key_for_agent("g1", "echo") == "agent:g1:echo"
    assert state_key_for_guild("g1") == "guild:g1"
