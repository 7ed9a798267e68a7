"""Core dumps of a sandbox: what is captured from a paused vCPU, and writing it.

Every function here expects the vCPU paused and held by the calling thread
(the call's owner, a borrower while the owner runs host code, or the holder
of an idle sandbox): none takes a lock, so a dump never blocks a thread that
only wants to interrupt or inspect the sandbox.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, Protocol

from .. import _telemetry as telemetry
from ..config import SandboxConfig
from ..crashdump import _format as core_format
from ..crashdump.placement import resolve_directory, write_atomically
from ..crashdump.writer import CrashContext, write_core
from ..errors import CrashdumpError, GuestAborted, GuestCrashed, GuestError, HlasyncError
from ..guest import layout as lay
from ..guest.image import GuestImage
from ..guest.layout import MemoryLayout
from ..kvm import kvm_sregs
from .calls import Call
from .faults import VECTOR_NAMES, ExceptionInfo
from .machine import Machine

__all__ = ["CrashdumpRecord", "Dumpable", "capture", "write_dump"]

_logger = logging.getLogger("hlasync")
_P = ParamSpec("_P")


@dataclass(frozen=True, slots=True)
class CrashdumpRecord:
    """A core dump a sandbox wrote (or failed to write, with ``error``)."""

    sandbox_id: str
    reason: str
    function: str | None
    path: Path | None
    size: int
    seconds: float
    error: CrashdumpError | None = None


class Dumpable(Protocol):
    """What a dump reads of a sandbox (a :class:`~.core.Sandbox`, or a part of it)."""

    @property
    def id(self) -> str: ...
    @property
    def image(self) -> GuestImage: ...
    @property
    def layout(self) -> MemoryLayout: ...
    @property
    def config(self) -> SandboxConfig: ...
    @property
    def _machine(self) -> Machine: ...
    @property
    def _crashdump_listeners(self) -> list[Callable[[CrashdumpRecord], None]]: ...


def _version() -> str:
    from .. import __version__

    return __version__


def _special_registers(sregs: kvm_sregs) -> dict[str, int]:
    values = {name: getattr(sregs, name) for name in ("cr0", "cr2", "cr3", "cr4", "efer")}
    for seg in ("cs", "ds", "es", "fs", "gs", "ss", "tr"):
        values[seg] = getattr(sregs, seg).selector
    values["fs_base"] = sregs.fs.base
    values["gs_base"] = sregs.gs.base
    values["gdt_base"] = sregs.gdt.base
    values["idt_base"] = sregs.idt.base
    return values


def capture(
    sandbox: Dumpable,
    reason: str,
    *,
    function: str | None,
    error: GuestError | None = None,
    fault: ExceptionInfo | None = None,
    annotations: Mapping[str, object] | None = None,
) -> CrashContext:
    """The guest state a dump reports. ``fault``: show this faulting context
    instead of the vCPU's registers (which sit in the exception stub);
    ``annotations``: extra fields for the hlasync note."""
    machine = sandbox._machine
    vcpu = machine.vcpu
    if fault is not None:
        regs, sregs, user_mode = fault.regs, fault.sregs, True
    else:
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
        user_mode = sregs.cs.selector & 3 == 3
    try:
        xsave: bytes | None = bytes(vcpu.get_xsave())
    except HlasyncError:
        xsave = None
    signo, si_code = core_format.REASON_SIGNALS.get(reason, (signal.SIGQUIT, core_format.SI_USER))
    si_addr = 0
    if reason == "fault" and fault is not None:
        signo, si_code = core_format.VECTOR_SIGNALS.get(
            fault.vector, (signal.SIGSEGV, core_format.SI_KERNEL)
        )
        if fault.vector == 14:
            present = (fault.error_code or 0) & 1
            si_code = core_format.SEGV_ACCERR if present else core_format.SEGV_MAPERR
            si_addr = fault.cr2 or 0
        else:
            si_addr = fault.regs.rip
    now = datetime.datetime.now(datetime.UTC)
    metadata: dict[str, Any] = {
        "format": 1,
        "hlasync_version": _version(),
        "sandbox_id": sandbox.id,
        "reason": reason,
        "function": error.function if error is not None else function,
        "message": str(error) if error is not None else None,
        "guest": str(sandbox.image.path.resolve()),
        "pid": os.getpid(),
        "timestamp": now.isoformat(),
        "unix_time": now.timestamp(),
        "signal": signo,
        "vector": fault.vector if fault else None,
        "vector_name": VECTOR_NAMES.get(fault.vector, ("?",))[0] if fault else None,
        "error_code": fault.error_code if fault else None,
        "cr2": fault.cr2 if fault else None,
        "special_registers": _special_registers(sregs),
        "regions": [
            {"name": r.name, "start": r.start, "size": r.size, "flags": r.flags}
            for r in sandbox.layout.regions
        ],
    }
    if isinstance(error, GuestAborted):
        metadata["abort_code"] = error.code
        metadata["abort_message"] = error.guest_message
    for key, value in (annotations or {}).items():
        metadata.setdefault(key, value)
    return CrashContext(
        reason=reason,
        regs=regs,
        sregs=sregs,
        fpu=vcpu.get_fpu(),
        xsave=xsave,
        signo=signo,
        si_code=si_code,
        si_addr=si_addr,
        user_mode=user_mode,
        metadata=metadata,
    )


def write_dump(
    sandbox: Dumpable,
    reason: str,
    directory: str | os.PathLike[str] | None,
    *,
    function: str | None,
    error: GuestError | None = None,
    fault: ExceptionInfo | None = None,
    annotations: Mapping[str, object] | None = None,
) -> Path:
    """Capture and write one dump; every failure becomes :class:`CrashdumpError`.
    Listeners hear of the dump (or the failure) either way."""
    started = time.perf_counter()
    try:
        context = capture(
            sandbox, reason, function=function, error=error, fault=fault, annotations=annotations
        )
        memory = sandbox._machine.memory
        assert memory is not None
        runs = sandbox._machine.data_runs()
        target = resolve_directory(directory, sandbox.config.crashdump_dir)
        path, size = write_atomically(
            target,
            lambda fd: write_core(
                fd,
                memory=memory,
                regions=sandbox.layout.regions,
                image=sandbox.image,
                context=context,
                user_cs=lay.USER_CS,
                user_ss=lay.USER_DS,
                runs=runs,
            ),
            sandbox.config.crashdump_retention,
            extra=telemetry.dump_extra(sandbox.id, reason, function),
        )
    except Exception as exc:  # noqa: BLE001 - every failure is reported the same way
        failure = (
            exc
            if isinstance(exc, CrashdumpError)
            else CrashdumpError(
                f"sandbox {sandbox.id}: writing a core dump failed: {type(exc).__name__}: {exc}"
            )
        )
        if failure is not exc:
            failure.__cause__ = exc
        telemetry.dump_done(sandbox.id, reason, function, None, failure, _span_of(sandbox))
        notify(
            sandbox._crashdump_listeners,
            CrashdumpRecord(
                sandbox.id, reason, function, None, 0, time.perf_counter() - started, failure
            ),
        )
        raise failure from None
    telemetry.dump_done(sandbox.id, reason, function, str(path), None, _span_of(sandbox))
    notify(
        sandbox._crashdump_listeners,
        CrashdumpRecord(sandbox.id, reason, function, path, size, time.perf_counter() - started),
    )
    return path


def _span_of(sandbox: Dumpable) -> telemetry.CallSpan | None:
    """The telemetry of the call running on ``sandbox`` (its holder), if any."""
    holder = getattr(sandbox, "_holder", None)
    return holder.span if isinstance(holder, Call) else None


def notify(listeners: list[Callable[[CrashdumpRecord], None]], record: CrashdumpRecord) -> None:
    for listener in list(listeners):
        try:
            listener(record)
        except Exception:  # a broken listener must not break the dump
            _logger.exception("crash dump listener %r failed", listener)


def _returning_failure(
    write: Callable[_P, Path],
) -> Callable[_P, tuple[Path | None, CrashdumpError | None]]:
    def returning(*args: _P.args, **kwargs: _P.kwargs) -> tuple[Path | None, CrashdumpError | None]:
        try:
            return write(*args, **kwargs), None
        except CrashdumpError as exc:
            return None, exc

    return returning


#: :func:`write_dump` that returns ``(path, None)`` or ``(None, failure)`` instead of raising.
try_dump = _returning_failure(write_dump)


def attach_automatic_dump(
    sandbox: Dumpable, error: GuestError, fault: ExceptionInfo | None
) -> None:
    """Write the dump a fault, abort or protocol error gets, onto ``error``."""
    from ..errors import GuestProtocolError

    if isinstance(error, GuestProtocolError):
        reason = "protocol-error" if error.vcpu_exit is None else "unexpected-exit"
    else:
        reason = "fault" if isinstance(error, GuestCrashed) else "abort"
    error.core_path, error.crashdump_error = try_dump(
        sandbox, reason, None, function=error.function, error=error, fault=fault
    )
