"""Recovery after a kill: a process holding 10,000 pending messages dies by SIGKILL.

Run with ``python bench/recovery.py``. For each durable bus, a child process accepts the
messages (none handled) and is killed; then the guild starts again in this process, and
the bench prints how long until the agent could take its first pending message, and
until the whole backlog was handled. Redis is ``$RUSTIC_BENCH_REDIS`` (default db 13).
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from relay import Hop, Sink, bench_redis

from rustic import AgentBuilder, AgentSpec, Guild
from rustic.engines import SyncExecutionEngine

GUILD_ID = "bench"


def sink_spec() -> AgentSpec:
    """The one agent: a sink on topic `work`."""
    return AgentBuilder(Sink).set_id("sink").add_additional_topic("work").build_spec()


def child(url: str, messages: int) -> None:
    """Accept ``messages`` and never handle one (the sync engine is never driven)."""
    guild = Guild(id=GUILD_ID, messaging=url, execution_engine=SyncExecutionEngine())
    guild.launch_agent(sink_spec())
    for seq in range(messages):
        guild.publish("work", Hop(seq=seq))
    print("ready", flush=True)
    signal.pause()


def recover(url: str, messages: int) -> tuple[float, float]:
    """Kill a child holding ``messages`` pending; return seconds to the first and the last."""
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", url, "--messages", str(messages)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError(f"the child did not get ready (exit {proc.wait()})")
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    # The restart: open the bus, launch the agent (which queues its backlog), handle it all.
    started = time.perf_counter()
    guild = Guild(id=GUILD_ID, messaging=url, execution_engine=SyncExecutionEngine())
    mailbox = guild.launch_agent(sink_spec()).mailbox
    tick = threading.Event()
    while not len(mailbox):
        if time.perf_counter() - started > 60:
            raise RuntimeError("no pending message came back in 60 s")
        tick.wait(0.0005)
    ready = time.perf_counter() - started
    if not guild.run_until_idle(timeout=120):
        raise RuntimeError("the backlog was not handled in 120 s")
    drained = time.perf_counter() - started
    handled = guild.wrapper("sink").processed
    guild.stop(timeout=5)
    if handled != messages:
        raise RuntimeError(f"{handled} of {messages} handled after the restart")
    return ready, drained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--backends", default="sqlite,redis")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.messages)
        return

    print(f"{f'recovery, {args.messages:,} pending':<28}{'first ms':>14}{'all handled ms':>16}")
    for backend in args.backends.split(","):
        with tempfile.TemporaryDirectory() as folder:
            url = f"sqlite:///{Path(folder) / 'bus.db'}" if backend == "sqlite" else bench_redis()
            if url is None:
                print(f"{backend}: skipped, redis unreachable", file=sys.stderr)
                continue
            ready, drained = recover(url, args.messages)
        print(f"{backend:<28}{ready * 1000:>14,.1f}{drained * 1000:>16,.1f}")


if __name__ == "__main__":
    main()
