"""Sandbox: one guest in one KVM micro-VM (one VM, one vCPU). Synchronous.

States: ``ready`` (idle, a call may start), ``running`` (a call is on the
vCPU), ``poisoned`` (a fault, abort, protocol error or interrupt left the
guest dirty: only :meth:`Sandbox.restore` helps) and ``closed``.

Every vCPU ioctl and ``KVM_RUN`` runs on the vCPU's owner thread
(:mod:`hlasync.kvm.owner`). What the vCPU is used for is decided by one
*holder* at a time: a running call (its caller, see :mod:`.calls`), an
operation on an idle sandbox (restore, snapshot, dump) or a hot session. The state lock guards only
small bookkeeping and is never held across a guest run, a host function or
a dump write: interrupting, inspecting and closing never wait behind them.
Every wait has a bound.

This module owns the :class:`Sandbox` class (its public API, the lifecycle
of a call from its start to its outcome, close) and every change of its
state (:func:`~.states.after`). Its parts: :mod:`.holder` (the shared fields
and who holds the vCPU), :mod:`.boot` (making the machine, snapshots),
:mod:`.requests` (stopping and dumping a running call, and the caller's
answers), :mod:`.spin` (hot sessions at the end of a call).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from .. import _telemetry as telemetry
from .. import abi
from ..abi import Arg, FunctionSignature, Value
from ..config import SandboxConfig
from ..errors import (
    ArgumentError,
    FunctionNotFound,
    GuestCancelled,
    GuestResultError,
    HostFunctionError,
    SandboxClosed,
    SandboxPoisoned,
)
from ..guest.image import GuestImage
from ..guest.layout import MemoryLayout
from . import cpu, debugging, native, registry, runner, trim
from .boot import Booting
from .calls import Call, CallHandle, Phase, StopResult, current_runner
from .dumps import CrashdumpRecord
from .hot import AutoChooser, HotSession, budget, reaper
from .machine import Machine
from .requests import Requests
from .snapshots import Snapshot
from .spin import Spinning
from .states import Event, SandboxState, after

if TYPE_CHECKING:
    from ..debug.server import DebugServer

__all__ = ["Sandbox", "SandboxState", "StopResult", "check_call", "live_sandboxes"]

_logger = logging.getLogger("hlasync")
_ids = itertools.count(1)

#: How long close() waits for a running call to stop.
CLOSE_TIMEOUT = 5.0
#: Seconds close() waits for a hot sandbox's thread (and an idle reaper) to end.
HOT_THREAD_JOIN = 1.0
#: Seconds the finalizer of a sandbox dropped unclosed waits for its lock.
RELEASE_WAIT = 1.0
#: How long a restore spins (ns) for a hot guest to park after its answer (it
#: parks within a microsecond unless its thread lost the CPU), and how long it
#: waits in all before it takes the exit path instead.
PARK_SPIN_NS = 100_000
PARK_WAIT_NS = 5_000_000


class Sandbox(Requests, Spinning, Booting):
    """A guest running in its own KVM micro-VM.

    ``guest`` is the path of a guest ELF built with the hlasync SDK (see
    :mod:`hlasync.guests` for the bundled ones). ``output`` receives the
    guest's debug prints (default: written to ``sys.stdout``).

    Thread safety: one call at a time (a second concurrent call raises
    :class:`SandboxBusy`); :meth:`interrupt`, :meth:`generate_crashdump` and
    :meth:`close` may be called from any thread, also from a host function.
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
        self._host_functions = {}
        self._signatures = {fn.name: fn for fn in self.image.functions}
        self._encoders = {fn.name: abi.make_call_encoder(fn) for fn in self.image.functions}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._waiting = 0  # threads waiting on _changed
        self._crashdump_listeners = []
        self._last_worker = -1  # the supervisor worker that ran it last
        self._state = SandboxState.CLOSED
        self._holder = None
        self._loans = 0  # dumps written by other threads while a call runs host code
        self._forked_from = None
        self.last_exception = None
        self._doorbell = False  # the guest's dispatcher waits on the doorbell page
        self._park_feature = False  # and parks after a call when asked (hot_restore)
        self._park_token = 0  # of the park its guest is in or about to enter
        self._hot = None  # made at the first call with config.spin
        self._last_end = 0.0  # monotonic time the last call ended (spin="auto")
        self._gap_average = None  # of the gaps between calls (spin="auto")
        self._auto = AutoChooser()  # spin="auto": whether spinning pays for this caller
        self._idle_since = 0.0  # when the last holder left (idle_trim)
        self._trim_noted = False  # the hlasync-trim thread will look at it
        #: Whether config.spin applies: owners that measure a call's CPU time on
        #: the calling thread (the supervisor, JSSandbox) keep the exit path.
        self._spin_allowed = True
        self._compat = (self.image.digest, self.layout)
        self._debugger = None
        self._initial = self._boot()
        if self.config.debug_port is not None:
            self._spin_allowed = False  # the debugger's stops come through the exit path
            try:
                self._debugger = debugging.make_server(
                    self, self.config.debug_host, self.config.debug_port, str(self.image.path)
                )
            except BaseException:
                self._machine.release()
                raise
        # Releases the VM and memory if the sandbox is dropped unclosed; close()
        # releases through _release_locked. Not at interpreter exit: a daemon
        # thread may still be in KVM_RUN or in the native doorbell wait, reading
        # guest memory without the GIL (an unmap under it was a SIGSEGV), and
        # the process's end releases everything anyway.
        self._finalizer = weakref.finalize(
            self, _release_unclosed, self._machine, self._lock, self._debugger
        )
        self._finalizer.atexit = False
        self._state = after(self._state, Event.BOOTED)
        registry.add(self)

    # -------------------------------------------------------------- API
    @property
    def state(self) -> SandboxState:
        return self._state

    @property
    def debug_address(self) -> tuple[str, int] | None:
        """``(host, port)`` where a debugger attaches (``SandboxConfig.debug_port``;
        the port chosen when it was 0), or None without one."""
        debugger = self._debugger
        return None if debugger is None else debugger.address

    @property
    def debugger_attached(self) -> bool:
        """Whether a debugger is connected to :attr:`debug_address` now (its
        next stop, or the next call's entry, waits for it)."""
        debugger = self._debugger
        return debugger is not None and debugger.attached

    def _debug_paused(self) -> float:
        """Seconds its guest spent stopped in a debugger (0 without one):
        wall-clock limits leave them out."""
        debugger = self._debugger
        return 0.0 if debugger is None else debugger.paused()

    @property
    def functions(self) -> Mapping[str, FunctionSignature]:
        """Guest functions by name, with signatures read from the ELF."""
        return MappingProxyType(self._signatures)

    @property
    def host_functions(self) -> Mapping[str, Callable[..., Any]]:
        return MappingProxyType(self._host_functions)

    @property
    def current_call(self) -> CallHandle | None:
        """The running call, as a handle that can stop exactly it (None when idle)."""
        holder = self._holder
        return CallHandle(self, holder) if isinstance(holder, Call) else None

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
        """Call guest function ``name`` with ``args`` and return its result.

        With OpenTelemetry configured, the call is an ``hlasync.call`` span
        (the current span while its host functions run: theirs nest under it)
        and counts in the call metrics (``docs/observability.md``)."""
        signature = check_call(self.image, self._signatures, self.id, name, args)
        span = telemetry.begin_call(name, guest=self.image.path.name, sandbox_id=self.id)
        if span is None:
            return self._call_checked(signature, args)
        try:  # host functions run inside the span (the runner makes it current)
            result = self._call_checked(signature, args, span)
        except BaseException as exc:
            span.end(exc)
            raise
        span.end(None)
        return result

    def _call_with(self, span: telemetry.CallSpan | None, name: str, *args: Arg) -> Value:
        """:meth:`call` as part of a call whose telemetry ``span`` its caller
        made (a JavaScript handler's): no span of its own."""
        signature = check_call(self.image, self._signatures, self.id, name, args)
        return self._call_checked(signature, args, span)

    def _call_checked(
        self,
        signature: FunctionSignature,
        args: tuple[Arg, ...],
        span: telemetry.CallSpan | None = None,
    ) -> Value:
        """:meth:`call` for arguments already checked against ``signature`` (the
        supervisor checks them before queueing); ``span``: its telemetry."""
        return self._run_begun(self._begin_call(signature.name, span), signature, args)

    def interrupt(self) -> bool:
        """Stop the running call (from any thread).

        Returns True if this stopped a running call: it then raises
        :class:`GuestCancelled` and the sandbox is poisoned until
        :meth:`restore`. Returns False when idle (the next call is unaffected)
        or when the running call was already being stopped. To stop one
        particular call and never a later one, use :attr:`current_call`.
        """
        holder = self._holder
        return isinstance(holder, Call) and self._stop(holder).stopped

    def snapshot(self) -> Snapshot:
        """Capture guest memory and vCPU state (the sandbox must be ready)."""
        with self._operation("snapshot"):
            if self._state is not SandboxState.READY:
                self._raise_not_ready("snapshot")
            return self._take_snapshot()

    def restore(self, snapshot: Snapshot | None = None) -> None:
        """Return guest memory and vCPU state to ``snapshot`` (default: the
        state right after initialisation). Clears the poisoned state.

        Everything guest code can read or set is reset: every byte of memory
        the guest or the host wrote, the general registers and flags, segment
        registers and their bases, the x87/MMX/SSE/AVX state, and the vCPU's
        event state (an exception or interrupt KVM was delivering when the
        last call was stopped is dropped).
        """
        target = snapshot if snapshot is not None else self._initial
        if not isinstance(target, Snapshot):
            raise TypeError("restore() takes a Snapshot")
        if target._compat != self._compat:
            raise ValueError("snapshot belongs to a sandbox of another guest or configuration")
        if self._park_token and self._restore_in_place(target):
            return
        with self._operation("restore"):
            machine = self._machine
            # Its ioctls follow the memory reset: wake the owner meanwhile.
            machine.vcpu.owner.warm()
            assert machine.memory is not None
            try:
                # First: KVM finishing a pending `in`/`ins` writes registers and memory.
                machine.vcpu.complete()
                if machine.memory.backing is target._image:
                    machine.reset_memory()
                else:
                    machine.remap(target._image)
                cpu.apply(machine.vcpu, target._cpu)
            except OSError as exc:
                with self._lock:
                    self._state = after(self._state, Event.RESTORE_FAILED)
                raise SandboxPoisoned(
                    f"restoring sandbox {self.id} failed ({exc}); it stays poisoned: close it",
                    sandbox_id=self.id,
                ) from exc
            with self._lock:
                self._state = after(self._state, Event.RESTORED)
                self.last_exception = None

    def _restore_hot(self) -> bool:
        """:meth:`restore` to the initial state if it can be done in place (True);
        False, with nothing done, when it needs the exit path (a hot pool's
        worker then lets another worker take waiting calls first)."""
        return bool(self._park_token) and self._restore_in_place(self._initial)

    def _restore_in_place(self, target: Snapshot) -> bool:
        """:meth:`restore` without stopping the guest (``SandboxConfig.hot_restore``):
        when it spins on its hot thread, parked in ``hl_park`` after its last
        call, memory is put back around it (:meth:`Machine.reset_parked`),
        and the park has reset the registers. True when done so; False, with
        nothing changed, when the exit path must do it."""
        with self._lock:
            hot = self._holder
            machine = self._machine
            memory = machine.memory
            token = self._park_token
            if (
                not token
                or not isinstance(hot, HotSession)
                or not hot.running
                or hot.parked_at
                or self._state is not SandboxState.READY
                or memory is None
                or memory.backing is not target._image
            ):
                return False
            # Parked as the call's answer came, unless its thread lost the CPU
            # in between; under the lock, so that nothing unmaps the word.
            parked = memory.address + abi.DOORBELL_PARKED
            if native.wait(parked, token, hot.flag, PARK_SPIN_NS, PARK_WAIT_NS) != native.WAIT_WORD:
                return False
            if not machine.reset_parked(hot.answer_ticks):
                return False
            self._state = after(self._state, Event.RESTORED)
            self.last_exception = None
        return True

    def generate_crashdump(self, directory: str | os.PathLike[str] | None = None) -> Path:
        """Write an ELF core dump of the guest now and return its path.

        Works when idle, when poisoned (the dump shows the fault) and while a
        call runs on another thread: the vCPU is kicked out of the guest,
        dumped and resumed, and the call still completes. ``directory``
        overrides ``SandboxConfig.crashdump_dir``. Raises
        :class:`CrashdumpError` if dumps are disabled, the write fails or the
        vCPU does not pause within 10 s.
        """
        return self._dump_now(directory, "on-demand")

    def add_crashdump_listener(self, listener: Callable[[CrashdumpRecord], None]) -> None:
        """Call ``listener(record)`` after every dump this sandbox writes or fails to write.

        It runs on the thread that made the dump and must not block.
        """
        self._crashdump_listeners.append(listener)

    def _set_baseline(self, snapshot: Snapshot) -> None:
        """Make ``snapshot`` what ``restore()`` without an argument returns to
        (a JS sandbox's loaded handlers, rather than the bare engine)."""
        if snapshot._compat != self._compat:
            raise ValueError("snapshot belongs to a sandbox of another guest or configuration")
        self._initial = snapshot

    def _write_memory(self, address: int, data: bytes) -> None:
        """Write guest memory from the host (noted, so a restore undoes it)."""
        with self._lock:
            # A trim discards the pages it found unwritten: a write meanwhile would be lost.
            self._wait_for_trim_locked()
            memory = self._machine.memory
            if memory is None:
                raise SandboxClosed(f"sandbox {self.id} is closed", sandbox_id=self.id)
            if address < 0 or address + len(data) > memory.size:
                raise ValueError(f"[{address:#x}, +{len(data):#x}) is outside guest memory")
            self._machine.pages.host_wrote(address, len(data))
            memory.view[address : address + len(data)] = data

    def read_memory(self, address: int, size: int) -> bytes:
        """Copy ``size`` bytes of guest memory at guest address ``address``.

        With a debugger attached, its breakpoints never show: the bytes are
        the guest's own, even while a call runs with them in memory.
        """
        debugger = self._debugger
        if debugger is not None:
            with debugger.lock:  # the order the debugger's writes take the locks in
                return debugging.hide(self, self._read_memory(address, size), address)
        return self._read_memory(address, size)

    def _read_memory(self, address: int, size: int) -> bytes:
        with self._lock:
            memory = self._machine.memory
            if memory is None:
                raise SandboxClosed(f"sandbox {self.id} is closed", sandbox_id=self.id)
            return memory.read(address, size)

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Stop any running call, then release the VM and guest memory.

        Waits at most ``timeout`` seconds for a running call to stop. A call
        that cannot stop in time (blocked in a host function) keeps the VM
        until it returns; so does a call whose own host function closes its
        sandbox. The sandbox is closed for every other use at once.
        """
        me = threading.get_ident()
        with self._lock:
            if self._state is SandboxState.CLOSED:
                return
            self._state = after(self._state, Event.CLOSE)
            holder = self._holder
            own = False
            if self._trim_noted:
                self._trim_noted = False
                trim.forget(self)
            if self._hot is not None:
                self._hot.close()
                reaper.forget(self._hot)
            if isinstance(holder, HotSession):  # no need to wait for the spin to notice
                holder.park(self, time.monotonic(), kick=True)
            if isinstance(holder, Call):
                holder.cancelled = True
                self._kick_locked(holder)
                own = holder.thread == me
            if not own:
                deadline = time.monotonic() + timeout
                while self._holder is not None or self._loans:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._wait_locked(remaining)
            if self._holder is None and not self._loans:
                self._release_locked()
            elif not own:
                _logger.warning(
                    "sandbox %s: %r did not stop within %.3g s; its VM is released when it returns",
                    self.id,
                    self._holder,
                    timeout,
                )
            hot = self._hot
        if self._debugger is not None:
            self._debugger.close()
        if hot is not None and hot.thread.ident != me:
            # Its thread is ending (closing, parked): gone when close() returns,
            # and with it the reaper when nothing else is hot.
            hot.thread.join(HOT_THREAD_JOIN)
            reaper.settle(HOT_THREAD_JOIN)
        trim.settle(HOT_THREAD_JOIN)
        registry.discard(self)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Sandbox {self.id} {self.image.path.name} {self._state.value}>"

    # ------------------------------------------- a call, from start to outcome
    def _begin_call(self, function: str, span: telemetry.CallSpan | None = None) -> Call:
        """Make a call the holder of the vCPU (the calling thread becomes its owner)."""
        runner_ = current_runner()
        call = Call(self.id, function, runner_, self._machine.vcpu, span)
        with self._lock:
            holder = self._holder
            if isinstance(holder, HotSession) and not holder.parked_at:
                call.hot = holder  # the guest spins: the call is posted on the doorbell
            else:
                self._wait_for_operations(function)
            if self._state is not SandboxState.READY:
                self._raise_not_ready(function)
            if span is not None:
                span.path = "exit" if call.hot is None else "doorbell"
            self._holder = call
            self._state = after(self._state, Event.CALL)
        budget.call_started()
        runner_.calls.append(call)
        return call

    def _run_begun(self, call: Call, signature: FunctionSignature, args: tuple[Arg, ...]) -> Value:
        """Run a call made holder by :meth:`_begin_call`, to its outcome."""
        outcome = SandboxState.POISONED
        name = signature.name
        failed: BaseException | None = None  # what the call raised, if anything
        try:
            if call.stop_requested():
                outcome = SandboxState.READY  # no guest code ran
                raise GuestCancelled(
                    "call cancelled before it started", sandbox_id=self.id, function=name
                )
            machine = self._machine
            try:
                written = self._encoders[name](machine.input, args)
            except ValueError as exc:
                outcome = SandboxState.READY
                # Nothing of a frame that did not fit may survive into a later call.
                machine.pages.host_wrote(self.layout.input_addr, self.layout.input_size)
                raise self._argument_error(signature, exc) from None
            machine.pages.host_wrote(self.layout.input_addr, written)
            result = runner.run(self, call, signature)
            outcome = SandboxState.READY
            return result
        except (HostFunctionError, GuestResultError) as exc:
            outcome = SandboxState.READY  # the vCPU is (back) at the dispatcher
            failed = exc
            raise
        except BaseException as exc:
            failed = exc
            raise
        finally:
            if self._end_call(call, outcome):
                # The stop wins over whatever the call came to meanwhile (a result,
                # a fault, an abort): each stop that said True is one GuestCancelled,
                # and what the guest did is its cause (a crash keeps its dump).
                error = self._cancelled_error(call)
                if failed is not None and not isinstance(failed, GuestCancelled):
                    raise error from failed
                raise error

    def _end_call(self, call: Call, outcome: SandboxState) -> bool:
        """Give up the vCPU. True if a stop request turns the outcome into GuestCancelled."""
        call.runner.calls.remove(call)
        fault = self.last_exception if outcome is SandboxState.POISONED else None
        while True:
            with self._lock:
                requests, call.requests = call.requests, []
                if not requests:
                    stopped = call.cancelled and call.started
                    if stopped:
                        outcome = SandboxState.POISONED  # interrupted as it finished
                    call.phase = Phase.ENDED
                    event = Event.RETURNED if outcome is SandboxState.READY else Event.FAILED
                    self._state = after(self._state, event)
                    self._holder = self._after_call_locked(call, outcome)
                    self._holder_left_locked()
                    self._notify_locked()
                    return stopped
            # Asked for as the call ended: they see the state it left.
            self._serve(call, requests, fault)

    # --------------------------------------------------------- internals
    def _argument_error(self, signature: FunctionSignature, exc: ValueError) -> ArgumentError:
        if isinstance(exc, abi.EncodeError):
            detail = str(exc)  # "arguments need N bytes; the input buffer holds M"
        else:
            detail = f"the arguments do not fit the {self.layout.input_size:,}-byte input buffer"
        return ArgumentError(
            f"{signature}: {detail}: raise SandboxConfig.input_buffer_size",
            sandbox_id=self.id,
            function=signature.name,
        )

    def _after_fork_in_child(self, parent: int) -> None:
        """In a forked child: this sandbox's VM belongs to the parent. Locks may
        have been held by parent threads that do not exist here: replace them."""
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._waiting = 0
        self._forked_from = parent
        self._state = after(self._state, Event.CLOSE)
        self._holder = None
        self._hot = None  # its thread stayed in the parent
        self._loans = 0
        if self._debugger is not None:  # its threads stayed in the parent too
            self._debugger.forget_in_child()
            self._debugger = None
        self._release_locked()


def _release_unclosed(
    machine: Machine, lock: threading.Lock, debugger: DebugServer | None = None
) -> None:
    """The finalizer of a sandbox nobody closed, run when it is collected (not
    at interpreter exit: see ``Sandbox.__init__``). No thread can reach the
    sandbox then, so its lock is normally free; a hot thread back from KVM_RUN
    may still be finishing a doorbell write under it: wait for that, so that
    memory is never unmapped under a write (bounded: a wedged thread does not
    hold up the release). A debug server stops serving (its port is freed)."""
    if debugger is not None:
        debugger.abandon()
    locked = lock.acquire(timeout=RELEASE_WAIT)
    try:
        machine.release()
    finally:
        if locked:
            lock.release()


def live_sandboxes() -> list[Sandbox]:
    """Every sandbox of this process that is not closed."""
    return registry.live(Sandbox)


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
