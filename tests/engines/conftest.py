"""Fixtures for the engines tests; the helpers they use live in engine_harness.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from engine_harness import ENGINE_FACTORIES, Harness


@pytest.fixture(params=sorted(ENGINE_FACTORIES))
def engine_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def harness(engine_name: str) -> Iterator[Harness]:
    h = Harness(ENGINE_FACTORIES[engine_name]())
    yield h
    h.stop(timeout=2.0)
