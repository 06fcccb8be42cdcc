"""Agents for the multiprocess and Ray engine tests; importable by child processes and actors."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import ClassVar

from pydantic import BaseModel

from rustic import Agent, AgentFixtures, ProcessContext, processor
from rustic.deps import KeyValueStore


class Job(BaseModel):
    """A unit of work; ``kill`` makes the handler kill the process it runs in."""

    n: int
    kill: bool = False
    delay: float = 0.0


class Done(BaseModel):
    """What a remote agent reports for each job, and from where."""

    agent: str
    n: int
    pid: int
    version: str = ""
    count: int = 0
    cpus: float = 0.0


class Plain(BaseModel):
    """Nothing to configure."""


class Reporter(Agent[Plain]):
    """Reports every job on ``done``; a job with ``kill`` set SIGKILLs its own process."""

    @processor(Job)
    def work(self, ctx: ProcessContext[Job]) -> None:
        if ctx.payload.kill:
            os.kill(os.getpid(), signal.SIGKILL)
        if ctx.payload.delay:
            time.sleep(ctx.payload.delay)  # the work under test, not synchronisation
        ctx.send(Done(agent=self.id, n=ctx.payload.n, pid=os.getpid()), topic="done")


class Tally(Agent[Plain]):
    """Counts its jobs in its state (from on_startup on) and in an agent-scoped store."""

    @AgentFixtures.on_startup
    def begin(self) -> None:
        state = self.state.get()
        self.state.update({"starts": state.get("starts", 0) + 1, "pid": os.getpid()})

    @processor(Job)
    def count(self, ctx: ProcessContext[Job], store: KeyValueStore) -> None:
        total = ctx.state.get().get("count", 0) + 1
        ctx.state.update({"count": total, "last": ctx.payload.n})
        seen_here = store.incr("jobs")
        ctx.send(Done(agent=self.id, n=ctx.payload.n, pid=os.getpid(), count=seen_here), "done")


class Placed(Agent[Plain]):
    """Reports the CPUs that Ray reserved for the actor it runs in."""

    @processor(Job)
    def report(self, ctx: ProcessContext[Job]) -> None:
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0)
        ctx.send(Done(agent=self.id, n=ctx.payload.n, pid=os.getpid(), cpus=cpus), "done")


class DoneLog(Agent[Plain]):
    """Runs in the test process and keeps every Done it gets."""

    done: ClassVar[list[Done]] = []
    lock: ClassVar[threading.Lock] = threading.Lock()

    @processor(Done)
    def keep(self, ctx: ProcessContext[Done]) -> None:
        with self.lock:
            self.done.append(ctx.payload)

    @classmethod
    def reset(cls) -> None:
        """Forget what earlier tests kept."""
        with cls.lock:
            cls.done.clear()

    @classmethod
    def of(cls, agent: str) -> list[Done]:
        """What ``agent`` reported, in arrival order."""
        with cls.lock:
            return [done for done in cls.done if done.agent == agent]
