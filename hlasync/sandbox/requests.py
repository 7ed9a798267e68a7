"""Requests that other threads make of a sandbox's running call (stop it,
dump it), and the caller's side: how it answers them.

A request is posted on the :class:`~.calls.Call` under the sandbox's state
lock, and the guest is kicked out of ``KVM_RUN`` (:meth:`Requests._stop`,
:meth:`Requests._dump_now`); nothing here waits on the caller with the lock
held. The caller answers at its next safe point: after a kick
(:meth:`Requests._on_kick`), as it leaves the guest for host code
(:meth:`Requests._enter_host`) and as it comes back (:meth:`Requests._leave_host`,
which first waits for the dumps that *borrowed* the paused vCPU meanwhile).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from ..errors import CrashdumpError, GuestCancelled, SandboxBusy
from . import runner
from .calls import Call, DumpRequest, Phase, StopResult
from .dumps import try_dump, write_dump
from .faults import ExceptionInfo
from .holder import SandboxBase, _Operation
from .states import SandboxState

__all__ = ["DUMP_PAUSE_TIMEOUT", "LOAN_TIMEOUT", "Requests"]

_logger = logging.getLogger("hlasync")

#: How long generate_crashdump() waits for a running vCPU to pause.
DUMP_PAUSE_TIMEOUT = 10.0
#: How long a call waits, before resuming its guest, for dumps that borrowed its vCPU.
LOAN_TIMEOUT = 60.0


class Requests(SandboxBase):
    """Stopping and dumping a running call from any thread, and the answers
    its caller gives (a part of :class:`~.core.Sandbox`)."""

    # --------------------------------------------- requests from other threads
    def _stop(
        self,
        call: Call,
        dump_reason: str | None = None,
        directory: str | os.PathLike[str] | None = None,
        annotations: Mapping[str, object] | None = None,
    ) -> StopResult:
        """Ask ``call`` to stop, first dumping it when ``dump_reason`` is given
        (and dumps are enabled). Never blocks: the dump is written by the
        call's owner, or by a new thread while the owner runs host code."""
        me = threading.get_ident()
        with self._lock:
            if self._holder is not call or call.phase is Phase.ENDED or call.cancelled:
                return StopResult(False, None, False)
            call.cancelled = True
            in_host = call.phase is Phase.HOST and call.thread != me
            request = None
            if dump_reason is not None and self.config.crashdump_enabled:
                request = DumpRequest(directory, dump_reason, annotations)
                if in_host:
                    request.borrowed = True
                    self._loans += 1
                else:
                    call.requests.append(request)
            self._kick_locked(call)
        if request is not None and in_host:
            threading.Thread(
                target=self._write_on_loan,
                args=(call, request),
                name=f"hlasync-dump-{self.id}",
                daemon=True,
            ).start()
        return StopResult(True, request, in_host)

    def _dump_now(
        self,
        directory: str | os.PathLike[str] | None,
        reason: str,
        annotations: Mapping[str, object] | None = None,
    ) -> Path:
        """A dump now, whatever the sandbox is doing (see generate_crashdump)."""
        if not self.config.crashdump_enabled:
            raise CrashdumpError(
                f"crash dumps are disabled for sandbox {self.id} (crashdump_enabled=False)"
            )
        me = threading.get_ident()
        request = DumpRequest(directory, reason, annotations)
        with self._lock:
            while True:
                if self._state is SandboxState.CLOSED:
                    self._raise_not_ready("dump")
                holder = self._holder
                if isinstance(holder, Call) and holder.phase is not Phase.ENDED:
                    call: Call | None = holder
                    if holder.thread == me:  # host code of this very call: the vCPU is paused
                        mode = "own"
                    elif holder.phase is Phase.HOST:
                        self._loans += 1
                        request.borrowed = True
                        mode = "loan"
                    else:
                        holder.requests.append(request)
                        holder.runner.kick()
                        mode = "request"
                    break
                try:
                    self._wait_for_operations("dump")
                except SandboxBusy:
                    if isinstance(self._holder, Call):
                        continue  # a call began while we waited: dump it as it runs
                    raise
                call = None
                self._holder = _Operation("dump")
                mode = "hold"
                break
        if call is not None:
            if mode == "request":
                return self._await_dump(call, request)
            if mode == "own":
                self._halt_asking(call)
                return write_dump(
                    self, reason, directory, function=call.function, annotations=annotations
                )
            self._write_on_loan(call, request)
            if request.error is not None:
                raise request.error
            assert request.path is not None
            return request.path
        try:
            fault = self.last_exception if self._state is SandboxState.POISONED else None
            return write_dump(
                self, reason, directory, function=None, fault=fault, annotations=annotations
            )
        finally:
            with self._lock:
                self._holder = None
                self._holder_left_locked()
                self._notify_locked()

    def _await_dump(self, call: Call, request: DumpRequest) -> Path:
        if not request.wait(DUMP_PAUSE_TIMEOUT):
            with self._lock:
                if request in call.requests:  # not taken: withdraw it
                    call.requests.remove(request)
                    withdrawn = True
                else:
                    withdrawn = False
            if withdrawn or not request.wait(DUMP_PAUSE_TIMEOUT):
                raise CrashdumpError(
                    f"sandbox {self.id}: the vCPU did not pause within {DUMP_PAUSE_TIMEOUT:g} s"
                )
        if request.error is not None:
            raise request.error
        assert request.path is not None
        return request.path

    def _write_on_loan(self, call: Call, request: DumpRequest) -> None:
        """Dump while the call's owner runs host code (``_loans`` counts us).
        The result is stored before the loan ends: the owner, back from host
        code, waits for the loan and then finds the dump in ``call.dumps``
        (and the request's callbacks have run)."""
        try:
            self._halt_asking(call)
            path, error = try_dump(
                self,
                request.reason,
                request.directory,
                function=call.function,
                annotations=request.annotations,
            )
            with self._lock:
                call.dumps.append(request)
            request.set_result(path, error)
        finally:
            with self._lock:
                self._loans -= 1
                self._release_if_closed_locked()
                self._notify_locked()

    # ------------------------------------------- the owner's side of requests
    def _serve(
        self, call: Call, requests: list[DumpRequest], fault: ExceptionInfo | None = None
    ) -> None:
        """Write dumps asked of this call (owner thread, vCPU paused)."""
        if requests:
            self._halt_asking(call)
        for request in requests:
            path, error = try_dump(
                self,
                request.reason,
                request.directory,
                function=call.function,
                fault=fault,
                annotations=request.annotations,
            )
            with self._lock:
                call.dumps.append(request)
            request.set_result(path, error)

    def _kick_locked(self, call: Call) -> None:
        """Interrupt ``call``'s guest (sandbox lock held; never blocks). While
        its owner runs a host function, the guest may still spin for the answer
        on its hot thread (``call.asking``), where the owner's kick does not
        reach: that thread's KVM_RUN is kicked too, so a stopped call leaves no
        guest on a CPU however long the host function takes."""
        call.runner.kick()
        call.vcpu.kick()  # the owner of this call's vCPU, which may be another's innermost
        hot = call.asking
        if hot is not None:
            runner.halt(self, hot)

    def _halt_asking(self, call: Call) -> None:
        """Stop the guest of a call whose owner answers a doorbell ask (the guest
        spins for the answer on its hot thread): a dump needs the vCPU stopped.
        The owner finds the exit when it goes back to waiting for the guest."""
        hot = call.asking
        if hot is not None:
            runner.reclaim(self, hot)

    def _on_kick(self, call: Call) -> None:
        """``KVM_RUN`` came back interrupted: answer whatever was asked of the call."""
        with self._lock:
            requests, call.requests = call.requests, []
            stop = call.stop_requested()
            call.cancelled = stop  # also when a call it runs inside was stopped
        self._serve(call, requests)  # a stopped call still gets its dump first
        if stop:
            raise self._cancelled_error(call)

    def _enter_host(self, call: Call) -> None:
        """The owner leaves the guest to run host code; the vCPU may be borrowed."""
        while True:
            with self._lock:
                requests, call.requests = call.requests, []
                if not requests:
                    call.phase = Phase.HOST
                    return
            self._serve(call, requests)

    def _leave_host(self, call: Call) -> None:
        """The owner is back from host code: wait for loans, then resume or stop."""
        with self._lock:
            deadline = time.monotonic() + LOAN_TIMEOUT
            while self._loans and time.monotonic() < deadline:
                self._wait_locked(deadline - time.monotonic())
            if self._loans:
                _logger.error(
                    "sandbox %s: a dump still reads guest memory after %g s; resuming",
                    self.id,
                    LOAN_TIMEOUT,
                )
            call.phase = Phase.GUEST
            requests, call.requests = call.requests, []
            stop = call.stop_requested()
            call.cancelled = stop
        self._serve(call, requests)
        if stop:
            raise self._cancelled_error(call)

    def _cancelled_error(self, call: Call) -> GuestCancelled:
        path, failure = call.last_dump()
        error = GuestCancelled(
            "call interrupted", sandbox_id=self.id, function=call.function, core_path=path
        )
        error.crashdump_error = failure
        return error
