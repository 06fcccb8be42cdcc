"""`SqliteStateStore`: durability, WAL and sharing one file."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rustic.state import StateHandle
from rustic.state.sqlite import SqliteStateStore


def test_sqlite_state_survives_reopening_the_file(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    first = SqliteStateStore(path)
    StateHandle(first, "agent:g:a").update({"count": 41})
    first.close()

    reopened = SqliteStateStore(path)
    handle = StateHandle(reopened, "agent:g:a")

    assert handle.get() == {"count": 41}
    assert handle.version == 1
    reopened.close()


def test_sqlite_store_creates_missing_parent_folders(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "state.db"

    store = SqliteStateStore(path)
    store.save("guild:g", {"x": 1}, 1)
    store.close()

    assert path.is_file()


def test_sqlite_store_runs_in_wal_mode_with_the_state_table(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = SqliteStateStore(path)
    store.save("guild:g", {"x": 1}, 1)

    with sqlite3.connect(path) as connection:
        mode = connection.execute("PRAGMA journal_mode").fetchone()[0]
        columns = [row[1] for row in connection.execute("PRAGMA table_info(state)")]
    connection.close()
    store.close()

    assert mode == "wal"
    assert columns == ["key", "version", "data", "updated_at"]


def test_two_sqlite_stores_on_one_file_see_each_others_writes(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    left = SqliteStateStore(path)
    right = SqliteStateStore(path)

    left.save("agent:g:a", {"from": "left"}, 1)
    right.save("agent:g:b", {"from": "right"}, 1)

    assert right.load("agent:g:a") == ({"from": "left"}, 1)
    assert left.load("agent:g:b") == ({"from": "right"}, 1)
    assert left.keys() == right.keys() == ["agent:g:a", "agent:g:b"]
    left.close()
    right.close()


def test_a_closed_sqlite_store_refuses_further_use_naming_its_file(tmp_path: Path) -> None:
    store = SqliteStateStore(tmp_path / "state.db")
    store.close()

    with pytest.raises(RuntimeError, match=r"sqlite state store is closed: path=.*state\.db$"):
        store.load("guild:g")


def test_two_processes_opening_and_writing_one_file_at_once_both_succeed(tmp_path: Path) -> None:
    # Given two processes that open the same new file and write to it at the same moment
    path = tmp_path / "shared.db"
    script = textwrap.dedent(
        """
        import sys
        from rustic.state.sqlite import SqliteStateStore

        store = SqliteStateStore(sys.argv[1])
        for n in range(50):
            store.save(f"agent:g:{sys.argv[2]}-{n:02d}", {"n": n}, 1)
        store.close()
        """
    )
    source = str(Path(__file__).resolve().parents[2] / "src")
    env = {"PYTHONPATH": source}
    command = [sys.executable, "-c", script, str(path)]

    # When both run to the end
    workers = [subprocess.Popen([*command, name], env=env) for name in ("p1", "p2")]
    codes = [worker.wait(timeout=30) for worker in workers]

    # Then neither failed on a locked database and every write is there
    assert codes == [0, 0]
    store = SqliteStateStore(path)
    assert len(store.keys("agent:g:p1-")) == len(store.keys("agent:g:p2-")) == 50
    store.close()
