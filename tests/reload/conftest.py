"""Fixtures for the reload tests; the helpers they use live in reload_project.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from reload_project import ENGINES, Project, Running


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Project]:
    p = Project(tmp_path)
    yield p
    p.close()


@pytest.fixture(params=sorted(ENGINES))
def running(request: pytest.FixtureRequest, project: Project) -> Iterator[Running]:
    r = Running(project, ENGINES[request.param]())
    yield r
    r.stop()
