"""The Redis bus's two threads: a reader feeding the mailboxes, a committer batching writes.

Both exist to keep round trips to Redis few and large. Under the GIL a thread that waits
on a socket while others compute gets the interpreter back only after a switch interval,
so one round trip per delivery, made from each worker, would cost milliseconds apiece.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rustic.messaging.base import BusError
from rustic.messaging.durable import RETRY_FIRST, RETRY_MAX, decode
from rustic.messaging.redis_scripts import GROUP

if TYPE_CHECKING:
    from rustic.messaging.redis import Entry, RedisBus, RedisMailbox

logger = logging.getLogger(__name__)

BLOCK_MS = 100  # how long one XREADGROUP waits for new entries
READ_COUNT = 500  # entries read per stream per call
HIGH_WATER = 1_000  # an agent with this many queued gets no more until it catches up
PRUNE_INTERVAL = 5.0  # seconds between two prunings of the local agents' streams
_FULL_PAUSE = 0.005  # how long to wait when every local mailbox is full
GATHER_S = 0.001  # after a small read, let entries gather this long before the next one


class Reader:
    """Reads every local agent's stream with one blocking XREADGROUP per round.

    It runs on its own connection, so that its blocking reads never hold one the handlers
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
        from rustic.messaging.redis import SOCKET_TIMEOUT_S, connect, import_redis

        response_error = import_redis().ResponseError
        client = connect(self.bus.url, socket_timeout=SOCKET_TIMEOUT_S + BLOCK_MS / 1000)
        delay, failing = RETRY_FIRST, False
        next_prune = time.monotonic() + PRUNE_INTERVAL
        while not self._stop.is_set():
            try:
                if self.bus.broken:
                    self.bus.restore()
                self._read(client)
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
                # NOGROUP: the stream or its group vanished (Redis restarted empty).
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
        client.close()

    def _read(self, client: Any) -> None:
        """One round: read what is new for the local agents that have room."""
        boxes = {box.stream: box for box in self.bus.local_mailboxes() if len(box) < HIGH_WATER}
        if not boxes:
            self._stop.wait(_FULL_PAUSE)
            return
        streams = dict.fromkeys(boxes, ">")
        reply = client.xreadgroup(
            GROUP, self.bus.consumer, streams, count=READ_COUNT, block=BLOCK_MS
        )
        read = 0
        for stream, entries in reply or ():
            mailbox = boxes[stream.decode()]
            self.bus.deliver(mailbox, self._decode(mailbox, entries), check_acked=False)
            read += len(entries)

        # A trickle read entry by entry would cost a round trip each: let a batch gather.
        if 0 < read < READ_COUNT:
            self._stop.wait(GATHER_S)

    def _decode(self, mailbox: RedisMailbox, entries: list[Any]) -> list[Entry]:
        """The messages of raw entries; an entry that does not decode is dropped (and XACKed)."""
        decoded: list[Entry] = []
        for entry, fields in entries:
            try:
                decoded.append((entry, decode(fields[b"m"])))
            except (KeyError, TypeError, ValueError) as exc:
                logger.error(
                    "undecodable entry dropped agent_id=%s entry=%s error=%s",
                    mailbox.agent_id,
                    entry,
                    exc,
                )
                self.bus.client.xack(mailbox.stream, GROUP, entry)
        return decoded


MAX_BATCH = 512  # turns sent in one script call
FLUSH_S = 2.0  # how long a closing bus keeps retrying the commits still queued


@dataclass(eq=False)
class Job:
    """One commit script call waiting for the committer, and its outcome."""

    args: list[Any]
    deadline: float | None  # when to give up while Redis is unreachable; None: never
    on_done: Callable[..., None] | None = None  # called with delivered= or error=
    done: threading.Event | None = None  # for a caller that waits
    result: list[bytes] = field(default_factory=list)
    error: BusError | None = None

    def wait(self) -> list[bytes]:
        """Block until the job was committed; raise its :class:`BusError` if it was not."""
        assert self.done is not None
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result


class Committer:
    """Sends the turns of every thread that is waiting in one commit script call.

    A worker hands over its turn and waits; meanwhile other workers' turns and outside
    publishes queue up, and go together in the next round trip (group commit). While
    Redis is unreachable the batch is retried with a growing pause; a job whose deadline
    passes first fails with :class:`BusError`, and so does every job once the bus closes.
    """

    def __init__(self, bus: RedisBus) -> None:
        self.bus = bus
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()  # guarded by `_cond`
        self._thread: threading.Thread | None = None  # guarded by `_cond`
        self._stopping = False  # guarded by `_cond`

    def submit(
        self,
        args: list[Any],
        patience: float | None,
        on_done: Callable[..., None] | None = None,
    ) -> Job:
        """Queue one commit; wait on the returned job, or let ``on_done`` be told."""
        deadline = None if patience is None else time.monotonic() + patience
        job = Job(args, deadline, on_done, None if on_done else threading.Event())
        with self._cond:
            if self._stopping:
                raise BusError(f"{self.bus.describe()}: the bus is closed")
            self._queue.append(job)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="rustic-redis-committer", daemon=True
                )
                self._thread.start()
            self._cond.notify()
        return job

    def stop(self, timeout: float = FLUSH_S + 1.0) -> None:
        """Send what is queued (giving up after ``FLUSH_S`` if Redis is away), then stop."""
        with self._cond:
            self._stopping = True
            thread = self._thread
            self._cond.notify()
        if thread is not None:
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._stopping)
                if not self._queue:
                    return
                batch = [self._queue.popleft() for _ in range(min(MAX_BATCH, len(self._queue)))]
                if self._stopping:
                    # Closing: what is queued still goes out, but only briefly retried.
                    flush_by = time.monotonic() + FLUSH_S
                    for job in batch:
                        job.deadline = min(job.deadline or flush_by, flush_by)
            self._commit(batch)

    def _commit(self, batch: list[Job]) -> None:
        """Send ``batch`` until it goes through, its jobs expire or the bus closes."""
        delay, failures = RETRY_FIRST, 0
        while batch:
            batch = self._drop_expired(batch)
            if not batch:
                return
            try:
                if self.bus.broken:
                    self.bus.restore()
                results = self.bus.execute_commits([job.args for job in batch])
            except self.bus.transient_errors as exc:
                self.bus.broken = True
                failures += 1
                if failures == 1:
                    logger.error(
                        "commit failed, retrying bus=%s error=%s", self.bus.describe(), exc
                    )
                if self.bus.closed.wait(delay):
                    closed = BusError(f"{self.bus.describe()}: commit failed, bus closed: {exc}")
                    for job in batch:
                        _finish(job, error=closed)
                    return
                delay = min(delay * 2, RETRY_MAX)
                continue
            except Exception as exc:
                logger.exception("commit failed bus=%s", self.bus.describe())
                failed = BusError(f"{self.bus.describe()}: commit failed: {exc}")
                for job in batch:
                    _finish(job, error=failed)
                return
            for job, result in zip(batch, results, strict=True):
                _finish(job, result=result)
            return

    def _drop_expired(self, batch: list[Job]) -> list[Job]:
        now = time.monotonic()
        kept = []
        for job in batch:
            if job.deadline is not None and now > job.deadline:
                _finish(job, error=BusError(f"{self.bus.describe()}: redis unreachable"))
            else:
                kept.append(job)
        return kept


def _finish(job: Job, result: list[bytes] | None = None, error: BusError | None = None) -> None:
    job.result = result or []
    job.error = error
    if job.done is not None:
        job.done.set()
    if job.on_done is not None:
        try:
            job.on_done(delivered=job.result, error=error)
        except Exception:
            logger.exception("commit callback failed")
