"""The one way tests wait: poll a condition on a short tick until it holds or time runs out."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

WAIT_S = 10.0  # the default most a condition in these tests may take to come true
TICK_S = 0.01


def wait_until(condition: Callable[[], T], timeout: float = WAIT_S, what: str = "") -> T:
    """Return ``condition()`` once it is truthy; raise AssertionError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    tick = threading.Event()
    while not (value := condition()):
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        tick.wait(TICK_S)
    return value
