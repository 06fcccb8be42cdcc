"""The contract every execution engine keeps, checked against each one."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

from conformance_agents import AsyncWorker, BadHook, Counter, Item, Worker
from engine_harness import Harness, wait_until


def test_every_published_message_is_handled_once(harness: Harness) -> None:
    harness.launch(Worker, "w")
    for n in range(200):
        harness.send(n)
    seen = harness.wait_seen(200, "w")
    assert sorted(s.n for s in seen) == list(range(200))


def test_one_agent_handles_messages_in_publish_order(harness: Harness) -> None:
    harness.launch(Worker, "w")
    for n in range(300):
        harness.send(n)
    seen = harness.wait_seen(300, "w")
    assert [s.n for s in seen] == list(range(300))


def test_an_agent_never_handles_two_messages_at_once(harness: Harness) -> None:
    harness.launch(Worker, "w")
    for n in range(40):
        harness.send(n, delay=0.002)
    seen = sorted(harness.wait_seen(40, "w"), key=lambda s: s.started)
    overlaps = [(a.n, b.n) for a, b in itertools.pairwise(seen) if b.started < a.ended]
    assert overlaps == []


def test_a_topic_fans_out_to_every_subscriber(harness: Harness) -> None:
    for agent_id in ("a", "b", "c"):
        harness.launch(Worker, agent_id)
    for n in range(50):
        harness.send(n)
    for agent_id in ("a", "b", "c"):
        assert sorted(s.n for s in harness.wait_seen(50, agent_id)) == list(range(50))


def test_async_handlers_run_on_every_engine(harness: Harness) -> None:
    harness.launch(AsyncWorker, "aw")
    for n in range(20):
        harness.send(n)
    assert sorted(s.n for s in harness.wait_seen(20, "aw")) == list(range(20))


def test_a_raising_handler_is_reported_retried_dead_lettered_and_contained(
    harness: Harness,
) -> None:
    # Given an agent that refuses item 3, with one retry
    harness.launch(Worker, "w", fail_on=[3])

    # When items 0..9 arrive
    for n in range(10):
        harness.send(n)

    # Then the other nine are handled, item 3 was tried twice and reported, then dead-lettered
    assert sorted(s.n for s in harness.wait_seen(9, "w")) == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    wait_until(lambda: len(harness.guild.bus.dead_letters()) == 1, what="a dead letter")
    (dead,) = harness.guild.bus.dead_letters()
    assert dead.agent_id == "w"
    assert dead.message.payload["n"] == 3
    assert "refusing item 3" in dead.reason
    wait_until(lambda: len(harness_errors(harness)) == 2, what="two error reports")
    assert [e["attempt"] for e in harness_errors(harness)] == [1, 2]
    assert harness_errors(harness)[-1]["final"] is True


def harness_errors(harness: Harness) -> list[dict[str, object]]:
    from conformance_agents import Collector

    with Collector.lock:
        return list(Collector.errors)


def test_a_payload_that_does_not_validate_is_dead_lettered_at_once(harness: Harness) -> None:
    harness.launch(Worker, "w")
    harness.guild.publish("work", {"n": "not a number"}, format=Item.__module__ + ".Item")
    harness.send(1)
    assert [s.n for s in harness.wait_seen(1, "w")] == [1]
    wait_until(lambda: len(harness.guild.bus.dead_letters()) == 1, what="a dead letter")
    assert "not a valid Item" in harness.guild.bus.dead_letters()[0].reason


def test_state_updates_made_by_handlers_land_in_the_guild_store(harness: Harness) -> None:
    harness.launch(Counter, "counter")
    for n in range(25):
        harness.send(n)
    wait_until(lambda: harness.guild.wrapper("counter").processed == 25, what="25 processed")
    wait_until(lambda: harness.guild.wrapper("counter").state.get().get("count") == 25)
    assert harness.guild.wrapper("counter").state.get() == {"count": 25, "last": 24}


def test_pause_queues_mail_and_resume_delivers_it(harness: Harness) -> None:
    harness.launch(Worker, "w")
    engine = harness.guild.engine_of("w")

    # Given a paused agent
    assert engine.pause("w", timeout=5)

    # When mail arrives, it queues
    for n in range(10):
        harness.send(n)
    wait_until(lambda: len(harness.guild.wrapper("w").mailbox) == 10, what="10 queued")
    assert harness.seen("w") == []
    assert {a.id: a.state for a in engine.agents()}["w"] == "paused"

    # Then resume delivers it, in order
    engine.resume("w")
    assert [s.n for s in harness.wait_seen(10, "w")] == list(range(10))


def test_pause_waits_for_the_in_flight_handler(harness: Harness) -> None:
    harness.launch(Worker, "w")
    harness.send(1, delay=0.3)
    wait_until(lambda: harness.guild.wrapper("w").in_flight is not None, what="in flight")
    engine = harness.guild.engine_of("w")
    assert engine.pause("w", timeout=5)
    assert len(harness.seen("w")) == 1 or harness.guild.wrapper("w").processed == 1
    engine.resume("w")


def test_stop_finishes_in_flight_work_drains_the_queue_and_runs_hooks(
    harness: Harness, tmp_path: Path
) -> None:
    # Given an agent with a slow message in flight and more queued
    harness.launch(Worker, "w", marker_dir=str(tmp_path))
    for n in range(5):
        harness.send(n, delay=0.05)
    wait_until(lambda: harness.guild.wrapper("w").processed >= 1, what="first handled")

    # When the guild stops
    report = harness.stop(timeout=10)

    # Then every message was handled, the hook ran, and the report says so
    assert report.handled >= 5
    assert report.pending == 0
    assert report.clean
    assert (tmp_path / "w.startup").exists()
    assert (tmp_path / "w.shutdown").exists()


def test_a_stuck_handler_cannot_make_stop_hang(harness: Harness, tmp_path: Path) -> None:
    # Given an agent stuck in a very long call
    harness.launch(Worker, "w", marker_dir=str(tmp_path))
    harness.send(1, delay=60)
    wait_until(lambda: harness.guild.wrapper("w").in_flight is not None, what="in flight")

    # When the guild stops with a short timeout
    started = time.monotonic()
    report = harness.guild.stop(timeout=0.5)

    # Then stop returns promptly, names the stuck agent and still ran its hook
    assert time.monotonic() - started < 5
    assert not report.clean
    assert "w" in report.stuck_agents or report.not_joined or not report.drained
    assert (tmp_path / "w.shutdown").exists()


def test_a_raising_shutdown_hook_is_reported_and_the_stop_completes(harness: Harness) -> None:
    harness.launch(BadHook, "bad")
    harness.launch(Worker, "w")
    harness.send(1)
    harness.wait_seen(2)
    report = harness.stop(timeout=5)
    assert report.hooks_failed == ["bad"]
    assert report.handled >= 2


def test_stop_agent_stops_one_agent_and_the_others_keep_working(
    harness: Harness, tmp_path: Path
) -> None:
    harness.launch(Worker, "a", marker_dir=str(tmp_path))
    harness.launch(Worker, "b")
    harness.send(1)
    harness.wait_seen(2)
    assert harness.guild.stop_agent("a", timeout=5)
    assert (tmp_path / "a.shutdown").exists()
    harness.send(2)
    assert [s.n for s in harness.wait_seen(2, "b")] == [1, 2]
    assert [s.n for s in harness.seen("a")] == [1]


def test_agents_reports_tracking_for_each_agent(harness: Harness) -> None:
    harness.launch(Worker, "w", fail_on=[2])
    for n in range(4):
        harness.send(n)
    harness.wait_seen(3, "w")
    wait_until(lambda: harness.guild.wrapper("w").processed == 4, what="4 processed")
    info = {a.id: a for a in harness.engine.agents()}["w"]
    assert info.engine == harness.engine.name
    assert info.state == "running"
    assert (info.processed, info.errors, info.dead_letters) == (4, 2, 1)
    assert info.queue_depth == 0
    assert info.where


def test_the_engine_is_importable_from_the_documented_path(engine_name: str) -> None:
    from engine_harness import ENGINE_FACTORIES
    from rustic_ai.core.guild.execution import BaseExecutionEngine

    assert isinstance(ENGINE_FACTORIES[engine_name](), BaseExecutionEngine)


def test_items_are_plain_pydantic_models() -> None:
    assert Item(n=1).model_dump() == {"n": 1, "delay": 0.0}
