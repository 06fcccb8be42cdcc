"""Agents used by the engine conformance suite; importable by spawned children and actors."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel

from rustic import Agent, AgentFixtures, ProcessContext, processor


class Item(BaseModel):
    """A unit of work."""

    n: int
    delay: float = 0.0


class Seen(BaseModel):
    """What an agent reports about each message it handled."""

    agent: str
    n: int
    started: float
    ended: float
    thread: str
    pid: int


class Marker(BaseModel):
    """Where hooks leave their marks: a folder the test reads."""

    marker_dir: str = ""
    fail_on: list[int] = []


def _report(agent: Agent[Any], ctx: ProcessContext[Item], started: float) -> None:
    ctx.send(
        Seen(
            agent=agent.id,
            n=ctx.payload.n,
            started=started,
            ended=time.monotonic(),
            thread=threading.current_thread().name,
            pid=os.getpid(),
        ),
        topic="seen",
    )


def _mark(props: Marker, name: str) -> None:
    if props.marker_dir:
        Path(props.marker_dir, name).write_text(str(os.getpid()))


class Worker(Agent[Marker]):
    """Handles Items, optionally slowly, reports each on ``seen``; can fail on some ``n``."""

    @processor(Item)
    def work(self, ctx: ProcessContext[Item]) -> None:
        started = time.monotonic()
        if ctx.payload.n in self.config.fail_on:
            raise RuntimeError(f"refusing item {ctx.payload.n}")
        if ctx.payload.delay:
            time.sleep(ctx.payload.delay)  # the work under test, not synchronisation
        _report(self, ctx, started)

    @AgentFixtures.on_startup
    def started(self) -> None:
        _mark(self.config, f"{self.id}.startup")

    @AgentFixtures.on_shutdown
    def stopped(self) -> None:
        _mark(self.config, f"{self.id}.shutdown")


class AsyncWorker(Agent[Marker]):
    """Like Worker, with an ``async def`` handler."""

    @processor(Item)
    async def work(self, ctx: ProcessContext[Item]) -> None:
        started = time.monotonic()
        await asyncio.sleep(ctx.payload.delay)
        _report(self, ctx, started)


class Counter(Agent[Marker]):
    """Keeps a count of its Items in its state."""

    @processor(Item)
    def count(self, ctx: ProcessContext[Item]) -> None:
        total = ctx.state.get().get("count", 0) + 1
        ctx.state.update({"count": total, "last": ctx.payload.n})


class BadHook(Agent[Marker]):
    """An agent whose shutdown hook raises."""

    @processor(Item)
    def work(self, ctx: ProcessContext[Item]) -> None:
        _report(self, ctx, time.monotonic())

    @AgentFixtures.on_shutdown
    def explode(self) -> None:
        raise RuntimeError("hook failure under test")


class Collector(Agent):  # type: ignore[type-arg]
    """Runs in the test process and keeps every Seen and ErrorReport it gets."""

    seen: ClassVar[list[Seen]] = []
    errors: ClassVar[list[dict[str, Any]]] = []
    lock: ClassVar[threading.Lock] = threading.Lock()

    @processor(Seen)
    def keep(self, ctx: ProcessContext[Seen]) -> None:
        with self.lock:
            self.seen.append(ctx.payload)

    @processor(dict)
    def keep_errors(self, ctx: ProcessContext[dict[str, Any]]) -> None:
        if ctx.message.topic == "error_topic":
            with self.lock:
                self.errors.append(ctx.payload)
