"""Scheduling shared by the engines whose agents run outside this process (multiprocess, ray).

The guild's process keeps each agent's mailbox, state handle and counters. A *turn* takes
up to ``batch_size`` messages from the mailbox and ships them to the agent's host in one
call; the host's :class:`~rustic.engines.remote.Outcome` is applied here when it comes
back: state writes, dead letters, then the messages the agent sent, published in order.
One batch per agent is in flight at a time, which keeps each agent's order and its
one-message-at-a-time semantics.

When a host dies with a batch in flight, the turn stays open and the batch's messages are
replayed one at a time once the host is back, each counting the crashes it was in flight
for. A message in flight for ``max_crashes`` crashes is dead-lettered. An agent whose host
died ``max_restarts`` times in a row without a message handled is marked failed: what it
still held is dead-lettered, and its mailbox keeps queueing until a reload revives it.
"""

from __future__ import annotations

import logging
import sys
import threading
from abc import abstractmethod
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from rustic.agent import Agent
from rustic.engines.base import EngineReport
from rustic.engines.local import HOOK_TIMEOUT, LocalEngine
from rustic.engines.remote import HostError, HostOrder, Outcome
from rustic.hotswap import ReloadError
from rustic.logs import log_context
from rustic.message import Message
from rustic.spec import AgentSpec
from rustic.wrapper import AgentWrapper

logger = logging.getLogger(__name__)

HOOK_MARGIN = 1.0  # what a hook call waits beyond the hook's own deadline, for the round trip


class HostGone(HostError):
    """The process hosting an agent died, or was never reachable."""


@dataclass(eq=False)
class Hosted:
    """The guild-side record of one agent whose instance lives in a host."""

    wrapper: AgentWrapper
    home: Any = None  # where the host is: an engine's worker or actor handle
    batch: list[Message] = field(default_factory=list)  # shipped, outcome not applied yet
    replay: deque[Message] = field(default_factory=deque)  # lost with a host; go one by one
    crashes: dict[int, int] = field(default_factory=dict)  # message id -> host deaths seen
    streak: int = 0  # host deaths in a row without a handled message

    @property
    def agent_id(self) -> str:
        """The id of the agent."""
        return self.wrapper.agent_id


class HostedEngine(LocalEngine):
    """An engine that runs each agent in a host elsewhere and ships it batches of mail.

    Subclasses place hosts (``_place``, ``_unplace``, and ``_new_host``, ``_release`` for
    a swap), run hooks there (``_hook``), say when a host takes batches (``_accepts``)
    and where it is (``_label``), and ship batches (``_ship``), calling ``_finished`` or
    ``_lost`` for each. Turns start and batch outcomes are applied on one thread of the
    engine, its dispatcher; a build's or a hook's outcome on the thread that asked.
    """

    out_of_process = True

    def __init__(self, batch_size: int, max_crashes: int, max_restarts: int) -> None:
        for knob, value in (
            ("batch_size", batch_size),
            ("max_crashes", max_crashes),
            ("max_restarts", max_restarts),
        ):
            if value < 1:
                raise ValueError(f"{knob} must be at least 1, got {value}")
        super().__init__()
        self.batch_size = batch_size
        self.max_crashes = max_crashes
        self.max_restarts = max_restarts
        self._hosted: dict[str, Hosted] = {}  # written under `_cond`
        self._closing = threading.Event()

    # -- what each engine provides ----------------------------------------------------------

    @abstractmethod
    def _place(self, hosted: Hosted, order: HostOrder) -> Outcome:
        """Build the agent in a host, make it ``hosted.home`` and return the build's outcome."""

    @abstractmethod
    def _unplace(self, hosted: Hosted) -> None:
        """Let the agent's host go: the agent stopped for good."""

    @abstractmethod
    def _hook(self, hosted: Hosted, kind: str, timeout: float) -> Outcome:
        """Run the agent's ``kind`` hooks in its host, each under ``timeout``."""

    @abstractmethod
    def _accepts(self, hosted: Hosted) -> bool:
        """True when the agent's host can take a batch now."""

    @abstractmethod
    def _label(self, hosted: Hosted) -> str:
        """Where the agent runs, for ``agents()``."""

    @abstractmethod
    def _new_host(self, hosted: Hosted, order: HostOrder) -> tuple[Any, Outcome]:
        """Build a hot swap's new version in a fresh host; HostError if it is refused."""

    @abstractmethod
    def _release(self, hosted: Hosted, home: Any) -> None:
        """Close the agent's previous host after a swap, without on_shutdown."""

    @abstractmethod
    def _ship(self, hosted: Hosted, batch: list[Message]) -> None:
        """Send ``batch`` to the agent's host (after ``_shipped``); the answer comes later."""

    # -- the contract ------------------------------------------------------------------------

    def launch(self, wrapper: AgentWrapper) -> None:
        """Build the agent in its host (running on_startup there), then deliver its mail."""
        with self._cond:
            if wrapper.agent_id in self._hosted:
                raise ValueError(f"agent {wrapper.agent_id!r} already runs on {self!r}")
        hosted = Hosted(wrapper)
        outcome = self._place(hosted, self.order(wrapper))
        with self._cond:
            self._hosted[wrapper.agent_id] = hosted
        self._apply(hosted, outcome, [])
        wrapper.where = self._label(hosted)
        super().launch(wrapper)

    def swap(self, wrapper: AgentWrapper, agent: Agent[Any], spec: AgentSpec) -> None:
        """Build the new version in a fresh host (fresh code), then move the paused agent.

        The new instance's on_reload hooks run in that host with ``previous=None``: the
        previous instance lives in another process. It starts from the agent's current
        state. The old host is closed without on_shutdown: the agent lives on. A failed
        agent is revived by a successful swap.
        """
        hosted = self._hosted_of(wrapper.agent_id)
        order = self.order(wrapper, spec, type(agent), hook="reload")
        try:
            home, outcome = self._new_host(hosted, order)
        except HostError as exc:
            raise ReloadError(wrapper.agent_id, "swap", str(exc)) from exc

        # The new host takes the agent over; the old one lets it go.
        with self._cond:
            old, hosted.home = hosted.home, home
            hosted.streak = 0
            hosted.crashes.clear()
            wrapper.failed = False
        self._apply(hosted, outcome, [])
        wrapper.install(agent, spec)
        wrapper.where = self._label(hosted)
        if old is not None:
            self._release(hosted, old)

    def shutdown(self, timeout: float) -> EngineReport:
        """Stop every agent, run on_shutdown in its host, then end every host."""
        self._closing.set()
        report = super().shutdown(timeout)
        with self._cond:
            records = list(self._hosted.values())

        # Mail that was taken from a mailbox but never handled is pending too.
        for hosted in records:
            report.pending += len({m.id for m in (*hosted.batch, *hosted.replay)})
        return report

    def order(
        self,
        wrapper: AgentWrapper,
        spec: AgentSpec | None = None,
        agent_class: type[Any] | None = None,
        hook: str = "startup",
    ) -> HostOrder:
        """What a host needs to build ``wrapper``'s agent as it is now.

        ``spec`` and ``agent_class`` default to the wrapper's own; a swap passes its new ones.
        """
        guild = wrapper.guild
        spec = (wrapper.spec if spec is None else spec).model_copy()
        spec._agent_class = None  # the class travels on its own, by reference
        app_dir = [str(guild.app_dir)] if guild.app_dir is not None else []
        return HostOrder(
            guild_id=guild.id,
            default_topic=guild.default_topic,
            error_topic=guild.error_topic,
            dependency_map=dict(guild.spec.dependency_map),
            spec=spec,
            agent_class=agent_class or type(wrapper.agent),
            state=wrapper.state.get(),
            state_version=wrapper.state.version,
            engine=self.name,
            sys_path=[*app_dir, *sys.path],
            hook=hook,
        )

    # -- turns ------------------------------------------------------------------------------

    def _begin_turn(self, wrapper: AgentWrapper) -> bool:
        if not super()._begin_turn(wrapper):
            return False
        hosted = self._hosted.get(wrapper.agent_id)
        if hosted is not None and not wrapper.failed and self._accepts(hosted):
            wrapper.where = self._label(hosted)
            return True

        # Its host is away (restarting, replaying, failed): the agent is notified when back.
        with self._cond:
            self._running.discard(wrapper.agent_id)
            self._unschedule(wrapper)
        return False

    def _start_turn(self, wrapper: AgentWrapper) -> None:
        """On the dispatcher: begin a scheduled agent's turn and ship its next batch."""
        if not self._begin_turn(wrapper):
            return
        hosted = self._hosted.get(wrapper.agent_id)
        if hosted is None:
            return
        batch = self._next_batch(hosted)
        if batch:
            self._ship(hosted, batch)
        else:
            self._turn_over(hosted)

    def _next_batch(self, hosted: Hosted) -> list[Message]:
        """The messages to ship next: one replayed message, or a batch from the mailbox."""
        if hosted.replay:
            return [hosted.replay[0]]
        take = hosted.wrapper.mailbox.get_nowait
        batch: list[Message] = []
        while len(batch) < self.batch_size and (message := take()) is not None:
            batch.append(message)
        return batch

    def _shipped(self, hosted: Hosted, batch: list[Message]) -> None:
        """Record ``batch`` as in flight to the agent's host."""
        hosted.batch = batch
        hosted.wrapper.in_flight = batch[0]

    def _turn_over(self, hosted: Hosted) -> None:
        """End the agent's turn; one with more mail goes back on the dispatcher's queue."""
        if self._end_turn(hosted.wrapper):
            self._enqueue(hosted.wrapper)

    # -- outcomes ---------------------------------------------------------------------------

    def _finished(self, hosted: Hosted, outcome: Outcome) -> None:
        """Apply the outcome of the batch in flight and acknowledge its messages."""
        batch, hosted.batch = hosted.batch, []
        wrapper = hosted.wrapper
        self._apply(hosted, outcome, batch)
        ack = wrapper.mailbox.ack
        for message in batch:
            ack(message)
        if hosted.crashes:
            for message in batch:
                hosted.crashes.pop(message.id, None)
        if hosted.replay and batch and batch[0] is hosted.replay[0]:
            hosted.replay.popleft()
        hosted.streak = 0
        wrapper.in_flight = None

    def _refused(self, hosted: Hosted, reason: str) -> None:
        """The host raised instead of handling the batch: give up on each of its messages."""
        batch, hosted.batch = hosted.batch, []
        logger.error("host failed a batch agent_id=%s reason=%s", hosted.agent_id, reason)
        for message in batch:
            self._give_up(hosted, message, f"its host failed: {reason.splitlines()[-1]}")
        if hosted.replay and batch and batch[0] is hosted.replay[0]:
            hosted.replay.popleft()
        hosted.wrapper.in_flight = None

    def _lost(self, hosted: Hosted) -> None:
        """The host died with the batch in flight: count the crash, keep what may be retried."""
        batch, hosted.batch = hosted.batch, []
        hosted.wrapper.in_flight = None
        if not batch:
            return
        hosted.streak += 1
        if not (hosted.replay and batch[0] is hosted.replay[0]):
            hosted.replay.extend(batch)
        for message in batch:
            hosted.crashes[message.id] = hosted.crashes.get(message.id, 0) + 1

        # A message that was in flight for every one of `max_crashes` crashes is the cause.
        doomed = {m.id for m in batch if hosted.crashes[m.id] >= self.max_crashes}
        if doomed:
            for message in [m for m in hosted.replay if m.id in doomed]:
                reason = f"its host died {self.max_crashes} times while handling it"
                self._give_up(hosted, message, reason)
            hosted.replay = deque(m for m in hosted.replay if m.id not in doomed)
        if hosted.streak >= self.max_restarts:
            self._fail(hosted, f"its host died {hosted.streak} times in a row")

    def _fail(self, hosted: Hosted, why: str) -> None:
        """Mark the agent failed and dead-letter what it still held; its mailbox stays."""
        hosted.wrapper.failed = True
        with log_context(agent_id=hosted.agent_id):
            logger.error("agent failed reason=%s", why)
        for message in hosted.replay:
            self._give_up(hosted, message, f"the agent failed: {why}")
        hosted.replay.clear()

    def _give_up(self, hosted: Hosted, message: Message, reason: str) -> None:
        wrapper = hosted.wrapper
        with log_context(agent_id=wrapper.agent_id, message_id=message.id):
            logger.warning("message dead-lettered reason=%s", reason)
        wrapper.guild.bus.dead_letter(wrapper.agent_id, message, reason)
        hosted.crashes.pop(message.id, None)
        wrapper.dead_lettered += 1
        wrapper.processed += 1
        wrapper.mailbox.ack(message)

    def _apply(self, hosted: Hosted, outcome: Outcome, batch: list[Message]) -> None:
        """Apply a host's outcome here: state writes, dead letters, sent messages, counters."""
        wrapper = hosted.wrapper
        state = wrapper.state
        for op, document in outcome.state_ops:
            if op == "update":
                state.update(document)
            else:
                state.replace(document)
        bus = wrapper.guild.bus
        if outcome.dead:
            by_id = {message.id: message for message in batch}
            for message_id, reason in outcome.dead:
                if message_id in by_id:
                    bus.dead_letter(wrapper.agent_id, by_id[message_id], reason)
        publish = bus.publish
        for message in outcome.sent:
            publish(message)
        wrapper.errors += outcome.errors
        wrapper.dead_lettered += outcome.dead_lettered
        wrapper.processed += outcome.processed

    # -- teardown ---------------------------------------------------------------------------

    def _run_shutdown_hooks(self, wrapper: AgentWrapper, budget: float) -> bool:
        if not wrapper.has_fixtures("shutdown"):
            return True
        hosted = self._hosted.get(wrapper.agent_id)
        if hosted is None or hosted.home is None or wrapper.failed:
            return False
        timeout = max(0.1, min(HOOK_TIMEOUT, budget))
        try:
            outcome = self._hook(hosted, "shutdown", timeout)
        except HostError as exc:
            with log_context(agent_id=wrapper.agent_id):
                logger.error("shutdown hooks did not run in the host reason=%s", exc)
            return False
        self._apply(hosted, outcome, [])
        return outcome.ok

    def _forget(self, wrapper: AgentWrapper) -> None:
        with self._cond:
            hosted = self._hosted.pop(wrapper.agent_id, None)
        if hosted is not None and hosted.home is not None:
            self._unplace(hosted)

    def _hosted_of(self, agent_id: str) -> Hosted:
        with self._cond:
            try:
                return self._hosted[agent_id]
            except KeyError:
                raise KeyError(f"agent {agent_id!r} does not run on {self!r}") from None
