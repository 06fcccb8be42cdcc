"""The contract of a message bus backend: topics, mailboxes, acknowledgements, dead letters."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rustic.message import Message


def _noop() -> None:
    return None


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

    def to_dict(self) -> dict[str, Any]:
        """Return the dead letter as a JSON-able dict."""
        return {
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

    def close(self) -> None:  # noqa: B027 - an optional hook, empty by default
        """Release connections and files."""
