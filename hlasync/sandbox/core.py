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
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

from .. import abi
from ..abi import Arg, FunctionSignature, Value
from ..config import AUTO, SandboxConfig
from ..errors import (
    ArgumentError,
    CrashdumpError,
    FunctionNotFound,
    GuestCancelled,
    GuestImageError,
    GuestResultError,
    HostFunctionError,
    SandboxBusy,
    SandboxClosed,
    SandboxPoisoned,
)
from ..guest import layout as lay
from ..guest.image import GuestImage
from ..guest.layout import MemoryLayout
from ..guest.memory import GuestMemory, MemoryImage
from ..kvm import kvm_regs
from ..kvm.exits import Interrupted, IoOut
from . import cpu, registry, runner
from .calls import Call, CallHandle, DumpRequest, Phase, current_runner
from .dumps import CrashdumpRecord, try_dump, write_dump
from .faults import ExceptionInfo
from .hot import (
    AUTO_FACTOR,
    AUTO_GAP_CAP,
    AUTO_MAX,
    AUTO_MAX_GAP,
    AUTO_MIN,
    CROWDED_COOLDOWN,
    PARK_KICK_AFTER,
    AutoChooser,
    HotSession,
    budget,
    reaper,
)
from .machine import Machine
from .snapshots import Snapshot, templates
from .states import Event, SandboxState, after

__all__ = ["Sandbox", "SandboxState", "StopResult", "check_call"]

_logger = logging.getLogger("hlasync")
_ids = itertools.count(1)

#: How long a call, restore or dump waits for another operation on an idle
#: sandbox (a restore, a snapshot, a dump) to finish before SandboxBusy.
OPERATION_WAIT = 30.0
#: How long generate_crashdump() waits for a running vCPU to pause.
DUMP_PAUSE_TIMEOUT = 10.0
#: How long close() waits for a running call to stop.
CLOSE_TIMEOUT = 5.0
#: Seconds close() waits for a hot sandbox's thread (and an idle reaper) to end.
HOT_THREAD_JOIN = 1.0
#: Seconds the finalizer of a sandbox dropped unclosed waits for its lock.
RELEASE_WAIT = 1.0
#: How long a call waits, before resuming its guest, for dumps that borrowed its vCPU.
LOAN_TIMEOUT = 60.0


class StopResult(NamedTuple):
    """What :meth:`Sandbox._stop` did."""

    stopped: bool  # this request stopped the call (False: ended or already stopping)
    dump: DumpRequest | None  # the dump asked for, if any
    in_host: bool  # the call was running host code (a host function) on another thread


class _Operation:
    """A holder of an idle sandbox that is not a call: restore, snapshot or dump."""

    __slots__ = ("name", "thread")

    def __init__(self, name: str) -> None:
        self.name = name
        self.thread = threading.get_ident()


class Sandbox:
    """A guest running in its own KVM micro-VM.

    ``guest`` is the path of a guest ELF built with the hlasync SDK (see
    :mod:`hlasync.guests` for the bundled ones). ``output`` receives the
    guest's debug prints (default: written to ``sys.stdout``).

    Thread safety: one call at a time (a second concurrent call raises
    :class:`SandboxBusy`); :meth:`interrupt`, :meth:`generate_crashdump` and
    :meth:`close` may be called from any thread, also from a host function.
    """

    _machine: Machine

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
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._waiting = 0  # threads waiting on _changed
        self._crashdump_listeners: list[Callable[[CrashdumpRecord], None]] = []
        self._last_worker = -1  # the supervisor worker that ran it last
        self._state = SandboxState.CLOSED
        self._holder: Call | _Operation | HotSession | None = None
        self._loans = 0  # dumps written by other threads while a call runs host code
        self._forked_from: int | None = None
        self.last_exception: ExceptionInfo | None = None
        self._doorbell = False  # the guest's dispatcher waits on the doorbell page
        self._hot: HotSession | None = None  # made at the first call with config.spin
        self._last_end = 0.0  # monotonic time the last call ended (spin="auto")
        self._gap_average: float | None = None  # of the gaps between calls (spin="auto")
        self._auto = AutoChooser()  # spin="auto": whether spinning pays for this caller
        #: Whether config.spin applies: owners that measure a call's CPU time on
        #: the calling thread (the supervisor, JSSandbox) keep the exit path.
        self._spin_allowed = True
        self._compat = (self.image.digest, self.layout)
        self._initial = self._boot()
        # Releases the VM and memory if the sandbox is dropped unclosed; close()
        # releases through _release_locked. Not at interpreter exit: a daemon
        # thread may still be in KVM_RUN or in the native doorbell wait, reading
        # guest memory without the GIL (an unmap under it was a SIGSEGV), and
        # the process's end releases everything anyway.
        self._finalizer = weakref.finalize(self, _release_unclosed, self._machine, self._lock)
        self._finalizer.atexit = False
        self._state = after(self._state, Event.BOOTED)
        registry.add(self)

    # ----------------------------------------------------------- creation
    def _boot(self) -> Snapshot:
        template = templates.get(self._compat)
        if template is not None:
            self._machine = Machine(self.layout, template._image)
            self._machine.vcpu.owner.label = self.id
            try:
                cpu.apply(self._machine.vcpu, template._cpu)
            except BaseException:
                self._machine.release()
                raise
            # The template's output buffer still holds the ready frame its guest wrote.
            features = abi.READY.unpack_from(self._machine.output, 0)[3]
            self._doorbell = bool(features & abi.FEATURE_DOORBELL)
            return template
        boot = MemoryImage(self.layout.memory_size, "hlasync-boot")
        try:
            mapping = GuestMemory(boot)  # write the boot image once through a private map
            try:
                lay.build_boot_image(mapping.view, self.layout, self.image)
                # Everything the boot image holds lies below the stack.
                boot.write_runs(mapping.view, [(0, self.layout.stack_base)])
            finally:
                mapping.close()
            self._machine = Machine(self.layout, boot)
            self._machine.vcpu.owner.label = self.id
        except BaseException:
            boot.close()
            raise
        try:
            vcpu = self._machine.vcpu
            cpu.set_user_mode(vcpu)
            vcpu.set_regs(
                kvm_regs(rip=self.image.entry, rsp=self.layout.stack_top, rflags=lay.RFLAGS)
            )
            self._initialise()
            initial = self._take_snapshot()
        except BaseException:
            self._machine.release()
            boot.close()  # not left to the GC: a traceback may keep it alive a long time
            raise
        templates.put(self._compat, initial)
        return initial

    def _initialise(self) -> None:
        """Run the guest from its entry point to its dispatcher, for at most
        ``config.init_timeout`` seconds."""
        vcpu = self._machine.vcpu
        expired = threading.Event()
        guard = threading.Lock()
        booting = True

        def expire() -> None:
            with guard:  # kick only while this thread is still booting
                if booting:
                    expired.set()
                    vcpu.kick()

        timer = threading.Timer(self.config.init_timeout, expire)
        timer.daemon = True
        timer.start()
        try:
            while True:
                exit_ = vcpu.run()
                if not isinstance(exit_, Interrupted):
                    break
                if expired.is_set():
                    self._init_timed_out()
        finally:
            with guard:
                booting = False
            timer.cancel()
            vcpu.owner.drain()  # a kick sent just before the guard closed
        if not (isinstance(exit_, IoOut) and exit_.port == abi.PORT_RETURN):
            raise GuestImageError(
                f"guest did not reach its dispatcher during initialisation (exit: {exit_}); "
                "was it built with the hlasync SDK?",
                path=self.image.path,
            )
        magic, version, count, features = abi.READY.unpack_from(self._machine.output, 0)
        self._doorbell = bool(features & abi.FEATURE_DOORBELL)
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

    def _init_timed_out(self) -> None:
        path, failure = None, None
        if self.config.crashdump_enabled:
            path, failure = try_dump(self, "init-timeout", None, function=None)
        where = f"; core dump: {path}" if path else ""
        if failure is not None:
            where = f"; no core dump: {failure}"
        error = GuestImageError(
            f"guest did not reach its dispatcher within {self.config.init_timeout:g} s of "
            f"starting (SandboxConfig.init_timeout){where}",
            path=self.image.path,
        )
        error.core_path = path
        raise error

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
        """Call guest function ``name`` with ``args`` and return its result."""
        signature = check_call(self.image, self._signatures, self.id, name, args)
        return self._call_checked(signature, args)

    def _call_checked(self, signature: FunctionSignature, args: tuple[Arg, ...]) -> Value:
        """:meth:`call` for arguments already checked against ``signature`` (the
        supervisor checks them before queueing)."""
        return self._run_begun(self._begin_call(signature.name), signature, args)

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
        with self._operation("restore"):
            machine = self._machine
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
            memory = self._machine.memory
            if memory is None:
                raise SandboxClosed(f"sandbox {self.id} is closed", sandbox_id=self.id)
            if address < 0 or address + len(data) > memory.size:
                raise ValueError(f"[{address:#x}, +{len(data):#x}) is outside guest memory")
            self._machine.pages.host_wrote(address, len(data))
            memory.view[address : address + len(data)] = data

    def read_memory(self, address: int, size: int) -> bytes:
        """Copy ``size`` bytes of guest memory at guest address ``address``."""
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
        if hot is not None and hot.thread.ident != me:
            # Its thread is ending (closing, parked): gone when close() returns,
            # and with it the reaper when nothing else is hot.
            hot.thread.join(HOT_THREAD_JOIN)
            reaper.settle(HOT_THREAD_JOIN)
        registry.discard(self)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Sandbox {self.id} {self.image.path.name} {self._state.value}>"

    # ------------------------------------------------------ holding the vCPU
    def _begin_call(self, function: str) -> Call:
        """Make a call the holder of the vCPU (the calling thread becomes its owner)."""
        runner_ = current_runner()
        call = Call(self.id, function, runner_, self._machine.vcpu)
        with self._lock:
            holder = self._holder
            if isinstance(holder, HotSession) and not holder.parked_at:
                call.hot = holder  # the guest spins: the call is posted on the doorbell
            else:
                self._wait_for_operations(function)
            if self._state is not SandboxState.READY:
                self._raise_not_ready(function)
            self._holder = call
            self._state = after(self._state, Event.CALL)
        budget.call_started()
        runner_.calls.append(call)
        return call

    def _wait_for_operations(self, what: str) -> None:
        """Wait (lock held, bounded) until no other operation holds the vCPU;
        SandboxBusy if a call holds it. Returns with the holder free."""
        deadline = 0.0
        while True:
            if self._state is SandboxState.CLOSED:
                self._raise_not_ready(what)
            holder = self._holder
            if holder is None:
                return
            if isinstance(holder, HotSession):  # stop the spin; it gives the vCPU up
                holder.park(self, time.monotonic())
                self._wait_locked(PARK_KICK_AFTER / 4)
                continue
            if isinstance(holder, Call):
                raise SandboxBusy(
                    f"sandbox {self.id} is already running a call ({holder.function})",
                    sandbox_id=self.id,
                )
            if holder.thread == threading.get_ident():
                raise SandboxBusy(
                    f"sandbox {self.id} is busy with {holder.name} on this thread ({what})",
                    sandbox_id=self.id,
                )
            now = time.monotonic()
            if not deadline:
                deadline = now + OPERATION_WAIT
            if now >= deadline:
                raise SandboxBusy(
                    f"sandbox {self.id} has been busy with {holder.name} for more than "
                    f"{OPERATION_WAIT:g} s ({what})",
                    sandbox_id=self.id,
                )
            self._wait_locked(deadline - now)

    @contextlib.contextmanager
    def _operation(self, name: str) -> Iterator[_Operation]:
        """Hold an idle (ready or poisoned) sandbox's vCPU for ``name``."""
        operation = _Operation(name)
        with self._lock:
            self._wait_for_operations(name)
            self._holder = operation
            # spin="auto": the next call follows an operation, which would park a
            # spinning guest again (call + restore loops): it does not spin.
            self._last_end = 0.0
        try:
            yield operation
        finally:
            with self._lock:
                self._holder = None
                self._release_if_closed_locked()
                self._notify_locked()

    def _wait_locked(self, timeout: float) -> None:
        """Wait (lock held) for the holder or the loans to change."""
        self._waiting += 1
        try:
            self._changed.wait(max(timeout, 0.0))
        finally:
            self._waiting -= 1

    def _notify_locked(self) -> None:
        if self._waiting:  # nobody waits on most calls: skip the Condition's bookkeeping
            self._changed.notify_all()

    def _release_locked(self) -> None:
        """Release the VM and guest memory now (lock held, or no other thread)."""
        self._finalizer.detach()
        self._machine.release()

    def _release_if_closed_locked(self) -> None:
        if self._state is SandboxState.CLOSED and self._holder is None and not self._loans:
            self._release_locked()

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
                    self._release_if_closed_locked()
                    self._notify_locked()
                    return stopped
            # Asked for as the call ended: they see the state it left.
            self._serve(call, requests, fault)

    # ------------------------------------------------------- hot sandboxes
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
                self._release_if_closed_locked()
                self._notify_locked()

    def _set_spin(self, ticks: int) -> None:
        """The doorbell's spin budget (TSC ticks; 0 ends a spin)."""
        machine = self._machine
        if machine.released:  # by the finalizer of a sandbox dropped unclosed
            return
        machine.write_bell(abi.WORD_SPIN, ticks)

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
                self._release_if_closed_locked()
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

    # --------------------------------------------------------- internals
    def _take_snapshot(self) -> Snapshot:
        machine = self._machine
        assert machine.memory is not None
        machine.vcpu.complete()  # before reading memory: finishing an `ins` writes it
        image = machine.memory.snapshot_image(machine.data_runs())
        # Map the new image under the guest so restoring it is a cheap reset.
        machine.remap(image)
        return Snapshot(self._compat, image, cpu.capture(machine.vcpu))

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

    def _cancelled_error(self, call: Call) -> GuestCancelled:
        path, failure = call.last_dump()
        error = GuestCancelled(
            "call interrupted", sandbox_id=self.id, function=call.function, core_path=path
        )
        error.crashdump_error = failure
        return error

    def _raise_not_ready(self, what: str) -> None:
        state = self._state
        if state is SandboxState.POISONED:
            raise SandboxPoisoned(
                f"sandbox {self.id} is poisoned by an earlier fault or interrupt; call restore()",
                sandbox_id=self.id,
            )
        if state is SandboxState.CLOSED:
            if self._forked_from is not None:
                raise SandboxClosed(
                    f"sandbox {self.id} belongs to process {self._forked_from}; a forked child "
                    "cannot use it (create sandboxes after the fork)",
                    sandbox_id=self.id,
                )
            raise SandboxClosed(f"sandbox {self.id} is closed", sandbox_id=self.id)
        raise SandboxBusy(
            f"sandbox {self.id} is already running a call ({what})", sandbox_id=self.id
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
        self._release_locked()


def _release_unclosed(machine: Machine, lock: threading.Lock) -> None:
    """The finalizer of a sandbox nobody closed, run when it is collected (not
    at interpreter exit: see ``Sandbox.__init__``). No thread can reach the
    sandbox then, so its lock is normally free; a hot thread back from KVM_RUN
    may still be finishing a doorbell write under it: wait for that, so that
    memory is never unmapped under a write (bounded: a wedged thread does not
    hold up the release)."""
    locked = lock.acquire(timeout=RELEASE_WAIT)
    try:
        machine.release()
    finally:
        if locked:
            lock.release()


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
