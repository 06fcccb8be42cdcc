"""The in-memory bus: the default, fastest backend; it keeps nothing across a restart."""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Iterable

from rustic.message import Message
from rustic.messaging.base import DeadLetter, Mailbox, MessageBus


class MemoryMailbox(Mailbox):
    """A deque; appends and pops are atomic, so no lock is needed."""

    __slots__ = ("_queue",)

    def __init__(self, agent_id: str) -> None:
        super().__init__(agent_id)
        self._queue: deque[Message] = deque()

    def put(self, message: Message) -> None:
        self._queue.append(message)
        self.notify()

    def get_nowait(self) -> Message | None:
        try:
            return self._queue.popleft()
        except IndexError:
            return None

    def ack(self, message: Message) -> None:
        return None

    def __len__(self) -> int:
        return len(self._queue)


class MemoryBus(MessageBus):
    """Topics map to tuples of mailboxes, replaced on change, so publish reads without a lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._mailboxes: dict[str, MemoryMailbox] = {}  # guarded by `_lock`
        self._topics: dict[str, tuple[Mailbox, ...]] = {}  # replaced, never mutated, under `_lock`
        self._by_agent: dict[str, set[str]] = {}  # each agent's topics; guarded by `_lock`
        self._dead: list[DeadLetter] = []  # guarded by `_lock`
        self._dead_ids = itertools.count(1)  # guarded by `_lock`

    def open_mailbox(self, agent_id: str) -> Mailbox:
        with self._lock:
            mailbox = self._mailboxes.get(agent_id)
            if mailbox is None:
                mailbox = self._mailboxes[agent_id] = MemoryMailbox(agent_id)
            return mailbox

    def close_mailbox(self, agent_id: str) -> list[Message]:
        with self._lock:
            mailbox = self._mailboxes.pop(agent_id, None)
            for topic in self._by_agent.pop(agent_id, set()):
                self._drop(topic, agent_id)
        return mailbox.drain() if mailbox is not None else []

    def subscribe(self, topic: str, agent_id: str) -> None:
        mailbox = self.open_mailbox(agent_id)
        with self._lock:
            topics = self._by_agent.setdefault(agent_id, set())
            if topic not in topics:
                topics.add(topic)
                self._topics[topic] = (*self._topics.get(topic, ()), mailbox)

    def unsubscribe(self, topic: str, agent_id: str) -> None:
        with self._lock:
            topics = self._by_agent.get(agent_id, set())
            if topic in topics:
                topics.discard(topic)
                self._drop(topic, agent_id)

    def _drop(self, topic: str, agent_id: str) -> None:
        # Caller holds `_lock`.
        kept = tuple(box for box in self._topics.get(topic, ()) if box.agent_id != agent_id)
        if kept:
            self._topics[topic] = kept
        else:
            self._topics.pop(topic, None)

    def subscriptions(self, agent_id: str) -> set[str]:
        with self._lock:
            return set(self._by_agent.get(agent_id, ()))

    def publish(self, message: Message) -> int:
        delivered = 0
        sender = message.sender
        for mailbox in self._topics.get(message.topic, ()):
            if mailbox.agent_id != sender:
                mailbox.put(message)
                delivered += 1
        return delivered

    def dead_letter(self, agent_id: str, message: Message, reason: str) -> None:
        with self._lock:
            self._dead.append(DeadLetter(agent_id, message, reason, id=next(self._dead_ids)))

    def dead_letters(self) -> list[DeadLetter]:
        with self._lock:
            return list(self._dead)

    def retry_dead_letters(self, ids: Iterable[int]) -> list[DeadLetter]:
        """Put the dead letters ``ids`` back into their agents' mailboxes.

        Only agents with an open mailbox can take one back; the others' stay dead letters.
        """
        wanted = set(ids)
        with self._lock:
            retried = [
                dead
                for dead in self._dead
                if dead.id in wanted and dead.agent_id in self._mailboxes
            ]
            gone = {dead.id for dead in retried}
            self._dead = [dead for dead in self._dead if dead.id not in gone]
            boxes = [self._mailboxes[dead.agent_id] for dead in retried]
        for dead, mailbox in zip(retried, boxes, strict=True):
            mailbox.put(dead.message)
        return retried
