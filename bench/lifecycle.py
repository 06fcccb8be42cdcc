"""Lifecycle costs: launching 1,000 agents, their idle memory, stopping, hot swaps, watch.

Run with ``make bench``. Each row is measured in this run on this machine.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import tempfile
import textwrap
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel

from rustic import Agent, AgentBuilder, AgentSpec, Guild, ProcessContext, processor
from rustic.engines import create_engine


class Ping(BaseModel):
    """A message nobody in the launch test gets."""

    n: int


class Idle(Agent):  # type: ignore[type-arg]
    """An agent with one handler that is never called here."""

    @processor(Ping)
    def ping(self, ctx: ProcessContext[Ping]) -> None:
        return None


def idle_specs(count: int) -> list[AgentSpec]:
    return [AgentBuilder(Idle).set_id(f"idle-{n}").build_spec() for n in range(count)]


def launch_cost(engine: str, count: int) -> tuple[float, float]:
    """Seconds to launch ``count`` agents, and idle bytes per agent (Python heap).

    Timed and weighed in two separate launches: tracing allocations slows a launch down.
    """
    guild = Guild(id="launch", execution_engine=engine)
    specs = idle_specs(count)
    started = time.perf_counter()
    for spec in specs:
        guild.launch_agent(spec)
    elapsed = time.perf_counter() - started
    guild.stop(timeout=5)

    specs = idle_specs(count)
    gc.collect()
    tracemalloc.start()
    guild = Guild(id="launch", execution_engine=engine)
    before = tracemalloc.get_traced_memory()[0]
    for spec in specs:
        guild.launch_agent(spec)
    gc.collect()
    per_agent = (tracemalloc.get_traced_memory()[0] - before) / count
    tracemalloc.stop()
    guild.stop(timeout=5)
    return elapsed, per_agent


def idle_stop(engine: str, count: int) -> float:
    """Seconds for an idle guild of ``count`` agents to stop."""
    guild = Guild(id="stop", execution_engine=engine)
    for spec in idle_specs(count):
        guild.launch_agent(spec)
    started = time.perf_counter()
    guild.stop(timeout=5)
    return time.perf_counter() - started


RELAY_MODULE = """
    from pydantic import BaseModel
    from rustic import Agent, ProcessContext, processor

    VERSION = {version}


    class Hop(BaseModel):
        seq: int


    class Relay(Agent):
        @processor(Hop)
        def forward(self, ctx: ProcessContext[Hop]) -> None:
            ctx.send(Hop(seq=ctx.payload.seq), topic="out")


    class Sink(Agent):
        count = 0

        @processor(Hop)
        def land(self, ctx: ProcessContext[Hop]) -> None:
            type(self).count += 1
"""


@contextlib.contextmanager
def relay_project(package: str) -> Iterator[tuple[Path, Path]]:
    """A throwaway project folder holding ``package.relay``; yields it and the module file."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / package).mkdir()
        (root / package / "__init__.py").write_text("")
        module = root / package / "relay.py"
        module.write_text(textwrap.dedent(RELAY_MODULE.format(version=0)))
        sys.path.insert(0, tmp)
        try:
            yield root, module
        finally:
            while tmp in sys.path:
                sys.path.remove(tmp)
            for name in [m for m in sys.modules if m.split(".")[0] == package]:
                del sys.modules[name]


def reload_under_load(engine: str, seconds: float) -> tuple[float, float, float, float]:
    """Reload pause p50/p95 (ms) and relay rate steady vs. with a reload every 100 ms."""
    with relay_project("benchproj") as (root, module):
        steady = _relay_rate(engine, root, seconds, reload_every=None, module=module)
        loaded = _relay_rate(engine, root, seconds, reload_every=0.1, module=module)
    pauses = loaded[1]
    p95 = statistics.quantiles(pauses, n=20)[-1] if len(pauses) >= 2 else pauses[0]
    return statistics.median(pauses), p95, steady[0], loaded[0]


def _relay_rate(
    engine_name: str, root: Path, seconds: float, reload_every: float | None, module: Path
) -> tuple[float, list[float]]:
    engine = create_engine(engine_name)
    guild = Guild(id="reloadbench", execution_engine=engine, app_dir=root)
    relay = AgentSpec(
        id="relay", name="relay", class_name="benchproj.relay.Relay", additional_topics=["in"]
    )
    sink = AgentSpec(
        id="sink", name="sink", class_name="benchproj.relay.Sink", additional_topics=["out"]
    )
    sink.listen_to_default_topic = False
    guild.launch_agent(relay)
    guild.launch_agent(sink)
    stop = threading.Event()
    serving = threading.Event()
    pauses: list[float] = []
    driver = None
    if engine_name == "sync":
        driver = threading.Thread(target=engine.serve, args=(serving,), daemon=True)  # type: ignore[attr-defined]
        driver.start()

    def reloader() -> None:
        version = 1
        while not stop.wait(reload_every or 0):
            module.write_text(textwrap.dedent(RELAY_MODULE.format(version=version)))
            pauses.append(guild.reload_agent("relay").pause_ms)
            version += 1

    swapper = threading.Thread(target=reloader, daemon=True) if reload_every else None
    if swapper is not None:
        swapper.start()
    started = time.perf_counter()
    sent = 0
    while time.perf_counter() - started < seconds:
        for _ in range(500):
            guild.publish("in", {"seq": sent}, format="Hop")
            sent += 1
        _wait_for_backlog(guild, 2000)
    stop.set()
    if swapper is not None:
        swapper.join()
    guild.run_until_idle(timeout=30) if driver is None else _wait_for_backlog(guild, 0)
    elapsed = time.perf_counter() - started
    delivered = guild.wrapper("relay").processed + guild.wrapper("sink").processed
    if driver is not None:
        serving.set()
        driver.join()
    guild.stop(timeout=5)
    return delivered / elapsed, pauses


def _wait_for_backlog(guild: Guild, limit: int) -> None:
    tick = threading.Event()
    while sum(len(guild.wrapper(a).mailbox) for a in ("relay", "sink")) > limit:
        tick.wait(0.001)


def watch_latency(saves: int) -> float:
    """Median ms from a save to the new code handling a message, through watchfiles."""
    from rustic.daemon.watch import GuildWatcher

    with relay_project("watchproj") as (root, module):
        guild_file = root / "guild.yaml"
        guild_file.write_text(
            "id: watchbench\nname: w\nagents:\n  - id: relay\n    name: relay\n"
            "    class_name: watchproj.relay.Relay\n"
        )
        guild = Guild.from_yaml(guild_file, execution_engine="multithreaded")
        watcher = GuildWatcher(guild, guild_file, [root])
        watcher.start()
        latencies = []
        tick = threading.Event()
        for version in range(1, saves + 1):
            saved = time.perf_counter()
            module.write_text(textwrap.dedent(RELAY_MODULE.format(version=version)))
            while not _runs_version(guild, version):
                tick.wait(0.001)
            latencies.append((time.perf_counter() - saved) * 1000)
            tick.wait(0.05)  # let the watcher settle so each save is its own batch
        watcher.stop()
        guild.stop(timeout=5)
    return statistics.median(latencies)


def _runs_version(guild: Guild, version: int) -> bool:
    """True once the relay agent is an instance of the module that defines ``version``."""
    module = sys.modules.get("watchproj.relay")
    agent = guild.wrapper("relay").agent
    # The module may be half executed: a re-import runs in the module's own namespace.
    if module is None or getattr(module, "VERSION", None) != version:
        return False
    return type(agent) is getattr(module, "Relay", None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--engines", default="sync,multithreaded")
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()

    print(f"{'lifecycle':<44}{'value':>14}  target")
    for engine in args.engines.split(","):
        elapsed, per_agent = launch_cost(engine, 1000)
        print(f"{'launch 1,000 agents, ' + engine:<44}{elapsed * 1000:>11.0f} ms  < 1,000 ms")
        print(f"{'idle memory per agent, ' + engine:<44}{per_agent / 1024:>11.1f} KB  < 30 KB")
        stop = idle_stop(engine, 100)
        print(f"{'stop an idle 100-agent guild, ' + engine:<44}{stop * 1000:>11.0f} ms  < 500 ms")
    for engine in args.engines.split(","):
        p50, p95, steady, loaded = reload_under_load(engine, args.seconds)
        print(f"{'reload pause p50 / p95, ' + engine:<44}{p50:>7.2f} / {p95:.2f} ms  < 5 ms p50")
        print(f"{'relay rate steady, ' + engine:<44}{steady:>14,.0f}  deliveries/s")
        ratio = loaded / steady
        label = "relay rate, reload every 100 ms, " + engine
        print(f"{label:<44}{loaded:>14,.0f}  {ratio:.0%} of steady (> 50%)")
    print(f"{'watch: save to new code, p50':<44}{watch_latency(10):>11.0f} ms  < 300 ms")


if __name__ == "__main__":
    main()
