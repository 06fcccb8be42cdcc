"""The multithreaded engine under concurrent publishers: no wakeup is ever lost."""

from __future__ import annotations

import threading
from typing import Any, ClassVar

from engine_harness import wait_until
from rustic import (
    Agent,
    AgentBuilder,
    Guild,
    MultithreadedExecutionEngine,
    ProcessContext,
    processor,
)


class Tally(Agent):  # type: ignore[type-arg]
    """Counts what it gets; the handler is tiny so that scheduling dominates."""

    counts: ClassVar[dict[str, int]] = {}

    @processor(dict)
    def tally(self, ctx: ProcessContext[dict[str, Any]]) -> None:
        self.counts[self.id] = self.counts.get(self.id, 0) + 1


def test_concurrent_publishers_never_strand_a_message_in_a_mailbox() -> None:
    # Given three agents on eight workers
    Tally.counts.clear()
    engine = MultithreadedExecutionEngine(max_workers=8, thread_name_prefix="stress-")
    guild = Guild(id="stress", execution_engine=engine)
    for n in range(3):
        guild.launch_agent(AgentBuilder(Tally).set_id(f"t{n}").build_spec())

    # When four threads publish 5,000 messages each, in small bursts
    def publish() -> None:
        for n in range(5000):
            guild.publish("default_topic", {"n": n})

    publishers = [threading.Thread(target=publish) for _ in range(4)]
    for thread in publishers:
        thread.start()
    for thread in publishers:
        thread.join(30)

    # Then every agent handles all 20,000 without anyone publishing again to wake it
    wait_until(lambda: all(Tally.counts.get(f"t{n}") == 20_000 for n in range(3)), 30)
    assert all(len(guild.wrapper(f"t{n}").mailbox) == 0 for n in range(3))
    assert guild.stop(timeout=5).clean


def test_thread_names_carry_the_prefix_in_pool_and_dedicated_modes() -> None:
    for dedicated, expected in ((False, "pfx-0"), (True, "pfx-solo")):
        guild = Guild(
            id="names",
            execution_engine=MultithreadedExecutionEngine(
                max_workers=1, thread_name_prefix="pfx-", dedicated_threads=dedicated
            ),
        )
        guild.launch_agent(AgentBuilder(Tally).set_id("solo").build_spec())
        guild.publish("default_topic", {"n": 1})
        assert guild.run_until_idle(timeout=10)
        (info,) = guild.agents()
        assert info.where == expected
        assert expected in {t.name for t in threading.enumerate()}
        guild.stop(timeout=5)
