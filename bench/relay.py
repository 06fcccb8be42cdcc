"""The relay workload: five relay agents in a chain and a sink, small pydantic payloads.

Run with ``make bench`` (or ``python bench/relay.py --help``). Prints deliveries per second
for each engine beside the CPython floor measured in the same run: a bare loop of deques
and function calls with the same shape (six hops, a small dict payload re-made per hop).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from rustic import Agent, AgentBuilder, AgentSpec, Guild, ProcessContext, processor
from rustic.engines import BaseExecutionEngine, create_engine

RELAYS = 5
LAUNCH_AGENTS = 100
HOPS = RELAYS + 1  # five relays and the sink


class Hop(BaseModel):
    """The payload that travels down the chain."""

    seq: int
    hops: int = 0


class RelayProps(BaseModel):
    """Where a relay forwards to."""

    next_topic: str


class Relay(Agent[RelayProps]):
    """Forwards every Hop to the next topic, one hop further."""

    @processor(Hop)
    def forward(self, ctx: ProcessContext[Hop]) -> None:
        ctx.send(Hop(seq=ctx.payload.seq, hops=ctx.payload.hops + 1), topic=self.config.next_topic)


class Sink(Agent):  # type: ignore[type-arg]
    """Counts what reaches the end of the chain."""

    received = 0

    @processor(Hop)
    def land(self, ctx: ProcessContext[Hop]) -> None:
        type(self).received += 1


def relay_specs() -> list[AgentSpec]:
    """The six agents of the workload, subscribed hop-0 → hop-5."""
    specs = [
        AgentBuilder(Relay)
        .set_id(f"relay-{n}")
        .set_properties({"next_topic": f"hop-{n + 1}"})
        .add_additional_topic(f"hop-{n}")
        .listen_to_default_topic(False)
        .build_spec()
        for n in range(RELAYS)
    ]
    sink = (
        AgentBuilder(Sink)
        .set_id("sink")
        .add_additional_topic(f"hop-{RELAYS}")
        .listen_to_default_topic(False)
        .build_spec()
    )
    return [*specs, sink]


def run_relay(engine: BaseExecutionEngine | str, messages: int, **guild_args: Any) -> float:
    """Push ``messages`` through the chain; return deliveries per second."""
    Sink.received = 0
    guild = Guild(id="bench", execution_engine=engine, **guild_args)
    for spec in relay_specs():
        guild.launch_agent(spec)
    started = time.perf_counter()
    for seq in range(messages):
        guild.publish("hop-0", Hop(seq=seq))
    if not guild.run_until_idle(timeout=300):
        raise RuntimeError("relay workload did not finish in 300 s")
    elapsed = time.perf_counter() - started
    landed = guild.wrapper("sink").processed  # counted here: the sink may run elsewhere
    guild.stop(timeout=5)
    if landed != messages:
        raise RuntimeError(f"sink received {landed} of {messages}")
    return messages * HOPS / elapsed


def time_launch(engine: BaseExecutionEngine, agents: int) -> tuple[float, float]:
    """Seconds to launch ``agents`` sinks on ``engine``, then until each handled one message."""
    guild = Guild(id="launch", execution_engine=engine)
    specs = [
        AgentBuilder(Sink).set_id(f"sink-{n}").listen_to_default_topic(False).build_spec()
        for n in range(agents)
    ]
    Sink.received = 0
    started = time.perf_counter()
    for spec in specs:
        guild.launch_agent(spec)
    launched = time.perf_counter() - started
    for spec in specs:
        guild.publish(f"agent_inbox:{spec.id}", Hop(seq=0))
    if not guild.run_until_idle(timeout=60):
        raise RuntimeError(f"{agents} agents did not handle their first message in 60 s")
    first = time.perf_counter() - started
    landed = sum(guild.wrapper(spec.id).processed for spec in specs)
    guild.stop(timeout=5)
    if landed != agents:
        raise RuntimeError(f"{landed} of {agents} sinks got their first message")
    return launched, first


def start_ray() -> float:
    """Start the local Ray that every ray row shares; returns the seconds it took.

    Ray engines join a Ray already initialised, so its start is counted once, here, and
    not in the first relay or launch row that happens to need it.
    """
    import ray

    started = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False)
    return time.perf_counter() - started


def cpython_floor(messages: int) -> float:
    """The same six hops as plain deques and function calls: what Python costs at the least."""
    queues: list[deque[tuple[int, str, dict[str, int]]]] = [deque() for _ in range(HOPS)]
    landed = [0]

    def relay(n: int) -> Callable[[tuple[int, str, dict[str, int]]], None]:
        out = queues[n + 1]

        def forward(message: tuple[int, str, dict[str, int]]) -> None:
            payload = message[2]
            out.append(
                (message[0] + 1, "hop", {"seq": payload["seq"], "hops": payload["hops"] + 1})
            )

        return forward

    def sink(message: tuple[int, str, dict[str, int]]) -> None:
        landed[0] += 1

    handlers = [*(relay(n) for n in range(RELAYS)), sink]
    started = time.perf_counter()
    for seq in range(messages):
        queues[0].append((seq, "hop", {"seq": seq, "hops": 0}))
    busy = True
    while busy:
        busy = False
        for queue, handle in zip(queues, handlers, strict=True):
            while queue:
                handle(queue.popleft())
                busy = True
    elapsed = time.perf_counter() - started
    assert landed[0] == messages
    return messages * HOPS / elapsed


def pydantic_floor(messages: int) -> float:
    """The floor's loop plus what any pydantic relay must do per hop: validate, build, dump.

    Not a target: it says how much of a delivery's cost is pydantic's own, so that the
    rest (routing, scheduling, accounting) can be read off the table.
    """
    queue: deque[tuple[int, dict[str, int]]] = deque()
    validate = Hop.__pydantic_validator__.validate_python
    started = time.perf_counter()
    for seq in range(messages):
        queue.append((0, {"seq": seq, "hops": 0}))
    handled = 0
    while queue:
        hop, data = queue.popleft()
        handled += 1
        payload = validate(data)
        if hop < RELAYS:
            queue.append((hop + 1, Hop(seq=payload.seq, hops=payload.hops + 1).model_dump()))
    elapsed = time.perf_counter() - started
    assert handled == messages * HOPS
    return handled / elapsed


def durable_rows(pairs: str, messages: int) -> list[tuple[str, float]]:
    """The relay on durable buses: a fresh sqlite file, or a Redis database of the bench's own."""
    rows = []
    for pair in filter(None, pairs.split(",")):
        name, _, backend = pair.partition(":")
        with tempfile.TemporaryDirectory() as folder:
            url = f"sqlite:///{folder}/relay.db" if backend == "sqlite" else bench_redis()
            if url is None:
                print(f"{name}, {backend}: skipped, redis unreachable", file=sys.stderr)
                continue
            rate = run_relay(create_engine(name), messages, messaging=url)
        rows.append((f"{name}, {backend}", rate))
    return rows


def bench_redis() -> str | None:
    """The bench's Redis URL with the last run's keys removed, or None when unreachable."""
    url = os.environ.get("RUSTIC_BENCH_REDIS", "redis://127.0.0.1:6379/13")
    try:
        import redis
    except ImportError:
        return None
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        stale = list(client.scan_iter(match="rustic:bus:bench:*", count=1000))
        if stale:
            client.delete(*stale)
    except redis.RedisError:
        return None
    finally:
        client.close()
    return url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--engines", default="sync,multithreaded,asyncio,multiprocess,ray")
    parser.add_argument("--launch-agents", type=int, default=LAUNCH_AGENTS)
    parser.add_argument(
        "--durable",
        default="sync:sqlite,multithreaded:redis",
        help="engine:backend rows on durable buses (redis: $RUSTIC_BENCH_REDIS, db 13)",
    )
    args = parser.parse_args()

    engines = args.engines.split(",")
    ray_start = start_ray() if "ray" in engines else None
    floor = cpython_floor(args.messages)
    rows = [("cpython floor", floor), ("floor + pydantic per hop", pydantic_floor(args.messages))]
    for name in args.engines.split(","):
        engine = create_engine(name)
        rows.append((f"{name}, memory", run_relay(engine, args.messages)))
    rows += durable_rows(args.durable, args.messages)
    print(f"{'relay workload':<28}{'deliveries/s':>14}{'of floor':>10}")
    for label, rate in rows:
        print(f"{label:<28}{rate:>14,.0f}{rate / floor:>10.1%}")

    # Measure every launch before printing: Ray reports on stdout while it starts workers.
    launches = [(name, *time_launch(create_engine(name), args.launch_agents)) for name in engines]
    print(f"\n{f'launch {args.launch_agents} agents':<28}{'launch ms':>14}{'+ 1st msg ms':>14}")
    for name, launched, first in launches:
        print(f"{name:<28}{launched * 1000:>14,.1f}{first * 1000:>14,.1f}")
    if ray_start is not None:
        print(f"{'(local ray start, once)':<28}{ray_start * 1000:>14,.1f}")


if __name__ == "__main__":
    main()
