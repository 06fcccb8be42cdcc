"""Engines under test, and a harness that runs agents on one and watches from outside."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from conformance_agents import Collector, Item, Seen
from rustic import (
    AgentBuilder,
    AgentSpec,
    BaseExecutionEngine,
    Guild,
    MultithreadedExecutionEngine,
    SyncExecutionEngine,
)
from rustic.engines.aio import AsyncioExecutionEngine
from rustic.engines.processes import MultiprocessExecutionEngine
from rustic.engines.ray import RayExecutionEngine
from waiting import wait_until

EngineFactory = Callable[[], BaseExecutionEngine]

# Every engine joins the conformance suite by adding itself here.
ENGINE_FACTORIES: dict[str, EngineFactory] = {
    "sync": SyncExecutionEngine,
    "multithreaded": lambda: MultithreadedExecutionEngine(
        max_workers=4, thread_name_prefix="conf-"
    ),
    "dedicated": lambda: MultithreadedExecutionEngine(
        thread_name_prefix="own-", dedicated_threads=True
    ),
    "asyncio": lambda: AsyncioExecutionEngine(max_concurrency=64, executor_workers=4),
    "multiprocess": lambda: MultiprocessExecutionEngine(max_workers=2),
    "ray": RayExecutionEngine,  # joins the session's Ray (the `ray_session` fixture)
}

# Engines that need a service: marked, so that `-m "not ray"` leaves them out.
ENGINE_MARKS: dict[str, pytest.MarkDecorator] = {"ray": pytest.mark.ray}


class Harness:
    """A guild whose default engine is the one under test, plus an in-process collector."""

    def __init__(self, engine: BaseExecutionEngine) -> None:
        self.engine = engine
        self.guild = Guild(id="conformance", execution_engine=engine)
        Collector.seen.clear()
        Collector.errors.clear()
        collector = AgentBuilder(Collector).set_id("collector").add_additional_topic("seen")
        collector.add_additional_topic("error_topic").listen_to_default_topic(False)
        self.guild.launch_agent(
            collector.build_spec(), execution_engine=MultithreadedExecutionEngine(max_workers=1)
        )
        self._serving = threading.Event()
        self._driver: threading.Thread | None = None
        if isinstance(engine, SyncExecutionEngine):
            self._driver = threading.Thread(target=engine.serve, args=(self._serving,), daemon=True)
            self._driver.start()

    def launch(self, cls: type[Any], agent_id: str, topic: str = "work", **props: Any) -> str:
        spec: AgentSpec = (
            AgentBuilder(cls)
            .set_id(agent_id)
            .set_properties(props)
            .add_additional_topic(topic)
            .listen_to_default_topic(False)
            .set_max_retries(1)
            .build_spec()
        )
        self.guild.launch_agent(spec)
        return agent_id

    def send(self, n: int, topic: str = "work", delay: float = 0.0) -> None:
        self.guild.publish(topic, Item(n=n, delay=delay))

    def seen(self, agent: str | None = None) -> list[Seen]:
        with Collector.lock:
            return [s for s in Collector.seen if agent is None or s.agent == agent]

    def wait_seen(self, count: int, agent: str | None = None, timeout: float = 15.0) -> list[Seen]:
        wait_until(lambda: len(self.seen(agent)) >= count, timeout, f"{count} seen by {agent}")
        return self.seen(agent)

    def stop(self, timeout: float = 5.0) -> Any:
        self._serving.set()
        if self._driver is not None:
            self._driver.join(timeout)
        return self.guild.stop(timeout=timeout)
