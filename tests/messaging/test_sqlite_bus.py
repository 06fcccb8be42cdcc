"""SqliteBus: publishes stored before they return, turns acknowledged in one commit, restarts."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from bus_agents import Collect, Hop, message, run_relay_chain
from rustic import AgentBuilder, Guild, MultithreadedExecutionEngine
from rustic.message import EPOCH_MS
from rustic.messaging import BusError, Retention, open_bus
from rustic.messaging.sqlite import SqliteBus


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "bus.db"


@pytest.fixture(autouse=True)
def _clean_journal() -> None:
    Collect.journal.clear()


def test_a_publish_is_stored_before_publish_returns(db: Path) -> None:
    # Given a bus where agent a listens to topic t
    bus = SqliteBus(db)
    bus.set_subscriptions("a", {"t"})

    # When a message is published and the process is gone without closing the bus
    sent = message("t", {"n": 1})
    assert bus.publish(sent) == 1

    # Then another bus on the file finds the delivery pending for a
    again = SqliteBus(db)
    assert again.open_mailbox("a").drain() == [sent]
    again.close()
    bus.close()


def test_pending_deliveries_come_back_in_id_order_ahead_of_new_mail(db: Path) -> None:
    # Given three messages published for a, never handled
    bus = SqliteBus(db)
    bus.set_subscriptions("a", {"t"})
    earlier = [message("t", {"n": n}) for n in range(3)]
    for sent in reversed(earlier):
        bus.publish(sent)
    bus.close()

    # When the bus reopens, a's mailbox opens and a new message arrives
    bus = SqliteBus(db)
    mailbox = bus.open_mailbox("a")
    later = message("t", {"n": 3})
    bus.publish(later)

    # Then the pending ones come first, by id, then the new one
    assert mailbox.drain() == [*earlier, later]
    bus.close()


def test_an_acknowledged_delivery_is_not_redelivered(db: Path) -> None:
    bus = SqliteBus(db)
    bus.set_subscriptions("a", {"t"})
    mailbox = bus.open_mailbox("a")
    first, second = message("t", {"n": 1}), message("t", {"n": 2})
    bus.publish(first)
    bus.publish(second)

    taken = mailbox.get_nowait()
    assert taken == first
    mailbox.ack(taken)
    bus.close()

    bus = SqliteBus(db)
    assert bus.open_mailbox("a").drain() == [second]
    bus.close()


def test_a_handlers_publishes_wait_for_its_acknowledgement(db: Path) -> None:
    # Given a listening to t, and b listening to u
    bus = SqliteBus(db)
    bus.set_subscriptions("a", {"t"})
    bus.set_subscriptions("b", {"u"})
    inbox_a, inbox_b = bus.open_mailbox("a"), bus.open_mailbox("b")
    bus.publish(message("t", {"n": 1}))

    # When a takes its message and publishes on u during its turn
    taken = inbox_a.get_nowait()
    assert taken is not None
    reply = message("u", {"answer": 1}, sender="a")
    bus.publish(reply)

    # Then b sees nothing until a's turn is acknowledged, then the reply
    assert len(inbox_b) == 0
    inbox_a.ack(taken)
    assert inbox_b.drain() == [reply]
    bus.close()


def test_a_turn_cut_short_leaves_its_message_pending_and_its_publishes_unsent(db: Path) -> None:
    # Given a in the middle of a turn that published on u
    bus = SqliteBus(db)
    bus.set_subscriptions("a", {"t"})
    bus.set_subscriptions("b", {"u"})
    bus.publish(message("t", {"n": 1}))
    taken = bus.open_mailbox("a").get_nowait()
    assert taken is not None
    bus.publish(message("u", {"answer": 1}, sender="a"))

    # When the process dies before the acknowledgement
    after = SqliteBus(db)

    # Then a gets its message again and b never got the reply
    assert after.open_mailbox("a").drain() == [taken]
    assert after.open_mailbox("b").drain() == []
    after.close()
    bus.close()


def test_an_agent_skips_a_message_id_it_already_got(db: Path) -> None:
    bus = SqliteBus(db)
    bus.set_subscriptions("a", {"t"})
    mailbox = bus.open_mailbox("a")
    sent = message("t", {"n": 1})

    assert bus.publish(sent) == 1
    mailbox.ack(mailbox.get_nowait() or sent)
    assert bus.publish(sent) == 0

    assert len(mailbox) == 0
    bus.close()


def test_mail_for_an_agent_not_launched_yet_waits_in_the_file(db: Path) -> None:
    # Given a guild's agents registered on the bus, b not launched anywhere
    bus = SqliteBus(db)
    bus.register_agents({"a": {"t"}, "b": {"t"}})
    bus.close()

    # When a message is published after a restart, before b's mailbox opens
    bus = SqliteBus(db)
    sent = message("t", {"n": 1})
    assert bus.publish(sent) == 2

    # Then b gets it once it opens
    assert bus.open_mailbox("b").drain() == [sent]
    bus.close()


def test_registering_a_spec_forgets_agents_it_no_longer_has(db: Path) -> None:
    bus = SqliteBus(db)
    bus.register_agents({"a": {"t"}, "gone": {"t"}})

    bus.register_agents({"a": {"t"}})

    assert bus.subscribed_agents() == {"a"}
    assert bus.publish(message("t", {})) == 1
    bus.close()


def test_handled_deliveries_beyond_the_retention_count_are_pruned(db: Path) -> None:
    # Given a bus that keeps 5 deliveries per agent, 20 handled and 3 pending
    bus = SqliteBus(db, Retention(count=5))
    bus.set_subscriptions("a", {"t"})
    mailbox = bus.open_mailbox("a")
    for n in range(20):
        bus.publish(message("t", {"n": n}))
    for _ in range(20):
        taken = mailbox.get_nowait()
        assert taken is not None
        mailbox.ack(taken)
    pending = [message("t", {"n": n}) for n in range(20, 23)]
    for sent in pending:
        bus.publish(sent)

    # When the bus prunes
    bus.prune()

    # Then the newest 5 deliveries are kept: the 3 pending ones and 2 handled
    assert _count(db, "SELECT count(*) FROM deliveries") == 5
    assert _count(db, "SELECT count(*) FROM deliveries WHERE acked_at IS NULL") == 3
    bus.close()
    assert SqliteBus(db).open_mailbox("a").drain() == pending


def test_handled_messages_older_than_max_age_are_pruned_but_dead_letters_stay(db: Path) -> None:
    # Given a bus keeping an hour of history, and two handled messages made two hours ago
    bus = SqliteBus(db, Retention(max_age=3600))
    bus.set_subscriptions("a", {"t"})
    mailbox = bus.open_mailbox("a")
    old = [message("t", {"n": n})._replace(id=_id_at(time.time() - 7200) + n) for n in range(2)]
    for sent in old:
        bus.publish(sent)
    fresh = message("t", {"n": 2})
    bus.publish(fresh)
    for _ in range(3):
        taken = mailbox.get_nowait()
        assert taken is not None
        if taken == old[0]:
            bus.dead_letter("a", taken, "gave up")
        mailbox.ack(taken)

    # When the bus prunes
    bus.prune()

    # Then only the fresh delivery is left, and the dead letter is kept
    assert _count(db, "SELECT message_id FROM deliveries") == fresh.id
    assert [dead.message for dead in bus.dead_letters()] == [old[0]]
    bus.close()


def test_open_bus_reads_retention_from_the_url(db: Path) -> None:
    bus = open_bus(f"sqlite:///{db}?retention=10&max_age=60")

    assert isinstance(bus, SqliteBus)
    assert bus.retention == Retention(count=10, max_age=60.0)
    assert bus.path == db
    bus.close()


@pytest.mark.parametrize(
    "query", ["retention=-1", "max_age=0", "retention=lots", "colour=blue"], ids=str
)
def test_open_bus_refuses_a_bad_query_parameter_naming_it(db: Path, query: str) -> None:
    with pytest.raises(ValueError, match=query.partition("=")[0]):
        open_bus(f"sqlite:///{db}?{query}")


def test_dead_letters_survive_a_restart_and_a_retry_redelivers_the_same_message(
    db: Path,
) -> None:
    # Given a message that agent a dead-lettered, and a restart
    bus = SqliteBus(db)
    bus.set_subscriptions("a", {"t"})
    mailbox = bus.open_mailbox("a")
    bus.publish(message("t", {"n": 1}))
    taken = mailbox.get_nowait()
    assert taken is not None
    bus.dead_letter("a", taken, "ValueError: no")
    mailbox.ack(taken)
    bus.close()
    bus = SqliteBus(db)
    mailbox = bus.open_mailbox("a")
    [dead] = bus.dead_letters()
    assert (dead.agent_id, dead.message, dead.reason) == ("a", taken, "ValueError: no")

    # When it is retried
    retried = bus.retry_dead_letters([dead.id, 999])

    # Then a gets the same message again, and it is no longer a dead letter
    assert [item.id for item in retried] == [dead.id]
    assert mailbox.drain() == [taken]
    assert bus.dead_letters() == []
    bus.close()


def test_a_full_disk_refuses_publishes_clearly_and_a_turn_waits_for_space(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a bus whose file may not grow (SQLite reports a full disk)
    bus = SqliteBus(db)
    bus.set_subscriptions("a", {"t"})
    bus.set_subscriptions("b", {"u"})
    inbox_a, inbox_b = bus.open_mailbox("a"), bus.open_mailbox("b")
    bus.publish(message("t", {"n": 0}))
    _limit_pages(bus, _count(db, "PRAGMA page_count"))
    big = {"blob": "x" * 20_000}

    # When an outside publisher publishes, the publisher is told, with the file named
    with pytest.raises(BusError, match=r"database or disk is full"):
        bus.publish(message("t", big))

    # And when a handler's turn cannot be stored, it waits
    taken = inbox_a.get_nowait()
    assert taken is not None
    bus.publish(message("u", big, sender="a"))
    acked = threading.Thread(target=inbox_a.ack, args=(taken,))
    with caplog.at_level(logging.ERROR, logger="rustic.messaging.durable"):
        acked.start()
        acked.join(0.3)
    assert acked.is_alive()
    assert "acknowledge failed, retrying" in caplog.text

    # Then once there is room again the turn is stored and the file is sound
    _limit_pages(bus, 1_000_000)
    acked.join(10)
    assert not acked.is_alive()
    assert [m.payload for m in inbox_b.drain()] == [big]
    bus.close()
    check = sqlite3.connect(db)
    assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    check.close()


def test_a_guild_on_sqlite_handles_after_a_restart_what_it_had_not_handled(
    tmp_path: Path, db: Path
) -> None:
    # Given a sync guild on sqlite that accepted three messages and died before handling them
    url = f"sqlite:///{db}"
    spec = AgentBuilder(Collect).set_id("c").add_additional_topic("t").build_spec()
    crashed = Guild(id="durable", messaging=url)
    crashed.launch_agent(spec)
    sent = [crashed.publish("t", Hop(seq=n)) for n in range(3)]

    # When the guild starts again on the same file
    guild = Guild(id="durable", messaging=url)
    guild.launch_agent(spec)
    assert guild.run_until_idle(timeout=10)

    # Then the three are handled, in order, once
    assert [m.id for m in Collect.seen("c")] == [m.id for m in sent]
    assert guild.stop().pending == 0
    crashed.bus.close()


def test_a_relay_chain_on_sqlite_loses_nothing_on_the_multithreaded_engine(
    tmp_path: Path, db: Path
) -> None:
    engine = MultithreadedExecutionEngine(max_workers=4)
    guild = Guild(id="chain", messaging=f"sqlite:///{db}", execution_engine=engine)
    run_relay_chain(guild, tmp_path / "ledger")
    assert guild.stop().clean


def _id_at(unix_time: float) -> int:
    """The smallest message id made at ``unix_time``."""
    return (int(unix_time * 1000) - EPOCH_MS) << 22


def _count(db: Path, query: str) -> int:
    check = sqlite3.connect(db)
    try:
        return int(check.execute(query).fetchone()[0])
    finally:
        check.close()


def _limit_pages(bus: SqliteBus, pages: int) -> None:
    """Cap the bus file's size, as a full disk would."""
    with bus._lock:
        connection = bus._db()
        connection.execute(f"PRAGMA max_page_count = {pages}")
