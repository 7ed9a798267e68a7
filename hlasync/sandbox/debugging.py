"""The run loop's side of the live debugger (:mod:`hlasync.debug`).

With ``SandboxConfig(debug_port=...)`` a sandbox has a
:class:`~hlasync.debug.server.DebugServer`, and its run loop
(:mod:`.runner`) calls these at the points where a debugger may stop the
guest. Every vCPU access here is the calling thread's, through the vCPU's
owner like any other; the server thread sees only copies.

On this PVM host a debugger's stops are the guest's own exceptions
(docs/architecture.md §14): an ``int3`` written over an instruction arrives
as ``#BP``, a single step (``RFLAGS.TF``) as ``#DB``, both reported by the
CPL0 exception stubs as any fault is. A stop shows the user-mode context
recovered from the interrupt frame; resuming puts it back in the vCPU (CPL3
segments, the frame's ``rip``/``rsp``/``rflags`` and what the debugger
changed) and runs the guest again.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Protocol

from ..errors import GuestCancelled
from ..guest.memory import GuestMemory
from ..kvm import kvm_regs, kvm_xsave
from ..kvm.exits import Exit
from .faults import ExceptionInfo, copy_struct

if TYPE_CHECKING:
    from ..abi import FunctionSignature
    from ..debug.server import DebugServer, Stop
    from .calls import Call
    from .machine import Machine
    from .snapshots import Snapshot

__all__ = [
    "after_out",
    "call_begins",
    "call_ends",
    "make_server",
    "on_abort",
    "on_exception",
    "on_kick",
    "run",
]

TF = 0x100
SIGINT, SIGILL, SIGTRAP, SIGABRT, SIGFPE, SIGBUS, SIGSEGV = 2, 4, 5, 6, 8, 10, 11
#: gdb's signal for each exception vector (as Linux maps them for a process).
_SIGNALS = {
    0: SIGFPE,
    1: SIGTRAP,
    3: SIGTRAP,
    6: SIGILL,
    7: SIGFPE,
    16: SIGFPE,
    17: SIGBUS,
    19: SIGFPE,
}


class Debuggable(Protocol):
    """What these hooks use of a sandbox (a :class:`~.core.Sandbox`)."""

    _debugger: DebugServer | None

    @property
    def id(self) -> str: ...
    @property
    def _machine(self) -> Machine: ...
    @property
    def _initial(self) -> Snapshot: ...
    def _enter_host(self, call: Call) -> None: ...
    def _leave_host(self, call: Call) -> None: ...
    def _write_memory(self, address: int, data: bytes) -> None: ...


def make_server(sb: Debuggable, host: str, port: int, image_path: str) -> DebugServer:
    """A debug server for ``sb``, holding it only weakly (its thread must not
    keep a dropped sandbox alive)."""
    from ..debug.server import DebugServer
    from .calls import Call

    ref = weakref.ref(sb)
    memory = sb._machine.memory
    assert memory is not None

    def write(address: int, data: bytes) -> None:
        sandbox = ref()
        if sandbox is not None:
            sandbox._write_memory(address, data)

    def kick() -> None:
        sandbox = ref()
        holder = getattr(sandbox, "_holder", None)
        if isinstance(holder, Call) and holder.started:
            holder.vcpu.kick()

    return DebugServer(
        sb.id, host, port, image_path=image_path, memory=memory, write=write, kick=kick
    )


def _memory(sb: Debuggable) -> GuestMemory:
    memory = sb._machine.memory
    assert memory is not None  # a call holds the vCPU: nothing releases it
    return memory


def _cr3(sb: Debuggable) -> int:
    return int(sb._initial._cpu.sregs.cr3)


def hide(sb: Debuggable, data: bytes, address: int) -> bytes:
    """``data`` read at guest address ``address`` with the debugger's inserted
    breakpoints put back; the caller holds the debugger's lock."""
    dbg = sb._debugger
    assert dbg is not None
    memory = sb._machine.memory
    if memory is None:
        return data
    return dbg.breakpoints.hide_physical(memory, _cr3(sb), address, data)


def call_begins(sb: Debuggable, signature: FunctionSignature) -> None:
    """A call is about to run: a breakpoint at the function's entry when a
    stop is wanted (the first call, a debugger attaching or Ctrl-C between
    calls)."""
    dbg = sb._debugger
    if dbg is None:
        return
    with dbg.lock:
        dbg.breakpoints.entry = signature.address if dbg.want_stop else None


def run(sb: Debuggable) -> Exit:
    """One ``KVM_RUN`` of the call with the debugger's breakpoints in memory
    for just that long: whatever reads memory while the vCPU is out (a stop,
    a dump, a snapshot) never sees them."""
    dbg = sb._debugger
    assert dbg is not None
    memory, cr3 = _memory(sb), _cr3(sb)
    with dbg.lock:
        dbg.breakpoints.insert(memory, dbg.write, cr3)
    try:
        return sb._machine.vcpu.run()
    finally:
        with dbg.lock:
            dbg.breakpoints.remove(memory, dbg.write, cr3)


def call_ends(sb: Debuggable) -> None:
    """The call is over, however it ended: no entry breakpoint or single-step
    flag left for the next call."""
    dbg = sb._debugger
    if dbg is None:
        return
    with dbg.lock:
        dbg.breakpoints.entry = None
        stepping, dbg.stepping = dbg.stepping, False
    if stepping and not sb._machine.released:
        vcpu = sb._machine.vcpu
        regs = vcpu.get_regs()
        if regs.rflags & TF:
            regs.rflags &= ~TF
            vcpu.set_regs(regs)


def on_exception(sb: Debuggable, call: Call, info: ExceptionInfo) -> bool:
    """A CPU exception in guest code, with a debugger configured. True: the
    guest was resumed (the call goes on); False: the exception is the call's
    outcome (``GuestCrashed`` with its dump) — no debugger attached, or it
    passed the fault on."""
    dbg = sb._debugger
    assert dbg is not None
    rip = int(info.regs.rip)
    with dbg.lock:
        bp = dbg.breakpoints
        ours = info.vector == 3 and bp.hit(rip - 1)
        entry = ours and rip - 1 == bp.entry
        bp.entry = None  # any stop is the one wanted: no second one at the entry
        stepped = info.vector == 1 and dbg.stepping
        dbg.stepping = False
        attached = dbg.attached
    regs = copy_struct(info.regs)
    if ours:
        regs.rip = rip - 1  # the instruction under the int3 has not run
    if stepped:
        regs.rflags &= ~TF
    trap = ours or stepped
    if not attached and not entry and not trap:
        return False  # a fault nobody debugs: the call's outcome
    # Back in user mode where the exception struck, as if it had not been
    # delivered: a stop, and a dump made during it, show the guest's context.
    _load_user_mode(sb, regs)
    if not attached and not entry:
        return True  # the debugger left: nobody wants this trap, run on
    signal = _SIGNALS.get(info.vector, SIGSEGV)
    if entry:
        signal = dbg.take_stop_request() or SIGTRAP
    return _stopped(sb, call, regs, signal, swbreak=ours and not entry, fault=not trap, wait=entry)


def after_out(sb: Debuggable, call: Call) -> None:
    """The guest's ``out`` (a host call, a print) was answered. Single-stepping
    it, this host loses the trap that should follow it (the instruction
    completes at the next ``KVM_RUN``, and the guest runs on): the step ends
    here instead, after the ``out``."""
    dbg = sb._debugger
    if dbg is None:
        return
    with dbg.lock:
        stepping = dbg.stepping and dbg.attached
        if stepping:
            dbg.stepping = False
    if not stepping:
        return
    regs = sb._machine.vcpu.get_regs()  # completes the out: rip after it
    regs.rflags &= ~TF
    _stopped(sb, call, regs, SIGTRAP, swbreak=False, fault=False, wait=False)


def on_kick(sb: Debuggable, call: Call) -> None:
    """``KVM_RUN`` came back kicked: stop here if the debugger wants a stop
    (Ctrl-C, or a client attaching mid-call)."""
    dbg = sb._debugger
    if dbg is None or not dbg.attached:
        return
    vcpu = sb._machine.vcpu
    sregs = vcpu.get_sregs()
    if sregs.cs.selector & 3 != 3:
        return  # between an exception and its report: the report is the stop
    signal = dbg.take_stop_request()
    if signal is None:
        return
    with dbg.lock:
        dbg.breakpoints.entry = None  # this is the stop wanted
        dbg.stepping = False
    regs = vcpu.get_regs()
    regs.rflags &= ~TF
    _stopped(sb, call, regs, signal, swbreak=False, fault=False, wait=False)


def on_abort(sb: Debuggable, call: Call) -> None:
    """The guest called ``hl_abort()``: with a debugger attached, stop there
    (SIGABRT) first; the call then fails as it would have."""
    dbg = sb._debugger
    if dbg is None or not dbg.attached:
        return
    with dbg.lock:
        dbg.stepping = False
    regs = sb._machine.vcpu.get_regs()
    _publish_and_wait(sb, call, _stop_of(sb, regs, SIGABRT, False, False), wait=False)
    dbg.terminated(SIGABRT)  # however it resumes, the call fails with the abort


def _load_user_mode(sb: Debuggable, regs: kvm_regs) -> None:
    """Put the vCPU back in user mode with ``regs`` (an exception report left
    it in the CPL0 stub): the user-mode segments of the initial state."""
    vcpu = sb._machine.vcpu
    sregs = vcpu.get_sregs()
    user = sb._initial._cpu.sregs
    sregs.cs, sregs.ss = copy_struct(user.cs), copy_struct(user.ss)
    vcpu.set_sregs(sregs)
    vcpu.set_regs(regs)


def _stop_of(sb: Debuggable, regs: kvm_regs, signal: int, swbreak: bool, fault: bool) -> Stop:
    from ..debug.registers import RegisterFile
    from ..debug.server import Stop

    vcpu = sb._machine.vcpu
    sregs = vcpu.get_sregs()
    registers = RegisterFile.of(regs, sregs, bytes(vcpu.get_xsave()))
    return Stop(signal, registers, int(sregs.cr3), swbreak=swbreak, fault=fault)


def _stopped(
    sb: Debuggable,
    call: Call,
    regs: kvm_regs,
    signal: int,
    *,
    swbreak: bool,
    fault: bool,
    wait: bool,
) -> bool:
    """Stop for the debugger (the vCPU holds the user-mode context); False
    when it passed a fault on (the call then fails with it)."""
    stop = _stop_of(sb, regs, signal, swbreak, fault)
    verdict = _publish_and_wait(sb, call, stop, wait=wait)
    dbg = sb._debugger
    assert dbg is not None
    if verdict == "signal":
        dbg.terminated(signal)
        return False  # the fault is passed on: the call crashes as it would have
    _resume(sb, stop, step=verdict == "step")
    return True


def _publish_and_wait(sb: Debuggable, call: Call, stop: Stop, *, wait: bool) -> str:
    """Show ``stop`` to the debugger and wait for its verdict (``wait``: also
    when no debugger is attached, for one to come). Meanwhile the vCPU is
    paused as during a host function: a dump may borrow it, and a stop of
    the call (``interrupt()``, ``close()``) ends the wait."""
    dbg = sb._debugger
    assert dbg is not None
    sb._enter_host(call)
    try:
        dbg.publish(stop, wait_for_client=wait)
        verdict = dbg.wait_verdict(stop, call.stop_requested)
    finally:
        sb._leave_host(call)  # GuestCancelled when the call was stopped meanwhile
    if verdict == "kill":
        raise GuestCancelled(
            "the debugger killed the call", sandbox_id=sb.id, function=call.function
        )
    return verdict


def _resume(sb: Debuggable, stop: Stop, *, step: bool) -> None:
    """Load what the debugger changed, and the single-step flag; the run loop
    then runs the guest."""
    dbg = sb._debugger
    assert dbg is not None
    vcpu = sb._machine.vcpu
    rf = stop.registers
    regs = copy_struct(rf.regs)
    if step:
        regs.rflags |= TF
    else:
        regs.rflags &= ~TF
    if "sregs" in rf.changed:
        vcpu.set_sregs(rf.sregs)
    vcpu.set_regs(regs)
    if "xsave" in rf.changed:
        vcpu.set_xsave(kvm_xsave.from_buffer_copy(bytes(rf.xsave)))
    with dbg.lock:
        dbg.stepping = step
