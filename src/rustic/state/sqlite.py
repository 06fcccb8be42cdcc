"""A state store in one SQLite file, shared by the threads (and processes) that open it."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from rustic.state.base import StateStore

logger = logging.getLogger(__name__)

# how long a connection waits for another one (thread or process) to release a lock
BUSY_TIMEOUT_S = 10.0
_WAL_RETRY_S = 0.01

_SCHEMA = """
CREATE TABLE IF NOT EXISTS state (
    key TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    data TEXT NOT NULL,
    updated_at REAL NOT NULL
)
"""

_UPSERT = """
INSERT INTO state (key, version, data, updated_at) VALUES (?, ?, ?, ?)
ON CONFLICT (key) DO UPDATE SET
    version = excluded.version, data = excluded.data, updated_at = excluded.updated_at
"""


class SqliteStateStore(StateStore):
    """State in a SQLite file (WAL journal), so it survives a restart of the guild.

    The parent folders are created if missing. One connection is shared by all threads
    and serialised by a lock; other processes may open the same file, and wait up to
    `BUSY_TIMEOUT_S` for each other's writes.
    """

    def __init__(self, path: str | Path) -> None:
        self._path = Path(path)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = _connect(self._path)  # guarded by `_lock`
        logger.debug("sqlite state store opened path=%s", self._path)

    @property
    def path(self) -> Path:
        """The SQLite file holding the state."""
        return self._path

    def load(self, key: str) -> tuple[dict[str, Any], int]:
        """Return the document under `key` and its version, or `({}, 0)`."""
        with self._lock:
            cursor = self._open().execute("SELECT data, version FROM state WHERE key = ?", (key,))
            row = cursor.fetchone()
        if row is None:
            return {}, 0
        return json.loads(row[0]), int(row[1])

    def save(self, key: str, data: dict[str, Any], version: int) -> None:
        """Write `data` under `key` with `version` in one statement (atomic on its own)."""
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        with self._lock:
            self._open().execute(_UPSERT, (key, version, text, time.time()))

    def delete(self, key: str) -> None:
        """Delete the row of `key`, if any."""
        with self._lock:
            self._open().execute("DELETE FROM state WHERE key = ?", (key,))

    def keys(self, prefix: str = "") -> list[str]:
        """Return the sorted keys starting with `prefix`."""
        # substr, not LIKE: a prefix may contain `%` or `_`
        query = "SELECT key FROM state WHERE substr(key, 1, ?) = ? ORDER BY key"
        with self._lock:
            rows = self._open().execute(query, (len(prefix), prefix)).fetchall()
        return [row[0] for row in rows]

    def close(self) -> None:
        """Close the connection; later calls on this store raise `RuntimeError`."""
        with self._lock:
            if self._connection is None:
                return
            self._connection.close()
            self._connection = None
        logger.debug("sqlite state store closed path=%s", self._path)

    def _open(self) -> sqlite3.Connection:
        """Return the live connection; caller holds `_lock`."""
        if self._connection is None:
            raise RuntimeError(f"the sqlite state store is closed: path={self._path}")
        return self._connection


def _connect(path: Path) -> sqlite3.Connection:
    """Open `path` in autocommit mode with WAL journaling and create the table."""
    connection = sqlite3.connect(
        path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
    )

    # the busy timeout comes first: switching to WAL takes a lock another process may hold
    connection.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")

    # WAL lets readers run beside a writer; under WAL, NORMAL skips the fsync per commit:
    # a power cut may lose the last writes but never corrupts the file
    mode = _enable_wal(connection)
    if mode != "wal":
        logger.warning("sqlite state store is not in wal mode journal_mode=%s path=%s", mode, path)
    connection.execute("PRAGMA synchronous = NORMAL")

    connection.execute(_SCHEMA)
    return connection


def _enable_wal(connection: sqlite3.Connection) -> str:
    """Switch the file to WAL and return the journal mode now in force.

    SQLite answers a journal-mode switch that meets another connection's lock with an
    immediate "database is locked", without calling the busy handler; two processes
    opening a new file at once hit this. So retry until `BUSY_TIMEOUT_S` has passed.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            return str(connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                raise
        time.sleep(_WAL_RETRY_S)
