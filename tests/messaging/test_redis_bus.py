"""RedisBus: streams per agent, turns committed whole, claims after a crash, several processes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from bus_agents import Collect, Hop, message, run_relay_chain
from rustic import AgentBuilder, Guild, MultithreadedExecutionEngine
from rustic.messaging import BusError, Retention, open_bus
from rustic.messaging.redis import RedisBus, RedisMailbox
from waiting import wait_until

pytest.importorskip("redis")
pytestmark = pytest.mark.redis


@pytest.fixture
def buses(bus_redis_url: str) -> Iterator[list[RedisBus]]:
    """Make buses on database 12 with ``make(consumer)``; all are closed after the test."""
    made: list[RedisBus] = []
    yield made
    for bus in made:
        bus.close()


def make(buses: list[RedisBus], url: str, consumer: str, **options: Any) -> RedisBus:
    bus = RedisBus(url, guild_id="g", consumer=consumer, **options)
    buses.append(bus)
    return bus


def take(mailbox: RedisMailbox, count: int = 1) -> list[Any]:
    """Wait until ``count`` deliveries are queued, then take them as a turn each."""
    wait_until(
        timeout=20.0,
        condition=lambda: len(mailbox) >= count,
        what=f"{count} deliveries for {mailbox.agent_id}",
    )
    return [mailbox.get_nowait() for _ in range(count)]


@pytest.fixture(autouse=True)
def _clean_journal() -> None:
    Collect.journal.clear()


def test_a_publish_is_in_redis_before_publish_returns(
    buses: list[RedisBus], bus_redis_url: str, bus_redis: Any
) -> None:
    bus = make(buses, bus_redis_url, "one")
    bus.set_subscriptions("a", {"t"})

    assert bus.publish(message("t", {"n": 1})) == 1

    assert bus_redis.xlen("rustic:bus:g:inbox:a") == 1


def test_a_message_published_in_one_process_is_handled_in_another(
    buses: list[RedisBus], bus_redis_url: str
) -> None:
    # Given agent a in one process and agent b, listening to t, in another
    here, there = make(buses, bus_redis_url, "here"), make(buses, bus_redis_url, "there")
    here.set_subscriptions("a", {"x"})
    there.set_subscriptions("b", {"t"})
    inbox_b = there.open_mailbox("b")

    # When a publishes on t from the first process
    sent = message("t", {"n": 1}, sender="a")
    here.publish(sent)

    # Then b gets it in the second
    assert take(inbox_b) == [sent]


def test_a_handlers_publishes_wait_for_its_turn_to_be_committed(
    buses: list[RedisBus], bus_redis_url: str
) -> None:
    bus = make(buses, bus_redis_url, "one")
    bus.set_subscriptions("a", {"t"})
    bus.set_subscriptions("b", {"u"})
    inbox_a, inbox_b = bus.open_mailbox("a"), bus.open_mailbox("b")
    bus.publish(message("t", {"n": 1}))
    [taken] = take(inbox_a)

    reply = message("u", {"answer": 1}, sender="a")
    bus.publish(reply)
    assert bus.wait_delivered(0.2)
    assert len(inbox_b) == 0

    inbox_a.ack(taken)
    assert take(inbox_b) == [reply]


def test_a_consumer_that_died_mid_turn_leaves_its_message_to_the_next_one(
    buses: list[RedisBus], bus_redis_url: str
) -> None:
    # Given a taken by a first process, in a turn that published on u, never acknowledged
    first = make(buses, bus_redis_url, "first")
    first.set_subscriptions("a", {"t"})
    first.set_subscriptions("b", {"u"})
    first.publish(message("t", {"n": 1}))
    [taken] = take(first.open_mailbox("a"))
    first.publish(message("u", {"answer": 1}, sender="a"))
    first.close()  # it dies: its reader stops and nothing more is acknowledged

    # When another process opens a's mailbox
    second = make(buses, bus_redis_url, "second")
    inbox_a = second.open_mailbox("a")

    # Then it claims the message at once, and b never got the unfinished turn's reply
    assert len(inbox_a) == 1
    assert inbox_a.get_nowait() == taken
    assert second.open_mailbox("b").drain() == []


def test_claimed_entries_come_in_id_order_ahead_of_new_mail(
    buses: list[RedisBus], bus_redis_url: str
) -> None:
    first = make(buses, bus_redis_url, "first")
    first.set_subscriptions("a", {"t"})
    earlier = [message("t", {"n": n}) for n in range(3)]
    for sent in earlier:
        first.publish(sent)
    take(first.open_mailbox("a"), 3)
    first.close()  # it dies with the three taken and never acknowledged

    second = make(buses, bus_redis_url, "second")
    inbox = second.open_mailbox("a")
    later = message("t", {"n": 3})
    second.publish(later)

    wait_until(timeout=20.0, condition=lambda: len(inbox) == 4, what="the new message")
    assert inbox.drain() == [*earlier, later]


def test_an_agent_skips_a_message_id_it_already_acknowledged(
    buses: list[RedisBus], bus_redis_url: str
) -> None:
    bus = make(buses, bus_redis_url, "one")
    bus.set_subscriptions("a", {"t"})
    inbox = bus.open_mailbox("a")
    sent = message("t", {"n": 1})
    bus.publish(sent)
    [taken] = take(inbox)
    inbox.ack(taken)
    assert bus.wait_delivered(5)

    assert bus.publish(sent) == 0
    assert bus.wait_delivered(0.2)
    assert len(inbox) == 0


def test_a_claim_skips_entries_whose_id_was_acknowledged(
    buses: list[RedisBus], bus_redis_url: str, bus_redis: Any
) -> None:
    # Given a message a acknowledged, and a duplicate entry of it that a consumer read and
    # never acknowledged (it died)
    stream = "rustic:bus:g:inbox:a"
    first = make(buses, bus_redis_url, "first")
    first.set_subscriptions("a", {"t"})
    inbox = first.open_mailbox("a")
    first.publish(message("t", {"n": 1}))
    [taken] = take(inbox)
    inbox.ack(taken)
    assert first.wait_delivered(5)
    first.close()
    bus_redis.xadd(stream, {"m": bus_redis.xrange(stream)[0][1][b"m"]})
    bus_redis.xreadgroup("rustic", "ghost", {stream: ">"})

    # When another process claims a's pending entries
    second = make(buses, bus_redis_url, "second")

    # Then the duplicate is acknowledged, not delivered
    assert len(second.open_mailbox("a")) == 0
    assert bus_redis.xpending(stream, "rustic")["pending"] == 0


def test_handled_entries_beyond_retention_are_trimmed_but_pending_ones_stay(
    buses: list[RedisBus], bus_redis_url: str, bus_redis: Any
) -> None:
    bus = make(buses, bus_redis_url, "one", retention=Retention(count=2))
    bus.set_subscriptions("a", {"t"})
    inbox = bus.open_mailbox("a")
    for n in range(10):
        bus.publish(message("t", {"n": n}))
    for taken in take(inbox, 10)[:7]:
        inbox.ack(taken)
    assert wait_until(
        timeout=20.0,
        condition=lambda: bus_redis.xpending("rustic:bus:g:inbox:a", "rustic")["pending"] == 3,
    )

    bus.prune()

    left = [entry for entry, _ in bus_redis.xrange("rustic:bus:g:inbox:a")]
    assert len(left) == 3
    assert bus_redis.zcard("rustic:bus:g:acked:a") == 2


def test_dead_letters_are_listed_and_a_retry_redelivers_the_same_message(
    buses: list[RedisBus], bus_redis_url: str
) -> None:
    # Given a message agent a dead-lettered in one process
    first = make(buses, bus_redis_url, "first")
    first.set_subscriptions("a", {"t"})
    inbox = first.open_mailbox("a")
    first.publish(message("t", {"n": 1}))
    [taken] = take(inbox)
    first.dead_letter("a", taken, "ValueError: no")
    inbox.ack(taken)
    assert first.wait_delivered(5)

    # When another process lists and retries it
    second = make(buses, bus_redis_url, "second")
    [dead] = second.dead_letters()
    assert (dead.agent_id, dead.message, dead.reason) == ("a", taken, "ValueError: no")
    assert [item.id for item in second.retry_dead_letters([dead.id, 999])] == [dead.id]

    # Then a gets the same message again, and it is no longer a dead letter
    assert take(inbox) == [taken]
    assert first.dead_letters() == []


def test_open_bus_takes_retention_window_and_consumer_from_the_url(bus_redis_url: str) -> None:
    bus = open_bus(f"{bus_redis_url}?retention=5&max_age=60&window=1&consumer=me", guild_id="g")

    assert isinstance(bus, RedisBus)
    assert (bus.retention, bus.window, bus.consumer) == (Retention(5, 60.0), 1, "me")
    assert bus.prefix == "rustic:bus:g:"
    bus.close()


def test_a_relay_chain_on_redis_loses_nothing_on_the_multithreaded_engine(
    bus_redis_url: str, tmp_path: Any
) -> None:
    engine = MultithreadedExecutionEngine(max_workers=4)
    guild = Guild(id="chain", messaging=bus_redis_url, execution_engine=engine)
    run_relay_chain(guild, tmp_path / "ledger")
    report = guild.stop()
    assert report.clean
    assert report.pending == 0


def test_a_sync_guild_on_redis_settles_only_once_everything_came_back(bus_redis_url: str) -> None:
    guild = Guild(id="settle", messaging=bus_redis_url)
    spec = AgentBuilder(Collect).set_id("c").add_additional_topic("t").build_spec()
    guild.launch_agent(spec)

    sent = [guild.publish("t", Hop(seq=n)) for n in range(50)]

    assert guild.run_until_idle(timeout=10)
    assert [m.id for m in Collect.seen("c")] == [m.id for m in sent]
    guild.stop()


def test_a_publish_while_redis_is_away_raises_a_clear_error(
    private_redis: Any, buses: list[RedisBus]
) -> None:
    bus = make(buses, private_redis.url, "one")
    bus.set_subscriptions("a", {"t"})
    private_redis.kill()

    with pytest.raises(BusError, match=r"redis bus redis://127\.0\.0\.1:\d+/0: publish failed"):
        bus.publish(message("t", {"n": 1}))
