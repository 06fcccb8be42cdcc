"""The contract of a message bus backend: topics, mailboxes, acknowledgements, dead letters."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from rustic.message import Message


def _noop() -> None:
    return None


class BusError(RuntimeError):
    """A bus could not do what was asked: its store is unreachable, full or closed."""


class Mailbox(ABC):
    """One agent's queue of deliveries.

    The bus appends to it; the agent's engine takes from it, one message at a time, and
    acknowledges each message once its handlers finished. ``notify`` is set by the engine
    and called after every append, from whichever thread published.
    """

    agent_id: str
    notify: Callable[[], None]

    def __init__(self, agent_id: str) -> None:
        self.agent_id = agent_id
        self.notify = _noop

    @abstractmethod
    def put(self, message: Message) -> None:
        """Append a delivery and call ``notify``."""

    @abstractmethod
    def get_nowait(self) -> Message | None:
        """Take the oldest delivery, or return ``None`` when there is none."""

    @abstractmethod
    def ack(self, message: Message) -> None:
        """Record that ``message`` was handled (or dead-lettered) and need not be redelivered."""

    @abstractmethod
    def __len__(self) -> int:
        """Number of deliveries waiting."""

    def drain(self) -> list[Message]:
        """Take every waiting delivery, oldest first."""
        taken: list[Message] = []
        while (message := self.get_nowait()) is not None:
            taken.append(message)
        return taken


@dataclass(frozen=True)
class DeadLetter:
    """A message an agent gave up on, and why."""

    agent_id: str
    message: Message
    reason: str
    at: float = field(default_factory=time.time)
    id: int = 0  # given by the bus that keeps it; names it for `retry_dead_letters`

    def to_dict(self) -> dict[str, Any]:
        """Return the dead letter as a JSON-able dict."""
        return {
            "id": self.id,
            "agent_id": self.agent_id,
            "reason": self.reason,
            "at": self.at,
            "message": self.message.to_dict(),
        }


class MessageBus(ABC):
    """Routes published messages to the mailboxes of the topics' subscribers.

    Publishing appends the message to every subscriber's mailbox except the sender's own,
    in publish order. Implementations are thread-safe.
    """

    durable: ClassVar[bool] = False  # True when pending deliveries outlive the process

    @abstractmethod
    def open_mailbox(self, agent_id: str) -> Mailbox:
        """Return the mailbox of ``agent_id``, creating it on first use."""

    @abstractmethod
    def close_mailbox(self, agent_id: str) -> list[Message]:
        """Drop the agent's mailbox and subscriptions; return what was still waiting."""

    @abstractmethod
    def subscribe(self, topic: str, agent_id: str) -> None:
        """Deliver messages published on ``topic`` to ``agent_id``'s mailbox."""

    @abstractmethod
    def unsubscribe(self, topic: str, agent_id: str) -> None:
        """Stop delivering ``topic`` to ``agent_id``."""

    @abstractmethod
    def subscriptions(self, agent_id: str) -> set[str]:
        """The topics ``agent_id`` is subscribed to."""

    @abstractmethod
    def publish(self, message: Message) -> int:
        """Deliver ``message`` to its topic's subscribers; return how many got it."""

    @abstractmethod
    def dead_letter(self, agent_id: str, message: Message, reason: str) -> None:
        """Keep ``message`` aside as one that ``agent_id`` could not handle."""

    @abstractmethod
    def dead_letters(self) -> list[DeadLetter]:
        """Every dead letter kept, oldest first."""

    def set_subscriptions(self, agent_id: str, topics: Iterable[str]) -> None:
        """Make ``topics`` exactly the topics ``agent_id`` is subscribed to."""
        wanted = set(topics)
        current = self.subscriptions(agent_id)
        for topic in sorted(wanted - current):
            self.subscribe(topic, agent_id)
        for topic in sorted(current - wanted):
            self.unsubscribe(topic, agent_id)

    def wait_delivered(self, timeout: float) -> bool:
        """Wait until what this process published to its own agents is in their mailboxes.

        In-process buses deliver during ``publish``, so they never wait; a bus that carries
        messages through a server (redis) waits for its reader to fetch them.
        """
        return True

    def register_agents(self, topics: Mapping[str, Iterable[str]]) -> None:  # noqa: B027
        """Learn the topics of every agent of a guild spec, whether it runs here or not.

        A durable bus stores them so that mail for agents not launched yet (or running in
        another daemon) is kept; the in-memory bus ignores this.
        """

    def retry_dead_letters(self, ids: Iterable[int]) -> list[DeadLetter]:
        """Deliver the dead letters ``ids`` again, each to the agent that gave up on it.

        They leave the dead-letter store; returns those found (unknown ids are skipped).
        """
        raise NotImplementedError(f"{type(self).__name__} cannot retry dead letters")

    def close(self) -> None:  # noqa: B027 - an optional hook, empty by default
        """Release connections and files."""
