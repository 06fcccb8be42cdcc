"""The `StateStore` contract, checked on every backend."""

from __future__ import annotations

import threading

from rustic.state import StateStore


def test_loading_a_missing_key_gives_an_empty_document_at_version_zero(
    store: StateStore,
) -> None:
    assert store.load("agent:g:nobody") == ({}, 0)


def test_a_saved_document_loads_back_with_its_version(store: StateStore) -> None:
    document = {"text": "héllo ✓", "n": 1.5, "ok": True, "none": None, "list": [1, {"a": []}]}

    store.save("agent:g:a", document, 3)

    assert store.load("agent:g:a") == (document, 3)


def test_saving_again_replaces_the_whole_document(store: StateStore) -> None:
    store.save("agent:g:a", {"old": 1}, 1)

    store.save("agent:g:a", {"new": 2}, 2)

    assert store.load("agent:g:a") == ({"new": 2}, 2)


def test_the_store_keeps_no_reference_to_saved_or_loaded_documents(store: StateStore) -> None:
    saved = {"items": [1]}
    store.save("agent:g:a", saved, 1)
    saved["items"].append(2)

    loaded, _ = store.load("agent:g:a")
    loaded["items"].append(3)

    assert store.load("agent:g:a") == ({"items": [1]}, 1)


def test_delete_removes_the_key_and_ignores_a_missing_one(store: StateStore) -> None:
    store.save("agent:g:a", {"x": 1}, 1)

    store.delete("agent:g:a")
    store.delete("agent:g:never-saved")

    assert store.load("agent:g:a") == ({}, 0)
    assert store.keys() == []


def test_keys_lists_the_sorted_keys_with_the_prefix(store: StateStore) -> None:
    for key in ["agent:g1:b", "agent:g1:a", "agent:g2:a", "guild:g1"]:
        store.save(key, {}, 1)

    assert store.keys() == ["agent:g1:a", "agent:g1:b", "agent:g2:a", "guild:g1"]
    assert store.keys("agent:g1:") == ["agent:g1:a", "agent:g1:b"]
    assert store.keys("nothing") == []


def test_keys_treats_wildcard_characters_in_the_prefix_literally(store: StateStore) -> None:
    for key in ["a%_*?[x]:1", "abcd:2", "a%_*?[x]:3"]:
        store.save(key, {}, 1)

    assert store.keys("a%_*?[x]") == ["a%_*?[x]:1", "a%_*?[x]:3"]


def test_close_can_be_called_twice(store: StateStore) -> None:
    store.close()
    store.close()


def test_eight_threads_saving_different_keys_at_once_all_land(store: StateStore) -> None:
    start = threading.Barrier(8)

    def work(thread_no: int) -> None:
        start.wait(timeout=10)
        for n in range(20):
            store.save(f"agent:g:{thread_no}-{n:02d}", {"n": n}, n + 1)
            store.load(f"agent:g:{thread_no}-{n:02d}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert not any(thread.is_alive() for thread in threads)
    assert len(store.keys("agent:g:")) == 8 * 20
    assert store.load("agent:g:7-19") == ({"n": 19}, 20)
