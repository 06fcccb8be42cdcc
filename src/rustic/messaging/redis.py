"""The Redis bus: Redis Streams shared by every daemon of a guild, on one host or many."""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

from rustic.message import Message
from rustic.messaging.base import BusError, DeadLetter
from rustic.messaging.durable import Dead, DurableBus, DurableMailbox, Retention, decode, encode
from rustic.messaging.redis_scripts import COMMIT, GROUP, PRUNE, RETRY, SUBSCRIBE
from rustic.messaging.redis_threads import Committer, Reader

logger = logging.getLogger(__name__)

CLAIM_BATCH = 1_000  # entries reclaimed per XAUTOCLAIM call
RECENT_ACKS = 1_000  # message ids each mailbox remembers having acknowledged
DEFAULT_WINDOW = 64  # turns an agent may hand to the committer before it waits for Redis
SOCKET_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 2.0

Entry = tuple[bytes, Message]  # a stream entry id and the message it holds


class RedisMailbox(DurableMailbox):
    """A mailbox fed by the bus's reader thread; it knows each message's stream entry."""

    def __init__(self, bus: RedisBus, agent_id: str) -> None:
        super().__init__(bus, agent_id)
        self.stream = bus.inbox(agent_id)
        self.window = threading.Semaphore(bus.window)  # turns handed over, not yet in Redis
        self.entries: dict[int, bytes] = {}  # entry id by message id, queued or in flight
        self._recent: deque[int] = deque(maxlen=RECENT_ACKS)  # acknowledged here, newest last
        self._recent_set: set[int] = set()  # the same ids, to look up

    def knows(self, message_id: int) -> bool:
        """True when the message is queued, in flight or was recently acknowledged here."""
        return message_id in self.entries or message_id in self._recent_set

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
    makes to an agent running here counts until the reader has put it in the mailbox.
    ``Guild.run_until_idle`` and the drain of a stop wait for both to reach zero.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pairs: set[tuple[str, int]] = set()  # (agent, message id); guarded by `_cond`
        self._turns = 0  # turns not yet committed; guarded by `_cond`

    def expect(self, pairs: set[tuple[str, int]]) -> None:
        """Count deliveries a commit is about to make."""
        if pairs:
            with self._cond:
                self._pairs |= pairs

    def arrived(self, pairs: set[tuple[str, int]]) -> None:
        """Stop counting deliveries that reached their mailbox (or will not be made)."""
        if pairs and self._pairs:
            with self._cond:
                self._pairs -= pairs
                self._cond.notify_all()

    def forget(self, agent_id: str) -> None:
        """Stop counting deliveries to an agent whose mailbox closed."""
        with self._cond:
            self._pairs = {pair for pair in self._pairs if pair[0] != agent_id}
            self._cond.notify_all()

    def turn_started(self) -> None:
        with self._cond:
            self._turns += 1

    def turn_ended(self) -> None:
        with self._cond:
            self._turns -= 1
            self._cond.notify_all()

    def wait(self, timeout: float) -> bool:
        """Wait until nothing is in transit; False at the deadline."""
        with self._cond:
            return self._cond.wait_for(lambda: not (self._pairs or self._turns), timeout)


class RedisBus(DurableBus):
    """A bus on Redis Streams; needs the ``redis`` extra (``pip install 'rustic[redis]'``).

    Each agent's deliveries are a stream, ``rustic:bus:<guild>:inbox:<agent>``, with one
    consumer group; one reader thread per bus feeds the local mailboxes with XREADGROUP.
    A publish is one script call that looks up the topic's subscribers in Redis (so agents
    of daemons on other hosts are included) and appends to each one's stream; a handler's
    turn (its publishes, its dead letters and the XACK) is one script call too, so it is
    stored whole or not at all. Guarantees and limits:

    - A publish from outside a handler is in Redis before ``publish`` returns; how durable
      Redis keeps it is up to Redis's own persistence settings.
    - At ``open_mailbox`` the agent's pending entries, left by a consumer that died (any
      daemon that ran the agent before), are claimed with XAUTOCLAIM and queued in id
      order ahead of new mail. Run an agent in one daemon at a time: a daemon that starts
      an agent claims the in-flight entries of any other daemon running it.
    - An agent skips a message id it already acknowledged: the ids are kept in Redis with
      the acknowledgements (pruned by ``retention``) and checked when entries are appended
      and when they are claimed.
    - While Redis is unreachable the reader and the handlers' acknowledgements retry with a
      growing pause, and publishes from outside raise :class:`BusError` after a few seconds.
      Once Redis is back, subscriptions and consumer groups are put back (a Redis without
      persistence restarts empty) and work resumes.
    - Handled entries are trimmed from the streams of the agents running here by
      ``retention`` (count and age), never an entry not yet handled. Keys assume a single
      Redis server, not a cluster.
    """

    def __init__(
        self,
        url: str,
        guild_id: str = "default",
        retention: Retention | None = None,
        consumer: str | None = None,
        window: int = DEFAULT_WINDOW,
    ) -> None:
        redis = import_redis()
        super().__init__(retention or Retention())
        if window < 1:
            raise ValueError(f"messaging: {redact(url)}: window must be at least 1, got {window}")
        self.window = window
        self.transient_errors = (redis.ConnectionError, redis.TimeoutError)
        self.url = url
        self.prefix = f"rustic:bus:{guild_id}:"
        self.consumer = consumer or f"{socket.gethostname()}:{os.getpid()}"
        self.client = connect(url)
        self._commit = self.client.register_script(COMMIT)
        self._subscribe = self.client.register_script(SUBSCRIBE)
        self._retry = self.client.register_script(RETRY)
        self._prune = self.client.register_script(PRUNE)
        self.broken = False  # an operation failed: Redis may have restarted empty
        self.transit = InTransit()
        self.reader = Reader(self)
        self.committer = Committer(self)
        for agent_id, topics in self._retrying("connect", self._load_subscriptions).items():
            self._remember_subscriptions(agent_id, topics)
        logger.debug("redis bus opened bus=%s consumer=%s", self.describe(), self.consumer)

    def describe(self) -> str:
        return f"redis bus {redact(self.url)}"

    def inbox(self, agent_id: str) -> str:
        """The key of the agent's delivery stream."""
        return f"{self.prefix}inbox:{agent_id}"

    # -- mailboxes --------------------------------------------------------------------------

    def open_mailbox(self, agent_id: str) -> RedisMailbox:
        """Return the agent's mailbox; on first use, claim its pending entries, in id order."""
        with self._lock:
            mailbox = self._mailboxes.get(agent_id)
            if isinstance(mailbox, RedisMailbox):
                return mailbox
            mailbox = RedisMailbox(self, agent_id)
            self._retrying("create group", lambda: self.ensure_group(agent_id))
            claimed = self._retrying("claim pending", lambda: self._claim(mailbox))
            self._mailboxes[agent_id] = mailbox
        if claimed:
            logger.info("pending deliveries claimed agent_id=%s count=%d", agent_id, claimed)
        self.reader.start()
        return mailbox

    def close_mailbox(self, agent_id: str) -> list[Message]:
        """Drop the agent's mailbox and subscriptions; its pending entries stay in Redis.

        They are claimed again when a mailbox for ``agent_id`` opens, here or elsewhere.
        """
        self.set_subscriptions(agent_id, ())
        with self._lock:
            mailbox = self._mailboxes.pop(agent_id, None)
        self.transit.forget(agent_id)
        return mailbox.drain() if mailbox is not None else []

    def local_mailboxes(self) -> list[RedisMailbox]:
        """The mailboxes open in this process."""
        with self._lock:
            return [box for box in self._mailboxes.values() if isinstance(box, RedisMailbox)]

    def ensure_group(self, agent_id: str) -> None:
        """Create the agent's stream and consumer group unless they exist."""
        redis = import_redis()
        try:
            self.client.xgroup_create(self.inbox(agent_id), GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _claim(self, mailbox: RedisMailbox) -> int:
        """Claim every pending entry of the agent's group and queue it; return how many."""
        start: Any = "0-0"
        claimed: list[Entry] = []
        while True:
            start, entries, *_ = self.client.xautoclaim(
                mailbox.stream, GROUP, self.consumer, 0, start, count=CLAIM_BATCH
            )
            claimed += [(entry, decode(fields[b"m"])) for entry, fields in entries if fields]
            if start in (b"0-0", "0-0"):
                break
        self.deliver(mailbox, claimed, check_acked=True)
        return len(claimed)

    def deliver(self, mailbox: RedisMailbox, entries: Sequence[Entry], check_acked: bool) -> None:
        """Queue entries read from the agent's stream; XACK at once those it already had.

        Entries appended after an acknowledgement were checked against it by the script
        that appended them; ``check_acked`` asks Redis again, for entries claimed back.
        """
        if not entries:
            return
        if check_acked:
            key = f"{self.prefix}acked:{mailbox.agent_id}"
            scores = self.client.zmscore(key, [message.id for _, message in entries])
        else:
            scores = [None] * len(entries)
        fresh: list[Message] = []
        duplicates: list[bytes] = []
        for (entry, message), score in zip(entries, scores, strict=True):
            if score is not None or mailbox.knows(message.id):
                duplicates.append(entry)
            else:
                mailbox.entries[message.id] = entry
                fresh.append(message)
        if duplicates:
            self.client.xack(mailbox.stream, GROUP, *duplicates)
            logger.info(
                "redelivered ids skipped agent_id=%s count=%d", mailbox.agent_id, len(duplicates)
            )
        mailbox.extend(fresh)
        self.transit.arrived({(mailbox.agent_id, message.id) for _, message in entries})

    # -- storing ----------------------------------------------------------------------------

    def _store(
        self,
        publishes: Sequence[Message],
        acked: tuple[DurableMailbox, Message] | None,
        dead: Sequence[Dead],
        patience: float | None,
    ) -> int:
        expected = self._expect(publishes)
        delivered: list[bytes] = []
        args = self._commit_args(publishes, acked, dead)
        try:
            delivered = self._retrying("publish", lambda: self.execute_commits([args])[0], patience)
        finally:
            self._unexpect(expected, delivered)
        if acked is not None:
            self._acknowledged(acked)
        return len(delivered) // 2

    def finish_turn(self, mailbox: DurableMailbox, message: Message) -> None:
        """Hand the turn to the committer and let the agent go on to its next message.

        The agent waits only when ``window`` of its turns are not yet in Redis; a crash
        redelivers those (their outputs were not published either).
        """
        assert isinstance(mailbox, RedisMailbox)
        held, dead = mailbox.end_turn()
        args = self._commit_args(held, (mailbox, message), dead)
        expected = self._expect(held)
        mailbox.window.acquire()
        self.transit.turn_started()
        done = functools.partial(self._turn_committed, mailbox, message, expected)
        try:
            self.committer.submit(args, None, on_done=done)
        except BusError as exc:
            done(error=exc)

    def _turn_committed(
        self,
        mailbox: RedisMailbox,
        message: Message,
        expected: set[tuple[str, int]],
        delivered: Sequence[bytes] = (),
        error: BusError | None = None,
    ) -> None:
        """Runs on the committer thread once a turn is in Redis, or is not to be."""
        mailbox.window.release()
        self._unexpect(expected, delivered)
        if error is None:
            mailbox.acknowledged(message.id)
        self.transit.turn_ended()
        if error is None:
            return
        logger.warning(
            "turn not stored, message will be redelivered agent_id=%s message_id=%d error=%s",
            mailbox.agent_id,
            message.id,
            error,
        )

    def _commit_args(
        self,
        publishes: Sequence[Message],
        acked: tuple[DurableMailbox, Message] | None,
        dead: Sequence[Dead],
    ) -> list[Any]:
        """One turn's arguments to the commit script (see ``redis_scripts.COMMIT``)."""
        args: list[Any] = ["", "", ""]
        if acked is not None:
            box, handled = acked
            assert isinstance(box, RedisMailbox)
            args[:] = [box.agent_id, box.entries.get(handled.id, b"0-0"), handled.id]
        args.append(len(publishes))
        for message in publishes:
            args += (message.topic, message.sender, message.id, encode(message))
        args.append(len(dead))
        args += (_dead_record(agent_id, message, reason) for agent_id, message, reason in dead)
        return args

    def _acknowledged(self, acked: tuple[DurableMailbox, Message]) -> None:
        box, handled = acked
        assert isinstance(box, RedisMailbox)
        box.acknowledged(handled.id)

    def execute_commits(self, batch: Sequence[list[Any]]) -> list[list[bytes]]:
        """Commit a batch of turns (their ``_commit_args``) in one script call, in order."""
        redis = import_redis()
        args = [self.prefix, time.time(), len(batch)]
        for turn in batch:
            args += turn
        try:
            return list(self.client.evalsha(self._commit.sha, 0, *args))
        except redis.exceptions.NoScriptError:
            # Redis restarted and forgot the script: nothing of the batch ran.
            self._commit.sha = self.client.script_load(COMMIT)
            return list(self.client.evalsha(self._commit.sha, 0, *args))

    def _save_subscriptions(self, agent_id: str, topics: frozenset[str]) -> None:
        self._subscribe(args=[self.prefix, agent_id, *sorted(topics)])

    def _load_subscriptions(self) -> dict[str, frozenset[str]]:
        agents = sorted(member.decode() for member in self.client.smembers(f"{self.prefix}agents"))
        pipe = self.client.pipeline(transaction=False)
        for agent_id in agents:
            pipe.smembers(f"{self.prefix}subs:{agent_id}")
        found = pipe.execute()
        return {
            agent_id: frozenset(topic.decode() for topic in topics)
            for agent_id, topics in zip(agents, found, strict=True)
        }

    def restore(self) -> None:
        """Put back subscriptions and groups, in case Redis came back without its data."""
        with self._lock:
            subs = dict(self._subs)
            local = list(self._mailboxes)
        for agent_id, topics in subs.items():
            self._save_subscriptions(agent_id, topics)
        for agent_id in local:
            self.ensure_group(agent_id)
        if self.broken:
            self.broken = False
            logger.warning("redis reachable again, subscriptions restored bus=%s", self.describe())

    def prune(self) -> int:
        """Trim handled entries and old acknowledged ids of the agents running here.

        The reader thread runs this every few seconds; returns the entries trimmed.
        """
        keep_ms = int((time.time() - self.retention.max_age) * 1000)
        keep_at = time.time() - self.retention.max_age
        trimmed = 0
        for mailbox in self.local_mailboxes():
            keys = [mailbox.stream, f"{self.prefix}acked:{mailbox.agent_id}"]
            trimmed += int(self._prune(keys=keys, args=[self.retention.count, keep_ms, keep_at]))
        return trimmed

    # -- in transit: published here to an agent running here, not yet read back -------------

    def _expect(self, publishes: Sequence[Message]) -> set[tuple[str, int]]:
        """Note the local deliveries a commit is about to make, before the reader can see them."""
        local = self._mailboxes
        expected = {
            (agent_id, message.id)
            for message in publishes
            for agent_id in self._targets(message)
            if agent_id in local
        }
        self.transit.expect(expected)
        return expected

    def _unexpect(self, expected: set[tuple[str, int]], delivered: Sequence[bytes]) -> None:
        """Drop the expected deliveries the commit did not make (all of them, if it failed)."""
        if expected:
            made = {
                (agent.decode(), int(message_id))
                for agent, message_id in zip(delivered[::2], delivered[1::2], strict=True)
            }
            self.transit.arrived(expected - made)

    def wait_delivered(self, timeout: float) -> bool:
        """Wait until this process's turns are in Redis and its own agents' mail is read back."""
        return self.transit.wait(timeout)

    # -- dead letters -----------------------------------------------------------------------

    def dead_letters(self) -> list[DeadLetter]:
        key = f"{self.prefix}dead"
        raw = self._retrying("list dead letters", lambda: self.client.hgetall(key))
        return sorted(
            (_dead_letter(int(dead_id), record) for dead_id, record in raw.items()),
            key=lambda dead: dead.id,
        )

    def retry_dead_letters(self, ids: Iterable[int]) -> list[DeadLetter]:
        """Append the dead letters ``ids`` to their agents' streams again, each once."""
        wanted = set(ids)
        retried = []
        for dead in self.dead_letters():
            if dead.id not in wanted:
                continue
            args = [self.prefix, dead.id, dead.agent_id, dead.message.id, encode(dead.message)]
            if self._retrying("retry dead letter", functools.partial(self._retry, args=args)):
                retried.append(dead)
        return retried

    # -- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the reader and release the connections."""
        self.committer.stop()  # sends what is queued first, briefly
        super().close()
        self.reader.stop()
        self.client.close()
        logger.debug("redis bus closed bus=%s", self.describe())


def import_redis() -> Any:
    """Import redis-py, or say which extra installs it."""
    try:
        import redis
    except ImportError as exc:
        raise ImportError("the redis bus needs redis-py: pip install 'rustic[redis]'") from exc
    return redis


def connect(url: str, socket_timeout: float = SOCKET_TIMEOUT_S) -> Any:
    """A client for ``url`` that fails fast: the bus does its own retrying."""
    redis = import_redis()
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(
        url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        retry=Retry(NoBackoff(), 0),
    )


def redact(url: str) -> str:
    """Hide the password of a Redis URL before it is shown."""
    scheme, sep, rest = url.partition("://")
    credentials, at, location = rest.rpartition("@")
    if not at or ":" not in credentials:
        return url
    return f"{scheme}{sep}{credentials.split(':', 1)[0]}:***@{location}"


def _dead_record(agent_id: str, message: Message, reason: str) -> str:
    record = {"agent_id": agent_id, "reason": reason, "at": time.time(), "m": encode(message)}
    return json.dumps(record)


def _dead_letter(dead_id: int, record: bytes) -> DeadLetter:
    data = json.loads(record)
    return DeadLetter(data["agent_id"], decode(data["m"]), data["reason"], data["at"], id=dead_id)
