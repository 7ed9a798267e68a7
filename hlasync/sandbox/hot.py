"""Hot sandboxes (``SandboxConfig.spin > 0``): between calls, a thread of the
sandbox keeps its vCPU in ``KVM_RUN`` while the guest's dispatcher spins on
the doorbell page, so that the next call is posted through shared memory and
answered with no VM exit.

While hot, the sandbox's holder is its :class:`HotSession`. A call takes the
vCPU over from it without stopping the guest (see ``runner.run``); any other
operation *parks* it first: the host zeroes the doorbell's ``spin``, the
dispatcher leaves its loop for its ``out`` to the return port, and ``KVM_RUN``
comes back on the hot thread, which then gives the vCPU up. A guest that does
not park within :data:`PARK_KICK_AFTER` is kicked out of ``KVM_RUN``.

When ``KVM_RUN`` returns on the hot thread (the spin ran out, a park, a kick,
a fault in a call, any exit), the hot thread hands the exit to the call that
holds the vCPU, if one does, and otherwise makes the sandbox cold (no holder,
the vCPU stopped at the dispatcher's park). The sandbox goes hot again when
its next call ends.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from typing import Any, Protocol

from .. import abi
from ..config import AUTO, SandboxConfig
from ..kvm import Vcpu
from ..kvm.exits import Exit
from . import native
from .machine import Machine

__all__ = [
    "ANSWER_SPIN",
    "AUTO_FACTOR",
    "AUTO_GAP_CAP",
    "AUTO_MAX",
    "AUTO_MAX_GAP",
    "AUTO_MIN",
    "CROWDED_COOLDOWN",
    "PARK_KICK_AFTER",
    "AutoChooser",
    "HotBudget",
    "HotOwner",
    "HotSession",
    "SpinControl",
    "budget",
    "reaper",
]

#: Seconds a guest of a hot call spins for the answer to a host call or print
#: it asked on the doorbell before it exits to wait (capped by ``spin``): a
#: host function slower than this costs the exit it would have cost anyway.
ANSWER_SPIN = 0.0002
#: ``spin="auto"``: a sandbox spins while its caller comes back within this
#: many seconds of the end of the last call (a running average of the gaps,
#: each counted as at most AUTO_GAP_CAP), for AUTO_FACTOR times that average,
#: at least AUTO_MIN and at most AUTO_MAX seconds.
AUTO_MAX_GAP = 0.0005
AUTO_GAP_CAP = 0.001
AUTO_FACTOR = 4.0
AUTO_MIN = 0.0003
AUTO_MAX = 0.001
#: Seconds a parked guest has to reach its park exit before it is kicked.
PARK_KICK_AFTER = 0.05
#: Seconds a sandbox stays on the exit path after the budget had no room for
#: it: going hot and parking again at every call costs more than the exits.
CROWDED_COOLDOWN = 0.02
#: A sandbox does not spin while another thread made a call this recently
#: (seconds): a few GIL switch intervals.
OTHER_CALLERS_WINDOW = 0.02

#: ``spin="auto"`` measures whether spinning pays (:class:`AutoChooser`): it
#: runs the mode it prefers for a stretch of calls (AUTO_FIRST_RUN at first,
#: twice as long after each probe the mode wins, at most AUTO_LONGEST_RUN),
#: then probes: AUTO_PROBE_BLOCKS pairs of blocks, the other mode and its own
#: in turn (so that both see the same moments of a noisy machine), each block
#: AUTO_PROBE_BLOCK timed calls after it settled (AUTO_SETTLE calls and
#: AUTO_SETTLE_TIME seconds: a hot thread woken on a busy machine waits for a
#: CPU before its first answers), and spins on only where that made the
#: caller's calls come back sooner by AUTO_MARGIN.
AUTO_FIRST_RUN = 200
AUTO_LONGEST_RUN = 16_000
AUTO_PROBE_BLOCK = 16
AUTO_PROBE_BLOCKS = 3
AUTO_SETTLE = 4
AUTO_SETTLE_TIME = 0.005
AUTO_MARGIN = 0.1


class SpinControl(Protocol):
    """What starting, parking and watching a spinning guest use of its sandbox
    (a :class:`~.core.Sandbox`, or a part of it): its machine and the
    doorbell's spin budget."""

    @property
    def _machine(self) -> Machine: ...
    def _set_spin(self, ticks: int) -> None: ...


class HotOwner(SpinControl, Protocol):
    """What a :class:`HotSession` uses of its sandbox (a :class:`~.core.Sandbox`)."""

    @property
    def id(self) -> str: ...
    @property
    def config(self) -> SandboxConfig: ...
    @property
    def _lock(self) -> threading.Lock: ...
    @property
    def _holder(self) -> object: ...
    def _hot_returned(self, hot: HotSession) -> None: ...


class AutoChooser:
    """Whether a ``spin="auto"`` sandbox spins after a call, by measurement.

    Spinning makes a call cheaper only when the spinning guest takes no CPU
    that the caller needs: with more runnable threads than CPUs (a busy
    machine, the supervisor's event loop and worker beside the guest) it
    can make calls slower than exits. So the chooser times what the caller
    sees, the *cycle* from the end of one call to the end of the next (the
    caller's own work included), in both modes, and spins only where that
    clearly pays. It only counts calls that came back to back; it holds no
    lock and does no I/O (the sandbox's lock guards it), so it is tested on
    its own."""

    __slots__ = ("_block", "_counted", "_left", "_run", "_samples", "_settle", "_waited", "hot")

    def __init__(self) -> None:
        self.hot = True  # the preferred mode
        self._run = self._left = AUTO_FIRST_RUN
        self._block = -1  # the probe's block (-1: not probing)
        self._counted = 0  # timed calls of the block so far
        self._settle = 0  # calls the block still lets pass untimed
        self._waited = 0.0  # seconds of cycles the block let pass so far
        self._samples: dict[bool, list[float]] = {True: [], False: []}

    @property
    def probing(self) -> bool:
        return self._block >= 0

    @property
    def spinning(self) -> bool:
        """The mode of the next call: True to spin after it."""
        if self._block < 0:
            return self.hot
        return self.hot if self._block % 2 else not self.hot

    def record(self, cycle: float, *, back_to_back: bool) -> bool:
        """The call that ran in :attr:`spinning` mode ended ``cycle`` seconds
        after the previous one: count it, and return the mode for the next."""
        if self._block < 0:
            self._left -= 1
            if self._left <= 0:
                self._samples = {True: [], False: []}
                self._start_block(0)
            return self.spinning
        mode = self.spinning
        if self._settle or self._waited < AUTO_SETTLE_TIME:
            self._settle = max(self._settle - 1, 0)
            self._waited += cycle
        elif back_to_back:
            self._samples[mode].append(cycle)
            self._counted += 1
        else:
            self._counted += 1  # an idle caller: nothing to time, but the probe goes on
        if self._counted >= AUTO_PROBE_BLOCK:
            if self._block + 1 < 2 * AUTO_PROBE_BLOCKS:
                self._start_block(self._block + 1)
            else:
                self._block = -1
                self._decide()
        return self.spinning

    def _start_block(self, block: int) -> None:
        self._block, self._counted = block, 0
        self._settle, self._waited = AUTO_SETTLE, 0.0

    def _decide(self) -> None:
        """Spin only where it clearly pays: a spinning guest costs a CPU, so
        spinning must beat the exit path by AUTO_MARGIN (either way round)."""
        hot, cold = self._samples[True], self._samples[False]
        if not hot or not cold:
            hot_wins = self.hot  # nothing timed (calls not back to back): as it was
        else:
            hot_wins = _median(hot) < (1 - AUTO_MARGIN) * _median(cold)
        if hot_wins != self.hot:
            self.hot, self._run = hot_wins, AUTO_FIRST_RUN
        else:
            self._run = min(2 * self._run, AUTO_LONGEST_RUN)
        self._left = self._run


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


class HotSession:
    """The thread that runs a sandbox's vCPU between calls, and its state.
    Fields are guarded by the sandbox's state lock, except ``exit``, which the
    hot thread writes before it raises ``flag`` and which only the holder of
    the vCPU reads after it saw the flag."""

    def __init__(self, sandbox: HotOwner) -> None:
        self._sandbox = weakref.ref(sandbox)
        self.vcpu: Vcpu = sandbox._machine.vcpu
        self.flag = native.Flag()  # raised when KVM_RUN returned on the hot thread
        self.running = False  # the hot thread is in (or about to enter) KVM_RUN
        self.closing = False
        self.exit: Exit | BaseException | None = None
        self.parked_at = 0.0  # monotonic time a park was asked, 0 when none
        self.kicked = False
        self.cooldown_until = 0.0  # no spin before then (the budget was full)
        self.reaper_due = 0.0  # the deadline the reaper holds for it (0: none; sandbox lock)
        self._go = threading.Event()
        self.per_second = self.vcpu.tsc_khz() * 1000  # TSC ticks
        spin = sandbox.config.spin
        longest = AUTO_MAX if spin == AUTO else float(spin)
        self.answer_ticks = self.ticks_for(min(longest, ANSWER_SPIN))
        started = threading.Event()
        self.thread = threading.Thread(
            target=self._main, args=(started,), name=f"hlasync-hot-{sandbox.id}", daemon=True
        )
        # A sandbox dropped without close(): the thread ends with it (it holds
        # only a weak reference, so it sleeps until then without waking up).
        weakref.finalize(sandbox, self.close)
        self.thread.start()
        started.wait()

    def ticks_for(self, seconds: float) -> int:
        """A spin of ``seconds`` in the guest's TSC ticks (at least one)."""
        return max(int(self.per_second * seconds), 1)

    def start(self, sandbox: SpinControl, seconds: float) -> None:
        """Resume the guest on the hot thread, spinning for ``seconds`` (sandbox
        lock held; the vCPU is stopped and nobody else runs it)."""
        sandbox._machine.write_bell(abi.WORD_ANSWER_SPIN, self.answer_ticks)
        sandbox._set_spin(self.ticks_for(seconds))
        self.flag.lower()
        self.exit = None
        self.parked_at, self.kicked = 0.0, False
        self.running = True
        self._go.set()

    def park(self, sandbox: SpinControl, now: float, *, kick: bool = False) -> None:
        """Ask the guest to stop spinning (sandbox lock held); kick it out of
        KVM_RUN at once with ``kick`` (a guest that may not park), else when it
        has not parked within PARK_KICK_AFTER of the first request."""
        if not self.parked_at:
            self.parked_at = now
            sandbox._set_spin(0)
        if not self.kicked and (kick or now - self.parked_at >= PARK_KICK_AFTER):
            self.kicked = True
            self.vcpu.kick()

    def expire(self) -> None:
        """The spin should be over (the reaper's deadline passed): a guest still
        spinning without a call ignored its budget; stop it."""
        sandbox = self._sandbox()
        if sandbox is None:
            return
        with sandbox._lock:
            if sandbox._holder is self and self.running:
                self.park(sandbox, time.monotonic(), kick=True)

    def close(self) -> None:
        """End the hot thread once it is idle (sandbox lock held)."""
        self.closing = True
        self._go.set()

    def _main(self, started: threading.Event) -> None:
        started.set()
        while True:
            self._go.wait()
            self._go.clear()
            if not self._serve_once():
                return

    def _serve_once(self) -> bool:
        """One KVM_RUN for the sandbox; False when the thread should end. The
        sandbox is held only meanwhile: an idle hot thread keeps nothing alive."""
        sandbox = self._sandbox()
        if sandbox is None:
            if self.running:  # started, then dropped before the thread woke up
                self.running = False
                budget.give_back()
            return False
        if self.closing:
            if self.running:  # started, then closed at once
                sandbox._hot_returned(self)
            return False
        try:
            # On the vCPU's owner thread; a kick that comes after it returned
            # stays pending there and interrupts the next KVM_RUN at once.
            exit_: Exit | BaseException = self.vcpu.run(long=True)
        except BaseException as exc:  # noqa: BLE001 - handed to whoever holds the vCPU
            exit_ = exc
        self.exit = exit_
        sandbox._hot_returned(self)  # raises the flag, under the sandbox's lock
        return True


def read_done_seq(sandbox: SpinControl) -> int:
    """The last call the guest's dispatcher says it finished."""
    return int(sandbox._machine.bell[abi.WORD_DONE_SEQ])


#: How long the reaper's thread outlives the last hot session (seconds): a
#: pool whose members go cold and hot again call after call would otherwise
#: start a thread for nearly every call (in a probe of a hot pool in a worker
#: process, starting them took 13% of its vCPU thread's time).
REAPER_LINGER = 0.05


class _Reaper:
    """One thread for every hot session of the process: at each session's
    deadline (its spin plus PARK_KICK_AFTER after its last call) it stops a
    guest that is still spinning with no call, so that no guest can keep a
    CPU busy longer than its sandbox's ``spin`` allows. Its thread ends
    :data:`REAPER_LINGER` after no session is hot (at once when a closing
    sandbox settles it), and the next hot session starts another."""

    def __init__(self) -> None:
        self._changed = threading.Condition(threading.Lock())
        self._due: dict[HotSession, float] = {}
        self._thread: threading.Thread | None = None
        self._ending: threading.Thread | None = None  # the last thread, once it ends
        self._wakes_at = float("inf")  # when the reaper wakes up next on its own
        self._quit = False  # settle(): end now if nothing is hot, without lingering

    def watch(self, hot: HotSession, spin_end: float) -> None:
        """Stop ``hot``'s guest if it still spins :data:`PARK_KICK_AFTER` after
        ``spin_end`` (sandbox lock held). A deadline moves only when less than
        half that grace is left: most calls take no lock here."""
        if hot.reaper_due >= spin_end + PARK_KICK_AFTER / 2:
            return
        deadline = hot.reaper_due = spin_end + PARK_KICK_AFTER
        with self._changed:
            self._due[hot] = deadline
            self._quit = False
            if self._thread is None:
                self._thread = threading.Thread(target=self._main, name="hlasync-hot-reaper")
                self._thread.daemon = True
                self._thread.start()
            if deadline < self._wakes_at:  # most calls move a deadline later: no wake-up
                self._changed.notify()

    def forget(self, hot: HotSession) -> None:
        """``hot`` went cold or closed: no deadline."""
        with self._changed:
            hot.reaper_due = 0.0
            if self._due.pop(hot, None) is not None and not self._due:
                self._changed.notify()

    def settle(self, timeout: float) -> None:
        """If nothing is hot any more, end the reaper's thread now and wait (at
        most ``timeout``) for it to end."""
        with self._changed:
            if self._due:
                return
            thread = self._thread or self._ending
            if self._thread is not None:
                self._quit = True
                self._changed.notify()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _main(self) -> None:
        while True:
            with self._changed:
                idle_since: float | None = None
                while True:
                    now = time.monotonic()
                    if not self._due:  # nothing hot: the thread lingers, then ends
                        idle_since = now if idle_since is None else idle_since
                        self._wakes_at = float("inf")
                        if self._quit or now - idle_since >= REAPER_LINGER:
                            self._quit = False
                            self._ending, self._thread = self._thread, None
                            return
                        self._changed.wait(idle_since + REAPER_LINGER - now)
                        continue
                    idle_since = None
                    hot, due = min(self._due.items(), key=lambda item: item[1])
                    if due <= now:
                        del self._due[hot]
                        break
                    self._wakes_at = due
                    self._changed.wait(due - now)
            hot.expire()  # without the reaper's lock: it takes the sandbox's


reaper = _Reaper()


class HotBudget:
    """Whether a sandbox whose call ends may spin. A hot call keeps two CPUs
    busy (the spinning guest, the waiting caller), so: at most one hot sandbox
    per two CPUs this process may run on, at least one (``$HLASYNC_HOT_SLOTS``
    overrides it), counting the calls in flight on the exit path; and none
    while another thread has called a sandbox within
    :data:`OTHER_CALLERS_WINDOW`. Otherwise several callers, spinning guests and
    the GIL take turns and calls get slower than exits would make them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._used = 0  # hot sessions in KVM_RUN
        self._calls: list[None] = []  # one per call between _begin_call and _end_call
        # The thread whose call ended last, when, and when a call of another
        # thread last ended before that thread's run of calls began.
        self._last_thread = 0
        self._last_end = 0.0
        self._other_end = 0.0
        self.slots = self._slots()
        #: The helper library once this process shares a spin board with the
        #: other worker processes of its supervisor (:meth:`share`), else None.
        self._board: Any = None

    @staticmethod
    def _slots() -> int:
        text = os.environ.get("HLASYNC_HOT_SLOTS", "").strip()
        if text.isdigit() and int(text) > 0:
            return int(text)
        return max(1, len(os.sched_getaffinity(0)) // 2)

    def call_started(self) -> None:
        # list.append/pop are atomic under the GIL: no lock on every call's path.
        self._calls.append(None)

    def end_call(self, *, running: bool, wanted: bool, thread: int, now: float) -> bool:
        """Call of ``thread`` ends at ``now`` (it leaves the calls in flight).
        True when its sandbox may spin: no other thread called a sandbox within
        :data:`OTHER_CALLERS_WINDOW` (threads that wait for the GIL are not in a
        call, but a spinning guest takes the CPU they need), and the hot
        sandboxes and calls in flight leave a slot. ``running`` (its guest still
        spins) keeps its slot then; otherwise a free slot is taken for it."""
        self._calls.pop()
        # O(1) on every call: no walk over the threads, which would grow with
        # them exactly when the GIL is busiest.
        if thread != self._last_thread:
            self._other_end, self._last_thread = self._last_end, thread
        self._last_end = now
        if not wanted or now - self._other_end < OTHER_CALLERS_WINDOW:
            return False
        others = len(self._calls)
        board = self._board
        if running:
            used = board.hl_owner_hot() if board is not None else self._used
            return used - 1 + others < self.slots
        with self._lock:
            if self._used + others >= self.slots:
                return False
            if board is not None and not board.hl_owner_take_hot(others):
                return False  # the other worker processes' hot sandboxes take the slots
            self._used += 1
            return True

    def give_back(self) -> None:
        with self._lock:
            self._used -= 1
            if self._board is not None:
                self._board.hl_owner_give_hot()

    def share(self, slots: int) -> None:
        """Count this process's hot sandboxes in its spin board too
        (:mod:`hlasync.supervisor.spinboard`, attached before any sandbox was
        made), against the board's ``slots``: a worker process's sandbox goes
        hot only while the hot sandboxes of all the supervisor's worker
        processes leave a slot."""
        from ..kvm.helper import library

        self.slots, self._board = slots, library()

    @property
    def active(self) -> int:
        """Calls in flight in this process, hot or not."""
        return len(self._calls)


budget = HotBudget()


def _forked() -> None:
    # The helper library's child counts alone (hl_owner_forked): so does the budget.
    budget._board, budget.slots = None, HotBudget._slots()


os.register_at_fork(after_in_child=_forked)
