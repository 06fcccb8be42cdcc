"""Small agents shared by the library tests."""

from __future__ import annotations

import threading
from typing import Any, ClassVar

from pydantic import BaseModel

from rustic import Agent, AgentFixtures, ProcessContext, processor
from rustic.deps import KeyValueStore


class Greeting(BaseModel):
    """Someone to greet."""

    name: str


class Reply(BaseModel):
    """A greeting's answer."""

    text: str


class GreeterProps(BaseModel):
    """How a greeter greets."""

    greeting: str = "Hello"


class Greeter(Agent[GreeterProps]):
    """Answers each Greeting on the default topic."""

    @processor(Greeting)
    def greet(self, ctx: ProcessContext[Greeting]) -> None:
        thread = threading.current_thread().name
        ctx.send(Reply(text=f"{self.config.greeting}, {ctx.payload.name} [{thread}]"))


class Recorder(Agent):  # type: ignore[type-arg]
    """Keeps every message it gets, by agent id, in a class-level journal."""

    journal: ClassVar[dict[str, list[tuple[str, Any]]]] = {}
    lock: ClassVar[threading.Lock] = threading.Lock()

    @processor(dict)
    def record(self, ctx: ProcessContext[dict[str, Any]]) -> None:
        with self.lock:
            self.journal.setdefault(self.id, []).append((ctx.message.format, ctx.payload))

    @classmethod
    def of(cls, agent_id: str) -> list[tuple[str, Any]]:
        with cls.lock:
            return list(cls.journal.get(agent_id, []))


class Twice(Agent):  # type: ignore[type-arg]
    """Two handlers for one format, and one for any: all run, in declaration order."""

    order: ClassVar[list[str]] = []

    @processor(Greeting)
    def first(self, ctx: ProcessContext[Greeting]) -> None:
        self.order.append("first")

    @processor(dict)
    def any_message(self, ctx: ProcessContext[dict[str, Any]]) -> None:
        self.order.append("any")

    @processor(Greeting)
    def second(self, ctx: ProcessContext[Greeting]) -> None:
        self.order.append("second")


class Chatty(Agent):  # type: ignore[type-arg]
    """Sends on a topic it listens to itself, and replies to whoever wrote."""

    @processor(Greeting)
    def chat(self, ctx: ProcessContext[Greeting]) -> None:
        ctx.send(Greeting(name="echo"), topic="chat")
        ctx.reply(Reply(text=f"got {ctx.payload.name}"))


class Counting(Agent):  # type: ignore[type-arg]
    """Counts Greetings in an injected store and in its state."""

    @processor(Greeting)
    def count(self, ctx: ProcessContext[Greeting], store: KeyValueStore) -> None:
        store.incr(self.id)
        ctx.state.update({"seen": ctx.state.get().get("seen", 0) + 1})

    @AgentFixtures.on_shutdown
    def bye(self, store: KeyValueStore) -> None:
        store.set(f"{self.id}:bye", True)
