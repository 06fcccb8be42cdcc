"""The Redis bus: Redis Streams shared by every daemon of a guild, on one host or many."""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import time
from collections.abc import Iterable, Sequence
from typing import Any

from rustic.message import Message
from rustic.messaging.base import BusError, DeadLetter
from rustic.messaging.durable import Dead, DurableBus, DurableMailbox, Retention, decode, encode
from rustic.messaging.redis_conn import Link, connect, import_redis, redact
from rustic.messaging.redis_scripts import COMMIT, GROUP, PRUNE, RETRY, SUBSCRIBE
from rustic.messaging.redis_threads import (
    Committer,
    Entry,
    InTransit,
    Pair,
    Reader,
    RedisMailbox,
    read_entry,
)

logger = logging.getLogger(__name__)

CLAIM_BATCH = 1_000  # entries reclaimed per XAUTOCLAIM call
DEFAULT_WINDOW = 64  # turns an agent may hand to the committer before it waits for Redis


class RedisBus(DurableBus):
    """A bus on Redis Streams; needs the ``redis`` extra (``pip install 'rustic[redis]'``).

    Each agent's deliveries are a stream, ``rustic:bus:<guild>:inbox:<agent>``, with one
    consumer group; one reader thread per bus feeds the local mailboxes with XREADGROUP.
    Publishing runs a script that looks up the topic's subscribers in Redis (so agents of
    daemons on other hosts are included) and appends to each one's stream. A handler's
    turn (its publishes, dead letters and XACK) is committed by the same script, whole or
    not at all, batched with other turns by a committer thread. Guarantees and limits:

    - A publish from outside a handler is in Redis before ``publish`` returns; how durable
      Redis keeps it is up to Redis's own persistence settings.
    - An agent goes on to its next message while its last turn is on its way to Redis; it
      waits when ``window`` of its turns are. A crash redelivers those turns' messages and
      the one being handled (their outputs were not published): at most ``window + 1``
      per agent. ``?window=0`` in the URL commits each turn before the next message, like
      the sqlite bus, at a cost in throughput.
    - At ``open_mailbox`` the agent's pending entries, left by a consumer that died (any
      daemon that ran the agent before), are claimed with XAUTOCLAIM and queued in id
      order ahead of new mail. Run an agent in one daemon at a time: a daemon that starts
      an agent claims the in-flight entries of any other daemon running it.
    - An agent skips a message id it already acknowledged: the ids are kept in Redis with
      the acknowledgements (pruned by ``retention``) and checked when entries are appended
      and when they are claimed.
    - While Redis is unreachable the reader and the committer retry with a growing pause,
      and publishes from outside raise :class:`BusError` after a few seconds (such a
      publish may still have been stored). Once Redis is back, subscriptions and consumer
      groups are put back (a Redis without persistence restarts empty) and work resumes.
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
        if window < 0:
            raise ValueError(f"messaging: {redact(url)}: window must be 0 or more, got {window}")
        self.transient_errors = (redis.ConnectionError, redis.TimeoutError)
        self.url = url
        self.window = window
        self.prefix = f"rustic:bus:{guild_id}:"
        self.consumer = consumer or f"{socket.gethostname()}:{os.getpid()}"
        self.client = connect(url)
        self._publisher = Link(self.client)
        self._commit_sha = self.client.register_script(COMMIT).sha
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
            self.transit.unread(agent_id)
            self._mailboxes[agent_id] = mailbox
        if claimed:
            logger.info("pending deliveries claimed agent_id=%s count=%d", agent_id, claimed)
        self.reader.start()
        return mailbox

    def close_mailbox(self, agent_id: str) -> list[Message]:
        """Drop the agent's mailbox and subscriptions; its pending entries stay in Redis.

        They are claimed again when a mailbox for ``agent_id`` opens, here or elsewhere.
        """
        waiting = super().close_mailbox(agent_id)
        self.transit.forget(agent_id)
        return waiting

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
            claimed += [read_entry(entry, fields) for entry, fields in entries if fields]
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
            scores = self.client.zmscore(key, [message.id for _, message, _ in entries])
        else:
            scores = [None] * len(entries)
        fresh: list[Message] = []
        duplicates: list[bytes] = []
        for (entry, message, retry), score in zip(entries, scores, strict=True):
            if score is not None or mailbox.knows(message.id, recent=not retry):
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
        self.transit.arrived({(mailbox.agent_id, message.id) for _, message, _ in entries})

    # -- storing ----------------------------------------------------------------------------

    def _store(
        self,
        publishes: Sequence[Message],
        acked: tuple[DurableMailbox, Message] | None,
        dead: Sequence[Dead],
        patience: float | None,
    ) -> int:
        """Commit at once, on the calling thread: the caller waits for Redis anyway."""
        args = self._commit_args(publishes, acked, dead)
        expected = self._expect(publishes)
        delivered: list[bytes] = []
        try:
            what = "publish" if acked is None else "acknowledge"
            delivered = self._retrying(what, lambda: self._commit_now(args), patience)
        finally:
            self._unexpect(expected, delivered)
        if acked is not None:
            box, handled = acked
            assert isinstance(box, RedisMailbox)
            box.acknowledged(handled.id)
        return len(delivered) // 2

    def _commit_now(self, args: list[Any]) -> list[bytes]:
        """One commit on the publishers' link, after putting back what an outage lost."""
        if self.broken:
            self.restore()
        try:
            return self.execute_commits(self._publisher, [args])[0]
        except self.transient_errors:
            self.broken = True
            raise

    def finish_turn(self, mailbox: DurableMailbox, message: Message) -> None:
        """Hand the turn to the committer; wait only when ``window`` turns are on their way.

        With a window of 0 the turn is committed before this returns, as on sqlite.
        """
        assert isinstance(mailbox, RedisMailbox)
        if not self.window:
            super().finish_turn(mailbox, message)
            return
        held, dead = mailbox.end_turn()
        args = self._commit_args(held, (mailbox, message), dead)
        mailbox.window.acquire()
        expected = self._expect(held, turn=True)
        done = functools.partial(self._turn_committed, mailbox, message, expected)
        try:
            self.committer.submit(args, None, on_done=done)
        except BusError as exc:
            done(error=exc)

    def _turn_committed(
        self,
        mailbox: RedisMailbox,
        message: Message,
        expected: set[Pair],
        delivered: Sequence[bytes] = (),
        error: BusError | None = None,
    ) -> None:
        """Runs on the committer thread once a turn is in Redis, or is not to be."""
        mailbox.window.release()
        if error is None:
            mailbox.acknowledged(message.id)
        self._unexpect(expected, delivered, turn=True)
        if error is not None:
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

    def execute_commits(self, link: Link, batch: Sequence[list[Any]]) -> list[list[bytes]]:
        """Commit a batch of turns (their ``_commit_args``) in one script call, in order."""
        redis = import_redis()
        args = ["EVALSHA", self._commit_sha, 0, self.prefix, time.time(), len(batch)]
        for turn in batch:
            args += turn
        try:
            return list(link.call(*args))
        except redis.exceptions.NoScriptError:
            # Redis restarted and forgot the script: nothing of the batch ran.
            self._commit_sha = self.client.script_load(COMMIT)
            args[1] = self._commit_sha
            return list(link.call(*args))

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
        keep_at = time.time() - self.retention.max_age
        args = [self.retention.count, int(keep_at * 1000), keep_at]
        trimmed = 0
        for mailbox in self.local_mailboxes():
            keys = [mailbox.stream, f"{self.prefix}acked:{mailbox.agent_id}"]
            trimmed += int(self._prune(keys=keys, args=args))
        return trimmed

    # -- in transit -------------------------------------------------------------------------

    def _expect(self, publishes: Sequence[Message], turn: bool = False) -> set[Pair]:
        """Count the local deliveries a commit is about to make, before the reader sees them."""
        local = self._mailboxes
        expected = {
            (agent_id, message.id)
            for message in publishes
            for agent_id in self._targets(message)
            if agent_id in local
        }
        self.transit.expect(expected, turn)
        return expected

    def _unexpect(
        self, expected: set[Pair], delivered: Sequence[bytes], turn: bool = False
    ) -> None:
        """Stop counting what the commit did not deliver (everything, if it failed)."""
        made = {
            (agent.decode(), int(message_id))
            for agent, message_id in zip(delivered[::2], delivered[1::2], strict=True)
        }
        self.transit.arrived(expected - made, turn)

    def wait_delivered(self, timeout: float) -> bool:
        """Wait until this process's turns are in Redis and its own agents' mail is read."""
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
        """Send the turns still queued (briefly), stop the threads, release the connections."""
        self.committer.stop()
        super().close()
        self.reader.stop()
        self._publisher.close()
        self.client.close()
        logger.debug("redis bus closed bus=%s", self.describe())


def _dead_record(agent_id: str, message: Message, reason: str) -> str:
    record = {"agent_id": agent_id, "reason": reason, "at": time.time(), "m": encode(message)}
    return json.dumps(record)


def _dead_letter(dead_id: int, record: bytes) -> DeadLetter:
    data = json.loads(record)
    return DeadLetter(data["agent_id"], decode(data["m"]), data["reason"], data["at"], id=dead_id)
