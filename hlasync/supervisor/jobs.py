"""One call, from submission to completion (:class:`Job`), and which call a
vCPU thread runs. The limits' values (``DEFAULT``, ``check_limit``) live in
:mod:`.settings` and are importable from here too."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from ..abi import Arg, FunctionSignature, Value
from ..errors import CrashdumpError
from ..sandbox import Sandbox
from ..sandbox.calls import Call
from .settings import DEFAULT, check_limit

if TYPE_CHECKING:
    from .._telemetry import CallSpan
    from .targets import Target

__all__ = ["DEFAULT", "Job", "check_limit", "current_job"]

_tls = threading.local()  # .job: the call running on this vCPU thread


def current_job() -> Job | None:
    """The call this vCPU thread is running (host functions ask), or None."""
    return getattr(_tls, "job", None)


def set_current_job(job: Job | None) -> None:
    _tls.job = job


class Job:
    """One call, from submission to completion."""

    __slots__ = (
        "abandoned",
        "args",
        "call",
        "call_id",
        "core_path",
        "cpu_clock",
        "cpu_start",
        "cpu_timeout",
        "delivered",
        "done",
        "dump_error",
        "error",
        "expired",
        "expired_at",
        "finished",
        "host_scopes",
        "js_stack",
        "lateness",
        "lock",
        "name",
        "owner_clock",
        "owner_start",
        "path",
        "paused_start",
        "queued_at",
        "resent",
        "result",
        "sandbox",
        "sandbox_id",
        "signature",
        "span",
        "started_at",
        "target",
        "timeout",
    )

    def __init__(
        self,
        call_id: int,
        target: Target,
        signature: FunctionSignature,
        args: tuple[Arg, ...],
        timeout: float | None,
        cpu_timeout: float | None,
    ) -> None:
        self.call_id = call_id
        self.target = target
        self.signature = signature  # the arguments were checked against it
        self.name = signature.name
        self.args = args
        self.timeout = timeout
        self.cpu_timeout = cpu_timeout
        #: Set on the loop once the outcome is known (the front's jobs only: a
        #: worker process's copy of a call has no loop): an asyncio future
        #: on asyncio (a tenth of the cost of an ``anyio.Event``), else an
        #: ``anyio.Event``; ``delivered`` says it was set.
        self.done: asyncio.Future[None] | anyio.Event | None = None
        self.delivered = False
        self.lock = threading.Lock()
        self.finished = False  # outcome decided (worker or watchdog), under lock
        self.result: Value = None
        self.error: BaseException | None = None
        self.sandbox: Sandbox | None = None
        self.call: Call | None = None  # once a worker has begun it on its sandbox
        self.queued_at = time.monotonic()
        self.started_at = 0.0
        self.expired: str | None = None  # "wall" or "cpu"
        self.expired_at = 0.0
        #: How late the watchdog noticed the expiry (seconds, CPU-seconds for "cpu").
        self.lateness = 0.0
        self.core_path: Path | None = None
        self.dump_error: CrashdumpError | None = None
        self.abandoned = False
        self.cpu_clock = 0
        self.cpu_start = 0.0
        #: The CPU clock of the hot thread whose guest answers the call through
        #: the doorbell (``Sandbox`` spin), or None: the guest's CPU time is
        #: spent there, not on the worker thread.
        self.owner_clock: int | None = None
        self.owner_start = 0.0
        #: The sandbox's time stopped in a debugger when the call began: its
        #: wall-clock limit leaves out what is added to that meanwhile.
        self.paused_start = 0.0
        self.host_scopes: list[anyio.CancelScope] = []
        self.js_stack: str | None = None  # a JS handler's stack when its limit expired
        #: Its telemetry (``hlasync.call`` span, timing), made on the caller's side.
        self.span: CallSpan | None = None
        #: How it reached its guest (``exit`` or ``doorbell``) and on which
        #: sandbox, once a worker ran it (for its span).
        self.path: str | None = None
        self.sandbox_id: str | None = None
        #: Times it was sent again because its worker process died before it
        #: started (worker processes; see proc_relaunch).
        self.resent = 0

    def outcome(self) -> Value:
        """Its result, or its error raised (once it is done)."""
        if self.error is not None:
            raise self.error
        return self.result


def cpu_used(job: Job) -> float:
    """Seconds of CPU the call has used so far: its worker thread's (host code,
    less its waits for a hot guest's answer on the doorbell) and its vCPU's
    owner thread's (``owner_clock``: the guest runs there). OSError when the
    worker thread is gone."""
    now = time.clock_gettime(job.cpu_clock)
    used = now - job.cpu_start
    call = job.call
    if call is not None:  # the worker's waits for a hot guest's answer are the guest's time
        used -= call.waited_cpu(now)
    if job.owner_clock is not None:
        try:
            used += time.clock_gettime(job.owner_clock) - job.owner_start
        except OSError:  # the owner thread ended (the sandbox closed)
            job.owner_clock = None
    return used
