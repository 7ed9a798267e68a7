"""The hlasync exception tree.

Every error hlasync raises derives from :class:`HlasyncError`::

    HlasyncError
    ├── KvmError
    │   ├── KvmUnavailableError      /dev/kvm missing, not permitted, wrong API
    │   └── IoctlError               an ioctl failed (names the ioctl and errno)
    ├── ConfigError                  a SandboxConfig value is invalid (also ValueError)
    ├── GuestImageError              the guest binary cannot be loaded or initialised
    ├── DebuggerError                a sandbox's debugger server cannot listen (debug_port)
    ├── CallError                    a call was refused before the guest ran
    │   ├── FunctionNotFound         no guest function of that name (also LookupError)
    │   └── ArgumentError            arguments do not match the signature (also TypeError)
    ├── SandboxStateError            the sandbox cannot take this request now
    │   ├── SandboxPoisoned          a fault or interrupt left it dirty: restore() first
    │   ├── SandboxBusy              a call is already running on it
    │   │   └── OwnerBusy            its vCPU's owner thread did not take a request in time
    │   └── SandboxClosed            it was closed
    ├── GuestError                   the guest failed while running a call
    │   ├── GuestCrashed             a CPU exception (fault) in guest code
    │   ├── GuestAborted             the guest called hl_abort()
    │   ├── GuestCancelled           interrupt() stopped the call
    │   ├── GuestProtocolError       the guest broke the host/guest ABI
    │   ├── GuestResultError         the function ran, its result could not be returned
    │   ├── GuestTimeout             a supervisor watchdog stopped the call
    │   ├── HostFunctionError        a host function the guest called raised
    │   └── JSError                  a JavaScript handler threw (name, message, stack)
    │       ├── JSSyntaxError        a handler or module does not compile (line, column)
    │       └── JSResultError        a handler returned nothing, or nothing JSON can hold
    ├── SupervisorError              the supervisor cannot take this call
    │   ├── SupervisorBusy           its queue is full (call_nowait)
    │   ├── SupervisorClosed         it is shut down or shutting down
    │   └── WorkerLost               the worker process (or Ray actor) running the call died
    └── CrashdumpError               a core dump could not be written
        └── InvalidCoreDump          a file is not a readable hlasync core dump

Every :class:`GuestError` carries the sandbox id, the guest function name and,
when a core dump was written for it, ``core_path``.

Text that came from a guest (a JS message or stack, an abort message) is kept
unchanged on the error's attributes, but the error's ``str()`` shows it through
:func:`printable`: a guest cannot move a terminal's cursor, retitle its window
or hide text in someone's log by throwing an error.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

__all__ = [
    "ArgumentError",
    "CallError",
    "ConfigError",
    "CrashdumpError",
    "DebuggerError",
    "FunctionNotFound",
    "GuestAborted",
    "GuestCancelled",
    "GuestCrashed",
    "GuestError",
    "GuestImageError",
    "GuestProtocolError",
    "GuestResultError",
    "GuestTimeout",
    "HlasyncError",
    "HostFunctionError",
    "InvalidCoreDump",
    "IoctlError",
    "JSError",
    "JSResultError",
    "JSSyntaxError",
    "KvmError",
    "KvmUnavailableError",
    "OwnerBusy",
    "SandboxBusy",
    "SandboxClosed",
    "SandboxPoisoned",
    "SandboxStateError",
    "SupervisorBusy",
    "SupervisorClosed",
    "SupervisorError",
    "WorkerLost",
    "printable",
]


def _printable_table(*, keep_newlines: bool) -> dict[int, str]:
    controls = [*range(0x20), 0x7F, *range(0x80, 0xA0)]
    # Invisible characters that reorder or break lines in a terminal or editor.
    layout = [0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x2028, 0x2029]
    layout += range(0xD800, 0xE000)  # lone surrogates: no terminal encoding can show them
    table = {c: f"\\x{c:02x}" for c in controls}
    table.update({c: f"\\u{c:04x}" for c in layout})
    del table[ord("\t")]
    if keep_newlines:
        del table[ord("\n")]
    return table


_PRINTABLE_MULTILINE = _printable_table(keep_newlines=True)
_PRINTABLE_ONE_LINE = _printable_table(keep_newlines=False)


def printable(text: str, *, keep_newlines: bool = True) -> str:
    """``text`` safe to print on a terminal or write to a log.

    Every control character (C0 but tab and, with ``keep_newlines``, newline;
    DEL; C1 ``0x80``-``0x9f``) becomes its ``\\xNN`` escape, and the invisible
    characters that reorder or break lines (bidirectional overrides and
    isolates, U+2028/U+2029) and lone surrogates their ``\\uNNNN`` escape: ``"\\x1b[2J"`` prints
    as the six characters ``\\x1b[2J`` instead of clearing the screen.
    Everything else, backslashes included, is left as it is, so the result is
    for reading, not for decoding back. Linear in ``len(text)``.
    """
    return text.translate(_PRINTABLE_MULTILINE if keep_newlines else _PRINTABLE_ONE_LINE)


class HlasyncError(Exception):
    """Root of every error raised by hlasync.

    Every error pickles with its attributes and its ``__cause__`` (a cause
    that does not pickle travels as a ``RuntimeError`` naming it): errors
    cross from the supervisor's worker processes to the callers.
    """

    #: The Ray node the error came from (``hlasync.ray``), None for this machine:
    #: the ``core_path`` of such an error is a path on that node.
    node: str | None = None

    def __str__(self) -> str:
        return printable(super().__str__())

    def __reduce__(self) -> tuple[Any, ...]:
        state = dict(self.__dict__)
        cause = self.__cause__
        return (_rebuild_error, (type(self), self.args, state, portable_error(cause)))


def portable_error(error: BaseException | None) -> BaseException | None:
    """``error`` if it survives a pickle round trip, else a ``RuntimeError`` naming it."""
    if error is None:
        return None
    try:
        pickle.loads(pickle.dumps(error))  # both ways: a class may pickle but not rebuild
    except Exception:  # noqa: BLE001 - anything that does not pickle travels as text
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error


def _rebuild_error(
    cls: type[HlasyncError],
    args: tuple[Any, ...],
    state: dict[str, Any],
    cause: BaseException | None,
) -> HlasyncError:
    error = cls.__new__(cls, *args)
    if isinstance(error, OSError):
        OSError.__init__(error, *args)  # errno and strerror come from the arguments
    else:
        BaseException.__init__(error, *args)
    error.__dict__.update(state)
    error.__cause__ = cause
    return error


class KvmError(HlasyncError):
    """A problem talking to the kernel's KVM API."""


class KvmUnavailableError(KvmError):
    """``/dev/kvm`` cannot be used; the message says what to do about it."""


class IoctlError(KvmError, OSError):
    """An ioctl on a KVM file descriptor failed."""

    def __init__(self, name: str, errno: int, strerror: str) -> None:
        OSError.__init__(self, errno, f"{name} failed: {strerror}")
        self.ioctl = name

    def __str__(self) -> str:
        return f"{self.ioctl} failed: [Errno {self.errno}] {self.strerror}"


class ConfigError(HlasyncError, ValueError):
    """A configuration value is out of range or inconsistent."""


class GuestImageError(HlasyncError):
    """The guest binary is not a loadable hlasync guest, its initialisation
    failed (``core_path`` then names a dump when one was written), or it is not
    the build a core dump was taken from."""

    def __init__(self, message: str, *, path: str | Path | None = None) -> None:
        self.path = None if path is None else Path(path)
        #: A core dump of the guest, when it was running (e.g. initialisation timed out).
        self.core_path: Path | None = None
        super().__init__(f"{path}: {message}" if path is not None else message)


class DebuggerError(HlasyncError):
    """The live debugger's server for a sandbox (``SandboxConfig.debug_port``)
    cannot listen: the address is in use or the host cannot be bound."""


class CallError(HlasyncError):
    """A call was rejected by the host before any guest code ran."""

    def __init__(self, message: str, *, sandbox_id: str, function: str) -> None:
        super().__init__(message)
        self.sandbox_id = sandbox_id
        self.function = function


class FunctionNotFound(CallError, LookupError):
    """The guest exports no function of that name."""


class ArgumentError(CallError, TypeError):
    """The arguments do not match the function's signature in the guest ELF."""


class SandboxStateError(HlasyncError):
    """The sandbox is in a state that cannot take this request."""

    def __init__(self, message: str, *, sandbox_id: str) -> None:
        super().__init__(message)
        self.sandbox_id = sandbox_id


class SandboxPoisoned(SandboxStateError):
    """A fault, abort or interrupt left the guest dirty; call ``restore()``."""


class SandboxBusy(SandboxStateError):
    """Another call is running on this sandbox."""


class OwnerBusy(SandboxBusy):
    """The vCPU's owner thread did not take a request in time (another stayed
    in flight too long), or it has ended with its sandbox."""


class SandboxClosed(SandboxStateError):
    """The sandbox has been closed."""


class GuestError(HlasyncError):
    """The guest failed while running a call.

    Attributes common to every guest-caused error: ``sandbox_id``,
    ``function`` (the guest function that was called), ``core_path`` (the
    core dump written for it, or None) and ``crashdump_error`` (why that
    dump could not be written, or None).
    """

    def __init__(
        self,
        message: str,
        *,
        sandbox_id: str,
        function: str | None,
        core_path: Path | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.sandbox_id = sandbox_id
        self.function = function
        self.core_path = core_path
        #: Set when writing the automatic core dump for this error failed.
        self.crashdump_error: CrashdumpError | None = None

    def __str__(self) -> str:
        where = f"sandbox {self.sandbox_id}"
        if self.function is not None:
            where += f", function {self.function!r}"
        text = f"{self.message} ({where})"
        if self.core_path is not None:
            text += f"; core dump: {self.core_path}"
        return printable(text)


class GuestCrashed(GuestError):
    """A CPU exception in guest code: divide error, page fault, #UD, #GP, ...

    ``vector`` is the exception number, ``vector_name`` its mnemonic
    (``"#PF"``), ``error_code`` the CPU's error code (or None), ``rip`` the
    faulting instruction, ``cr2`` the faulting address of a page fault
    (None for other vectors) and ``symbol`` the guest symbol containing
    ``rip`` (``"divide_by_zero+0x4"``), when the ELF has symbols.
    """

    def __init__(
        self,
        *,
        sandbox_id: str,
        function: str | None,
        vector: int,
        vector_name: str,
        description: str,
        error_code: int | None,
        rip: int,
        cr2: int | None,
        symbol: str | None,
        core_path: Path | None = None,
    ) -> None:
        at = f"rip={rip:#x}" + (f" in {symbol}" if symbol else "")
        message = f"guest crashed: {vector_name} {description} at {at}"
        if error_code is not None:
            message += f", error code {error_code:#x}"
        if cr2 is not None:
            message += f", fault address {cr2:#x}"
        super().__init__(message, sandbox_id=sandbox_id, function=function, core_path=core_path)
        self.vector = vector
        self.vector_name = vector_name
        self.error_code = error_code
        self.rip = rip
        self.cr2 = cr2
        self.symbol = symbol


class GuestAborted(GuestError):
    """The guest called ``hl_abort(code, message)``."""

    def __init__(
        self,
        *,
        sandbox_id: str,
        function: str | None,
        code: int,
        guest_message: str,
        core_path: Path | None = None,
    ) -> None:
        super().__init__(
            f"guest aborted with code {code}: {printable(guest_message, keep_newlines=False)}",
            sandbox_id=sandbox_id,
            function=function,
            core_path=core_path,
        )
        self.code = code
        self.guest_message = guest_message


class GuestCancelled(GuestError):
    """The call was stopped by ``Sandbox.interrupt()``."""


class GuestProtocolError(GuestError):
    """The guest broke the host/guest ABI (bad frame, unknown port, ...) or the
    vCPU stopped in a way no guest should (``vcpu_exit`` is then that exit)."""

    def __init__(
        self,
        message: str,
        *,
        sandbox_id: str,
        function: str | None,
        core_path: Path | None = None,
        vcpu_exit: object | None = None,
    ) -> None:
        super().__init__(message, sandbox_id=sandbox_id, function=function, core_path=core_path)
        self.vcpu_exit = vcpu_exit


class GuestResultError(GuestError):
    """The guest function ran but its dispatcher could not return the result
    (for example: larger than the output buffer). The guest is back at its
    dispatcher and the sandbox stays ready."""


class GuestTimeout(GuestError):
    """A supervisor watchdog stopped a call that ran too long.

    ``kind`` is ``"wall"`` (the call's ``timeout`` of wall-clock time on the
    vCPU) or ``"cpu"`` (its ``cpu_timeout`` of guest CPU time); ``elapsed``
    is the wall-clock seconds the call had run; ``core_path`` the dump of the
    hung guest, taken before it was stopped.
    """

    def __init__(
        self,
        *,
        sandbox_id: str,
        function: str | None,
        kind: str,
        limit: float,
        elapsed: float,
        core_path: Path | None = None,
    ) -> None:
        what = "wall-clock" if kind == "wall" else "guest CPU"
        super().__init__(
            f"call exceeded its {what} limit of {limit:g} s (ran {elapsed:.3f} s)",
            sandbox_id=sandbox_id,
            function=function,
            core_path=core_path,
        )
        self.kind = kind
        self.limit = limit
        self.elapsed = elapsed
        #: For a JavaScript handler: its JS stack when the limit expired (None when
        #: the engine could not answer in time, or the guest is not a JS runtime).
        self.js_stack: str | None = None


class HostFunctionError(GuestError):
    """A host function called by the guest raised; the original is ``__cause__``."""

    def __init__(
        self,
        message: str,
        *,
        sandbox_id: str,
        function: str | None,
        host_function: str,
        core_path: Path | None = None,
    ) -> None:
        super().__init__(message, sandbox_id=sandbox_id, function=function, core_path=core_path)
        self.host_function = host_function


class JSError(GuestError):
    """A JavaScript handler threw, or its promise was rejected.

    ``name`` is the JS error's name (``"TypeError"``, ``"RangeError"``,
    ``"InternalError"`` for out of memory, ...; empty when something other
    than an Error was thrown), ``js_message`` its message and ``stack`` its
    JavaScript stack (``"    at handler (greet.js:3:5)"``). The sandbox
    stays usable: no dump is written, it is not a crash.
    """

    def __init__(
        self,
        *,
        sandbox_id: str,
        function: str | None,
        name: str,
        js_message: str,
        stack: str,
    ) -> None:
        shown = f"{printable(name, keep_newlines=False)}: {js_message}" if name else js_message
        super().__init__(
            f"JavaScript {shown}" + (f"\n{stack.rstrip()}" if stack else ""),
            sandbox_id=sandbox_id,
            function=function,
        )
        self.name = name
        self.js_message = js_message
        self.stack = stack


class JSSyntaxError(JSError):
    """A handler or module does not compile; ``file``, ``line`` and ``column``
    locate the problem (None when the engine did not say)."""

    def __init__(
        self,
        *,
        sandbox_id: str,
        function: str | None,
        name: str,
        js_message: str,
        stack: str,
        file: str | None,
        line: int | None,
        column: int | None,
    ) -> None:
        super().__init__(
            sandbox_id=sandbox_id, function=function, name=name, js_message=js_message, stack=stack
        )
        self.file = file
        self.line = line
        self.column = column


class JSResultError(JSError):
    """A handler returned ``undefined`` or a value JSON cannot represent."""


class SupervisorError(HlasyncError):
    """The supervisor cannot take this call."""


class SupervisorBusy(SupervisorError):
    """The supervisor's queue of pending calls is full (``call_nowait``)."""


class SupervisorClosed(SupervisorError):
    """The supervisor is shut down, or shutting down."""


class WorkerLost(SupervisorError):
    """The worker process running the call died (killed, crashed, out of
    memory) before the call ended; the supervisor keeps serving with a new
    worker. ``worker`` is its index, ``exit_status`` what ``waitpid`` said
    (a negative number is the signal that ended it; None if unknown)."""

    def __init__(self, message: str, *, worker: int, exit_status: int | None) -> None:
        super().__init__(message)
        self.worker = worker
        self.exit_status = exit_status


class CrashdumpError(HlasyncError):
    """A core dump could not be written (or crash dumps are disabled)."""


class InvalidCoreDump(CrashdumpError, ValueError):
    """A file is not a readable hlasync core dump (corrupt, truncated, foreign)."""
