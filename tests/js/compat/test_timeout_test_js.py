"""Port of hyperlight-js ``src/js-host-api/tests/timeout.test.js`` (the Node binding).

``{wallClockTimeoutMs: n}`` is ``timeout=n / 1000`` and ``{cpuTimeoutMs: n}``
``cpu_timeout=n / 1000``; a monitor's kill (``ERR_CANCELLED``) is a
:class:`~hlasync.GuestTimeout`, ``interruptHandle.kill()``'s a
:class:`~hlasync.GuestCancelled`; ``ERR_INVALID_ARG`` is a ``ValueError``.
Upstream's loaded sandbox keeps its handlers' state and is poisoned by a
kill until ``restore()``: here ``JSSandbox(keep_state=True)``. Upstream builds a
fresh loaded sandbox for every test (``beforeEach``); here a shared one is
restored to its loaded state instead.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from hlasync import GuestCancelled, GuestTimeout
from hlasync.js import JSSandbox, JSSnapshot
from hlasync.kvm import Kvm

from ._helpers import poisoned, reload
from ._missing import DELIBERATE_TIMEOUT_MAX, xfail

ECHO = "function handler(e) { return e; }"
BUSY_10_S = """
            function handler(event) {
                const startTime = Date.now();
                while (Date.now() - startTime < 10000) { /* busy loop */ }
                return event;
            }
"""


@pytest.fixture
def snapshot(burner: tuple[JSSandbox, JSSnapshot]) -> JSSnapshot:
    """``beforeEach``'s ``snapshot = await loaded.snapshot()``."""
    return burner[1]


# --------------------------------------------------------- Wall Clock Timeout
def test_wall_clock_should_complete_fast_handler_before_timeout(loaded: JSSandbox) -> None:
    """timeout.test.js "Wall Clock Timeout > should complete fast handler before timeout"."""
    result = loaded.call_handler("handler", {"runtime": 100}, timeout=1.0)
    assert isinstance(result, dict)
    assert result["counter"] > 0
    assert result["actualRuntime"] < 500
    assert poisoned(loaded) is False


def test_wall_clock_should_kill_slow_handler_after_timeout(loaded: JSSandbox) -> None:
    """timeout.test.js "Wall Clock Timeout > should kill slow handler after timeout"."""
    start = time.monotonic()
    with pytest.raises(GuestTimeout):
        loaded.call_handler("handler", {"runtime": 4000}, timeout=0.5)
    elapsed = time.monotonic() - start
    assert 0.3 < elapsed < 2
    assert poisoned(loaded) is True


def test_wall_clock_should_recover_from_poisoned_state_with_restore(
    loaded: JSSandbox, snapshot: JSSnapshot
) -> None:
    """timeout.test.js "Wall Clock Timeout > should recover from poisoned state with restore"."""
    with pytest.raises(GuestTimeout):
        loaded.call_handler("handler", {"runtime": 4000}, timeout=0.5)
    assert poisoned(loaded) is True
    loaded.restore(snapshot)
    assert poisoned(loaded) is False
    result = loaded.call_handler("handler", {"runtime": 50}, timeout=1.0)
    assert isinstance(result, dict)


# ----------------------------------------------------------- CPU Time Timeout
def test_cpu_should_complete_fast_handler_before_cpu_timeout(loaded: JSSandbox) -> None:
    """timeout.test.js "CPU Time Timeout > should complete fast handler before CPU timeout"."""
    result = loaded.call_handler("handler", {"runtime": 50}, cpu_timeout=0.5)
    assert isinstance(result, dict)
    assert result["counter"] > 0
    assert poisoned(loaded) is False


def test_cpu_should_kill_cpu_intensive_handler_after_cpu_timeout(loaded: JSSandbox) -> None:
    """timeout.test.js "CPU Time Timeout > should kill CPU-intensive handler after CPU timeout"."""
    start = time.monotonic()
    with pytest.raises(GuestTimeout):
        loaded.call_handler("handler", {"runtime": 3000}, cpu_timeout=0.5)
    assert time.monotonic() - start < 2
    assert poisoned(loaded) is True


# ---------------------------------------------- Combined Monitors (CPU + Wall)
def test_combined_should_complete_fast_handler_with_both_monitors(loaded: JSSandbox) -> None:
    """timeout.test.js "Combined Monitors (CPU + Wall Clock) >
    should complete fast handler with both monitors"."""
    result = loaded.call_handler("handler", {"runtime": 50}, timeout=5.0, cpu_timeout=2.0)
    assert result["counter"] > 0
    assert poisoned(loaded) is False


def test_combined_should_kill_cpu_intensive_handler_cpu_fires_first(loaded: JSSandbox) -> None:
    """timeout.test.js "Combined Monitors (CPU + Wall Clock) >
    should kill CPU-intensive handler (CPU fires first)"."""
    start = time.monotonic()
    with pytest.raises(GuestTimeout):
        loaded.call_handler("handler", {"runtime": 10000}, timeout=5.0, cpu_timeout=0.5)
    assert time.monotonic() - start < 3
    assert poisoned(loaded) is True


def test_combined_should_recover_after_combined_monitor_kill(
    loaded: JSSandbox, snapshot: JSSnapshot
) -> None:
    """timeout.test.js "Combined Monitors (CPU + Wall Clock) >
    should recover after combined monitor kill"."""
    with pytest.raises(GuestTimeout):
        loaded.call_handler("handler", {"runtime": 10000}, timeout=5.0, cpu_timeout=0.5)
    assert poisoned(loaded) is True
    loaded.restore(snapshot)
    assert poisoned(loaded) is False
    result = loaded.call_handler("handler", {"runtime": 50}, timeout=5.0, cpu_timeout=2.0)
    assert isinstance(result, dict)


def test_combined_should_call_handler_without_monitors_when_no_timeout_is_specified(
    loaded: JSSandbox,
) -> None:
    """timeout.test.js "Combined Monitors (CPU + Wall Clock) > should call handler without
    monitors when no timeout is specified"."""
    result = loaded.call_handler("handler", {"runtime": 50})
    assert isinstance(result, dict)
    assert result["counter"] > 0
    assert poisoned(loaded) is False


def test_combined_should_call_handler_with_gc_false_and_no_monitors(loaded: JSSandbox) -> None:
    """timeout.test.js "Combined Monitors (CPU + Wall Clock) >
    should call handler with gc: false and no monitors"."""
    result = loaded.call_handler("handler", {"runtime": 50}, gc=False)
    assert isinstance(result, dict)
    assert result["counter"] > 0
    assert poisoned(loaded) is False


def test_combined_should_call_handler_with_gc_true_and_no_monitors(loaded: JSSandbox) -> None:
    """timeout.test.js "Combined Monitors (CPU + Wall Clock) >
    should call handler with gc: true and no monitors"."""
    result = loaded.call_handler("handler", {"runtime": 50}, gc=True)
    assert isinstance(result, dict)
    assert result["counter"] > 0
    assert poisoned(loaded) is False


@xfail(DELIBERATE_TIMEOUT_MAX)
def test_combined_should_throw_invalid_arg_for_timeout_exceeding_maximum(
    loaded: JSSandbox,
) -> None:
    """timeout.test.js "Combined Monitors (CPU + Wall Clock) > should throw INVALID_ARG for
    timeout exceeding maximum" (4,000,000 ms: more than an hour)."""
    with pytest.raises(ValueError):
        loaded.call_handler("handler", {}, timeout=4_000.0)


def test_combined_should_throw_invalid_arg_for_zero_wall_clock_timeout_ms(
    loaded: JSSandbox,
) -> None:
    """timeout.test.js "Combined Monitors (CPU + Wall Clock) >
    should throw INVALID_ARG for zero wallClockTimeoutMs"."""
    with pytest.raises(ValueError):
        loaded.call_handler("handler", {}, timeout=0)


def test_combined_should_throw_invalid_arg_for_zero_cpu_timeout_ms(loaded: JSSandbox) -> None:
    """timeout.test.js "Combined Monitors (CPU + Wall Clock) >
    should throw INVALID_ARG for zero cpuTimeoutMs"."""
    with pytest.raises(ValueError):
        loaded.call_handler("handler", {}, cpu_timeout=0)


def test_combined_should_accept_gc_option(loaded: JSSandbox) -> None:
    """timeout.test.js "Combined Monitors (CPU + Wall Clock) > should accept gc option"."""
    result = loaded.call_handler(
        "handler",
        {"runtime": 50},
        timeout=5.0,
        cpu_timeout=2.0,
        gc=False,
    )
    assert isinstance(result, dict)
    assert poisoned(loaded) is False


def test_combined_should_default_gc_to_true_when_not_specified(loaded: JSSandbox) -> None:
    """timeout.test.js "Combined Monitors (CPU + Wall Clock) >
    should default gc to true when not specified"."""
    result = loaded.call_handler("handler", {"runtime": 50}, timeout=5.0)
    assert isinstance(result, dict)
    assert poisoned(loaded) is False


# ----------------------------------------------------------- Interrupt Handle
@pytest.fixture(scope="module")
def interruptible(kvm: Kvm) -> Iterator[JSSandbox]:
    with JSSandbox(keep_state=True) as js:
        yield js


def test_interrupt_handle_should_provide_an_interrupt_handle(interruptible: JSSandbox) -> None:
    """timeout.test.js "Interrupt Handle > should provide an interrupt handle": a
    ``kill()`` with nothing running stops nothing."""
    reload(interruptible, {"handler": ECHO})
    assert interruptible.interrupt() is False
    assert interruptible.call_handler("handler", {"a": 1}) == {"a": 1}


def test_interrupt_handle_should_kill_a_running_handler_via_interrupt_handle(
    interruptible: JSSandbox,
) -> None:
    """timeout.test.js "Interrupt Handle > should kill a running handler via interruptHandle"."""
    reload(interruptible, {"handler": BUSY_10_S})

    def kill() -> None:  # setTimeout(() => handle.kill(), 200)
        time.sleep(0.2)
        deadline = time.monotonic() + 5
        while not interruptible.interrupt() and time.monotonic() < deadline:
            time.sleep(0.01)  # the call had not started yet

    timer = threading.Thread(target=kill)
    timer.start()
    try:
        with pytest.raises(GuestCancelled):
            interruptible.call_handler("handler", {})
    finally:
        timer.join()
    assert poisoned(interruptible) is True


def test_interrupt_handle_should_reject_empty_handler_name_on_call_handler(
    interruptible: JSSandbox,
) -> None:
    """timeout.test.js "Interrupt Handle > should reject empty handler name on callHandler"."""
    reload(interruptible, {"handler": ECHO})
    with pytest.raises(ValueError):
        interruptible.call_handler("", {}, timeout=1.0)
