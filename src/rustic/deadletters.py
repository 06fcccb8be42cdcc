"""Dead letters: list the messages agents gave up on, and deliver them to those agents again."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from rustic.messaging import DeadLetter, MessageBus

logger = logging.getLogger(__name__)


@dataclass
class RetryResult:
    """Which dead letters went back to their agents, and which ids were skipped.

    An id is skipped when it names no dead letter, or one whose agent cannot take it back
    (on the in-memory bus, an agent that does not run in this process).
    """

    retried: list[DeadLetter] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Return the result as a JSON-able dict."""
        return {"retried": [dead.to_dict() for dead in self.retried], "skipped": self.skipped}


def list_dead_letters(bus: MessageBus, agent_id: str | None = None) -> list[DeadLetter]:
    """The dead letters ``bus`` keeps, oldest first; only ``agent_id``'s when given.

    A durable bus keeps them across restarts (and, on Redis, for every daemon of the
    guild); the in-memory bus only for as long as the guild runs.
    """
    letters = bus.dead_letters()
    if agent_id is not None:
        letters = [dead for dead in letters if dead.agent_id == agent_id]
    return letters


def retry_dead_letters(bus: MessageBus, ids: Iterable[int] | None = None) -> RetryResult:
    """Deliver the dead letters ``ids`` (all of them, for None) again, each to its agent.

    The message keeps its id, so handlers see the very message that failed; it leaves
    the dead letters. On the in-memory bus only agents running in this process can take
    one back; on a durable bus an agent that is not running gets it when it starts.
    """
    wanted = sorted({dead.id for dead in bus.dead_letters()} if ids is None else set(ids))
    retried = bus.retry_dead_letters(wanted)
    found = {dead.id for dead in retried}
    result = RetryResult(retried, [dead_id for dead_id in wanted if dead_id not in found])
    for dead in retried:
        logger.info(
            "dead letter retried dead_letter_id=%d agent_id=%s message_id=%d",
            dead.id,
            dead.agent_id,
            dead.message.id,
        )
    return result
