"""Message ids are time-ordered and unique across processes; messages round-trip as JSON."""

from __future__ import annotations

import multiprocessing
import time

import pytest

from rustic.message import Message, id_timestamp, new_id


def _ids(count: int) -> list[int]:
    return [new_id() for _ in range(count)]


def test_ids_increase_strictly_within_a_process() -> None:
    ids = _ids(50_000)
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_ids_fit_in_64_bits_and_carry_their_time() -> None:
    before = time.time()
    message_id = new_id()
    assert 0 < message_id < 2**63
    assert before - 0.01 <= id_timestamp(message_id) <= time.time() + 0.01


def test_ids_from_several_processes_do_not_collide() -> None:
    context = multiprocessing.get_context("spawn")
    with context.Pool(4) as pool:
        batches = pool.map(_ids, [20_000] * 4)
    everything = [i for batch in batches for i in batch]
    assert len(set(everything)) == len(everything)


def test_a_message_round_trips_through_json_and_is_immutable() -> None:
    message = Message(new_id(), "topic", "me", "dict", {"a": [1, 2]}, in_response_to=7, thread=3)
    assert Message.from_json(message.to_json()) == message
    assert message.created_at == pytest.approx(time.time(), abs=1)
    with pytest.raises(AttributeError):
        message.topic = "other"  # type: ignore[misc]
