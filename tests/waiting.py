"""The one way tests wait: for a condition, with a deadline, never for a fixed time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    cond: Callable[[], T], timeout: float = 10.0, what: str = "", poll: float = 0.002
) -> T:
    """Return ``cond()``'s first truthy value; fail with ``what`` (or the condition's name)
    once ``timeout`` seconds pass without one."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or cond}")
        time.sleep(poll)
