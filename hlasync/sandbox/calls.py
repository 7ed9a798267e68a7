"""A call on a sandbox: its identity, the thread that called it, and the
requests other threads make of it.

Every ``KVM_RUN`` and vCPU ioctl runs on the vCPU's owner thread
(:mod:`hlasync.kvm.owner`). A running call is the sandbox's holder: its
*caller* (the thread that called it) posts the call's ``KVM_RUN``s to the
owner and acts on each exit. Other threads never wait on a lock the caller
holds for long: they post a request on the :class:`Call` (stop it, dump it)
under the sandbox's small state lock and *kick* the guest out of
``KVM_RUN``; the caller answers at its next safe point. While the caller
runs host code (a host function, the output callback) the vCPU is paused: a
dump may *borrow* it then, and the caller waits for the loan to end before
it resumes the guest.

A kick goes to a vCPU's owner thread (:mod:`hlasync.kvm.owner`), the one
thread that runs it: its ``KVM_RUN`` returns, or its next one at once. A host
function may run another sandbox's call on the calling thread, so a request
for a call kicks the vCPU of the innermost call its thread waits for (its
:class:`ThreadRunner` knows the calls), which then looks at its own requests
and at those of the calls it runs inside (stopping an outer call stops the
calls nested in it).
"""

from __future__ import annotations

import enum
import itertools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Protocol

from ..errors import CrashdumpError
from ..kvm import Vcpu

if TYPE_CHECKING:
    from .._telemetry import CallSpan
    from .hot import HotSession

__all__ = [
    "Call",
    "CallHandle",
    "DumpRequest",
    "Phase",
    "StopResult",
    "Stoppable",
    "ThreadRunner",
    "current_runner",
]

_logger = logging.getLogger("hlasync")
_call_ids = itertools.count(1)
_local = threading.local()


class Phase(enum.Enum):
    GUEST = "guest"  # the owner may be inside KVM_RUN: requests need a kick
    HOST = "host"  # the owner runs host code: the vCPU is paused and may be borrowed
    ENDED = "ended"


class ThreadRunner:
    """The calls one thread runs (more than one when a host function calls
    another sandbox), and where a kick for them goes."""

    def __init__(self) -> None:
        self.ident = threading.get_ident()
        self.calls: list[Call] = []  # outermost first; more than one via host functions

    def kick(self) -> None:
        """Interrupt the guest this thread waits for: the vCPU of its innermost
        call (its owner's KVM_RUN returns now, or its next one at once). That
        call then looks at its own requests and those of the calls it runs
        inside."""
        calls = self.calls
        if calls:
            calls[-1].vcpu.kick()


def current_runner() -> ThreadRunner:
    runner: ThreadRunner | None = getattr(_local, "runner", None)
    if runner is None:
        runner = _local.runner = ThreadRunner()
    return runner


class DumpRequest:
    """A core dump asked of a paused vCPU: a small future.

    ``borrowed`` says whether it was written by borrowing the vCPU while the
    owner ran host code (rather than by the owner itself).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None,
        reason: str,
        annotations: Mapping[str, object] | None = None,
    ) -> None:
        self.directory = directory
        self.reason = reason
        #: Extra fields for the dump's hlasync note (e.g. a JS stack captured first).
        self.annotations = dict(annotations or {})
        self.borrowed = False
        self.path: Path | None = None
        self.error: CrashdumpError | None = None
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[DumpRequest], object]] = []

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None) -> bool:
        return self._done.wait(timeout)

    def set_result(self, path: Path | None, error: CrashdumpError | None) -> None:
        with self._lock:
            self.path, self.error = path, error
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            self._run(callback)

    def add_done_callback(self, callback: Callable[[DumpRequest], object]) -> None:
        """Call ``callback(request)`` once the dump is written or failed (at once
        if it is already), on the thread that finished it."""
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(callback)
                return
        self._run(callback)

    def _run(self, callback: Callable[[DumpRequest], object]) -> None:
        try:
            callback(self)
        except Exception:  # a broken callback must not break the dump
            _logger.exception("dump request callback %r failed", callback)


class StopResult(NamedTuple):
    """What a request to stop a call (``Sandbox._stop``) did."""

    stopped: bool  # this request stopped the call (False: ended or already stopping)
    dump: DumpRequest | None  # the dump asked for, if any
    in_host: bool  # the call was running host code (a host function) on another thread


class Call:
    """One call on one sandbox, from start to outcome. Fields other than the
    identity are guarded by the sandbox's state lock."""

    __slots__ = (
        "asking",
        "began",
        "borrowed",
        "cancelled",
        "dumps",
        "function",
        "hot",
        "id",
        "parent",
        "phase",
        "requests",
        "runner",
        "sandbox_id",
        "span",
        "started",
        "thread",
        "vcpu",
        "waiting",
    )

    def __init__(
        self,
        sandbox_id: str,
        function: str,
        runner: ThreadRunner,
        vcpu: Vcpu,
        span: CallSpan | None = None,
    ) -> None:
        self.id = next(_call_ids)
        #: Its telemetry (span and timing), when traces or metrics are recorded.
        self.span = span
        self.vcpu = vcpu  # its sandbox's: a kick goes to that vCPU's owner
        self.sandbox_id = sandbox_id
        self.function = function
        self.runner = runner
        self.thread = runner.ident
        #: The call this thread was running (in a host function) when it began this one.
        self.parent: Call | None = runner.calls[-1] if runner.calls else None
        self.phase = Phase.GUEST
        self.cancelled = False
        self.requests: list[DumpRequest] = []  # dumps for the owner to write
        self.borrowed = 0  # dumps written by other threads while the owner runs host code
        self.dumps: list[DumpRequest] = []  # every dump made of this call, oldest first
        self.started = False  # guest code has run for it (set by the owner)
        self.began = time.monotonic()
        #: The hot session it took the vCPU from (its guest was spinning), if any.
        self.hot: HotSession | None = None
        #: Set while the owner answers a host call or print the guest asked on
        #: the doorbell: the guest still runs on this session's thread, to be
        #: stopped before the vCPU is read (a dump).
        self.asking: HotSession | None = None
        #: CPU time the calling thread spent waiting for a hot guest's answer on
        #: the doorbell (seconds of its thread clock), and that clock's value
        #: when its current wait began (None between waits): one tuple, set at
        #: once, so another thread reads a consistent pair (see waited_cpu).
        self.waiting: tuple[float, float | None] = (0.0, None)

    def waited_cpu(self, thread_cpu_now: float) -> float:
        """Seconds of the calling thread's CPU spent waiting for the guest's
        answer so far, given that thread's CPU clock now: a CPU-time limit
        leaves it out (the guest's own time is counted on the owner thread)."""
        total, since = self.waiting
        return total + (thread_cpu_now - since if since is not None else 0.0)

    def stop_requested(self) -> bool:
        """Whether this call, or a call it runs inside, was asked to stop."""
        call: Call | None = self
        while call is not None:
            if call.cancelled:
                return True
            call = call.parent
        return False

    def last_dump(self) -> tuple[Path | None, CrashdumpError | None]:
        """Path of the newest dump made of this call, and the newest failure."""
        paths = [d.path for d in self.dumps if d.path is not None]
        errors = [d.error for d in self.dumps if d.error is not None]
        return (paths[-1] if paths else None), (errors[-1] if errors else None)

    def __repr__(self) -> str:
        return f"<Call {self.id} {self.function} on {self.sandbox_id} {self.phase.value}>"


class Stoppable(Protocol):
    """What a :class:`CallHandle` uses of its sandbox (a :class:`~.core.Sandbox`)."""

    def _stop(self, call: Call) -> StopResult: ...


class CallHandle:
    """A running (or finished) call of a :class:`~hlasync.Sandbox`.

    Get one from :attr:`Sandbox.current_call`. :meth:`interrupt` stops exactly
    this call: once it has ended, the handle stops nothing, not even a later
    call on the same sandbox.
    """

    __slots__ = ("_call", "_sandbox")

    def __init__(self, sandbox: Stoppable, call: Call) -> None:
        self._sandbox = weakref.ref(sandbox)
        self._call = call

    @property
    def id(self) -> int:
        """Unique in this process, increasing."""
        return self._call.id

    @property
    def function(self) -> str:
        return self._call.function

    @property
    def sandbox_id(self) -> str:
        return self._call.sandbox_id

    @property
    def running(self) -> bool:
        return self._call.phase is not Phase.ENDED

    def interrupt(self) -> bool:
        """Stop this call (from any thread); True if this stopped it.

        The call then raises :class:`~hlasync.GuestCancelled` and its sandbox is
        poisoned until ``restore()``. False when the call has ended or is
        already being stopped.
        """
        sandbox = self._sandbox()
        return sandbox is not None and sandbox._stop(self._call).stopped

    def __repr__(self) -> str:
        state = "running" if self.running else "ended"
        return f"<CallHandle {self.id} {self.function} on {self.sandbox_id} {state}>"
