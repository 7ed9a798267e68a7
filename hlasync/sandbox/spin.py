"""The hot-session bookkeeping of a sandbox: whether its guest spins when a
call ends, and what happens when ``KVM_RUN`` comes back on its hot thread.

The hot thread, the reaper, the budget and the ``spin="auto"`` chooser are
:mod:`.hot`'s; this is the sandbox's side of them, run under its state lock:
at the end of each call :meth:`Spinning._after_call_locked` decides who
holds the vCPU next (a hot session, started or kept spinning, or nobody),
and :meth:`Spinning._hot_returned` hands a hot session's exit to the call
that took the vCPU, or makes the sandbox cold.
"""

from __future__ import annotations

import time

from ..config import AUTO
from .calls import Call
from .holder import SandboxBase
from .hot import (
    AUTO_FACTOR,
    AUTO_GAP_CAP,
    AUTO_MAX,
    AUTO_MAX_GAP,
    AUTO_MIN,
    CROWDED_COOLDOWN,
    HotSession,
    budget,
    reaper,
)
from .states import SandboxState

__all__ = ["Spinning"]


class Spinning(SandboxBase):
    """Hot-session bookkeeping at the end of a call (a part of :class:`~.core.Sandbox`)."""

    def _after_call_locked(self, call: Call, outcome: SandboxState) -> HotSession | None:
        """Who holds the vCPU after ``call``: its hot session when the guest spins
        (or is still in KVM_RUN on the hot thread), else nobody."""
        hot = self._hot
        now = time.monotonic()
        spin = self._spin_after(call, now)
        wanted = (
            outcome is SandboxState.READY
            and self._state is SandboxState.READY
            and spin > 0
            and self._spin_allowed
            and self._doorbell
            and call.parent is None  # a nested call's thread goes on with the outer one
        )
        running = hot is not None and hot.running
        cooling = hot is not None and now < hot.cooldown_until
        # One look at the budget per call: this call leaves the calls in flight,
        # and the sandbox gets (or keeps) a slot if the others leave one free.
        room = budget.end_call(
            running=running, wanted=wanted and not cooling, thread=call.thread, now=now
        )
        if wanted and not room and hot is not None and not cooling:
            hot.cooldown_until = now + CROWDED_COOLDOWN
        if hot is not None and running:
            if not wanted:  # a guest that failed may not park: kick it out now
                failed = outcome is not SandboxState.READY or self._state is not SandboxState.READY
                hot.park(self, now, kick=failed)
            elif not room:  # other calls run meanwhile: leave them the CPUs
                hot.park(self, now)
            else:  # a budget the guest may have changed during the call
                self._set_spin(hot.ticks_for(spin))
                reaper.watch(hot, now + spin)
            return hot  # until KVM_RUN is back on its thread
        if not room:  # not wanted, or no CPU to spin on: the exit path
            return None
        if hot is None:
            try:
                hot = self._hot = HotSession(self)
            except BaseException:
                budget.give_back()
                raise
        hot.start(self, spin)
        reaper.watch(hot, now + spin)
        return hot

    def _spin_after(self, call: Call, now: float) -> float:
        """Seconds the guest should spin after ``call``, which ends at ``now``
        (0: none). ``spin="auto"`` follows the caller's gaps between calls."""
        spin = self.config.spin
        if spin != AUTO:
            return float(spin)
        last, self._last_end = self._last_end, now
        if not last:
            return 0.0  # the first call, or the first after an operation: no gap
        gap = min(max(call.began - last, 0.0), AUTO_GAP_CAP)
        average = self._gap_average
        average = self._gap_average = gap if average is None else 0.75 * average + 0.25 * gap
        spinning = self._auto.record(now - last, back_to_back=gap < AUTO_GAP_CAP)
        if average > AUTO_MAX_GAP or not spinning:
            return 0.0
        return min(max(AUTO_FACTOR * average, AUTO_MIN), AUTO_MAX)

    def _hot_returned(self, hot: HotSession) -> None:
        """KVM_RUN came back on the hot thread (its exit is in ``hot.exit``): a call
        holding the vCPU takes it from there; otherwise the sandbox is cold."""
        with self._lock:
            hot.running = False
            budget.give_back()
            # Under the lock: a start() of the next spin cannot come between.
            hot.flag.wake()
            if self._holder is hot:
                self._holder = None
                reaper.forget(hot)
                # The spin ran out (or was ended): no budget may stay behind for
                # the next call, which runs on the exit path with nobody watching.
                self._set_spin(0)
                if self._state is SandboxState.CLOSED:
                    hot.close()
                self._holder_left_locked()
                self._notify_locked()
