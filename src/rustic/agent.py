"""The ``Agent`` base class, the ``processor`` decorator, ``ProcessContext`` and fixtures."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar, get_args, get_origin

from pydantic import BaseModel, ConfigDict

from rustic.message import Message

if TYPE_CHECKING:
    from rustic.spec import AgentSpec
    from rustic.state import StateHandle
    from rustic.wrapper import AgentWrapper

P = TypeVar("P", bound=BaseModel)
T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

_PROCESSOR_ATTR = "__rustic_processor__"
_FIXTURE_ATTR = "__rustic_fixture__"
_CTX_PARAMS = 2  # (self, ctx): what a handler takes before its injected dependencies


class NoProperties(BaseModel):
    """The properties model of an agent that declares none: it accepts no keys."""

    model_config = ConfigDict(extra="forbid")


def format_name(model: type[Any]) -> str:
    """Return the ``format`` that messages carrying ``model`` payloads are tagged with."""
    if model is dict:
        return "dict"
    return f"{model.__module__}.{model.__qualname__}"


@dataclass(frozen=True, slots=True)
class Handler:
    """One ``@processor`` method of an agent class, as the dispatcher sees it."""

    name: str
    model: type[Any]
    func: Callable[..., Any]
    is_async: bool
    inject: tuple[str, ...]


def processor(model: type[Any]) -> Callable[[F], F]:
    """Mark a method as the handler of messages whose payload is a ``model``.

    ``model`` is a pydantic model, or ``dict`` for every message whatever its format. The
    method takes ``(self, ctx)`` and then, by parameter name, any dependency of the
    agent's ``dependency_map``. It may be ``async def``.
    """
    if model is not dict and not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise TypeError(f"processor() takes a pydantic model class or dict, got {model!r}")

    def mark(func: F) -> F:
        setattr(func, _PROCESSOR_ATTR, model)
        return func

    return mark


class AgentFixtures:
    """Lifecycle hooks of an agent; each decorates a method of the agent class."""

    @staticmethod
    def on_startup(func: F) -> F:
        """Run after the agent is built, before its first message."""
        setattr(func, _FIXTURE_ATTR, "startup")
        return func

    @staticmethod
    def on_shutdown(func: F) -> F:
        """Run when the agent stops for good (stop_agent or guild stop)."""
        setattr(func, _FIXTURE_ATTR, "shutdown")
        return func

    @staticmethod
    def on_reload(func: F) -> F:
        """Run on the new instance during a hot swap; it receives the previous instance."""
        setattr(func, _FIXTURE_ATTR, "reload")
        return func


def _injected_names(func: Callable[..., Any], skip: int) -> tuple[str, ...]:
    params = list(inspect.signature(func).parameters.values())[skip:]
    return tuple(p.name for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD)


def _properties_model_of(cls: type[Any]) -> type[BaseModel] | None:
    for base in getattr(cls, "__orig_bases__", ()):
        if get_origin(base) is Agent:
            (arg,) = get_args(base)
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                return arg
    return None


class Agent(Generic[P]):
    """Base class of every agent: subclass it as ``class Greeter(Agent[GreeterProps])``.

    The runtime builds the instance from its spec: ``id``, ``name``, ``description``,
    ``config`` (the validated properties), ``spec``, ``guild_id`` and ``state`` are set
    before ``__init__`` runs, so a constructor may read them. An agent handles one message
    at a time on every engine.
    """

    properties_model: ClassVar[type[BaseModel]] = NoProperties
    handlers: ClassVar[tuple[Handler, ...]] = ()
    fixtures: ClassVar[dict[str, tuple[Callable[..., Any], ...]]] = {}

    id: str
    name: str
    description: str
    config: P
    spec: AgentSpec
    guild_id: str
    _wrapper: AgentWrapper
    _dependencies: dict[str, Any]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        model = _properties_model_of(cls)
        if model is not None:
            cls.properties_model = model
        cls.handlers, cls.fixtures = _collect(cls)

    @property
    def state(self) -> StateHandle:
        """The agent's state handle; it survives hot swaps of the agent."""
        return self._wrapper.state

    def __repr__(self) -> str:
        return f"<{type(self).__qualname__} id={getattr(self, 'id', '?')!r}>"


def _collect(
    cls: type[Any],
) -> tuple[tuple[Handler, ...], dict[str, tuple[Callable[..., Any], ...]]]:
    """Find the processors and fixtures of ``cls`` in declaration order, bases first."""
    members: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        members.update(vars(klass))

    handlers: list[Handler] = []
    fixtures: dict[str, list[Callable[..., Any]]] = {}
    for name, func in members.items():
        model = getattr(func, _PROCESSOR_ATTR, None)
        if model is not None:
            handlers.append(
                Handler(
                    name=name,
                    model=model,
                    func=func,
                    is_async=inspect.iscoroutinefunction(func),
                    inject=_injected_names(func, _CTX_PARAMS),
                )
            )
        kind = getattr(func, _FIXTURE_ATTR, None)
        if kind is not None:
            fixtures.setdefault(kind, []).append(func)
    return tuple(handlers), {kind: tuple(funcs) for kind, funcs in fixtures.items()}


class ProcessContext(Generic[T]):
    """What a handler gets: the message, its validated payload, and ways to answer."""

    __slots__ = ("_wrapper", "message", "payload")

    def __init__(self, wrapper: AgentWrapper, message: Message, payload: T) -> None:
        self._wrapper = wrapper
        self.message = message
        self.payload = payload

    @property
    def agent_id(self) -> str:
        """Id of the agent handling the message."""
        return self._wrapper.agent_id

    @property
    def state(self) -> StateHandle:
        """The handling agent's state handle."""
        return self._wrapper.state

    def send(self, payload: BaseModel | dict[str, Any], topic: str | None = None) -> Message:
        """Publish ``payload`` in response to this message, on ``topic`` or the default topic."""
        return self._wrapper.publish(
            topic or self._wrapper.default_topic,
            payload,
            in_response_to=self.message.id,
            thread=self.message.thread or self.message.id,
        )

    def reply(self, payload: BaseModel | dict[str, Any]) -> Message:
        """Send ``payload`` straight to the inbox of this message's sender."""
        return self.send(payload, topic=inbox_topic(self.message.sender))


def inbox_topic(agent_id: str) -> str:
    """Return the topic of ``agent_id``'s inbox."""
    return f"agent_inbox:{agent_id}"
