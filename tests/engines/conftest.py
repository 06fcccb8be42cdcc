"""Fixtures for the engines tests; the helpers they use live in engine_harness.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from engine_harness import ENGINE_FACTORIES, ENGINE_MARKS, Harness

RAY_CPUS = 2  # a light local Ray: actors reserve no CPU while they run, so 2 is plenty


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray for the whole session (about 3 s to start); Ray engines join it."""
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=RAY_CPUS, include_dashboard=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(
    params=[pytest.param(name, marks=ENGINE_MARKS.get(name, ())) for name in ENGINE_FACTORIES]
)
def engine_name(request: pytest.FixtureRequest) -> str:
    if request.param == "ray":
        request.getfixturevalue("ray_session")
    return str(request.param)


@pytest.fixture
def harness(engine_name: str) -> Iterator[Harness]:
    h = Harness(ENGINE_FACTORIES[engine_name]())
    yield h
    h.stop(timeout=2.0)
