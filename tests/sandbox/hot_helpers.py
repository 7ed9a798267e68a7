"""Helpers of the hot-sandbox tests (test_hot.py, test_hot_asks.py)."""

from __future__ import annotations

import time
from collections.abc import Callable

from hlasync import Sandbox
from hlasync.sandbox.hot import HotSession


def make_hot(sb: Sandbox, name: str = "add", *args: object) -> HotSession:
    """Call until the sandbox is hot and its guest spins (it does not spin while
    another thread has called a sandbox in the last moments: an earlier
    test's threads)."""
    deadline = time.monotonic() + 10
    while True:
        sb.call(name, *(args or (1, 2)))  # type: ignore[arg-type]
        holder = sb._holder
        if isinstance(holder, HotSession) and holder.running:
            return holder
        assert time.monotonic() < deadline, "the sandbox never went hot"
        time.sleep(0.03)


def wait_until(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.001)
