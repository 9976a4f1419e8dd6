"""Waiting in tests: for a condition, never for a fixed time, and never forever."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, what: str, every: float = 0.1) -> T:
    """Call ``predicate`` until it returns something truthy, and return that. After
    ``timeout`` seconds, fail saying ``what`` was awaited and the last value seen."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"waited {timeout:g} s for {what}; last: {value!r}")
        time.sleep(every)
