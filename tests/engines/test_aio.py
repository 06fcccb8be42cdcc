"""The asyncio engine: async handlers share one loop, sync ones run beside it in a pool."""

from __future__ import annotations

import asyncio
import itertools
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel

from daemon_harness import Rustic, wait_until, write_guild
from rustic import (
    Agent,
    AgentBuilder,
    AgentFixtures,
    EngineSpec,
    Guild,
    GuildSpec,
    ProcessContext,
    processor,
)
from rustic.engines import create_engine
from rustic.engines.aio import AsyncioExecutionEngine, HandlerPool

AGENTS = 200
IO_DELAY = 0.05


class Call(BaseModel):
    """Ask an agent to do its IO; ``port`` is where the slow server listens."""

    n: int = 0
    port: int = 0
    delay: float = 0.0


class Log:
    """What agents did, kept in the test process; waited on without sleeping."""

    cond: ClassVar[threading.Condition] = threading.Condition()
    entries: ClassVar[list[dict[str, Any]]] = []

    @classmethod
    def add(cls, **entry: Any) -> None:
        with cls.cond:
            cls.entries.append(entry)
            cls.cond.notify_all()

    @classmethod
    def wait_for(cls, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        with cls.cond:
            if not cls.cond.wait_for(lambda: len(cls.entries) >= count, timeout):
                pytest.fail(f"{len(cls.entries)} of {count} log entries after {timeout}s")
            return list(cls.entries)


class Caller(Agent):  # type: ignore[type-arg]
    """Opens a TCP connection, sends a line and awaits the reply: one real IO call."""

    @processor(Call)
    async def call(self, ctx: ProcessContext[Call]) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", ctx.payload.port)
        writer.write(b"ping\n")
        await writer.drain()
        reply = await reader.readline()
        writer.close()
        await writer.wait_closed()
        Log.add(agent=self.id, reply=reply, thread=threading.current_thread().name)


class Napper(Agent):  # type: ignore[type-arg]
    """Awaits ``delay`` seconds per message, recording when it started and ended."""

    running: ClassVar[int] = 0
    peak: ClassVar[int] = 0

    @processor(Call)
    async def nap(self, ctx: ProcessContext[Call]) -> None:
        started = time.monotonic()
        with Log.cond:
            type(self).running += 1
            type(self).peak = max(type(self).peak, type(self).running)
        try:
            await asyncio.sleep(ctx.payload.delay)
        finally:
            with Log.cond:
                type(self).running -= 1
        Log.add(agent=self.id, n=ctx.payload.n, started=started, ended=time.monotonic())

    @AgentFixtures.on_shutdown
    def stopped(self) -> None:
        Log.add(agent=self.id, hook="shutdown")


class Blocker(Agent):  # type: ignore[type-arg]
    """A sync handler that blocks its thread for ``delay`` seconds."""

    @processor(Call)
    def block(self, ctx: ProcessContext[Call]) -> None:
        time.sleep(ctx.payload.delay)  # the blocking work under test, not synchronisation
        Log.add(agent=self.id, n=ctx.payload.n, thread=threading.current_thread().name)


class Mixed(Agent):  # type: ignore[type-arg]
    """One sync and one async handler for the same message, in that order."""

    @processor(Call)
    def first(self, ctx: ProcessContext[Call]) -> None:
        Log.add(agent=self.id, step="sync", n=ctx.payload.n, thread=threading.current_thread().name)

    @processor(Call)
    async def second(self, ctx: ProcessContext[Call]) -> None:
        await asyncio.sleep(0)
        Log.add(
            agent=self.id, step="async", n=ctx.payload.n, thread=threading.current_thread().name
        )


class Flaky(Agent):  # type: ignore[type-arg]
    """An async handler that fails the first time it sees each message."""

    tried: ClassVar[set[int]] = set()

    @processor(Call)
    async def once_more(self, ctx: ProcessContext[Call]) -> None:
        await asyncio.sleep(0)
        if ctx.payload.n not in type(self).tried:
            type(self).tried.add(ctx.payload.n)
            raise ConnectionError(f"flaky call {ctx.payload.n}")
        Log.add(agent=self.id, n=ctx.payload.n)


class Session(Agent):  # type: ignore[type-arg]
    """Opens a loop-bound resource in its handler and closes it in an async shutdown hook."""

    def __init__(self) -> None:
        self.opened: asyncio.Queue[int] | None = None

    @processor(Call)
    async def use(self, ctx: ProcessContext[Call]) -> None:
        if self.opened is None:
            self.opened = asyncio.Queue()
        await self.opened.put(ctx.payload.n)
        Log.add(agent=self.id, loop=id(asyncio.get_running_loop()))

    @AgentFixtures.on_shutdown
    async def close(self) -> None:
        assert self.opened is not None
        await asyncio.wait_for(self.opened.get(), timeout=1)  # fails on a foreign loop
        Log.add(agent=self.id, hook="shutdown", loop=id(asyncio.get_running_loop()))


class Meddler(Agent):  # type: ignore[type-arg]
    """An async handler that tries to pause its own engine from the loop."""

    @processor(Call)
    async def meddle(self, ctx: ProcessContext[Call]) -> None:
        engine = self._wrapper.guild.engine_of(self.id)
        engine.pause(self.id, timeout=1)


@pytest.fixture(autouse=True)
def _clean_log() -> None:
    with Log.cond:
        Log.entries.clear()
    Napper.running = Napper.peak = 0
    Flaky.tried.clear()


@pytest.fixture
def slow_server() -> Iterator[int]:
    """A TCP server on its own loop that answers each line after ``IO_DELAY`` seconds."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    closing = asyncio.Event()
    ports: list[int] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        await asyncio.sleep(IO_DELAY)
        writer.write(b"pong\n")
        await writer.drain()
        writer.close()

    async def serve() -> None:
        server = await asyncio.start_server(answer, "127.0.0.1", 0, backlog=1024)
        ports.append(server.sockets[0].getsockname()[1])
        started.set()
        async with server:
            await closing.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert started.wait(5)
    yield ports[0]
    loop.call_soon_threadsafe(closing.set)
    thread.join(5)
    loop.close()


def launch(guild: Guild, cls: type[Agent[Any]], agent_id: str, topic: str = "calls") -> None:
    spec = (
        AgentBuilder(cls)
        .set_id(agent_id)
        .add_additional_topic(topic)
        .listen_to_default_topic(False)
        .set_max_retries(1)
        .build_spec()
    )
    guild.launch_agent(spec)


def test_200_agents_each_awaiting_a_50ms_io_call_finish_well_under_a_second(
    slow_server: int,
) -> None:
    # Given 200 agents whose handler makes one 50 ms round trip to a TCP server
    guild = Guild(id="io", execution_engine=AsyncioExecutionEngine())
    for n in range(AGENTS):
        launch(guild, Caller, f"caller-{n}")

    # When one message reaches all of them
    started = time.monotonic()
    guild.publish("calls", Call(port=slow_server))
    entries = Log.wait_for(AGENTS)
    elapsed = time.monotonic() - started
    guild.stop(timeout=5)

    # Then they waited together: far less than 200 x 50 ms, all on the loop's thread
    print(f"\n200 agents x 50 ms IO: {elapsed * 1000:.0f} ms")
    assert elapsed < 0.5
    assert {entry["reply"] for entry in entries} == {b"pong\n"}
    assert {entry["thread"] for entry in entries} == {"rustic-asyncio"}


def test_an_async_agent_handles_one_message_at_a_time_in_order() -> None:
    guild = Guild(id="order", execution_engine=AsyncioExecutionEngine())
    launch(guild, Napper, "napper")
    for n in range(30):
        guild.publish("calls", Call(n=n, delay=0.001))
    entries = Log.wait_for(30)
    guild.stop(timeout=5)
    assert [entry["n"] for entry in entries] == list(range(30))
    assert all(b["started"] >= a["ended"] for a, b in itertools.pairwise(entries))


def test_max_concurrency_bounds_how_many_agents_handle_a_message_at_once() -> None:
    # Given ten async agents on an engine that lets three work at a time
    guild = Guild(id="bounded", execution_engine=AsyncioExecutionEngine(max_concurrency=3))
    for n in range(10):
        launch(guild, Napper, f"napper-{n}")

    # When each gets two messages that take a while
    for n in range(2):
        guild.publish("calls", Call(n=n, delay=0.02))

    # Then all twenty are handled, never more than three at once
    Log.wait_for(20)
    guild.stop(timeout=5)
    assert Napper.peak == 3


def test_a_blocking_sync_handler_runs_on_a_pool_thread_and_leaves_the_loop_free() -> None:
    # Given a sync agent that blocks for 0.5 s and an async agent on the same engine
    guild = Guild(id="offloop", execution_engine=AsyncioExecutionEngine())
    launch(guild, Blocker, "blocker", topic="slow")
    launch(guild, Napper, "napper", topic="fast")

    # When the blocker is busy and the async agent gets a message
    started = time.monotonic()
    guild.publish("slow", Call(delay=0.5))
    guild.publish("fast", Call(n=7))

    # Then the async agent answers long before the blocker is done
    (fast,) = Log.wait_for(1)
    assert fast["agent"] == "napper"
    assert fast["ended"] - started < 0.3
    slow = Log.wait_for(2)[1]
    assert slow["thread"].startswith("rustic-asyncio-sync-")
    guild.stop(timeout=5)


def test_sync_and_async_handlers_of_one_message_run_in_declaration_order() -> None:
    guild = Guild(id="mixed", execution_engine=AsyncioExecutionEngine())
    launch(guild, Mixed, "mixed")
    for n in range(3):
        guild.publish("calls", Call(n=n))
    entries = Log.wait_for(6)
    guild.stop(timeout=5)
    assert [(e["n"], e["step"]) for e in entries] == [
        (n, step) for n in range(3) for step in ("sync", "async")
    ]
    assert {e["thread"] for e in entries if e["step"] == "async"} == {"rustic-asyncio"}
    assert all(
        e["thread"].startswith("rustic-asyncio-sync-") for e in entries if e["step"] == "sync"
    )


def test_a_failing_async_handler_is_retried_on_the_loop() -> None:
    guild = Guild(id="retry", execution_engine=AsyncioExecutionEngine())
    launch(guild, Flaky, "flaky")
    guild.publish("calls", Call(n=1))
    assert Log.wait_for(1) == [{"agent": "flaky", "n": 1}]
    assert guild.run_until_idle(timeout=5)
    wrapper = guild.wrapper("flaky")
    assert (wrapper.processed, wrapper.errors, wrapper.dead_lettered) == (1, 1, 0)
    guild.stop(timeout=5)


def test_the_loop_starts_at_the_first_launch_on_a_named_daemon_thread_and_joins_at_shutdown() -> (
    None
):
    # Given a new engine: no loop yet
    engine = AsyncioExecutionEngine(thread_name_prefix="aio-under-test")
    assert not [t for t in threading.enumerate() if t.name == "aio-under-test"]

    # When an agent launches, the loop thread runs, and tracking names it
    guild = Guild(id="lazy", execution_engine=engine)
    launch(guild, Napper, "napper")
    (thread,) = [t for t in threading.enumerate() if t.name == "aio-under-test"]
    assert thread.daemon
    assert [info.where for info in engine.agents()] == ["aio-under-test"]

    # Then shutdown joins it, and the engine takes no more agents
    report = guild.stop(timeout=5)
    assert report.clean
    assert not thread.is_alive()
    other = Guild(id="other")
    launch(other, Napper, "late")
    with pytest.raises(RuntimeError, match="shut down"):
        engine.launch(other.wrapper("late"))
    other.stop(timeout=1)


def test_a_stuck_async_handler_is_cancelled_at_shutdown_without_being_acknowledged() -> None:
    # Given an async agent awaiting something that will not come for a minute
    guild = Guild(id="stuck", execution_engine=AsyncioExecutionEngine())
    launch(guild, Napper, "napper")
    guild.publish("calls", Call(delay=60))
    wrapper = guild.wrapper("napper")
    wait_until(lambda: wrapper.in_flight is not None)

    # When the guild stops with a short timeout
    started = time.monotonic()
    report = guild.stop(timeout=0.3)

    # Then the handler is named and cancelled, the hook ran and the loop thread joined
    assert time.monotonic() - started < 3
    assert report.stuck_agents == ["napper"]
    assert report.not_joined == []
    assert (wrapper.processed, wrapper.interrupted) == (0, 1)
    assert {"agent": "napper", "hook": "shutdown"} in Log.entries


def test_stop_agent_cancels_an_async_handler_past_its_deadline_and_frees_its_slot() -> None:
    # Given one slot, held by an agent stuck in an await, and another agent with mail
    guild = Guild(id="slot", execution_engine=AsyncioExecutionEngine(max_concurrency=1))
    launch(guild, Napper, "stuck", topic="stuck")
    launch(guild, Napper, "next", topic="next")
    guild.publish("stuck", Call(delay=60))
    wait_until(lambda: guild.wrapper("stuck").in_flight is not None)
    guild.publish("next", Call(n=2))

    # When the stuck agent is stopped with a short timeout
    assert not guild.stop_agent("stuck", timeout=0.2)

    # Then its slot goes to the other agent
    assert [e.get("n") for e in Log.wait_for(2) if e["agent"] == "next"] == [2]
    assert guild.stop(timeout=5).clean


def test_an_async_shutdown_hook_runs_on_the_loop_of_the_handlers() -> None:
    # Given an agent whose handler opened a loop-bound queue on the engine's loop
    guild = Guild(id="hooks", execution_engine=AsyncioExecutionEngine())
    launch(guild, Session, "session")
    guild.publish("calls", Call(n=5))
    (used,) = Log.wait_for(1)

    # When the guild stops
    report = guild.stop(timeout=5)

    # Then the async hook could use the queue: it ran on that same loop
    assert report.clean
    assert Log.entries[1] == {"agent": "session", "hook": "shutdown", "loop": used["loop"]}


def test_a_handler_on_the_loop_may_not_call_what_waits_for_the_loop() -> None:
    guild = Guild(id="meddle", execution_engine=AsyncioExecutionEngine())
    launch(guild, Meddler, "meddler")
    guild.publish("calls", Call())
    assert guild.run_until_idle(timeout=5)
    (dead,) = guild.bus.dead_letters()
    assert "cannot run on it" in dead.reason
    guild.stop(timeout=5)


def test_the_engine_is_built_by_name_with_its_knobs_from_a_spec() -> None:
    spec = EngineSpec(
        engine="asyncio",
        max_concurrency=5,
        max_workers=3,
        thread_name_prefix="bots",
        options={"batch_size": 7},
    )
    engine = create_engine(spec)
    assert isinstance(engine, AsyncioExecutionEngine)
    assert (engine.max_concurrency, engine.pool.max_workers, engine.batch_size) == (5, 3, 7)
    assert engine.thread_name_prefix == "bots"
    assert isinstance(create_engine("asyncio"), AsyncioExecutionEngine)


def test_a_guild_spec_runs_one_agent_on_asyncio_and_the_rest_on_the_default() -> None:
    spec = GuildSpec.model_validate(
        {
            "id": "per-agent",
            "name": "Per agent",
            "agents": [
                {"id": "plain", "name": "Plain", "class_name": Blocker},
                {
                    "id": "io",
                    "name": "IO",
                    "class_name": Napper,
                    "additional_topics": ["calls"],
                    "execution": {"engine": "asyncio", "max_concurrency": 4},
                },
            ],
        }
    )
    guild = Guild.from_spec(spec)
    io_engine = guild.engine_of("io")
    assert isinstance(io_engine, AsyncioExecutionEngine)
    assert io_engine.max_concurrency == 4
    assert guild.engine_of("plain").name == "sync"
    guild.publish("calls", Call(n=1))
    assert Log.wait_for(1)[0]["agent"] == "io"
    guild.stop(timeout=5)


def test_the_handler_pool_starts_threads_on_demand_up_to_its_bound() -> None:
    pool = HandlerPool(max_workers=2, thread_name_prefix="pool-under-test-")
    gate = threading.Event()
    futures = [pool.submit(gate.wait, 5) for _ in range(4)]
    names = {t.name for t in threading.enumerate() if t.name.startswith("pool-under-test-")}
    assert names == {"pool-under-test-0", "pool-under-test-1"}
    gate.set()
    assert [f.result(5) for f in futures] == [True] * 4
    assert pool.close(5) == []
    with pytest.raises(RuntimeError, match="closed"):
        pool.submit(int)


PINGER_MODULE = """
    import asyncio
    from pathlib import Path
    from typing import Any

    from pydantic import BaseModel

    from rustic import Agent, AgentFixtures, ProcessContext, processor


    class PingerProps(BaseModel):
        marker: str


    class Pinger(Agent[PingerProps]):
        @processor(dict)
        async def ping(self, ctx: ProcessContext[dict[str, Any]]) -> None:
            await asyncio.sleep(0.01)

        @AgentFixtures.on_shutdown
        async def bye(self) -> None:
            await asyncio.sleep(0)
            Path(self.config.marker).write_text("async hook ran")
"""


def test_the_daemon_runs_a_guild_on_the_asyncio_engine_end_to_end(
    rustic: Rustic, tmp_path: Path
) -> None:
    # Given a daemon running a guild whose spec picks the asyncio engine
    folder = tmp_path / "g"
    guild_file = write_guild(
        folder,
        f"""
        id: pings
        name: Pings
        execution: {{engine: asyncio, max_concurrency: 8}}
        agents:
          - id: pinger
            name: Pinger
            class_name: agents.pinger.Pinger
            properties: {{marker: "{folder / "hook-ran"}"}}
            additional_topics: [pings]
            listen_to_default_topic: false
        """,
        {"agents/__init__.py": "", "agents/pinger.py": PINGER_MODULE},
    )
    daemon = rustic.start(guild_file)

    # When 20 messages are sent through the CLI
    for n in range(20):
        assert rustic.cli("send", "pings", f'{{"n": {n}}}').exit_code == 0
    wait_until(lambda: daemon.status()["by_id"]["pinger"]["processed"] == 20, what="20 pings")

    # Then the agent ran on the loop's thread, and SIGTERM stops the daemon cleanly
    pinger = daemon.status()["by_id"]["pinger"]
    assert (pinger["engine"], pinger["where"]) == ("asyncio", "rustic-asyncio")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0, daemon.stderr()
    assert "handled=20" in daemon.last_line()
    assert (folder / "hook-ran").read_text() == "async hook ran"
