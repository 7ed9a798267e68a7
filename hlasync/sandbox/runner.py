"""The caller's side of one call: have the vCPU's owner run the guest and
act on each exit.

A call is one ``KVM_RUN`` (on the owner thread) when the guest simply
returns; host calls and prints add one each. Every frame the guest wrote is
checked by :mod:`hlasync.abi` before it is believed. Faults, aborts and
protocol errors get their automatic core dump here, on the calling thread,
while the vCPU is paused.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol, assert_never

from .. import _telemetry as telemetry
from .. import abi
from ..abi import FunctionSignature, Value
from ..errors import (
    GuestAborted,
    GuestError,
    GuestProtocolError,
    GuestResultError,
    HostFunctionError,
)
from ..guest.memory import GuestMemory
from ..kvm.exits import Exit, Interrupted, IoOut
from . import cpu, debugging, native
from .calls import Call
from .decide import (
    Aborted,
    Asked,
    Broken,
    Faulted,
    HostCallAsked,
    Kicked,
    PrintAsked,
    Replay,
    Returned,
    Returning,
    Unreturnable,
    decide,
    decide_ask,
    result,
)
from .dumps import Dumpable, attach_automatic_dump
from .faults import ExceptionInfo, decode_exception
from .hot import HotSession, SpinControl, read_done_seq
from .snapshots import Snapshot

__all__ = ["Runnable", "halt", "post", "reclaim", "run"]

#: How long a caller spins (without the GIL) for a hot guest's answer before it
#: sleeps and looks every 50 us.
HOT_WAIT_SPIN_NS = 200_000
#: How long one wait lasts without a return to Python (for signal handlers).
HOT_WAIT_SLICE_NS = 100_000_000

#: Park tokens (:func:`post`): random, so unrelated to the calls made before.
_tokens = random.Random()


class Runnable(Dumpable, SpinControl, debugging.Debuggable, Protocol):
    """What the run loop uses of a sandbox (a :class:`~.core.Sandbox`, or a part
    of it): its machine and guest, its host functions and output, and the
    caller's answers to requests (:mod:`.requests`)."""

    last_exception: ExceptionInfo | None
    _park_token: int

    @property
    def _doorbell(self) -> bool: ...
    @property
    def _park_feature(self) -> bool: ...
    @property
    def _spin_allowed(self) -> bool: ...
    @property
    def _initial(self) -> Snapshot: ...
    @property
    def _host_functions(self) -> Mapping[str, Callable[..., Any]]: ...
    @property
    def _output(self) -> Callable[[str], None] | None: ...
    def _on_kick(self, call: Call) -> None: ...
    def _enter_host(self, call: Call) -> None: ...
    def _leave_host(self, call: Call) -> None: ...
    def _halt_asking(self, call: Call) -> None: ...


def post(sb: Runnable) -> int:
    """Announce the call frame in the input buffer on the doorbell: the
    dispatcher runs a call only when ``req_seq`` moved. The new sequence.

    A guest that parks (``SandboxConfig.hot_restore``) is asked to park
    after the call with a new token, and let out of the park it is in (or
    is about to enter) with ``go``, written last: it then finds the call.
    Tokens are random, so that a ``go`` never matches a later park and a
    call cannot count the calls before it by its token."""
    machine = sb._machine
    bell = machine.bell
    seq: int = (bell[abi.WORD_REQ_SEQ] + 1) & 0xFFFF_FFFF_FFFF_FFFF
    if not sb._park_feature:
        machine.write_bell(abi.WORD_REQ_SEQ, seq)
        return seq
    token = 0
    if sb.config.hot_restore and sb._spin_allowed:
        token = _tokens.getrandbits(63) | 1
    machine.write_bell(abi.WORD_PARK, token)  # read by the dispatcher with the call
    machine.write_bell(abi.WORD_REQ_SEQ, seq)
    parked = int(bell[abi.WORD_PARKED]) or sb._park_token
    if parked:
        machine.write_bell(abi.WORD_GO, parked)
    sb._park_token = token
    return seq


def _release_park(sb: Runnable) -> None:
    """The guest exited from a park that the call did not let it out of (it
    parked after the call was posted, with a token the host did not expect):
    let it out now; it finds the call then."""
    parked = int(sb._machine.bell[abi.WORD_PARKED])
    if parked:
        sb._machine.write_bell(abi.WORD_GO, parked)


def run(sb: Runnable, call: Call, signature: FunctionSignature) -> Value:
    """Resume the guest at its dispatcher (the call frame is in the input
    buffer) and run it until the call's outcome.

    A call that took the vCPU from a hot session (its guest spins on the
    doorbell) is posted there and answered without an exit; if ``KVM_RUN``
    comes back on the hot thread first (an exit of the call, a kick, the end
    of the spin), this thread takes the vCPU over and goes on with the exit.

    With a debugger configured (``SandboxConfig.debug_port``), its breakpoints
    are in guest memory during each ``KVM_RUN``, and the guest's traps and
    faults stop in the debugger (:mod:`.debugging`)."""
    if sb._debugger is None:
        return _run(sb, call, signature)
    debugging.call_begins(sb, signature)
    try:
        return _run(sb, call, signature)
    finally:
        debugging.call_ends(sb)


def _run(sb: Runnable, call: Call, signature: FunctionSignature) -> Value:
    vcpu = sb._machine.vcpu
    name = signature.name
    seq = post(sb) if sb._doorbell else 0
    call.started = True
    pending: Exit | None = None
    if call.hot is not None:
        handed = _hot_call(sb, call, call.hot, seq)
        if handed is None:
            return _read_result(sb, signature, call.hot)
        pending = handed
    elif sb._doorbell and sb._machine.bell[abi.WORD_SPIN]:
        sb._set_spin(0)  # on the exit path nobody watches the doorbell: no spin
    output = sb._machine.output
    while True:
        seen = True
        if pending is not None:
            exit_, pending = pending, None
            seen = read_done_seq(sb) == seq  # a return exit before the guest saw the call?
        elif sb._debugger is None:
            exit_ = vcpu.run()
        else:
            exit_ = debugging.run(sb)  # with the breakpoints in, for just this run
        if isinstance(exit_, IoOut) and exit_.port == abi.PORT_PARKED:
            seen = read_done_seq(sb) == seq  # parked after the call, or before it?
            if not seen:
                _release_park(sb)
        action = decide(exit_, output, call_seen=seen)
        match action:
            case Returning():
                return _read_result(sb, signature)
            case HostCallAsked(request=request):
                _host_call(sb, call, name, request)
                if sb._debugger is not None:
                    debugging.after_out(sb, call)
            case PrintAsked(text=text):
                _print(sb, call, text)
                if sb._debugger is not None:
                    debugging.after_out(sb, call)
            case Asked():
                _answer_ask(sb, call, name)
            case Kicked():
                sb._on_kick(call)
                if sb._debugger is not None:
                    debugging.on_kick(sb, call)
            case Replay():
                continue  # the guest parked before it saw the call: run it now
            case Faulted(vector=vector):
                error, fault = decode_exception(
                    vcpu, _memory(sb), sb.image, sandbox_id=sb.id, function=name, vector=vector
                )
                if (
                    fault is not None
                    and sb._debugger is not None
                    and debugging.on_exception(sb, call, fault)
                ):
                    continue  # the debugger resumed the guest
                raise _failed(sb, error, fault)
            case Aborted(code=code, message=message):
                if sb._debugger is not None:
                    debugging.on_abort(sb, call)
                aborted = GuestAborted(
                    sandbox_id=sb.id, function=name, code=code, guest_message=message
                )
                raise _failed(sb, aborted)
            case Broken(message=message, exit=unexpected):
                raise _failed(sb, _protocol_error(sb, name, message, unexpected))
            case _:
                assert_never(action)


def _hot_call(sb: Runnable, call: Call, hot: HotSession, seq: int) -> Exit | None:
    """Wait for the guest to answer call ``seq`` through the doorbell: None
    when it did, else the exit that ``KVM_RUN`` came back with on the hot
    thread (the vCPU is then stopped, and this thread's to run). Host calls
    and prints the guest asks on the doorbell meanwhile are answered there."""
    base = _memory(sb).address
    address = base + abi.DOORBELL_DONE_SEQ
    ask = (base + abi.DOORBELL_ASK_SEQ, base + abi.DOORBELL_ANSWER_SEQ)
    clock = time.thread_time
    while True:
        # The wait polls the doorbell on this thread: its CPU is the guest's
        # time seen from here, not host code (Call.waited_cpu).
        waited = call.waiting[0]
        call.waiting = (waited, clock())
        try:
            outcome = native.wait(address, seq, hot.flag, HOT_WAIT_SPIN_NS, HOT_WAIT_SLICE_NS, ask)
            while outcome == native.WAIT_TIMEOUT:  # back in Python now and then: signals run
                outcome = native.wait(address, seq, hot.flag, 0, HOT_WAIT_SLICE_NS, ask)
        finally:
            call.waiting = (call.waited_cpu(clock()), None)
        if outcome != native.WAIT_ASK:
            break
        # Host code runs on this thread while the guest spins for its answer on
        # the vCPU's owner: whoever needs the vCPU stopped (a stop, a dump) kicks
        # the owner (call.asking, set before the host code runs).
        call.asking = hot
        try:
            _answer_ask(sb, call, call.function)
        finally:
            call.asking = None
    if outcome == native.WAIT_WORD:
        return None
    # KVM_RUN returned on the owner for the hot thread: from here this thread
    # waits for the call's KVM_RUNs, and the guest must not spin once it is
    # done (nobody would watch it). A kick that came after that KVM_RUN
    # returned is pending on the owner: the next KVM_RUN returns at once.
    sb._set_spin(0)
    exit_ = hot.exit
    if isinstance(exit_, BaseException):
        raise exit_
    if exit_ is None:
        # The hot thread ended (its sandbox closing) before it ran the guest:
        # the vCPU is this thread's with the guest where it was; the call's
        # requests (its stop) are answered as after a kick.
        return Interrupted()
    return exit_


def halt(sb: SpinControl, hot: HotSession) -> None:
    """Make a hot thread's guest leave KVM_RUN now, without waiting for it: no
    more spin, and a kick for a guest that ignores the spin (sandbox lock held,
    or the vCPU's call owned: its flag is raised only under that lock)."""
    sb._set_spin(0)
    if not hot.flag.raised:
        sb._machine.vcpu.kick()


def reclaim(sb: SpinControl, hot: HotSession) -> None:
    """Take the vCPU back from a hot thread whose guest cannot be trusted to
    park (or must stop at once): kick it out of KVM_RUN, wait until it is out."""
    halt(sb, hot)
    while not native.wait_flag(hot.flag, HOT_WAIT_SLICE_NS):
        pass


def _answer_ask(sb: Runnable, call: Call, function: str) -> None:
    """Answer the host call or print the guest asked on the doorbell, if it has
    not been answered yet. While ``call.asking`` is set the guest still spins on
    that hot session's thread: it is stopped before anything that needs the
    vCPU (``Sandbox._halt_asking``)."""
    bell = sb._machine.bell
    asked = int(bell[abi.WORD_ASK_SEQ])
    if asked == bell[abi.WORD_ANSWER_SEQ]:
        return  # answered already (the guest exited as the answer came)
    match decide_ask(int(bell[abi.WORD_ASK_PORT]), sb._machine.output):
        case HostCallAsked(request=request):
            _host_call(sb, call, function, request)
        case PrintAsked(text=text):
            _print(sb, call, text)
        case Broken(message=message):
            sb._halt_asking(call)
            raise _failed(sb, _protocol_error(sb, function, message))
    sb._machine.write_bell(abi.WORD_ANSWER_SEQ, asked)  # after the answer's frame


def _memory(sb: SpinControl) -> GuestMemory:
    memory = sb._machine.memory
    assert memory is not None  # the call holds the vCPU: nothing releases it meanwhile
    return memory


def _failed(sb: Runnable, error: GuestError, fault: ExceptionInfo | None = None) -> GuestError:
    """A failure that poisons the sandbox: remember the fault, write the dump."""
    sb.last_exception = fault
    if sb.config.crashdump_enabled:
        attach_automatic_dump(sb, error, fault)
    if isinstance(error, GuestProtocolError):
        telemetry.protocol_error(sb.id, error)
    return error


def _protocol_error(
    sb: Runnable, function: str | None, message: str, unexpected: Exit | None = None
) -> GuestProtocolError:
    return GuestProtocolError(message, sandbox_id=sb.id, function=function, vcpu_exit=unexpected)


def _read_result(
    sb: Runnable, signature: FunctionSignature, hot: HotSession | None = None
) -> Value:
    """The call's result frame. ``hot``: the guest answered on the doorbell and
    still runs on that session's thread; a bad frame stops it before the dump."""
    match result(sb._machine.output, signature.returns, sb.layout.output_size):
        case Returned(value=value):
            return value
        case Unreturnable(message=message):
            raise GuestResultError(message, sandbox_id=sb.id, function=signature.name)
        case Broken(message=message):
            if hot is not None:
                reclaim(sb, hot)
            raise _failed(sb, _protocol_error(sb, signature.name, message))
        case outcome:
            assert_never(outcome)


def _host_call(sb: Runnable, call: Call, function: str, request: abi.HostCall) -> None:
    """Run the host function ``request`` asks for and write its result into
    the output buffer (a guest that asked on the doorbell and still spins is
    stopped first when the call fails)."""
    output = sb._machine.output
    host_fn = sb._host_functions.get(request.name)
    if host_fn is None:
        sb._halt_asking(call)
        _unwind(sb)
        raise HostFunctionError(
            f"guest called unregistered host function {request.name!r}",
            sandbox_id=sb.id,
            function=function,
            host_function=request.name,
        )
    failure: HostFunctionError | None = None

    def fail(message: str, cause: Exception) -> HostFunctionError:
        error = HostFunctionError(
            message, sandbox_id=sb.id, function=function, host_function=request.name
        )
        error.__cause__ = cause
        return error

    sb._enter_host(call)
    try:
        try:
            if call.span is None:
                result = host_fn(*request.args)
            else:  # inside the call's span: the function's own spans nest under it
                with call.span.current():
                    result = host_fn(*request.args)
        except Exception as exc:  # noqa: BLE001 - reported to the caller as HostFunctionError
            failure = fail(
                f"host function {request.name!r} raised {type(exc).__name__}: {exc}", exc
            )
        else:
            try:
                written = abi.write_result(output, result)
            except abi.EncodeError as exc:
                hint = "raise SandboxConfig.output_buffer_size"
                failure = fail(f"host function {request.name!r}: {exc}: {hint}", exc)
            except (TypeError, ValueError) as exc:  # "returned a list; host functions may ..."
                failure = fail(f"host function {request.name!r} {exc}", exc)
            else:
                sb._machine.pages.host_wrote(sb.layout.output_addr, written)
    finally:
        sb._leave_host(call)
    if failure is not None:
        sb._halt_asking(call)
        _unwind(sb)
        raise failure


def _unwind(sb: Runnable) -> None:
    """Put the vCPU back at the dispatcher's idle point (after a failed host call).
    Memory stays as the call left it: the doorbell must say the call was handled,
    or the dispatcher, resumed to spin, would run its frame again."""
    cpu.apply(sb._machine.vcpu, sb._initial._cpu)
    machine = sb._machine
    machine.write_bell(abi.WORD_DONE_SEQ, machine.bell[abi.WORD_REQ_SEQ])
    # an ask of the call is over too
    machine.write_bell(abi.WORD_ANSWER_SEQ, machine.bell[abi.WORD_ASK_SEQ])


def _print(sb: Runnable, call: Call, text: str) -> None:
    sb._enter_host(call)
    try:
        if sb._output is not None:
            if call.span is None:
                sb._output(text)
            else:  # inside the call's span, as host functions
                with call.span.current():
                    sb._output(text)
        else:
            sys.stdout.write(text)
            sys.stdout.flush()
    finally:
        sb._leave_host(call)
