"""``AgentWrapper``: one agent's instance, mailbox, state and dependencies, and its dispatch."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import inspect
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Executor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from rustic.agent import Agent, Handler, ProcessContext, format_name
from rustic.logs import log_context
from rustic.message import ErrorReport, Message, new_id
from rustic.messaging import Mailbox
from rustic.spec import AgentSpec
from rustic.state import StateHandle

if TYPE_CHECKING:
    from rustic.guild import Guild

logger = logging.getLogger(__name__)

_FORMATS: dict[type[Any], str] = {}
_SOURCE_DIGESTS: dict[tuple[str, int, int], bytes] = {}  # by (path, mtime_ns, size)
_loops = threading.local()


def payload_format(model: type[Any]) -> str:
    """Return (and cache) the ``format`` of payloads of type ``model``."""
    name = _FORMATS.get(model)
    if name is None:
        name = _FORMATS[model] = format_name(model)
    return name


def encode_payload(payload: BaseModel | dict[str, Any]) -> tuple[str, Any]:
    """The ``format`` and JSON-able data a message carries for ``payload``."""
    if isinstance(payload, BaseModel):
        # The model's own serializer: model_dump(mode="json") without its Python wrapper.
        return payload_format(type(payload)), payload.__pydantic_serializer__.to_python(
            payload, mode="json"
        )
    return "dict", payload


def run_coroutine(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` to completion on this thread's own event loop (made on first use)."""
    loop: asyncio.AbstractEventLoop | None = getattr(_loops, "loop", None)
    if loop is None or loop.is_closed():
        loop = _loops.loop = asyncio.new_event_loop()
    return loop.run_until_complete(coro)


def code_version(cls: type[Any], spec: AgentSpec) -> str:
    """A short hash of the agent's module source and its spec: changes when either does."""
    digest = hashlib.sha256(spec.fingerprint().encode())
    source = inspect.getsourcefile(cls) if cls.__module__ != "__main__" else None
    digest.update(_source_digest(source) if source else cls.__qualname__.encode())
    return digest.hexdigest()[:12]


def _source_digest(path: str) -> bytes:
    """The digest of a source file, read once per version of the file, not once per agent."""
    try:
        stat = Path(path).stat()
    except OSError:
        return path.encode()
    key = (path, stat.st_mtime_ns, stat.st_size)
    found = _SOURCE_DIGESTS.get(key)
    if found is None:
        found = _SOURCE_DIGESTS[key] = hashlib.sha256(Path(path).read_bytes()).digest()
    return found


class AgentWrapper:
    """Holds one agent and everything that outlives its instance.

    The mailbox, the state handle, the dependencies and the counters belong to the
    wrapper; a hot swap replaces only ``agent`` (and ``spec``). Engines call
    :meth:`dispatch` for each message and own the scheduling fields below.
    """

    def __init__(
        self,
        guild: Guild,
        spec: AgentSpec,
        mailbox: Mailbox,
        state: StateHandle,
        engine_name: str,
        *,
        shadow: bool = False,
    ) -> None:
        self.guild = guild
        self.shadow = shadow  # the agent runs elsewhere: build it without __init__ or deps
        self.agent_id = spec.id
        self.mailbox = mailbox
        self.state = state
        self.engine_name = engine_name
        self.default_topic = guild.default_topic
        self.error_topic = guild.error_topic
        self._publish = guild.bus.publish
        self.dependencies: dict[str, Any] = {}

        # Counters: written only by the thread running the agent, read by anyone.
        self.processed = 0
        self.errors = 0
        self.dead_lettered = 0
        self.interrupted = 0
        self.in_flight: Message | None = None
        self.started_at = time.time()
        self.last_reload: dict[str, Any] | None = None

        # Scheduling fields, owned by the engine (guarded by the engine's lock).
        self.scheduled = False
        self.paused = False
        self.stopped = False
        self.failed = False
        self.where = ""
        self.loop: asyncio.AbstractEventLoop | None = None  # where async handlers run, if not here

        self.agent: Agent[Any] = self.build(spec)
        self.install(self.agent, spec)

    # -- building ---------------------------------------------------------------------------

    def build(
        self,
        spec: AgentSpec,
        agent_class: type[Any] | None = None,
        fresh: frozenset[str] = frozenset(),
    ) -> Agent[Any]:
        """Make a new agent instance for ``spec`` bound to this wrapper (not yet installed).

        Dependencies already attached are reused, except those named in ``fresh``, which
        are built anew (their spec changed). A shadow wrapper's instance is only checked
        and typed here: its ``__init__`` and dependencies run where the engine hosts it.
        """
        cls = agent_class or spec.resolve_class()
        if not (isinstance(cls, type) and issubclass(cls, Agent)):
            raise TypeError(f"{spec.class_name} is not a subclass of rustic.Agent")
        config = cls.properties_model.model_validate(spec.properties)
        dependencies = {} if self.shadow else self._dependencies_for(cls, spec, fresh)

        agent: Agent[Any] = cls.__new__(cls)
        agent.id = spec.id
        agent.name = spec.name
        agent.description = spec.description
        agent.config = config
        agent.spec = spec
        agent.guild_id = self.guild.id
        agent._wrapper = self
        agent._dependencies = dependencies
        if not self.shadow:
            agent.__init__()  # type: ignore[misc]
        return agent

    def _dependencies_for(
        self, cls: type[Agent[Any]], spec: AgentSpec, fresh: frozenset[str]
    ) -> dict[str, Any]:
        """The objects ``cls``'s handlers and hooks take, reusing those already attached."""
        wanted = {name for handler in cls.handlers for name in handler.inject}
        for funcs in cls.fixtures.values():
            for func in funcs:
                wanted.update(_fixture_params(func))
        return {
            name: self.dependencies[name]
            if name in self.dependencies and name not in fresh
            else self.guild.resolve_dependency(name, spec, fresh=name in fresh)
            for name in sorted(wanted)
        }

    def install(self, agent: Agent[Any], spec: AgentSpec) -> None:
        """Make ``agent`` the one that handles messages; the engine has paused delivery."""
        self.agent = agent
        self.spec = spec
        self.dependencies = agent._dependencies
        self.version = code_version(type(agent), spec)
        self._dispatch_table: dict[str, tuple[Handler, ...]] = {}  # by format

    def topics(self, spec: AgentSpec | None = None) -> set[str]:
        """The topics the agent listens to under ``spec`` (default: its current spec)."""
        return self.guild.agent_topics(spec or self.spec)

    # -- dispatch (the hot path) -------------------------------------------------------------

    def dispatch(self, message: Message) -> None:
        """Run every handler of the agent that matches ``message``, then acknowledge it."""
        handlers = self._handlers(message.format)
        self.in_flight = message
        try:
            for handler in handlers:
                self._run_handler(handler, message)
        except BaseException:
            self._settle(message, handled=False)
            raise
        # `_settle(message, handled=True)`, inlined: this runs for every message.
        self.in_flight = None
        self.processed += 1
        self.mailbox.ack(message)

    def _settle(self, message: Message, handled: bool) -> None:
        """Account for the message that was in flight.

        One that a forced stop interrupted was not handled, so it is neither counted nor
        acknowledged (a durable bus will redeliver it).
        """
        self.in_flight = None
        if handled:
            self.processed += 1
            self.mailbox.ack(message)
        else:
            self.interrupted += 1

    def _handlers(self, fmt: str) -> tuple[Handler, ...]:
        """The handlers that take messages of format ``fmt``, worked out once per format."""
        handlers = self._dispatch_table.get(fmt)
        return handlers if handlers is not None else self._handlers_for(fmt)

    def _handlers_for(self, fmt: str) -> tuple[Handler, ...]:
        short = fmt.rpartition(".")[2]
        matching = tuple(
            handler
            for handler in type(self.agent).handlers
            if handler.model is dict
            or payload_format(handler.model) == fmt
            or handler.model.__qualname__ == short == fmt
        )
        self._dispatch_table[fmt] = matching
        return matching

    async def dispatch_async(self, message: Message, executor: Executor | None = None) -> None:
        """Like :meth:`dispatch`, from a task on a running event loop.

        ``async def`` handlers are awaited on that loop; sync handlers run in ``executor``
        (the loop's default when None), so that none of them blocks the loop.
        """
        loop = asyncio.get_running_loop()
        handlers = self._handlers(message.format)
        self.in_flight = message
        try:
            for handler in handlers:
                if handler.is_async:
                    await self._run_async_handler(handler, message)
                else:
                    await loop.run_in_executor(executor, self._run_handler, handler, message)
        except BaseException:
            self._settle(message, handled=False)  # cancelled by a stop past its deadline
            raise
        self._settle(message, handled=True)

    def _run_handler(self, handler: Handler, message: Message) -> None:
        if handler.is_async:
            run_coroutine(self._run_async_handler(handler, message))
            return
        args = self._prepare(handler, message)
        attempt = 0
        while args is not None:
            try:
                handler.func(*args)
                return
            except Exception as exc:
                attempt += 1
                if not self.handler_failed(handler, message, exc, attempt):
                    return

    async def _run_async_handler(self, handler: Handler, message: Message) -> None:
        args = self._prepare(handler, message)
        attempt = 0
        while args is not None:
            try:
                await handler.func(*args)
                return
            except Exception as exc:
                attempt += 1
                if not self.handler_failed(handler, message, exc, attempt):
                    return

    def _prepare(self, handler: Handler, message: Message) -> tuple[Any, ...] | None:
        """The handler's arguments: agent, context, dependencies; None (dead-lettered) if
        the payload does not validate."""
        if handler.model is dict:
            payload = message.payload
        else:
            try:
                # The model's own validator: model_validate without its Python wrapper.
                payload = handler.model.__pydantic_validator__.validate_python(message.payload)
            except ValidationError as exc:
                reason = f"payload is not a valid {handler.model.__qualname__}: {exc}"
                self.dead_letter(message, reason, handler.name)
                return None
        ctx = ProcessContext(self, message, payload)
        if not handler.inject:
            return (self.agent, ctx)
        return (self.agent, ctx, *(self.dependencies[name] for name in handler.inject))

    def handler_failed(
        self, handler: Handler, message: Message, exc: Exception, attempt: int
    ) -> bool:
        """Report a raising handler; dead-letter at the end of the budget. True: retry."""
        self.errors += 1
        final = attempt > self.spec.max_retries
        with log_context(agent_id=self.agent_id, message_id=message.id):
            logger.error(
                "handler failed handler=%s attempt=%d final=%s",
                handler.name,
                attempt,
                final,
                exc_info=exc,
            )
        report = ErrorReport(
            guild_id=self.guild.id,
            agent_id=self.agent_id,
            message_id=message.id,
            message_format=message.format,
            handler=handler.name,
            error_type=type(exc).__name__,
            error=str(exc),
            attempt=attempt,
            final=final,
        )
        self.publish(self.error_topic, report, in_response_to=message.id)
        if final:
            self.dead_letter(message, f"{type(exc).__name__}: {exc}", handler.name)
        return not final

    def dead_letter(self, message: Message, reason: str, handler: str = "") -> None:
        """Set ``message`` aside for good; the agent carries on with the next one."""
        self.dead_lettered += 1
        with log_context(agent_id=self.agent_id, message_id=message.id):
            logger.warning("message dead-lettered handler=%s reason=%s", handler, reason)
        self.guild.bus.dead_letter(self.agent_id, message, reason)

    # -- sending ----------------------------------------------------------------------------

    def publish(
        self,
        topic: str,
        payload: BaseModel | dict[str, Any],
        *,
        in_response_to: int | None = None,
        thread: int | None = None,
    ) -> Message:
        """Publish ``payload`` as this agent on ``topic``."""
        fmt, data = encode_payload(payload)
        message = Message(new_id(), topic, self.agent_id, fmt, data, in_response_to, thread)
        self._publish(message)
        return message

    # -- fixtures ---------------------------------------------------------------------------

    def run_fixtures(self, kind: str, agent: Agent[Any] | None = None, *args: Any) -> bool:
        """Run the agent's ``kind`` hooks; a raising hook is logged and contained."""
        agent = agent or self.agent
        ok = True
        for func in type(agent).fixtures.get(kind, ()):
            extra = [self.dependencies[name] for name in _fixture_params(func)]
            try:
                result = func(agent, *args, *extra)
                if inspect.iscoroutine(result):
                    self._run_hook_coroutine(result)
            except Exception:
                ok = False
                with log_context(agent_id=self.agent_id):
                    logger.exception("fixture failed fixture=%s hook=%s", kind, func.__name__)
        return ok

    def _run_hook_coroutine(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run an async hook on the loop the agent's handlers use, when its engine has one:
        the hook can then close what the handlers opened there."""
        loop = self.loop
        if loop is None or not loop.is_running() or _running_loop() is loop:
            run_coroutine(coro)
        else:
            asyncio.run_coroutine_threadsafe(coro, loop).result()

    def has_fixtures(self, kind: str) -> bool:
        """True when the agent defines hooks of ``kind``."""
        return bool(type(self.agent).fixtures.get(kind))


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


@functools.cache
def _fixture_params(func: Callable[..., Any]) -> tuple[str, ...]:
    """The dependency names a fixture takes after ``self`` (and ``previous`` for reload)."""
    params = list(inspect.signature(func).parameters)[1:]
    if getattr(func, "__rustic_fixture__", None) == "reload":
        params = params[1:]  # the previous instance
    return tuple(params)
