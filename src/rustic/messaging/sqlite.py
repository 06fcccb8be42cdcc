"""The SQLite bus: durable on one machine with no server; pending deliveries survive a crash."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from rustic.message import Message
from rustic.messaging.base import BusError, DeadLetter
from rustic.messaging.durable import Dead, DurableBus, DurableMailbox, Retention, decode, encode

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 10.0  # how long a statement waits for another connection's lock
PRUNE_EVERY = 2_000  # commits between two prunings of handled deliveries
PRUNE_INTERVAL = 10.0  # ...or seconds, whichever comes first
PAGE_SIZE = 2048
CHECKPOINT_PAGES = 10_000  # WAL pages between two checkpoints
_WAL_RETRY_S = 0.01

_SCHEMA = (
    # One row per delivery: the message, stored with each subscriber that gets it, and
    # acked_at, NULL while the delivery is pending. Rows are clustered by agent, so that an
    # agent's pending deliveries are one range of the key. A table of messages apart, or a
    # secondary index, would cost every commit one more page written.
    """CREATE TABLE IF NOT EXISTS deliveries (
        agent_id TEXT NOT NULL, message_id INTEGER NOT NULL, body TEXT NOT NULL, acked_at REAL,
        PRIMARY KEY (agent_id, message_id)) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS subscriptions (
        agent_id TEXT NOT NULL, topic TEXT NOT NULL,
        PRIMARY KEY (agent_id, topic)) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS dead_letters (
        id INTEGER PRIMARY KEY AUTOINCREMENT, agent_id TEXT NOT NULL,
        message_id INTEGER NOT NULL, body TEXT NOT NULL, reason TEXT NOT NULL, at REAL NOT NULL)""",
)
_INSERT_DELIVERY = "INSERT OR IGNORE INTO deliveries (agent_id, message_id, body) VALUES (?, ?, ?)"
_ACK = "UPDATE deliveries SET acked_at = ? WHERE agent_id = ? AND message_id = ?"
_INSERT_DEAD = (
    "INSERT INTO dead_letters (agent_id, message_id, body, reason, at) VALUES (?, ?, ?, ?, ?)"
)
_PENDING = "SELECT body FROM deliveries WHERE agent_id = ? AND acked_at IS NULL ORDER BY message_id"
_REDELIVER = """
    INSERT INTO deliveries (agent_id, message_id, body) VALUES (?, ?, ?)
    ON CONFLICT (agent_id, message_id) DO UPDATE SET acked_at = NULL"""
# Pruning walks each agent's range of the key; the agents are found by skipping from one
# to the next along it rather than by reading every row.
_AGENTS = """
    WITH RECURSIVE agent(id) AS (
        SELECT min(agent_id) FROM deliveries
        UNION ALL
        SELECT (SELECT min(agent_id) FROM deliveries WHERE agent_id > agent.id) FROM agent
        WHERE agent.id IS NOT NULL)
    SELECT id FROM agent WHERE id IS NOT NULL"""
_NEWEST_KEPT = """
    SELECT message_id FROM deliveries WHERE agent_id = ?
    ORDER BY message_id DESC LIMIT 1 OFFSET ?"""
_PRUNE = """
    DELETE FROM deliveries WHERE agent_id = ? AND message_id < ? AND acked_at IS NOT NULL"""


class SqliteBus(DurableBus):
    """A bus in one SQLite file (WAL journal, ``synchronous=NORMAL``).

    Guarantees, for a crash of the process at any point (``kill -9`` included):

    - A publish from outside a handler is committed before ``publish`` returns (one
      with no subscriber stores nothing: there is no one to deliver it to).
    - A handled message is acknowledged in the same commit as everything its handlers
      published and dead-lettered, after the handlers returned; those publishes reach
      their subscribers' mailboxes only then. So a crash loses no accepted message and
      redelivers at most the messages that were in flight (one per running agent).
    - At the next start, each agent's pending deliveries are queued in id order, ahead of
      new mail, when its mailbox opens; an agent never gets a message id twice.

    A power cut or an OS crash (not a process crash) may lose the commits made since the
    last checkpoint (every 20 MB of WAL), since with ``synchronous=NORMAL`` the WAL is
    synced at checkpoints only; it never corrupts the file. Commits are not batched across
    turns: one commit per handled message is what keeps the redelivery to the one in
    flight. Subscriptions are stored too, so mail for an agent that has not launched yet
    is kept for it. Handled deliveries are pruned by ``retention``; pending deliveries and
    dead letters are kept until handled or retried. One process at a time may use the file.
    """

    transient_errors = (sqlite3.OperationalError,)

    def __init__(self, path: str | Path, retention: Retention | None = None) -> None:
        super().__init__(retention or Retention())
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._connection: sqlite3.Connection | None = _connect(self.path)  # guarded by `_lock`
        self._commits = 0  # since the last pruning; guarded by `_lock`
        self._pruned_at = time.monotonic()  # guarded by `_lock`
        for agent_id, topics in self._load_subscriptions().items():
            self._remember_subscriptions(agent_id, topics)
        logger.debug("sqlite bus opened path=%s", self.path)

    def describe(self) -> str:
        return f"sqlite bus {self.path}"

    # -- mailboxes --------------------------------------------------------------------------

    def open_mailbox(self, agent_id: str) -> DurableMailbox:
        """Return the agent's mailbox; on first use, queue its pending deliveries in id order.

        Loading and registering happen under the lock that commits take, so a delivery
        committed meanwhile is either loaded here or put into the mailbox, never both.
        """
        with self._lock:
            mailbox = self._mailboxes.get(agent_id)
            if mailbox is not None:
                return mailbox
            rows = self._db().execute(_PENDING, (agent_id,)).fetchall()
            mailbox = DurableMailbox(self, agent_id)
            mailbox.extend([decode(body) for (body,) in rows])
            self._mailboxes[agent_id] = mailbox
        if rows:
            logger.info("pending deliveries loaded agent_id=%s count=%d", agent_id, len(rows))
        return mailbox

    # -- storing ----------------------------------------------------------------------------

    def _store(
        self,
        publishes: Sequence[Message],
        acked: tuple[DurableMailbox, Message] | None,
        dead: Sequence[Dead],
        patience: float | None,
    ) -> int:
        what = "acknowledge" if acked is not None else "publish"
        return self._retrying(what, lambda: self._commit(publishes, acked, dead), patience)

    def _commit(
        self,
        publishes: Sequence[Message],
        acked: tuple[DurableMailbox, Message] | None,
        dead: Sequence[Dead],
    ) -> int:
        """One transaction; raises ``sqlite3.OperationalError`` (nothing stored) on failure."""
        now = time.time()
        deliveries: list[tuple[DurableMailbox, Message]] = []
        count = 0
        with self._lock:
            db = self._db()
            with _Transaction(db):
                for message in publishes:
                    count += self._insert(db, message, deliveries)
                if acked is not None:
                    db.execute(_ACK, (now, acked[0].agent_id, acked[1].id))
                for agent_id, message, reason in dead:
                    db.execute(_INSERT_DEAD, (agent_id, message.id, encode(message), reason, now))
            self._commits += 1
            if self._commits >= PRUNE_EVERY or time.monotonic() - self._pruned_at > PRUNE_INTERVAL:
                self._prune_quietly(db, now)

        # Deliver in this process only once the commit made the messages durable.
        for mailbox, message in deliveries:
            mailbox.put(message)
        return count

    def _insert(
        self,
        db: sqlite3.Connection,
        message: Message,
        deliveries: list[tuple[DurableMailbox, Message]],
    ) -> int:
        """Store one delivery per subscriber; caller holds `_lock` inside a transaction."""
        body = encode(message)
        count = 0
        for agent_id in self._targets(message):
            # A row that exists already means a redelivery: the agent skips it.
            if db.execute(_INSERT_DELIVERY, (agent_id, message.id, body)).rowcount:
                count += 1
                mailbox = self._mailboxes.get(agent_id)
                if mailbox is not None:
                    deliveries.append((mailbox, message))
        return count

    def _prune(self, db: sqlite3.Connection, now: float) -> None:
        """Delete each agent's handled deliveries older than ``max_age`` or past ``count``."""
        age_cutoff = self.retention.age_cutoff_id(now)
        pruned = 0
        try:
            with _Transaction(db):
                for (agent_id,) in db.execute(_AGENTS).fetchall():
                    row = db.execute(_NEWEST_KEPT, (agent_id, self.retention.count)).fetchone()
                    cutoff = age_cutoff if row is None else max(age_cutoff, row[0] + 1)
                    pruned += db.execute(_PRUNE, (agent_id, cutoff)).rowcount
        finally:
            # A failed pruning waits for the next turn too, rather than retry every commit.
            self._commits, self._pruned_at = 0, time.monotonic()
        if pruned:
            logger.debug("handled deliveries pruned count=%d path=%s", pruned, self.path)

    def _prune_quietly(self, db: sqlite3.Connection, now: float) -> None:
        """Prune after a commit; a failure here must not make the commit look failed."""
        try:
            self._prune(db, now)
        except sqlite3.OperationalError as exc:
            logger.warning("pruning failed, will try again error=%s path=%s", exc, self.path)

    def prune(self) -> None:
        """Prune handled deliveries now, by the retention (it also runs every few commits)."""
        with self._lock:
            self._prune(self._db(), time.time())

    # -- subscriptions ----------------------------------------------------------------------

    def _save_subscriptions(self, agent_id: str, topics: frozenset[str]) -> None:
        with self._lock:
            db = self._db()
            with _Transaction(db):
                db.execute("DELETE FROM subscriptions WHERE agent_id = ?", (agent_id,))
                db.executemany(
                    "INSERT INTO subscriptions (agent_id, topic) VALUES (?, ?)",
                    [(agent_id, topic) for topic in sorted(topics)],
                )

    def _load_subscriptions(self) -> dict[str, frozenset[str]]:
        with self._lock:
            rows = self._db().execute("SELECT agent_id, topic FROM subscriptions").fetchall()
        found: dict[str, set[str]] = {}
        for agent_id, topic in rows:
            found.setdefault(agent_id, set()).add(topic)
        return {agent_id: frozenset(topics) for agent_id, topics in found.items()}

    # -- dead letters -----------------------------------------------------------------------

    def dead_letters(self) -> list[DeadLetter]:
        with self._lock:
            rows = (
                self._db()
                .execute("SELECT id, agent_id, body, reason, at FROM dead_letters ORDER BY id")
                .fetchall()
            )
        return [
            DeadLetter(agent_id, decode(body), reason, at, id=dead_id)
            for dead_id, agent_id, body, reason, at in rows
        ]

    def retry_dead_letters(self, ids: Iterable[int]) -> list[DeadLetter]:
        """Make the dead letters ``ids`` pending deliveries again, in one commit.

        Each goes back to the agent that gave up on it, with its original id; an agent
        not running in this process gets it when its mailbox opens.
        """
        wanted = set(ids)
        retried = [dead for dead in self.dead_letters() if dead.id in wanted]
        with self._lock:
            db = self._db()
            with _Transaction(db):
                for dead in retried:
                    message = dead.message
                    db.execute(_REDELIVER, (dead.agent_id, message.id, encode(message)))
                    db.execute("DELETE FROM dead_letters WHERE id = ?", (dead.id,))
            boxes = [self._mailboxes.get(dead.agent_id) for dead in retried]
        for dead, mailbox in zip(retried, boxes, strict=True):
            if mailbox is not None:
                mailbox.put(dead.message)
        return retried

    # -- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        """Close the file; later operations raise :class:`BusError`."""
        super().close()
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None
        logger.debug("sqlite bus closed path=%s", self.path)

    def _db(self) -> sqlite3.Connection:
        """The open connection; caller holds `_lock`."""
        if self._connection is None:
            raise BusError(f"{self.describe()} is closed")
        return self._connection


class _Transaction:
    """``with _Transaction(db):`` runs the block in BEGIN IMMEDIATE ... COMMIT, or rolls back."""

    __slots__ = ("_db",)

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is None:
            try:
                self._db.execute("COMMIT")
                return
            except BaseException:
                self._rollback()
                raise
        self._rollback()

    def _rollback(self) -> None:
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")


def _connect(path: Path) -> sqlite3.Connection:
    """Open ``path`` in autocommit mode, WAL journal and NORMAL sync, with the schema in place."""
    db = sqlite3.connect(
        path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
    )
    db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")

    # Each commit appends the pages it touched to the WAL: small pages write less, and
    # checkpointing every 20 MB rather than 4 MB copies a page rewritten often once.
    db.execute(f"PRAGMA page_size = {PAGE_SIZE}")  # takes effect on a new file only
    mode = _enable_wal(db)
    if mode != "wal":
        logger.warning("sqlite bus is not in wal mode journal_mode=%s path=%s", mode, path)
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute(f"PRAGMA wal_autocheckpoint = {CHECKPOINT_PAGES}")
    db.execute(f"PRAGMA journal_size_limit = {CHECKPOINT_PAGES * PAGE_SIZE * 2}")

    # Refuse a file written by a newer rustic rather than misread it.
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        db.close()
        raise BusError(
            f"sqlite bus {path}: schema version {version} is newer than this rustic "
            f"understands ({SCHEMA_VERSION}); upgrade rustic or use another file"
        )
    with _Transaction(db):
        for statement in _SCHEMA:
            db.execute(statement)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    return db


def _enable_wal(db: sqlite3.Connection) -> str:
    """Switch to WAL, retrying the immediate "locked" another opener's lock causes."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            return str(db.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                raise
        time.sleep(_WAL_RETRY_S)
