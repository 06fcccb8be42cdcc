"""The Redis bus's threads: a reader filling the mailboxes, a committer batching the turns.

Both keep round trips to Redis few and large, since under the GIL every round trip a
busy process makes costs far more than the network does. ``InTransit`` counts what they
carry, so that a guild can tell when it is idle.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rustic.message import Message
from rustic.messaging.base import BusError
from rustic.messaging.durable import RETRY_FIRST, RETRY_MAX, DurableMailbox, decode
from rustic.messaging.redis_conn import Link, import_redis
from rustic.messaging.redis_scripts import GROUP

if TYPE_CHECKING:
    from rustic.messaging.redis import RedisBus

logger = logging.getLogger(__name__)

BLOCK_MS = 100  # how long one XREADGROUP waits for new entries
READ_COUNT = 500  # entries read per stream per call
HIGH_WATER = 1_000  # an agent with this many queued gets no more until it catches up
PRUNE_INTERVAL = 5.0  # seconds between two prunings of the local agents' streams
READ_GATHER_S = 0.002  # after a small read, let entries gather this long before the next
COMMIT_GATHER_S = 0.001  # how long a small batch of turns waits for more to join it
MAX_BATCH = 512  # turns committed in one script call
FLUSH_S = 2.0  # how long a closing bus keeps retrying the turns still queued
RECENT_ACKS = 256  # message ids each mailbox remembers having acknowledged
_FULL_PAUSE = 0.005  # how long to wait when every local mailbox is full

Entry = tuple[bytes, Message, bool]  # an entry id, its message, and whether it is a retry
Pair = tuple[str, int]  # an agent id and a message id: one delivery


def read_entry(entry: bytes, fields: dict[bytes, bytes]) -> Entry:
    """A stream entry as the bus queues it; KeyError or ValueError when it does not decode."""
    return entry, decode(fields[b"m"]), b"retry" in fields


class RedisMailbox(DurableMailbox):
    """A mailbox fed by the bus's reader thread; it knows each message's stream entry."""

    def __init__(self, bus: RedisBus, agent_id: str) -> None:
        super().__init__(bus, agent_id)
        self.stream = bus.inbox(agent_id)
        self.window = threading.Semaphore(max(1, bus.window))  # turns not yet in Redis
        self.entries: dict[int, bytes] = {}  # entry id by message id, queued or in flight
        self._recent: deque[int] = deque(maxlen=RECENT_ACKS)  # acknowledged here, newest last
        self._recent_set: set[int] = set()  # the same ids, to look up

    def knows(self, message_id: int, recent: bool = True) -> bool:
        """True when the message is queued or in flight, or (``recent``) was acknowledged here."""
        return message_id in self.entries or (recent and message_id in self._recent_set)

    def acknowledged(self, message_id: int) -> None:
        """Forget the message's entry; remember its id, to skip a duplicate entry."""
        self.entries.pop(message_id, None)
        if len(self._recent) == RECENT_ACKS:
            self._recent_set.discard(self._recent[0])
        self._recent.append(message_id)
        self._recent_set.add(message_id)


class InTransit:
    """What this process sent toward its own agents and has not seen arrive yet.

    Turns handed to the committer count until they are in Redis; each delivery a commit
    makes to an agent running here counts until the reader put it in the mailbox; an
    agent whose stream may hold entries not read yet counts until a read finds none.
    ``Guild.run_until_idle`` and the drain of a stop wait for all three to be done.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pairs: set[Pair] = set()  # deliveries expected; guarded by `_cond`
        self._turns = 0  # turns not yet committed; guarded by `_cond`
        self._unread: set[str] = set()  # agents with entries maybe unread; guarded by `_cond`

    def expect(self, pairs: set[Pair], turn: bool) -> None:
        """Count the deliveries a commit is about to make (and the turn, for a turn)."""
        if pairs or turn:
            with self._cond:
                self._pairs |= pairs
                self._turns += turn

    def arrived(self, pairs: set[Pair], turn: bool = False) -> None:
        """Stop counting deliveries that reached their mailbox, or will not be made."""
        if (pairs and self._pairs) or turn:
            with self._cond:
                self._pairs -= pairs
                self._turns -= turn
                self._cond.notify_all()

    def unread(self, agent_id: str) -> None:
        """Note that the agent's stream may hold entries the reader has not fetched."""
        with self._cond:
            self._unread.add(agent_id)

    def read(self, agent_ids: set[str]) -> None:
        """Note that a read found everything there was for these agents."""
        if agent_ids & self._unread:
            with self._cond:
                self._unread -= agent_ids
                self._cond.notify_all()

    def forget(self, agent_id: str) -> None:
        """Stop counting anything for an agent whose mailbox closed."""
        with self._cond:
            self._pairs = {pair for pair in self._pairs if pair[0] != agent_id}
            self._unread.discard(agent_id)
            self._cond.notify_all()

    def wait(self, timeout: float) -> bool:
        """Wait until nothing is in transit; False at the deadline."""
        with self._cond:
            return self._cond.wait_for(
                lambda: not (self._pairs or self._turns or self._unread), timeout
            )


class Reader:
    """Reads every local agent's stream with one blocking XREADGROUP per round.

    It runs on a connection of its own, so that its blocking reads hold none that others
    need. Redis errors are logged once per outage and retried with a growing pause.
    """

    def __init__(self, bus: RedisBus) -> None:
        self.bus = bus
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None  # guarded by `_lock`
        self._stop = threading.Event()

    def start(self) -> None:
        """Start the thread, once."""
        with self._lock:
            if self._thread is not None or self._stop.is_set():
                return
            self._thread = threading.Thread(
                target=self._run, name="rustic-redis-reader", daemon=True
            )
            self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the thread; its blocking read ends within ``BLOCK_MS``."""
        self._stop.set()
        with self._lock:
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        response_error = import_redis().ResponseError
        link = Link(self.bus.client)
        delay, failing = RETRY_FIRST, False
        next_prune = time.monotonic() + PRUNE_INTERVAL
        while not self._stop.is_set():
            try:
                if self.bus.broken:
                    self.bus.restore()
                self._read(link)
                if time.monotonic() >= next_prune:
                    self.bus.prune()
                    next_prune = time.monotonic() + PRUNE_INTERVAL
            except self.bus.transient_errors as exc:
                if not failing:
                    logger.error(
                        "redis unreachable, retrying bus=%s error=%s", self.bus.describe(), exc
                    )
                failing, self.bus.broken = True, True
                self._stop.wait(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            except response_error as exc:
                # NOGROUP: a stream or its group vanished (Redis restarted empty).
                if "NOGROUP" not in str(exc):
                    logger.exception("redis read failed bus=%s", self.bus.describe())
                    self._stop.wait(delay)
                self.bus.broken = True
                continue
            except Exception:
                logger.exception("redis reader failed bus=%s", self.bus.describe())
                self._stop.wait(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            failing, delay = False, RETRY_FIRST
        link.close()

    def _read(self, link: Link) -> None:
        """One round: read what is new for the local agents that have room."""
        boxes: dict[bytes, RedisMailbox] = {}
        for box in self.bus.local_mailboxes():
            if len(box) < HIGH_WATER:
                boxes[box.stream.encode()] = box
            else:
                self.bus.transit.unread(box.agent_id)
        if not boxes:
            self._stop.wait(_FULL_PAUSE)
            return
        reply = link.call(
            "XREADGROUP", "GROUP", GROUP, self.bus.consumer, "COUNT", READ_COUNT,
            "BLOCK", BLOCK_MS, "STREAMS", *boxes, *(">" for _ in boxes),
        )  # fmt: skip

        # Streams that returned less than a full batch have nothing left to read.
        read, drained = 0, {box.agent_id for box in boxes.values()}
        for stream, entries in reply or ():
            mailbox = boxes[stream]
            self.bus.deliver(mailbox, self._decode(mailbox, entries), check_acked=False)
            read += len(entries)
            if len(entries) >= READ_COUNT:
                drained.discard(mailbox.agent_id)
        self.bus.transit.read(drained)

        # A trickle read entry by entry would cost a round trip each: let a batch gather.
        if 0 < read < READ_COUNT:
            self._stop.wait(READ_GATHER_S)

    def _decode(self, mailbox: RedisMailbox, entries: list[Any]) -> list[Entry]:
        """The messages of raw entries; one that does not decode is dropped (and XACKed)."""
        decoded: list[Entry] = []
        for entry, flat in entries:
            try:
                decoded.append(read_entry(entry, dict(zip(flat[::2], flat[1::2], strict=True))))
            except (KeyError, TypeError, ValueError) as exc:
                logger.error(
                    "undecodable entry dropped agent_id=%s entry=%s error=%s",
                    mailbox.agent_id,
                    entry,
                    exc,
                )
                self.bus.client.xack(mailbox.stream, GROUP, entry)
        return decoded


@dataclass(eq=False)
class Job:
    """One turn waiting for the committer, and what became of it."""

    args: list[Any]
    deadline: float | None  # when to give up while Redis is unreachable; None: never
    on_done: Callable[..., None]  # called with `delivered=` or `error=`, on the committer


class Committer:
    """Commits the turns of every agent in batches, one script call per batch.

    A worker hands over its turn and goes on; turns queued meanwhile go together in the
    next call (group commit). While Redis is unreachable a batch is retried with a growing
    pause; once the bus closes, what is queued is sent one last time, retried for at most
    ``FLUSH_S``, and what still failed is reported as not stored.
    """

    def __init__(self, bus: RedisBus) -> None:
        self.bus = bus
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()  # guarded by `_cond`
        self._thread: threading.Thread | None = None  # guarded by `_cond`
        self._stopping = False  # guarded by `_cond`

    def submit(self, args: list[Any], patience: float | None, on_done: Callable[..., None]) -> None:
        """Queue one turn; ``on_done`` hears how it went."""
        deadline = None if patience is None else time.monotonic() + patience
        with self._cond:
            if self._stopping:
                raise BusError(f"{self.bus.describe()}: the bus is closed")
            self._queue.append(Job(args, deadline, on_done))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="rustic-redis-committer", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def stop(self, timeout: float = FLUSH_S + 1.0) -> None:
        """Send what is queued (giving up after ``FLUSH_S`` if Redis is away), then stop."""
        with self._cond:
            self._stopping = True
            thread = self._thread
            self._cond.notify()
        if thread is not None:
            thread.join(timeout)

    def _run(self) -> None:
        link = Link(self.bus.client)
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._stopping)
                if len(self._queue) < MAX_BATCH and not self._stopping:
                    # Turns do not wait for their commit: let a few more join this one.
                    self._cond.wait(COMMIT_GATHER_S)
                if not self._queue:
                    break
                batch = [self._queue.popleft() for _ in range(min(MAX_BATCH, len(self._queue)))]
                if self._stopping:
                    flush_by = time.monotonic() + FLUSH_S
                    for job in batch:
                        job.deadline = min(job.deadline or flush_by, flush_by)
            self._commit(link, batch)
        link.close()

    def _commit(self, link: Link, batch: list[Job]) -> None:
        """Send ``batch`` until it goes through, its jobs expire or the bus closes."""
        delay, failures = RETRY_FIRST, 0
        while batch := self._drop_expired(batch):
            try:
                if self.bus.broken:
                    self.bus.restore()
                results = self.bus.execute_commits(link, [job.args for job in batch])
            except self.bus.transient_errors as exc:
                self.bus.broken = True
                failures += 1
                if failures == 1:
                    logger.error(
                        "commit failed, retrying bus=%s error=%s", self.bus.describe(), exc
                    )
                if self.bus.closed.wait(delay):
                    _fail(batch, BusError(f"{self.bus.describe()}: bus closed: {exc}"))
                    return
                delay = min(delay * 2, RETRY_MAX)
                continue
            except Exception as exc:
                logger.exception("commit failed bus=%s", self.bus.describe())
                _fail(batch, BusError(f"{self.bus.describe()}: commit failed: {exc}"))
                return
            if failures:
                logger.warning("commit succeeded again bus=%s", self.bus.describe())
            for job, delivered in zip(batch, results, strict=True):
                _tell(job, delivered=delivered)
            return

    def _drop_expired(self, batch: list[Job]) -> list[Job]:
        now = time.monotonic()
        expired = [job for job in batch if job.deadline is not None and now > job.deadline]
        _fail(expired, BusError(f"{self.bus.describe()}: redis unreachable"))
        return [job for job in batch if job not in expired]


def _fail(jobs: list[Job], error: BusError) -> None:
    for job in jobs:
        _tell(job, error=error)


def _tell(job: Job, **outcome: Any) -> None:
    try:
        job.on_done(**outcome)
    except Exception:
        logger.exception("commit callback failed")
