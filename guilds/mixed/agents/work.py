"""A job split into tasks, squared on a thread pool, tallied on the main thread."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from pydantic import BaseModel, Field

from rustic import Agent, AgentFixtures, ProcessContext, processor

logger = logging.getLogger(__name__)


class Job(BaseModel):
    """Square the numbers 1..count: `rustic send jobs '{"count": 10}'`."""

    count: int = Field(ge=1, le=100_000)


class Task(BaseModel):
    """One number of a job."""

    job: int
    size: int
    n: int


class Result(BaseModel):
    """One squared number, and the thread that squared it."""

    job: int
    size: int
    square: int
    thread: str


class Dispatcher(Agent):
    """Splits each job into tasks; both squarers receive each task and take turns by parity."""

    @processor(dict)
    def dispatch(self, ctx: ProcessContext[dict[str, Any]]) -> None:
        """Accept any format, so that a bare `rustic send` works."""
        job = Job.model_validate(ctx.payload)
        for n in range(1, job.count + 1):
            ctx.send(Task(job=ctx.message.id, size=job.count, n=n), topic="tasks")


class Squarer(Agent):
    """Squares the tasks of its parity: `squarer-a` the odd ones, `squarer-b` the even ones."""

    @processor(Task)
    def square(self, ctx: ProcessContext[Task]) -> None:
        """Publish the square of the number, if it is ours."""
        task = ctx.payload
        if task.n % 2 == (1 if self.id.endswith("a") else 0):
            thread = threading.current_thread().name
            result = Result(job=task.job, size=task.size, square=task.n * task.n, thread=thread)
            ctx.send(result, topic="results")


class Tally(Agent):
    """Sums the squares of each job; prints the sum and the threads once the job is complete."""

    def __init__(self) -> None:
        self.jobs: dict[int, list[Result]] = {}

    @processor(Result)
    def add(self, ctx: ProcessContext[Result]) -> None:
        """Collect one result; print when the job's last one arrives."""
        result = ctx.payload
        done = self.jobs.setdefault(result.job, [])
        done.append(result)
        if len(done) == result.size:
            del self.jobs[result.job]
            total = sum(item.square for item in done)
            threads = ",".join(sorted({item.thread for item in done}))
            print(f"job of {result.size}: sum of squares {total} (threads {threads})", flush=True)


class Auditor(Agent):
    """Counts results per worker thread in its state, from an async handler."""

    @processor(Result)
    async def audit(self, ctx: ProcessContext[Result]) -> None:
        """Record which thread squared this number."""
        await asyncio.sleep(0)  # an async handler may await; the engine runs it on its loop
        seen = ctx.state.get().get("by_thread", {})
        seen[ctx.payload.thread] = seen.get(ctx.payload.thread, 0) + 1
        ctx.state.update({"by_thread": seen})

    @AgentFixtures.on_shutdown
    def summary(self) -> None:
        """Log the counts per thread."""
        logger.info("auditor stopping by_thread=%s", self.state.get().get("by_thread", {}))
