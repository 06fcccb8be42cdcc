"""``AgentHost``: one agent built and run outside the guild's process, and what it sends back.

Engines whose agents live elsewhere (a child process, a Ray actor) keep the mailbox, the
state handle and the counters in the guild's process and ship batches of messages to an
``AgentHost`` where the agent runs. The host runs a real :class:`AgentWrapper` around a
host-side :class:`~rustic.guild.Guild` whose bus only collects: what the agent publishes,
dead-letters and writes to its state comes back as an :class:`Outcome` that the guild's
side applies in order. Dependencies are resolved where the agent runs, once per host
process for guild-scoped ones.
"""

from __future__ import annotations

import copy
import logging
import sys
import threading
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from rustic.deps import close_dependency
from rustic.engines.base import call_with_deadline
from rustic.logs import log_context
from rustic.message import Message
from rustic.messaging.base import DeadLetter, Mailbox, MessageBus
from rustic.spec import AgentSpec, DependencySpec
from rustic.state import MemoryStateStore, StateHandle, StateStore, state_key_for_agent
from rustic.wrapper import AgentWrapper

if TYPE_CHECKING:
    from rustic.guild import Guild

logger = logging.getLogger(__name__)


class Outcome(NamedTuple):
    """What one call into a host produced, for the guild's side to apply in this order.

    ``state_ops`` are ``("update", merge_patch)`` or ``("replace", document)``; ``dead``
    names messages of the batch by id with the reason they were given up; the counters
    are what the call added. ``ok`` is False when a hook failed.
    """

    state_ops: list[tuple[str, dict[str, Any]]]
    dead: list[tuple[int, str]]
    sent: list[Message]
    processed: int
    errors: int
    dead_lettered: int
    ok: bool = True


@dataclass
class HostOrder:
    """Everything a host needs to build one agent where it will run."""

    guild_id: str
    default_topic: str
    error_topic: str
    dependency_map: dict[str, DependencySpec]
    spec: AgentSpec
    agent_class: type[Any]
    state: dict[str, Any]
    state_version: int
    engine: str
    sys_path: list[str]
    hook: str = "startup"  # run once built: "startup" at launch, "reload" for a hot swap


class HostError(RuntimeError):
    """A host refused a request; the message carries the remote traceback."""


def describe_failure(exc: BaseException) -> str:
    """The text a host sends back for a request that raised: the error and its traceback."""
    return "".join(traceback.format_exception(exc)).rstrip()


class AgentHost:
    """One agent living where its engine runs it; built from a :class:`HostOrder`.

    ``handle`` runs a batch through the agent's wrapper, one message after the other, and
    returns the :class:`Outcome`. Hooks run through :meth:`run_hook`. A host is used by
    one thread at a time for batches; hooks may run on another thread meanwhile (a stop
    does not wait for a stuck handler to run ``on_shutdown``).
    """

    def __init__(self, order: HostOrder) -> None:
        extend_sys_path(order.sys_path)
        self.guild_id = order.guild_id
        self.agent_id = order.spec.id
        self.guild, self.bus = _host_guild(order)

        # The agent's state starts as the guild's copy; writes are recorded for the guild.
        key = state_key_for_agent(order.guild_id, self.agent_id)
        self.guild.state_store.save(key, order.state, order.state_version)
        self.state = RecordingState(self.guild.state_store, key)

        spec = order.spec.model_copy()
        spec._agent_class = order.agent_class
        mailbox = self.bus.open_mailbox(self.agent_id)
        with log_context(guild_id=self.guild_id, agent_id=self.agent_id):
            self.wrapper = AgentWrapper(self.guild, spec, mailbox, self.state, order.engine)
            extra = (None,) if order.hook == "reload" else ()  # the previous instance is elsewhere
            self.hooks_ok = self.wrapper.run_fixtures(order.hook, None, *extra)
        self._counted = (0, 0, 0)

    def handle(self, batch: list[Message]) -> Outcome:
        """Run every message of ``batch`` through the agent, in order."""
        dispatch = self.wrapper.dispatch
        with log_context(guild_id=self.guild_id):
            for message in batch:
                dispatch(message)
        return self.collect()

    def run_hook(self, kind: str, timeout: float) -> Outcome:
        """Run the agent's ``kind`` hooks under a deadline; ``ok`` says whether all ran."""
        with log_context(guild_id=self.guild_id, agent_id=self.agent_id):
            ok = call_with_deadline(
                lambda: self.wrapper.run_fixtures(kind), timeout, f"{self.agent_id}.on_{kind}"
            )
        return self.collect(ok)

    def collect(self, ok: bool = True) -> Outcome:
        """Take what the agent sent, dead-lettered and wrote since the last collect."""
        sent, dead = self.bus.take(self.agent_id)
        wrapper = self.wrapper
        counts = (wrapper.processed, wrapper.errors, wrapper.dead_lettered)
        processed, errors, dead_lettered = (
            now - before for now, before in zip(counts, self._counted, strict=True)
        )
        self._counted = counts
        return Outcome(self.state.take(), dead, sent, processed, errors, dead_lettered, ok)

    def close(self) -> None:
        """Close the agent's own dependencies; guild-scoped ones live as long as the host."""
        # The host guild is used only for its dependency scopes, so its own bookkeeping
        # of agent-scoped dependencies is the one to release.
        for failed in self.guild.dependencies.close_agent(self.agent_id):
            logger.warning("dependency did not close dependency=%s", failed)
        self.bus.close_mailbox(self.agent_id)


class RecordingState(StateHandle):
    """A state handle over the host's copy of the state that records each write."""

    def __init__(self, store: StateStore, key: str) -> None:
        super().__init__(store, key)
        self._ops: list[tuple[str, dict[str, Any]]] = []  # appended by writers, swapped by take

    def update(self, patch: dict[str, Any]) -> dict[str, Any]:
        """Apply and record a merge patch."""
        document = super().update(patch)
        self._ops.append(("update", copy.deepcopy(patch)))
        return document

    def replace(self, data: dict[str, Any]) -> dict[str, Any]:
        """Replace and record the whole document."""
        document = super().replace(data)
        self._ops.append(("replace", copy.deepcopy(data)))
        return document

    def take(self) -> list[tuple[str, dict[str, Any]]]:
        """The writes since the last take, oldest first."""
        ops, self._ops = self._ops, []
        return ops


class _NoMailbox(Mailbox):
    """The host's agents get their mail from the engine, never from a mailbox."""

    def put(self, message: Message) -> None:
        raise RuntimeError("a hosted agent's mailbox lives in the guild's process")

    def get_nowait(self) -> Message | None:
        return None

    def ack(self, message: Message) -> None:
        return None

    def __len__(self) -> int:
        return 0


class CollectingBus(MessageBus):
    """The bus of a host: it delivers nothing and keeps what each agent sends, by sender."""

    def __init__(self) -> None:
        self._sent: dict[str, list[Message]] = {}  # by sender; lists swapped out by `take`
        self._dead: dict[str, list[tuple[int, str]]] = {}

    def open_mailbox(self, agent_id: str) -> Mailbox:
        return _NoMailbox(agent_id)

    def close_mailbox(self, agent_id: str) -> list[Message]:
        self.take(agent_id)
        return []

    def subscribe(self, topic: str, agent_id: str) -> None:
        return None

    def unsubscribe(self, topic: str, agent_id: str) -> None:
        return None

    def subscriptions(self, agent_id: str) -> set[str]:
        return set()

    def publish(self, message: Message) -> int:
        self._sent.setdefault(message.sender, []).append(message)
        return 0

    def dead_letter(self, agent_id: str, message: Message, reason: str) -> None:
        self._dead.setdefault(agent_id, []).append((message.id, reason))

    def dead_letters(self) -> list[DeadLetter]:
        return []

    def take(self, agent_id: str) -> tuple[list[Message], list[tuple[int, str]]]:
        """What ``agent_id`` sent and dead-lettered since the last take."""
        return self._sent.pop(agent_id, []), self._dead.pop(agent_id, [])


# One host guild per guild id and process: agents of a guild hosted together share its
# guild-scoped dependencies, as they would in the guild's own process.
_guilds: dict[str, tuple[Guild, CollectingBus]] = {}  # guarded by `_guilds_lock`
_guilds_lock = threading.Lock()


def _host_guild(order: HostOrder) -> tuple[Guild, CollectingBus]:
    from rustic.engines.sync import SyncExecutionEngine
    from rustic.guild import Guild  # the guild imports the engines: import it when used

    with _guilds_lock:
        found = _guilds.get(order.guild_id)
        if found is None:
            bus = CollectingBus()
            guild = Guild(
                order.guild_id,
                messaging=bus,
                state=MemoryStateStore(),
                execution_engine=SyncExecutionEngine(),
                dependency_map=order.dependency_map,
                default_topic=order.default_topic,
                error_topic=order.error_topic,
            )
            found = _guilds[order.guild_id] = (guild, bus)
        return found


def close_host_guilds() -> None:
    """Close the guild-scoped dependencies of every host guild of this process."""
    with _guilds_lock:
        guilds = [guild for guild, _ in _guilds.values()]
        _guilds.clear()
    for guild in guilds:
        # A host guild never runs agents itself: its dependencies are all it holds.
        for name, obj in guild.dependencies.guild_scoped.items():
            close_dependency(name, obj)


def extend_sys_path(entries: list[str]) -> None:
    """Put the guild process's import path entries that this process lacks in front."""
    missing = [entry for entry in entries if entry not in sys.path]
    sys.path[:0] = missing
