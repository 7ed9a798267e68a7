"""Sandbox: one guest in one KVM micro-VM (one VM, one vCPU). Synchronous.

States: ``ready`` (idle, a call may start), ``running`` (a call is on the
vCPU), ``poisoned`` (a fault, abort, protocol error or interrupt left the
guest dirty: only :meth:`Sandbox.restore` helps) and ``closed``.

A call writes its frame into the guest's input buffer and resumes the vCPU
once (``KVM_RUN``): the guest's resident dispatcher reads the call, runs the
function, writes the result to the output buffer and exits through its
``out`` to the return port, where it waits for the next call. Host calls,
prints, aborts and exceptions are other ports of the same loop.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import enum
import itertools
import logging
import os
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from . import abi
from .abi import Arg, FrameError, FunctionSignature, Value
from .config import SandboxConfig
from .crashdump import _format as core_format
from .crashdump.placement import resolve_directory, write_atomically
from .crashdump.writer import CrashContext, write_core
from .errors import (
    ArgumentError,
    CrashdumpError,
    FunctionNotFound,
    GuestAborted,
    GuestCancelled,
    GuestCrashed,
    GuestError,
    GuestImageError,
    GuestProtocolError,
    GuestResultError,
    HlasyncError,
    HostFunctionError,
    IoctlError,
    SandboxBusy,
    SandboxClosed,
    SandboxPoisoned,
)
from .guest import layout as lay
from .guest.image import GuestImage
from .guest.layout import MemoryLayout
from .guest.memory import GuestMemory, MemoryImage
from .kvm import Kvm, Vcpu, Vm, _abi, kvm_fpu, kvm_regs, kvm_segment, kvm_sregs
from .kvm.exits import Interrupted, IoOut, Shutdown

__all__ = [
    "VECTOR_NAMES",
    "CrashdumpRecord",
    "ExceptionInfo",
    "Sandbox",
    "SandboxState",
    "Snapshot",
    "live_sandboxes",
]

PAGE_SIZE = 0x1000
#: Above this many written pages, restore drops them all (madvise) instead of copying.
RESET_COPY_LIMIT = 512

#: How long generate_crashdump() waits for a running vCPU to pause.
DUMP_PAUSE_TIMEOUT = 10.0

VECTOR_NAMES: dict[int, tuple[str, str]] = {
    0: ("#DE", "divide error"),
    1: ("#DB", "debug exception"),
    2: ("NMI", "non-maskable interrupt"),
    3: ("#BP", "breakpoint"),
    4: ("#OF", "overflow"),
    5: ("#BR", "bound range exceeded"),
    6: ("#UD", "invalid opcode"),
    7: ("#NM", "device not available"),
    8: ("#DF", "double fault"),
    9: ("#MF9", "coprocessor segment overrun"),
    10: ("#TS", "invalid TSS"),
    11: ("#NP", "segment not present"),
    12: ("#SS", "stack-segment fault"),
    13: ("#GP", "general protection fault"),
    14: ("#PF", "page fault"),
    16: ("#MF", "x87 floating-point exception"),
    17: ("#AC", "alignment check"),
    18: ("#MC", "machine check"),
    19: ("#XM", "SIMD floating-point exception"),
    20: ("#VE", "virtualization exception"),
    21: ("#CP", "control protection exception"),
    28: ("#HV", "hypervisor injection exception"),
    29: ("#VC", "VMM communication exception"),
    30: ("#SX", "security exception"),
}


class SandboxState(enum.Enum):
    READY = "ready"
    RUNNING = "running"
    POISONED = "poisoned"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class ExceptionInfo:
    """A CPU exception taken by guest code, recovered from the interrupt frame."""

    vector: int
    error_code: int | None
    cr2: int | None
    regs: kvm_regs  # the faulting context (rip, rsp, rflags from the frame)
    sregs: kvm_sregs


class Snapshot:
    """Guest memory and vCPU state of a sandbox at a ready point.

    Opaque; restore it with :meth:`Sandbox.restore` into the sandbox it came
    from or any sandbox of the same guest and configuration.
    """

    __slots__ = ("_compat", "_fpu", "_image", "_regs", "_sregs", "taken_at")

    def __init__(
        self,
        compat: tuple[object, ...],
        image: MemoryImage,
        regs: kvm_regs,
        sregs: kvm_sregs,
        fpu: kvm_fpu,
    ) -> None:
        self._compat = compat
        self._image = image
        self._regs = regs
        self._sregs = sregs
        self._fpu = fpu
        self.taken_at = time.time()

    def __repr__(self) -> str:
        return f"<Snapshot of {self._image.size} bytes taken at {self.taken_at:.3f}>"


_logger = logging.getLogger("hlasync")
_ids = itertools.count(1)
_templates: dict[tuple[object, ...], Snapshot] = {}
_templates_lock = threading.Lock()
_S = TypeVar("_S", bound=ctypes.Structure)


def _copy(struct: _S) -> _S:
    clone = type(struct)()
    ctypes.pointer(clone)[0] = struct
    return clone


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


class _DumpRequest:
    """A dump asked for by another thread while the vCPU is in the guest."""

    def __init__(self, directory: str | os.PathLike[str] | None, reason: str) -> None:
        self.directory = directory
        self.reason = reason
        self.done = threading.Event()
        self.path: Path | None = None
        self.error: BaseException | None = None


@dataclass
class _CallState:
    function: str | None = None
    cancel: bool = False
    kick_pending: bool = False
    thread: int = 0
    generation: int = 0  # counts calls; lets a supervisor stop exactly the call it means
    precancelled: int = 0  # a generation stopped before it began
    in_guest: bool = False  # the vCPU thread may be inside KVM_RUN
    requests: list[_DumpRequest] = field(default_factory=list)


_live: weakref.WeakSet[Sandbox] = weakref.WeakSet()
_live_lock = threading.Lock()


def live_sandboxes() -> list[Sandbox]:
    """Every sandbox of this process that is not closed."""
    with _live_lock:
        return [sb for sb in _live if sb.state is not SandboxState.CLOSED]


class Sandbox:
    """A guest running in its own KVM micro-VM.

    ``guest`` is the path of a guest ELF built with the hlasync SDK (see
    :mod:`hlasync.guests` for the bundled ones). ``output`` receives the
    guest's debug prints (default: written to ``sys.stdout``).

    Thread safety: one call at a time (a second concurrent call raises
    :class:`SandboxBusy`); :meth:`interrupt` and :meth:`close` may be called
    from any thread.
    """

    def __init__(
        self,
        guest: str | os.PathLike[str] | GuestImage,
        config: SandboxConfig | None = None,
        *,
        output: Callable[[str], None] | None = None,
        sandbox_id: str | None = None,
    ) -> None:
        self.config = config if config is not None else SandboxConfig()
        if not isinstance(self.config, SandboxConfig):
            raise TypeError("config must be a SandboxConfig")
        self.image = guest if isinstance(guest, GuestImage) else GuestImage.load(guest)
        self.layout = MemoryLayout.compute(self.config, self.image)
        self.id = sandbox_id or f"sb-{os.getpid()}-{next(_ids)}"
        self._output = output
        self._host_functions: dict[str, Callable[..., Any]] = {}
        self._signatures = {fn.name: fn for fn in self.image.functions}
        self._encoders = {fn.name: abi.make_call_encoder(fn) for fn in self.image.functions}
        # Re-entrant: a dump signal handler may run on a thread that holds it.
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        self._crashdump_listeners: list[Callable[[CrashdumpRecord], None]] = []
        self._last_worker = -1  # the supervisor worker that ran it last
        self._state = SandboxState.CLOSED
        self._call = _CallState()
        self.last_exception: ExceptionInfo | None = None
        self._compat = (self.image.digest, self.layout)
        self._vm: Vm | None = None
        self._memory: GuestMemory | None = None
        try:
            self._boot()
        except BaseException:
            self._release()
            raise
        self._state = SandboxState.READY
        with _live_lock:
            _live.add(self)

    # ----------------------------------------------------------- creation
    def _boot(self) -> None:
        with _templates_lock:
            template = _templates.get(self._compat)
        if template is not None:
            self._attach(template._image)
            self._set_cpu_state(template)
            self._initial = template
            return
        boot = MemoryImage(self.layout.memory_size, "hlasync-boot")
        mapping = GuestMemory(boot)  # write the boot image once through a private map
        try:
            lay.build_boot_image(mapping.view, self.layout, self.image)
            boot.write_runs(mapping.view, mapping.touched_runs())
        finally:
            mapping.close()
        self._attach(boot)
        assert self._vcpu is not None
        sregs = self._vcpu.get_sregs()
        _user_mode_sregs(sregs)
        self._vcpu.set_sregs(sregs)
        self._vcpu.set_regs(
            kvm_regs(rip=self.image.entry, rsp=self.layout.stack_top, rflags=lay.RFLAGS)
        )
        self._vcpu.prepare_thread()
        self._await_ready()
        self._initial = self._take_snapshot()
        with _templates_lock:
            _templates.setdefault(self._compat, self._initial)

    def _attach(self, image: MemoryImage) -> None:
        self._memory = GuestMemory(image)
        self._vm = Vm(Kvm.shared())
        size, address = self.layout.memory_size, self._memory.address
        try:
            # KVM logs the pages the guest writes: restore copies back just those.
            self._vm.set_user_memory_region(0, 0, size, address, _abi.KVM_MEM_LOG_DIRTY_PAGES)
            self._dirty_logging = True
        except IoctlError:
            self._vm.set_user_memory_region(0, 0, size, address)
            self._dirty_logging = False
        #: Bytes the host wrote at the start of the input and output buffers.
        self._host_written = [0, 0]
        self._vcpu: Vcpu | None = self._vm.create_vcpu()
        view = self._memory.view
        self._input = view[self.layout.input_addr : self.layout.input_addr + self.layout.input_size]
        self._output_buf = view[
            self.layout.output_addr : self.layout.output_addr + self.layout.output_size
        ]

    def _await_ready(self) -> None:
        assert self._vcpu is not None
        exit_ = self._vcpu.run()
        if not (isinstance(exit_, IoOut) and exit_.port == abi.PORT_RETURN):
            raise GuestImageError(
                f"guest did not reach its dispatcher during initialisation (exit: {exit_}); "
                "was it built with the hlasync SDK?",
                path=self.image.path,
            )
        magic, version, count = abi.READY.unpack_from(self._output_buf, 0)
        if magic != abi.MAGIC_READY or version != abi.ABI_VERSION:
            raise GuestImageError(
                f"guest speaks ABI {version if magic == abi.MAGIC_READY else '?'}, host speaks "
                f"{abi.ABI_VERSION}: rebuild it with this version of the SDK",
                path=self.image.path,
            )
        if count != len(self.image.functions):
            raise GuestImageError(
                f"guest reports {count} functions, its ELF declares {len(self.image.functions)}",
                path=self.image.path,
            )

    # -------------------------------------------------------------- API
    @property
    def state(self) -> SandboxState:
        return self._state

    @property
    def functions(self) -> Mapping[str, FunctionSignature]:
        """Guest functions by name, with signatures read from the ELF."""
        return MappingProxyType(self._signatures)

    @property
    def host_functions(self) -> Mapping[str, Callable[..., Any]]:
        return MappingProxyType(self._host_functions)

    def register_host_function(self, name: str, function: Callable[..., Any]) -> None:
        """Make ``function`` callable from the guest as ``name``.

        The guest passes typed values (int, float, bool, str, bytes); the
        return value must be one of those or None.
        """
        if not isinstance(name, str) or not name or len(name.encode()) > 256:
            raise ValueError("host function name must be a non-empty str of at most 256 bytes")
        if not callable(function):
            raise TypeError("host function must be callable")
        self._host_functions[name] = function

    def call(self, name: str, *args: Arg) -> Value:
        """Call guest function ``name`` with ``args`` and return its result."""
        signature = check_call(self.image, self._signatures, self.id, name, args)
        return self._call_checked(signature, args)

    def _call_checked(self, signature: FunctionSignature, args: tuple[Arg, ...]) -> Value:
        """:meth:`call` for arguments already checked against ``signature`` (the
        supervisor checks them before queueing)."""
        name = signature.name
        # Before the call becomes visible to interrupt(), which may kick this thread.
        Vcpu.block_kick_signal()
        with self._lock:
            if self._state is not SandboxState.READY:
                self._raise_not_ready(name)
            self._state = SandboxState.RUNNING
            call = self._call
            call.function = name
            call.cancel = False
            call.thread = threading.get_ident()
            call.generation += 1
            if call.precancelled == call.generation:
                self._state = SandboxState.READY  # nothing ran
                raise GuestCancelled(
                    "call cancelled before it started", sandbox_id=self.id, function=name
                )
            call.in_guest = True
        outcome = SandboxState.POISONED
        try:
            try:
                written = self._encoders[name](self._input, args)
                if written > self._host_written[0]:
                    self._host_written[0] = written
            except ValueError as exc:
                outcome = SandboxState.READY
                raise ArgumentError(
                    f"{signature}: arguments do not fit the {self.layout.input_size}-byte input "
                    f"buffer ({exc}); raise SandboxConfig.input_buffer_size",
                    sandbox_id=self.id,
                    function=name,
                ) from None
            assert self._vcpu is not None
            self._vcpu.prepare_thread()
            result = self._run(signature)
            outcome = SandboxState.READY
            return result
        except (HostFunctionError, GuestResultError):
            outcome = SandboxState.READY  # the vCPU is (back) at the dispatcher
            raise
        except (GuestCrashed, GuestAborted, GuestProtocolError) as exc:
            if self.config.crashdump_enabled:
                self._automatic_dump(exc)
            raise
        finally:
            with self._lock:
                if call.kick_pending:
                    Vcpu.consume_kick()
                    call.kick_pending = False
                cancelled = call.cancel and outcome is SandboxState.READY
                self._state = SandboxState.POISONED if cancelled else outcome
                call.cancel = False
                call.function = None
                call.in_guest = False
                leftover, call.requests = call.requests, []
                # Dumps asked for as the call ended see the state it left.
                for request in leftover:
                    self._serve_dump_request(request)
                self._idle.notify_all()
            if cancelled:
                raise GuestCancelled("call interrupted", sandbox_id=self.id, function=name)

    def interrupt(self) -> bool:
        """Stop the running call (from any thread).

        Returns True if this stopped a running call: it then raises
        :class:`GuestCancelled` and the sandbox is poisoned until
        :meth:`restore`. Returns False when idle (the next call is unaffected)
        or when the running call was already being stopped.
        """
        return self._stop()[0]

    def _stop(
        self,
        generation: int | None = None,
        dump_reason: str | None = None,
        directory: str | os.PathLike[str] | None = None,
    ) -> tuple[bool, Path | None, CrashdumpError | None]:
        """Cancel the running call (only call number ``generation``, if given),
        first dumping it when ``dump_reason`` is given and dumps are enabled.

        Returns (whether a call was stopped, dump path, dump error). Blocks
        only while the dump is written.
        """
        request = None
        path: Path | None = None
        error: CrashdumpError | None = None
        with self._lock:
            call = self._call
            if (
                generation is not None
                and generation == call.generation + 1
                and self._state is SandboxState.READY
            ):
                call.precancelled = generation  # the call has been handed out, not begun
                return True, None, None
            if (
                self._state is not SandboxState.RUNNING
                or (generation is not None and call.generation != generation)
                or call.cancel  # already being stopped
            ):
                return False, None, None
            if dump_reason is not None and self.config.crashdump_enabled:
                if call.in_guest and call.thread != threading.get_ident():
                    request = _DumpRequest(directory, dump_reason)
                    call.requests.append(request)  # served before the cancel takes effect
                else:
                    try:
                        path = self._write_dump(self._capture(dump_reason), directory)
                    except CrashdumpError as exc:
                        error = exc
            self._cancel_locked()
        if request is not None:
            path, error = self._await_dump(request)
        return True, path, error

    def _cancel_locked(self) -> None:
        call = self._call
        call.cancel = True
        self._kick_locked()

    def _kick_locked(self) -> None:
        call = self._call
        if not call.kick_pending:  # one queued kick is enough (real-time signals queue)
            call.kick_pending = True
            Vcpu.kick(call.thread)

    def _await_dump(self, request: _DumpRequest) -> tuple[Path | None, CrashdumpError | None]:
        if not request.done.wait(DUMP_PAUSE_TIMEOUT):
            return None, CrashdumpError(
                f"sandbox {self.id}: the vCPU did not pause within {DUMP_PAUSE_TIMEOUT} s"
            )
        if request.error is not None:
            if isinstance(request.error, CrashdumpError):
                return None, request.error
            error = CrashdumpError(f"sandbox {self.id}: dump failed: {request.error}")
            error.__cause__ = request.error
            return None, error
        return request.path, None

    def snapshot(self) -> Snapshot:
        """Capture guest memory and vCPU state (the sandbox must be ready)."""
        with self._lock:
            if self._state is not SandboxState.READY:
                self._raise_not_ready("snapshot")
            return self._take_snapshot()

    def _take_snapshot(self) -> Snapshot:
        assert self._memory is not None and self._vcpu is not None
        image = self._memory.snapshot_image()
        # Map the new image under the guest so restoring it is a cheap reset.
        self._memory.remap(image)
        self._forget_writes()
        return Snapshot(
            self._compat, image, self._vcpu.get_regs(), self._vcpu.get_sregs(), self._vcpu.get_fpu()
        )

    def restore(self, snapshot: Snapshot | None = None) -> None:
        """Return guest memory and vCPU state to ``snapshot`` (default: the
        state right after initialisation). Clears the poisoned state."""
        target = snapshot if snapshot is not None else self._initial
        if not isinstance(target, Snapshot):
            raise TypeError("restore() takes a Snapshot")
        if target._compat != self._compat:
            raise ValueError("snapshot belongs to a sandbox of another guest or configuration")
        with self._lock:
            if self._state is SandboxState.CLOSED:
                raise SandboxClosed("sandbox is closed", sandbox_id=self.id)
            if self._state is SandboxState.RUNNING:
                raise SandboxBusy("cannot restore while a call is running", sandbox_id=self.id)
            assert self._memory is not None
            if self._memory.backing is target._image:
                self._reset_memory()
            else:
                self._memory.remap(target._image)
                self._forget_writes()
            self._set_cpu_state(target, full=self._state is not SandboxState.READY)
            self.last_exception = None
            self._state = SandboxState.READY

    def generate_crashdump(self, directory: str | os.PathLike[str] | None = None) -> Path:
        """Write an ELF core dump of the guest now and return its path.

        Works when idle, when poisoned (the dump shows the fault) and while a
        call runs on another thread: the vCPU is kicked out of the guest,
        dumped and resumed, and the call still completes. ``directory``
        overrides ``SandboxConfig.crashdump_dir``. Raises
        :class:`CrashdumpError` if dumps are disabled or the write fails.
        """
        return self._dump_now(directory, "on-demand")

    def add_crashdump_listener(self, listener: Callable[[CrashdumpRecord], None]) -> None:
        """Call ``listener(record)`` after every dump this sandbox writes or fails to write.

        It runs on the thread that made the dump and must not block.
        """
        self._crashdump_listeners.append(listener)

    def _dump_now(self, directory: str | os.PathLike[str] | None, reason: str) -> Path:
        if not self.config.crashdump_enabled:
            raise CrashdumpError(
                f"crash dumps are disabled for sandbox {self.id} (crashdump_enabled=False)"
            )
        with self._lock:
            if self._state is SandboxState.CLOSED:
                raise SandboxClosed(f"sandbox {self.id} is closed", sandbox_id=self.id)
            call = self._call
            paused_elsewhere = (
                self._state is SandboxState.RUNNING
                and call.in_guest
                and call.thread != threading.get_ident()
            )
            if not paused_elsewhere:
                # Idle, poisoned, inside a host function, or on the vCPU thread itself:
                # nothing runs the vCPU while we hold the lock.
                return self._write_dump(self._capture(reason), directory)
            request = _DumpRequest(directory, reason)
            call.requests.append(request)
            self._kick_locked()
        path, error = self._await_dump(request)
        if error is not None:
            raise error
        assert path is not None
        return path

    def _serve_dump_request(self, request: _DumpRequest) -> None:
        try:
            request.path = self._write_dump(self._capture(request.reason), request.directory)
        except Exception as exc:  # noqa: BLE001 - handed to the waiting thread
            request.error = exc
        finally:
            request.done.set()

    def _automatic_dump(self, error: GuestError) -> None:
        if isinstance(error, GuestProtocolError):
            reason = "protocol-error" if error.vcpu_exit is None else "unexpected-exit"
        else:
            reason = "fault" if isinstance(error, GuestCrashed) else "abort"
        try:
            error.core_path = self._write_dump(self._capture(reason, error), None)
        except CrashdumpError as exc:
            error.crashdump_error = exc

    def _capture(self, reason: str, error: GuestError | None = None) -> CrashContext:
        """Guest state for a dump; the caller guarantees the vCPU is not running."""
        vcpu = self._vcpu
        assert vcpu is not None
        fault = self.last_exception if self._state is SandboxState.POISONED else None
        if isinstance(error, GuestCrashed):
            fault = self.last_exception
        if fault is not None:
            regs, sregs, user_mode = fault.regs, fault.sregs, True
        else:
            regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
            user_mode = sregs.cs.selector & 3 == 3
        try:
            xsave: bytes | None = bytes(vcpu.get_xsave())
        except HlasyncError:
            xsave = None
        signo, si_code = core_format.REASON_SIGNALS.get(
            reason, (signal.SIGSTOP, core_format.SI_USER)
        )
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
            "sandbox_id": self.id,
            "reason": reason,
            "function": error.function if error is not None else self._call.function,
            "message": str(error) if error is not None else None,
            "guest": str(self.image.path.resolve()),
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
                for r in self.layout.regions
            ],
        }
        if isinstance(error, GuestAborted):
            metadata["abort_code"] = error.code
            metadata["abort_message"] = error.guest_message
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

    def _write_dump(self, context: CrashContext, directory: str | os.PathLike[str] | None) -> Path:
        assert self._memory is not None
        memory = self._memory
        started = time.perf_counter()
        try:
            target = resolve_directory(directory, self.config.crashdump_dir)
            path, size = write_atomically(
                target,
                lambda fd: write_core(
                    fd,
                    memory=memory,
                    regions=self.layout.regions,
                    image=self.image,
                    context=context,
                    user_cs=lay.USER_CS,
                    user_ss=lay.USER_DS,
                ),
                self.config.crashdump_retention,
            )
        except CrashdumpError as exc:
            self._notify(
                CrashdumpRecord(
                    self.id,
                    context.reason,
                    context.metadata["function"],
                    None,
                    0,
                    time.perf_counter() - started,
                    exc,
                )
            )
            raise
        self._notify(
            CrashdumpRecord(
                self.id,
                context.reason,
                context.metadata["function"],
                path,
                size,
                time.perf_counter() - started,
            )
        )
        return path

    def _notify(self, record: CrashdumpRecord) -> None:
        for listener in list(self._crashdump_listeners):
            try:
                listener(record)
            except Exception:  # a broken listener must not break the dump
                _logger.exception("crash dump listener %r failed", listener)

    def read_memory(self, address: int, size: int) -> bytes:
        """Copy ``size`` bytes of guest memory at guest address ``address``."""
        with self._lock:
            if self._memory is None:
                raise SandboxClosed("sandbox is closed", sandbox_id=self.id)
            return self._memory.read(address, size)

    def close(self) -> None:
        """Stop any running call, then release the VM and guest memory."""
        with self._lock:
            if self._state is SandboxState.CLOSED:
                return
            if self._state is SandboxState.RUNNING:
                self._cancel_locked()
                while self._state is SandboxState.RUNNING:
                    self._idle.wait()
            self._state = SandboxState.CLOSED
            self._release()
        with _live_lock:
            _live.discard(self)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_state", SandboxState.CLOSED) is not SandboxState.CLOSED:
            with contextlib.suppress(Exception):  # never raise from a finalizer
                self.close()

    def __repr__(self) -> str:
        return f"<Sandbox {self.id} {self.image.path.name} {self._state.value}>"

    # --------------------------------------------------------- internals
    def _raise_not_ready(self, what: str) -> None:
        state = self._state
        if state is SandboxState.POISONED:
            raise SandboxPoisoned(
                f"sandbox {self.id} is poisoned by an earlier fault or interrupt; call restore()",
                sandbox_id=self.id,
            )
        if state is SandboxState.CLOSED:
            raise SandboxClosed(f"sandbox {self.id} is closed", sandbox_id=self.id)
        raise SandboxBusy(
            f"sandbox {self.id} is already running a call ({what})", sandbox_id=self.id
        )

    def _release(self) -> None:
        self._input = self._output_buf = memoryview(b"")
        if self._vm is not None:
            self._vm.close()
            self._vm = None
        self._vcpu = None
        if self._memory is not None:
            self._memory.close()
            self._memory = None

    def _written_pages(self) -> set[int]:
        """Pages changed since the backing image was mapped: by the guest (KVM's
        dirty log) and by the host (the frames it wrote into the buffers)."""
        assert self._vm is not None
        pages = set(self._vm.get_dirty_log(0, self.layout.memory_size))
        layout = self.layout
        for start, length in zip(
            (layout.input_addr, layout.output_addr), self._host_written, strict=True
        ):
            if length:
                pages.update(range(start // PAGE_SIZE, (start + length - 1) // PAGE_SIZE + 1))
        self._host_written = [0, 0]
        return pages

    def _reset_memory(self) -> None:
        assert self._memory is not None
        if not self._dirty_logging:
            self._memory.reset()
            return
        pages = self._written_pages()
        if len(pages) > RESET_COPY_LIMIT:
            self._memory.reset()  # cheaper than copying this many pages back
        else:
            self._memory.reset_pages(pages)

    def _forget_writes(self) -> None:
        if self._dirty_logging:
            self._written_pages()
        self._host_written = [0, 0]

    def _set_cpu_state(self, snapshot: Snapshot, *, full: bool = True) -> None:
        """Load the snapshot's vCPU state. ``full=False`` (after a call that ended
        normally, at CPL3 in the dispatcher) sets only the general registers: code
        at CPL3 cannot change the special registers, and the dispatcher clears the
        x87/SSE state at the start of every call."""
        assert self._vcpu is not None
        self._vcpu.complete_pending_io()
        if full:
            self._vcpu.set_sregs(snapshot._sregs)
            self._vcpu.set_fpu(snapshot._fpu)
        self._vcpu.set_regs(snapshot._regs)

    def _run(self, signature: FunctionSignature) -> Value:
        vcpu = self._vcpu
        assert vcpu is not None
        while True:
            exit_ = vcpu.run()
            match exit_:
                case IoOut(port=abi.PORT_RETURN):
                    return self._read_result(signature)
                case IoOut(port=abi.PORT_HOSTCALL):
                    self._host_call(signature.name)
                case IoOut(port=abi.PORT_PRINT):
                    self._print(signature.name)
                case IoOut(port=abi.PORT_ABORT):
                    raise self._aborted(signature.name)
                case IoOut(port=port) if 0 <= port - abi.PORT_EXCEPTION_BASE < 32:
                    raise self._crashed(signature.name, port - abi.PORT_EXCEPTION_BASE)
                case IoOut(port=port):
                    raise self._protocol_error(
                        signature.name, f"guest wrote to unknown port {port:#x}"
                    )
                case Interrupted():
                    self._on_interrupted()
                case _:
                    raise GuestProtocolError(
                        f"unexpected vCPU exit {exit_}"
                        + (" (triple fault)" if isinstance(exit_, Shutdown) else ""),
                        sandbox_id=self.id,
                        function=signature.name,
                        vcpu_exit=exit_,
                    )

    def _on_interrupted(self) -> None:
        with self._lock:
            call = self._call
            if call.kick_pending:
                Vcpu.consume_kick()
                call.kick_pending = False
            requests, call.requests = call.requests, []
            # The flag stays set until the call has ended, so a second interrupt() of
            # this call returns False instead of claiming a stop that will not come.
            cancel = call.cancel
        # The vCPU is paused here: serve dumps first, so a cancel still gets its dump.
        for request in requests:
            self._serve_dump_request(request)
        if cancel:
            dumped = [r.path for r in requests if r.path is not None]
            cancelled = GuestCancelled(
                "call interrupted",
                sandbox_id=self.id,
                function=call.function,
                core_path=dumped[-1] if dumped else None,
            )
            failed = [r.error for r in requests if isinstance(r.error, CrashdumpError)]
            cancelled.crashdump_error = failed[-1] if failed else None
            raise cancelled

    def _enter_host(self) -> None:
        """The vCPU thread leaves KVM_RUN to run user code (host function, print)."""
        with self._lock:
            self._call.in_guest = False

    def _leave_host(self) -> None:
        # Takes the lock, so a dump made meanwhile by another thread finishes first.
        with self._lock:
            self._call.in_guest = True

    def _read_result(self, signature: FunctionSignature) -> Value:
        try:
            value, error = abi.read_result(self._output_buf, signature.returns)
        except FrameError as exc:
            raise self._protocol_error(signature.name, f"bad result frame: {exc}") from None
        if error is not None:
            hint = ""
            if "output buffer" in error:
                hint = f" (raise SandboxConfig.output_buffer_size, now {self.layout.output_size})"
            raise GuestResultError(
                f"the guest could not return the result: {error}{hint}",
                sandbox_id=self.id,
                function=signature.name,
            )
        return value

    def _host_call(self, function: str) -> None:
        try:
            request = abi.read_host_call(self._output_buf)
        except FrameError as exc:
            raise self._protocol_error(function, f"bad host-call frame: {exc}") from None
        host_fn = self._host_functions.get(request.name)
        if host_fn is None:
            self._unwind()
            raise HostFunctionError(
                f"guest called unregistered host function {request.name!r}",
                sandbox_id=self.id,
                function=function,
                host_function=request.name,
            )
        self._enter_host()
        try:
            result = host_fn(*request.args)
            self._host_written[1] = max(
                self._host_written[1], abi.write_result(self._output_buf, result)
            )
        except Exception as exc:
            self._unwind()
            raise HostFunctionError(
                f"host function {request.name!r} raised {type(exc).__name__}: {exc}",
                sandbox_id=self.id,
                function=function,
                host_function=request.name,
            ) from exc
        finally:
            self._leave_host()

    def _unwind(self) -> None:
        """Put the vCPU back at the dispatcher's idle point (after a failed host call)."""
        self._set_cpu_state(self._initial)

    def _print(self, function: str) -> None:
        try:
            _, text = abi.read_message(self._output_buf, abi.MAGIC_PRINT)
        except FrameError as exc:
            raise self._protocol_error(function, f"bad print frame: {exc}") from None
        decoded = text.decode(errors="replace")
        self._enter_host()
        try:
            if self._output is not None:
                self._output(decoded)
            else:
                sys.stdout.write(decoded)
                sys.stdout.flush()
        finally:
            self._leave_host()

    def _aborted(self, function: str) -> GuestError:
        try:
            code, text = abi.read_message(self._output_buf, abi.MAGIC_ABORT)
        except FrameError as exc:
            return self._protocol_error(function, f"bad abort frame: {exc}")
        return GuestAborted(
            sandbox_id=self.id,
            function=function,
            code=code,
            guest_message=text.decode(errors="replace"),
        )

    def _crashed(self, function: str, vector: int) -> GuestError:
        assert self._vcpu is not None and self._memory is not None
        regs = self._vcpu.get_regs()
        sregs = self._vcpu.get_sregs()
        if sregs.cs.selector & 3:
            return self._protocol_error(
                function,
                f"guest wrote to exception port {vector + abi.PORT_EXCEPTION_BASE:#x} "
                "from user mode",
            )
        has_error = vector in lay.ERROR_CODE_VECTORS
        words = 6 if has_error else 5
        frame_at = regs.rsp
        if not lay.KERNEL_STACK_BASE <= frame_at <= lay.KERNEL_STACK_TOP - 8 * words:
            return self._protocol_error(
                function, f"exception frame at {frame_at:#x} is outside the exception stack"
            )
        frame = [
            int.from_bytes(self._memory.read(frame_at + 8 * i, 8), "little") for i in range(words)
        ]
        error_code = frame.pop(0) if has_error else None
        rip, _cs, rflags, rsp, _ss = frame
        faulting = _copy(regs)
        faulting.rip, faulting.rsp, faulting.rflags = rip, rsp, rflags
        cr2 = sregs.cr2 if vector == 14 else None
        name, description = VECTOR_NAMES.get(vector, (f"#{vector}", "exception"))
        if vector == 14 and rip == 0 and self._is_syscall_at(regs.rcx - 2):
            # PVM runs `syscall` even without EFER.SCE and enters LSTAR (0): report the
            # instruction that did it (its address is in rcx) rather than address 0.
            rip = faulting.rip = regs.rcx - 2
            description = "after a syscall instruction (guests have no system calls)"
        self.last_exception = ExceptionInfo(vector, error_code, cr2, faulting, sregs)
        return GuestCrashed(
            sandbox_id=self.id,
            function=function,
            vector=vector,
            vector_name=name,
            description=description,
            error_code=error_code,
            rip=rip,
            cr2=cr2,
            symbol=self.image.symbolize(rip),
        )

    def _is_syscall_at(self, address: int) -> bool:
        assert self._memory is not None
        try:
            return self._memory.read(address, 2) == b"\x0f\x05"
        except ValueError:
            return False

    def _protocol_error(self, function: str | None, message: str) -> GuestProtocolError:
        return GuestProtocolError(message, sandbox_id=self.id, function=function)


def check_call(
    image: GuestImage,
    signatures: Mapping[str, FunctionSignature],
    sandbox_id: str,
    name: str,
    args: tuple[Arg, ...],
) -> FunctionSignature:
    """The signature of ``name``, after checking ``args`` against it (before any guest runs)."""
    signature = signatures.get(name)
    if signature is None:
        raise FunctionNotFound(
            f"guest {image.path.name} has no function {name!r} "
            f"(it has: {', '.join(sorted(signatures))})",
            sandbox_id=sandbox_id,
            function=str(name),
        )
    params = signature.params
    if len(args) != len(params):
        raise ArgumentError(
            f"{signature} takes {len(params)} argument(s), got {len(args)}",
            sandbox_id=sandbox_id,
            function=name,
        )
    for position, (kind, arg) in enumerate(zip(params, args, strict=True)):
        problem = abi.check_value(kind, arg)
        if problem is not None:
            raise ArgumentError(
                f"{signature}: argument {position + 1}: {problem}",
                sandbox_id=sandbox_id,
                function=name,
            )
    return signature


def _version() -> str:
    from . import __version__

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


def _user_mode_sregs(sregs: kvm_sregs) -> None:
    """64-bit mode, paging on, flat CPL3 segments, our GDT/TSS/IDT."""
    flat = {"base": 0, "limit": 0xFFFFFFFF, "present": 1, "s": 1, "g": 1}
    sregs.cs = kvm_segment(selector=lay.USER_CS, type=11, dpl=3, l=1, **flat)
    data = kvm_segment(selector=lay.USER_DS, type=3, dpl=3, db=1, **flat)
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.tr = kvm_segment(
        base=lay.TSS, limit=lay.TSS_LIMIT, selector=lay.TSS_SELECTOR, type=11, present=1
    )
    sregs.gdt.base, sregs.gdt.limit = lay.GDT, len(lay.gdt_bytes()) - 1
    sregs.idt.base, sregs.idt.limit = lay.IDT, 16 * lay.IDT_ENTRIES - 1
    sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = lay.CR0, lay.PML4, lay.CR4, lay.EFER
