"""A Redis that goes away mid-run: clear errors, work waits, and resumes once it is back."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from bus_agents import Hop, chain_specs, ledger_lines
from rustic import Guild, MultithreadedExecutionEngine
from waiting import wait_until

pytest.importorskip("redis")
pytestmark = pytest.mark.redis


def test_a_guild_rides_out_a_redis_restart(
    private_redis: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a relay chain on a private Redis, handling a stream of messages
    caplog.set_level(logging.INFO, logger="rustic.messaging")
    ledger = tmp_path / "ledger"
    engine = MultithreadedExecutionEngine(max_workers=4)
    guild = Guild(id="outage", messaging=private_redis.url, execution_engine=engine)
    for spec in chain_specs(2, ledger, work_s=0.002):
        guild.launch_agent(spec)
    for seq in range(200):
        guild.publish("hop-0", Hop(seq=seq))
    wait_until(
        timeout=20.0, condition=lambda: len(ledger_lines(ledger)) >= 20, what="the first landings"
    )

    # When Redis dies (and with it, having no persistence, everything it held)
    private_redis.kill()

    # Then the bus says so, once, and keeps trying
    wait_until(
        timeout=20.0,
        condition=lambda: "redis unreachable, retrying" in caplog.text,
        what="the outage logged",
    )
    assert caplog.text.count("redis unreachable, retrying") == 1

    # And when Redis is back, the bus puts back what it needs and new mail flows again
    private_redis.start()
    later = range(1000, 1050)
    for seq in later:
        guild.publish("hop-0", Hop(seq=seq))
    wait_until(
        timeout=20.0,
        condition=lambda: set(later) <= set(ledger_lines(ledger)),
        what="mail after the restart",
    )
    assert "redis reachable again, subscriptions restored" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR and r.exc_info]
    report = guild.stop(timeout=10)
    assert report.clean
