"""The watchdog: one thread that notices calls past their wall-clock or
guest CPU-time limit. It only detects; what an expiry does (ask a JS engine
for its stack, dump, stop) is the worker host's, and never blocks this
thread, so expiries of many calls are handled side by side."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from ..sandbox import Sandbox
from .jobs import Job, cpu_used
from .settings import urgent_thread

__all__ = ["Watchdog"]


def _paused(job: Job) -> float:
    """Seconds ``job``'s guest has spent stopped in a debugger since it began
    (``SandboxConfig.debug_port``): not counted against its wall-clock limit.
    Its CPU time does not grow meanwhile: no thread runs it."""
    sandbox = job.sandbox
    if sandbox is None or sandbox._debugger is None:
        return 0.0
    return sandbox._debug_paused() - job.paused_start


class Watchdog:
    def __init__(
        self,
        on_expired: Callable[[Job, str], None],
        failed: Callable[[BaseException, Sandbox | None], None],
    ) -> None:
        self._on_expired = on_expired  # (job, "wall" | "cpu")
        self._failed = failed
        self._cond = threading.Condition(threading.Lock())
        self._watched: set[Job] = set()
        self._stopping = False

    def watch(self, job: Job) -> None:
        """Start timing ``job`` (on the worker thread running it: CPU time is
        that thread's, which runs host code, and that of its vCPU's owner
        thread, which runs the guest)."""
        if job.sandbox is not None:
            job.paused_start = job.sandbox._debug_paused()
        job.cpu_clock = time.pthread_getcpuclockid(threading.get_ident())
        job.cpu_start = time.clock_gettime(job.cpu_clock)
        call = job.call
        if call is not None and call.vcpu.owner.ident is not None:
            try:
                job.owner_clock = time.pthread_getcpuclockid(call.vcpu.owner.ident)
                job.owner_start = time.clock_gettime(job.owner_clock)
            except OSError:  # the owner has ended (the sandbox closed)
                job.owner_clock = None
        with self._cond:
            self._watched.add(job)
            self._cond.notify()

    def unwatch(self, job: Job) -> None:
        with self._cond:
            self._watched.discard(job)

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def main(self) -> None:
        urgent_thread()  # under the normal policy in a SCHED_BATCH worker: its wake-up never waits
        while True:
            expired: list[tuple[Job, str]] = []
            with self._cond:
                if self._stopping:
                    return
                now = time.monotonic()
                wake_at = math.inf
                for job in list(self._watched):
                    if job.timeout is not None:
                        deadline = job.started_at + job.timeout + _paused(job)
                        if now >= deadline:
                            expired.append((job, "wall"))
                            job.lateness = now - deadline
                            self._watched.discard(job)
                            continue
                        wake_at = min(wake_at, deadline)
                    if job.cpu_timeout is not None:
                        try:
                            used = cpu_used(job)
                        except OSError:  # the worker thread is gone
                            self._watched.discard(job)
                            continue
                        if used >= job.cpu_timeout:
                            expired.append((job, "cpu"))
                            job.lateness = used - job.cpu_timeout
                            self._watched.discard(job)
                            continue
                        # CPU time cannot grow faster than wall time.
                        wake_at = min(wake_at, now + job.cpu_timeout - used)
                if not expired:
                    self._cond.wait(None if wake_at == math.inf else max(wake_at - now, 0.0005))
                    continue
            for job, kind in expired:
                try:
                    self._on_expired(job, kind)
                except BaseException as exc:  # noqa: BLE001 - the watchdog outlives any failure
                    self._failed(exc, job.sandbox)
