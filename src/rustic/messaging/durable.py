"""What the durable buses (sqlite, redis) share: turns, retention and retries.

An agent is *in a turn* from the moment its engine takes a message out of its mailbox
until the engine acknowledges it. What the agent publishes and dead-letters during the
turn is held back and stored together with the acknowledgement, in one commit: after a
crash either the whole turn is in the store (and the message is not redelivered) or none
of it is (and the message is redelivered, its outputs not yet published). That is what
keeps "at most the message in flight is handled twice" true, and it costs one commit per
handled message rather than one per publish.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from abc import abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import parse_qsl

from rustic.message import EPOCH_MS, Message
from rustic.messaging.base import BusError, Mailbox, MessageBus

logger = logging.getLogger(__name__)

T = TypeVar("T")

RETRY_FIRST = 0.05  # seconds before the first retry of a failed store; doubles each time
RETRY_MAX = 2.0  # the longest pause between two retries
PUBLISH_PATIENCE = 3.0  # how long a publish from outside a handler retries before it raises

DEFAULT_RETENTION = 10_000  # handled deliveries kept per agent
DEFAULT_MAX_AGE = 7 * 24 * 3600.0  # seconds a handled message is kept
_ID_TIME_SHIFT = 22  # a message id is its millisecond shifted left by this (rustic.message)

Dead = tuple[str, Message, str]  # (agent id, message, reason)


@dataclass(frozen=True)
class Retention:
    """How much history a durable bus keeps of each agent's handled deliveries.

    A handled delivery is pruned once its message is older than ``max_age`` seconds, or
    once it is not among the agent's newest ``count`` deliveries. Pending deliveries and
    dead letters are never pruned. Set both in the bus URL:
    ``sqlite:///bus.db?retention=10000&max_age=3600``.
    """

    count: int = DEFAULT_RETENTION
    max_age: float = DEFAULT_MAX_AGE

    def age_cutoff_id(self, now: float) -> int:
        """The smallest message id that is young enough to keep at time ``now``."""
        millis = int((now - self.max_age) * 1000) - EPOCH_MS
        return max(0, millis) << _ID_TIME_SHIFT


_encoder = json.JSONEncoder(separators=(",", ":"))


def encode(message: Message) -> str:
    """A message as a compact JSON array of its fields, the form durable buses store."""
    return _encoder.encode(message)


def decode(text: str | bytes) -> Message:
    """Rebuild a message stored by :func:`encode`."""
    return Message(*json.loads(text))


def split_url(url: str, allowed: Iterable[str]) -> tuple[str, dict[str, str]]:
    """Split the query parameters named in ``allowed`` off ``url``; return the rest and them."""
    base, _, query = url.partition("?")
    allowed = set(allowed)
    ours: dict[str, str] = {}
    theirs: list[str] = []
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key in allowed:
            ours[key] = value
        else:
            theirs.append(f"{key}={value}")
    return (f"{base}?{'&'.join(theirs)}" if theirs else base), ours


def retention_from(options: dict[str, str], url: str) -> Retention:
    """Read ``retention`` and ``max_age`` from a bus URL's query parameters."""
    count, max_age = DEFAULT_RETENTION, DEFAULT_MAX_AGE
    try:
        if "retention" in options:
            count = int(options["retention"])
        if "max_age" in options:
            max_age = float(options["max_age"])
    except ValueError:
        count, max_age = -1, -1.0
    if count < 0 or max_age <= 0:
        raise ValueError(
            f"messaging: {url!r}: retention must be a whole number >= 0 and max_age a number "
            f"of seconds > 0 (got retention={options.get('retention')!r}, "
            f"max_age={options.get('max_age')!r})"
        )
    return Retention(count, max_age)


class DurableMailbox(Mailbox):
    """One agent's local queue on a durable bus; it also holds the agent's open turn."""

    def __init__(self, bus: DurableBus, agent_id: str) -> None:
        super().__init__(agent_id)
        self._bus = bus
        self._queue: deque[Message] = deque()
        self._lock = threading.Lock()
        self._taken = 0  # messages taken and not yet acknowledged; guarded by `_lock`
        self._outbox: list[Message] = []  # the open turn's publishes; guarded by `_lock`
        self._dead: list[Dead] = []  # the open turn's dead letters; guarded by `_lock`

    def put(self, message: Message) -> None:
        self._queue.append(message)
        self.notify()

    def extend(self, messages: Sequence[Message]) -> None:
        """Append several deliveries, oldest first, and notify once."""
        self._queue.extend(messages)
        if messages:
            self.notify()

    def get_nowait(self) -> Message | None:
        try:
            message = self._queue.popleft()
        except IndexError:
            return None
        with self._lock:
            self._taken += 1
        return message

    def ack(self, message: Message) -> None:
        self._bus.finish_turn(self, message)

    def __len__(self) -> int:
        return len(self._queue)

    def drain(self) -> list[Message]:
        """Take every waiting delivery without opening a turn (they stay pending in the store)."""
        taken: list[Message] = []
        while self._queue:
            try:
                taken.append(self._queue.popleft())
            except IndexError:
                break
        return taken

    def hold(self, message: Message) -> bool:
        """Keep a publish of this agent for the end of its turn; False when no turn is open."""
        with self._lock:
            if not self._taken:
                return False
            self._outbox.append(message)
            return True

    def hold_dead(self, message: Message, reason: str) -> bool:
        """Keep a dead letter for the end of the turn; False when no turn is open."""
        with self._lock:
            if not self._taken:
                return False
            self._dead.append((self.agent_id, message, reason))
            return True

    def end_turn(self) -> tuple[list[Message], list[Dead]]:
        """Close the turn; return what it published and dead-lettered."""
        with self._lock:
            self._taken = max(0, self._taken - 1)
            held, self._outbox = self._outbox, []
            dead, self._dead = self._dead, []
        return held, dead


class DurableBus(MessageBus):
    """A bus that stores every publish, and each turn with its acknowledgement in one commit.

    Subclasses implement :meth:`_store` (one atomic commit, retried until it succeeds or
    runs out of patience), :meth:`_save_subscriptions` and the opening of mailboxes.
    Publishing from inside a handler holds the message back until the turn ends; every
    other publish is stored before ``publish`` returns.
    """

    durable = True
    transient_errors: tuple[type[BaseException], ...] = ()  # worth retrying

    def __init__(self, retention: Retention) -> None:
        self.retention = retention
        self._lock = threading.RLock()
        self._mailboxes: dict[str, DurableMailbox] = {}  # guarded by `_lock`
        self._subs: dict[str, frozenset[str]] = {}  # agent -> topics; guarded by `_lock`
        self._topics: dict[str, frozenset[str]] = {}  # topic -> agents; replaced under `_lock`
        self.closed = threading.Event()  # set once, by close()

    @abstractmethod
    def describe(self) -> str:
        """The bus's location for messages (a path, a redacted URL)."""

    @abstractmethod
    def _store(
        self,
        publishes: Sequence[Message],
        acked: tuple[DurableMailbox, Message] | None,
        dead: Sequence[Dead],
        patience: float | None,
    ) -> int:
        """Store publishes, an acknowledgement and dead letters in one commit.

        Retries while the store is unreachable; raises :class:`BusError` once ``patience``
        seconds have passed (never, for None) or the bus is closed. Nothing is stored then,
        unless the store is a server whose reply was lost after it did the work. Returns how
        many deliveries the publishes made.
        """

    @abstractmethod
    def _save_subscriptions(self, agent_id: str, topics: frozenset[str]) -> None:
        """Make ``topics`` the agent's stored subscriptions."""

    # -- mailboxes --------------------------------------------------------------------------

    def close_mailbox(self, agent_id: str) -> list[Message]:
        """Drop the agent's mailbox and subscriptions; its pending deliveries stay stored.

        They are queued again if a mailbox for ``agent_id`` opens later, here, in another
        process or after a restart. Returns what was waiting in the mailbox.
        """
        self.set_subscriptions(agent_id, ())
        with self._lock:
            mailbox = self._mailboxes.pop(agent_id, None)
        return mailbox.drain() if mailbox is not None else []

    # -- subscriptions ----------------------------------------------------------------------

    def subscribe(self, topic: str, agent_id: str) -> None:
        with self._lock:
            self.set_subscriptions(agent_id, self.subscriptions(agent_id) | {topic})

    def unsubscribe(self, topic: str, agent_id: str) -> None:
        with self._lock:
            self.set_subscriptions(agent_id, self.subscriptions(agent_id) - {topic})

    def subscriptions(self, agent_id: str) -> set[str]:
        with self._lock:
            return set(self._subs.get(agent_id, ()))

    def set_subscriptions(self, agent_id: str, topics: Iterable[str]) -> None:
        """Make ``topics`` exactly the agent's subscriptions, in the store in one commit."""
        wanted = frozenset(topics)
        with self._lock:
            if self._subs.get(agent_id) == wanted:
                return
            self._retrying("subscribe", lambda: self._save_subscriptions(agent_id, wanted))
            self._remember_subscriptions(agent_id, wanted)

    def subscribed_agents(self) -> set[str]:
        """Every agent with stored subscriptions, launched in this process or not."""
        with self._lock:
            return set(self._subs)

    def register_agents(self, topics: Mapping[str, Iterable[str]]) -> None:
        """Store the topics of every agent of the guild spec; forget agents it no longer has.

        Mail for an agent that has not launched yet, or runs in another daemon, is then
        kept for it. A forgotten agent's pending deliveries stay stored.
        """
        for agent_id in sorted(self.subscribed_agents() - topics.keys()):
            logger.info("subscriptions dropped, agent not in the spec agent_id=%s", agent_id)
            self.set_subscriptions(agent_id, ())
        for agent_id, agent_topics in topics.items():
            self.set_subscriptions(agent_id, agent_topics)

    def _remember_subscriptions(self, agent_id: str, topics: frozenset[str]) -> None:
        """Update the in-process view of who listens to what."""
        with self._lock:
            old = self._subs.get(agent_id, frozenset())
            if topics:
                self._subs[agent_id] = topics
            else:
                self._subs.pop(agent_id, None)
            for topic in old - topics:
                left = self._topics.get(topic, frozenset()) - {agent_id}
                if left:
                    self._topics[topic] = left
                else:
                    self._topics.pop(topic, None)
            for topic in topics - old:
                self._topics[topic] = self._topics.get(topic, frozenset()) | {agent_id}

    def _targets(self, message: Message) -> frozenset[str]:
        """The agents a message goes to, by the in-process view (never its sender)."""
        return self._topics.get(message.topic, frozenset()) - {message.sender}

    # -- publishing and turns ---------------------------------------------------------------

    def publish(self, message: Message) -> int:
        """Store ``message`` and deliver it; from inside a handler, at the end of its turn.

        Returns how many deliveries were stored; for a message held back until the end of
        a turn, how many subscribers are known now.
        """
        mailbox = self._mailboxes.get(message.sender)
        if mailbox is not None and mailbox.hold(message):
            return len(self._targets(message))
        return self._store((message,), None, (), PUBLISH_PATIENCE)

    def dead_letter(self, agent_id: str, message: Message, reason: str) -> None:
        mailbox = self._mailboxes.get(agent_id)
        if mailbox is not None and mailbox.hold_dead(message, reason):
            return
        self._store((), None, ((agent_id, message, reason),), PUBLISH_PATIENCE)

    def finish_turn(self, mailbox: DurableMailbox, message: Message) -> None:
        """Store the turn that handled ``message``: its publishes, dead letters and the ack.

        Retries while the store is unreachable, so the agent waits rather than loses its
        outputs; gives up only when the bus closes, leaving the message to be redelivered.
        Never raises: it runs on the engine's thread.
        """
        held, dead = mailbox.end_turn()
        try:
            self._store(held, (mailbox, message), dead, None)
        except BusError as exc:
            logger.warning(
                "turn not stored, message will be redelivered agent_id=%s message_id=%d error=%s",
                mailbox.agent_id,
                message.id,
                exc,
            )
        except Exception:
            logger.exception(
                "turn not stored agent_id=%s message_id=%d", mailbox.agent_id, message.id
            )

    # -- retries ----------------------------------------------------------------------------

    def _retrying(
        self, what: str, call: Callable[[], T], patience: float | None = PUBLISH_PATIENCE
    ) -> T:
        """Run ``call``, retrying transient errors with a growing pause.

        Raises :class:`BusError` once ``patience`` seconds have passed (never, for None)
        or the bus is closed.
        """
        deadline = None if patience is None else time.monotonic() + patience
        delay = RETRY_FIRST
        failures = 0
        while True:
            if self.closed.is_set():
                raise BusError(f"{self.describe()}: {what} refused, the bus is closed")
            try:
                result = call()
            except self.transient_errors as exc:
                failures += 1
                if failures == 1:
                    logger.error("%s failed, retrying bus=%s error=%s", what, self.describe(), exc)
                if deadline is not None and time.monotonic() + delay > deadline:
                    raise BusError(f"{self.describe()}: {what} failed: {exc}") from exc
                self.closed.wait(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            if failures:
                logger.warning(
                    "%s succeeded again bus=%s retries=%d", what, self.describe(), failures
                )
            return result

    def close(self) -> None:
        """Stop retrying and refuse further work; subclasses release their connections."""
        self.closed.set()
