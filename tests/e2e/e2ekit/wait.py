"""Polling with a deadline: every wait in the e2e tests is bounded and says what it waited for."""

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    pass


def wait_until(predicate: Callable[[], T], timeout: float, what: str | Callable[[], str],
               interval: float = 0.05) -> T:
    """Return the first truthy value of predicate(), or fail naming `what` after `timeout` s
    (a callable `what` is asked at that moment, to say what was still missing)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout} s waiting for "
                              f"{what() if callable(what) else what}")
        time.sleep(interval)
