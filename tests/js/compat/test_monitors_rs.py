"""Port of hyperlight-js ``src/hyperlight-js/tests/monitors.rs``.

``handle_event_with_monitor`` with a ``WallClockMonitor`` is ``call_handler(...,
timeout=)``, with a ``CpuTimeMonitor`` ``cpu_timeout=``, and with a tuple of
both (the first to fire wins) both arguments. A monitor's kill is a
:class:`~hlasync.GuestTimeout`, and it poisons upstream's loaded sandbox until
``restore()``: ``JSSandbox(keep_state=True)``.
"""

from __future__ import annotations

import time

import pytest

from hlasync import GuestTimeout
from hlasync.js import JSSandbox

from ._helpers import poisoned


def test_wall_clock_monitor_completes_fast_handler(loaded: JSSandbox) -> None:
    """monitors.rs ``wall_clock_monitor_completes_fast_handler``."""
    output = loaded.call_handler("handler", {"runtime": 100}, timeout=5)
    assert "counter" in output
    assert not poisoned(loaded)


def test_wall_clock_monitor_kills_slow_handler(loaded: JSSandbox) -> None:
    """monitors.rs ``wall_clock_monitor_kills_slow_handler``: killed after about
    0.5 s of 5, and the sandbox is poisoned."""
    start = time.monotonic()
    with pytest.raises(GuestTimeout):
        loaded.call_handler("handler", {"runtime": 5000}, timeout=0.5)
    elapsed = time.monotonic() - start
    assert 0.4 <= elapsed < 2
    assert poisoned(loaded)


def test_wall_clock_monitor_sandbox_recovers_with_restore(loaded: JSSandbox) -> None:
    """monitors.rs ``wall_clock_monitor_sandbox_recovers_with_restore``."""
    snapshot = loaded.snapshot()
    with pytest.raises(GuestTimeout):
        loaded.call_handler("handler", {"runtime": 5000}, timeout=0.3)
    assert poisoned(loaded)
    loaded.restore(snapshot)
    assert not poisoned(loaded)
    assert "counter" in loaded.call_handler("handler", {"runtime": 50}, timeout=5)


def test_cpu_time_monitor_completes_fast_handler(loaded: JSSandbox) -> None:
    """monitors.rs ``cpu_time_monitor_completes_fast_handler``."""
    output = loaded.call_handler("handler", {"runtime": 100}, cpu_timeout=2)
    assert "counter" in output
    assert not poisoned(loaded)


def test_cpu_time_monitor_kills_cpu_intensive_handler(loaded: JSSandbox) -> None:
    """monitors.rs ``cpu_time_monitor_kills_cpu_intensive_handler``."""
    start = time.monotonic()
    with pytest.raises(GuestTimeout):
        loaded.call_handler("handler", {"runtime": 5000}, cpu_timeout=0.5)
    assert time.monotonic() - start < 5
    assert poisoned(loaded)


def test_cpu_time_monitor_sandbox_recovers_with_restore(loaded: JSSandbox) -> None:
    """monitors.rs ``cpu_time_monitor_sandbox_recovers_with_restore``."""
    snapshot = loaded.snapshot()
    with pytest.raises(GuestTimeout):
        loaded.call_handler("handler", {"runtime": 5000}, cpu_timeout=0.3)
    assert poisoned(loaded)
    loaded.restore(snapshot)
    assert not poisoned(loaded)
    assert "counter" in loaded.call_handler("handler", {"runtime": 50}, cpu_timeout=5)


def test_tuple_monitor_kills_cpu_intensive_handler(loaded: JSSandbox) -> None:
    """monitors.rs ``tuple_monitor_kills_cpu_intensive_handler``: the CPU limit
    (0.5 s) fires well before the wall-clock backstop (5 s)."""
    start = time.monotonic()
    with pytest.raises(GuestTimeout):
        loaded.call_handler("handler", {"runtime": 10000}, cpu_timeout=0.5, timeout=5)
    elapsed = time.monotonic() - start
    assert elapsed < 3
    assert poisoned(loaded)


def test_tuple_monitor_completes_fast_handler(loaded: JSSandbox) -> None:
    """monitors.rs ``tuple_monitor_completes_fast_handler``."""
    loaded.call_handler("handler", {"runtime": 100}, cpu_timeout=2, timeout=5)
    assert not poisoned(loaded)


def test_tuple_monitor_sandbox_recovers_with_restore(loaded: JSSandbox) -> None:
    """monitors.rs ``tuple_monitor_sandbox_recovers_with_restore``."""
    snapshot = loaded.snapshot()
    with pytest.raises(GuestTimeout):
        loaded.call_handler("handler", {"runtime": 10000}, cpu_timeout=0.3, timeout=3)
    assert poisoned(loaded)
    loaded.restore(snapshot)
    assert not poisoned(loaded)
    loaded.call_handler("handler", {"runtime": 50}, cpu_timeout=5, timeout=10)


def test_tuple_with_failing_monitor_is_fail_closed(loaded: JSSandbox) -> None:
    """monitors.rs ``tuple_with_failing_monitor_is_fail_closed``: a limit that
    cannot be set up (upstream: a monitor whose start fails; here: a CPU limit
    that is not a number of seconds) fails the call before the handler runs, and
    the sandbox is not poisoned."""
    start = time.monotonic()
    with pytest.raises(ValueError):
        loaded.call_handler("handler", {"runtime": 5000}, timeout=5, cpu_timeout=float("nan"))
    assert time.monotonic() - start < 1  # the handler (5 s) never ran
    assert not poisoned(loaded)


def test_monitor_reuse_across_calls(loaded: JSSandbox) -> None:
    """monitors.rs ``monitor_reuse_across_calls``: the same limit for two calls."""
    timeout = 5.0
    loaded.call_handler("handler", {"runtime": 50}, timeout=timeout)
    assert not poisoned(loaded)
    loaded.call_handler("handler", {"runtime": 50}, timeout=timeout)
    assert not poisoned(loaded)


def test_single_element_tuple_monitor(loaded: JSSandbox) -> None:
    """monitors.rs ``single_element_tuple_monitor``: a 1-tuple acts as its monitor."""
    start = time.monotonic()
    with pytest.raises(GuestTimeout):
        loaded.call_handler("handler", {"runtime": 5000}, timeout=0.5)
    elapsed = time.monotonic() - start
    assert elapsed < 2
    assert poisoned(loaded)
