"""The supervisor's settings: their checks and defaults. :data:`DEFAULT`
("the supervisor's default" for a call's limits) and :func:`check_limit` are
shared by the front (:mod:`.core`), the calls (:mod:`.jobs`) and the targets
(:mod:`.targets`); :func:`check_settings` checks ``Supervisor(...)``'s
arguments (``processes`` defaults to ``HLASYNC_PROCESSES``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ..config import SandboxConfig

__all__ = [
    "DEFAULT",
    "check_limit",
    "check_no_debugger",
    "check_settings",
    "default_processes",
    "hold_limit",
    "urgent_thread",
    "worker_policy",
]

#: "Use the supervisor-wide default" (a timeout of None means no limit).
DEFAULT: Any = object()


def check_limit(name: str, value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number of seconds or None, got {value!r}")


def check_no_debugger(config: SandboxConfig | None, method: str) -> None:
    """Pools cannot be debugged: their members would all listen on one port."""
    if config is not None and config.debug_port is not None:
        raise ValueError(
            f"{method}: pool members cannot be debugged (SandboxConfig.debug_port); "
            "debug a dedicated sandbox (create_sandbox) or a JSSandbox"
        )


def check_settings(
    workers: int,
    processes: int | None,
    pin_cpus: Sequence[int] | None,
    max_pending: int,
    timeout: float | None,
    cpu_timeout: float | None,
    shutdown_grace: float,
) -> int:
    """Check the arguments of ``Supervisor(...)`` (a ValueError says what is
    wrong); the number of worker processes (``processes``, else its default)."""
    if type(workers) is not int or workers < 1:
        raise ValueError("workers must be a positive int")
    if processes is None:
        processes = default_processes()
    if type(processes) is not int or processes < 0:
        raise ValueError("processes must be an int >= 0 (0: threads of this process)")
    if processes:
        hold_limit()  # read again by the process backend: a wrong value is said here
        worker_policy()
    if type(max_pending) is not int or max_pending < 1:
        raise ValueError("max_pending must be a positive int")
    check_limit("timeout", timeout)
    check_limit("cpu_timeout", cpu_timeout)
    if shutdown_grace < 0:
        raise ValueError("shutdown_grace must be >= 0")
    if pin_cpus is not None:
        available = os.sched_getaffinity(0)
        if not pin_cpus or any(cpu not in available for cpu in pin_cpus):
            raise ValueError(f"pin_cpus must name CPUs this process may use: {available}")
    return processes


def default_processes() -> int:
    """``HLASYNC_PROCESSES`` from the environment, else 0 (threads of this process)."""
    value = os.environ.get("HLASYNC_PROCESSES", "").strip()
    if not value:
        return 0
    try:
        processes = int(value)
    except ValueError:
        raise ValueError(f"HLASYNC_PROCESSES must be an int >= 0, got {value!r}") from None
    if processes < 0:
        raise ValueError(f"HLASYNC_PROCESSES must be an int >= 0, got {value!r}")
    return processes


def hold_limit() -> float:
    """Seconds a worker process may hold a finished call's outcome to send it
    with others (:data:`.channel.HOLD_LIMIT`, or ``HLASYNC_HOLD_LIMIT`` from
    the environment; 0: every outcome goes out at once)."""
    from .channel import HOLD_LIMIT

    value = os.environ.get("HLASYNC_HOLD_LIMIT", "").strip()
    if not value:
        return HOLD_LIMIT
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= 60:  # NaN too
        raise ValueError(f"HLASYNC_HOLD_LIMIT must be seconds from 0 to 60, got {value!r}")
    return seconds


#: The scheduling policies a worker process may run under (HLASYNC_WORKER_SCHED).
WORKER_POLICIES = ("batch", "other")


def worker_policy() -> str:
    """The scheduling policy of worker processes: ``batch`` (``SCHED_BATCH``,
    the default: a worker woken by the supervisor's write does not take the
    CPU from the event loop that wrote) or ``other`` (``SCHED_OTHER``, the
    normal one), from ``HLASYNC_WORKER_SCHED``."""
    value = os.environ.get("HLASYNC_WORKER_SCHED", "").strip().lower()
    if not value:
        return "batch"
    if value not in WORKER_POLICIES:
        raise ValueError(f"HLASYNC_WORKER_SCHED must be batch or other, got {value!r}")
    return value


def urgent_thread() -> None:
    """Put the calling thread back under the normal policy if it runs under
    ``SCHED_BATCH`` (a worker process's): a thread whose wake-up must not
    wait for the running thread's time slice (the watchdog, a hung call's
    stop and dump)."""
    try:
        if os.sched_getscheduler(0) == os.SCHED_BATCH:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    except OSError:  # pragma: no cover - a policy this thread may not change
        pass
