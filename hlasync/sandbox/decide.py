"""What the host does about one vCPU exit, decided without any I/O.

:func:`decide` takes an exit (a value of :mod:`hlasync.kvm.exits`) and the
frame the guest wrote into its output buffer, and returns an *action*: a
small value saying what happened and what the call must do next. It reads
no registers, runs no host code, writes nothing and touches no lock, so it
is tested on its own with frames built in a test (``tests/sandbox/
test_decide.py``), without KVM. The caller's run loop
(:func:`hlasync.sandbox.runner.run`) does the I/O the action asks for: runs
the host function, prints, reads the fault's registers, writes the dump.

Every frame is checked by :mod:`hlasync.abi` before it is believed; a bad
one is a :class:`Broken` action (a ``GuestProtocolError`` with a dump).
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import abi
from ..abi import FrameError, Value, ValueType
from ..kvm.exits import Exit, Interrupted, IoOut, Shutdown

__all__ = [
    "Aborted",
    "Action",
    "Asked",
    "Broken",
    "Faulted",
    "HostCallAsked",
    "Kicked",
    "Outcome",
    "PrintAsked",
    "Replay",
    "Returned",
    "Returning",
    "Unreturnable",
    "decide",
    "decide_ask",
    "result",
]


@dataclass(frozen=True, slots=True)
class Returning:
    """The function returned: its result frame is in the output buffer
    (:func:`result` decodes it)."""


@dataclass(frozen=True, slots=True)
class Returned:
    """The function returned ``value``: the call is over, the sandbox ready."""

    value: Value


@dataclass(frozen=True, slots=True)
class Unreturnable:
    """The function ran but its result could not be returned (``GuestResultError``;
    the sandbox stays ready)."""

    message: str


@dataclass(frozen=True, slots=True)
class HostCallAsked:
    """The guest asks for host function ``request.name``: run it, answer, resume."""

    request: abi.HostCall


@dataclass(frozen=True, slots=True)
class PrintAsked:
    """The guest prints ``text``: hand it to the output, resume."""

    text: str


@dataclass(frozen=True, slots=True)
class Asked:
    """A hot call's guest waits for the answer to what it asked on the doorbell
    (the wait port): answer it (:func:`decide_ask` says what it was), resume."""


@dataclass(frozen=True, slots=True)
class Aborted:
    """The guest called ``hl_abort(code, message)``: ``GuestAborted``, poisoned."""

    code: int
    message: str


@dataclass(frozen=True, slots=True)
class Faulted:
    """A CPU exception ``vector`` in guest code: decode its frame, ``GuestCrashed``."""

    vector: int


@dataclass(frozen=True, slots=True)
class Kicked:
    """``KVM_RUN`` was interrupted by a kick: answer the call's requests (dumps,
    a stop), then resume unless it was stopped."""


@dataclass(frozen=True, slots=True)
class Replay:
    """A handed-over exit of a dispatcher that parked before it saw the call:
    run the guest again (it finds the call then)."""


@dataclass(frozen=True, slots=True)
class Broken:
    """The guest broke the host/guest protocol: ``GuestProtocolError``, poisoned.
    ``exit`` is the exit when it was not an ``out`` at all."""

    message: str
    exit: Exit | None = None


Action = (
    Returning | HostCallAsked | PrintAsked | Asked | Aborted | Faulted | Kicked | Replay | Broken
)

#: What :func:`result` makes of a result frame.
Outcome = Returned | Unreturnable | Broken

_RETURNING = Returning()
_KICKED = Kicked()
_ASKED = Asked()
_REPLAY = Replay()


def decide(exit_: Exit, output: memoryview, *, call_seen: bool = True) -> Action:
    """The action for ``exit_``, given the guest's ``output`` buffer.
    ``call_seen`` is False when a return exit was handed over by a hot
    session whose guest had not yet seen the call (its ``done_seq`` is
    behind): that exit is no answer."""
    if isinstance(exit_, IoOut):
        port = exit_.port
        if port == abi.PORT_RETURN or port == abi.PORT_PARKED:
            return _RETURNING if call_seen else _REPLAY
        if port == abi.PORT_HOSTCALL:
            return _host_call(output)
        if port == abi.PORT_PRINT:
            return _print(output)
        if port == abi.PORT_WAIT:
            return _ASKED
        if port == abi.PORT_ABORT:
            return _abort(output)
        if 0 <= port - abi.PORT_EXCEPTION_BASE < 32:
            return Faulted(port - abi.PORT_EXCEPTION_BASE)
        return Broken(f"guest wrote to unknown port {port:#x}")
    if isinstance(exit_, Interrupted):
        return _KICKED
    suffix = " (triple fault)" if isinstance(exit_, Shutdown) else ""
    return Broken(f"unexpected vCPU exit {exit_}{suffix}", exit_)


def decide_ask(port: int, output: memoryview) -> HostCallAsked | PrintAsked | Broken:
    """What a hot call's guest asked on the doorbell (``ask_port``)."""
    if port == abi.PORT_HOSTCALL:
        return _host_call(output)
    if port == abi.PORT_PRINT:
        return _print(output)
    return Broken(f"guest asked on the doorbell for unknown port {port:#x}")


def result(output: memoryview, returns: ValueType, output_size: int = 0) -> Outcome:
    """What the result frame in ``output`` says, for a function returning
    ``returns``; ``output_size`` is named in the hint of a result that did
    not fit."""
    try:
        value, error = abi.read_result(output, returns)
    except FrameError as exc:
        return Broken(f"bad result frame: {exc}")
    if error is not None:
        hint = ""
        if "output buffer" in error:
            hint = f" (raise SandboxConfig.output_buffer_size, now {output_size})"
        return Unreturnable(f"the guest could not return the result: {error}{hint}")
    return Returned(value)


def _host_call(output: memoryview) -> HostCallAsked | Broken:
    try:
        return HostCallAsked(abi.read_host_call(output))
    except FrameError as exc:
        return Broken(f"bad host-call frame: {exc}")


def _print(output: memoryview) -> PrintAsked | Broken:
    try:
        _, text = abi.read_message(output, abi.MAGIC_PRINT)
    except FrameError as exc:
        return Broken(f"bad print frame: {exc}")
    return PrintAsked(text.decode(errors="replace"))


def _abort(output: memoryview) -> Aborted | Broken:
    try:
        code, text = abi.read_message(output, abi.MAGIC_ABORT)
    except FrameError as exc:
        return Broken(f"bad abort frame: {exc}")
    return Aborted(code, text.decode(errors="replace"))
