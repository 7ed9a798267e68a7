"""JSSandbox: JavaScript handlers in their own micro-VM, synchronously.

The sandbox runs the bundled ``jsruntime`` guest (QuickJS). Handlers are
added by name and compiled by :meth:`JSSandbox.load`. By default every call
starts from the state ``load()`` left: the sandbox is restored after each
call, so nothing one call does (globals, caches, memory, registers) reaches
the next. ``JSSandbox(keep_state=True)`` is hyperlight-js's model instead:
handlers keep their state from call to call until the caller restores a
:class:`JSSnapshot`, and a call that does not complete (a timeout,
:meth:`~JSSandbox.interrupt`, a crash) leaves the sandbox poisoned: it
refuses calls until :meth:`~JSSandbox.restore`, :meth:`~JSSandbox.unload` or
:meth:`~JSSandbox.load`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .. import _telemetry as telemetry
from ..config import SandboxConfig
from ..errors import (
    CallError,
    CrashdumpError,
    GuestCancelled,
    GuestTimeout,
    SandboxBusy,
    SandboxClosed,
    SandboxPoisoned,
)
from ..sandbox import CallHandle, Sandbox, SandboxState, Snapshot
from ..sandbox.calls import Call
from . import protocol, runtime
from .host import HostBridge, OutputSink
from .stack import JSStack, capture_stack

__all__ = ["JSSandbox", "JSSnapshot"]


@dataclass(frozen=True, slots=True)
class _Load:
    """One successful :meth:`JSSandbox.load`: the handlers it loaded, the
    revision of the modules and host functions it loaded with, and the state
    it left (what every call starts from in the default mode)."""

    handlers: Mapping[str, str]
    revision: int
    state: Snapshot


class JSSnapshot:
    """A :class:`JSSandbox` at one moment: the engine with the handlers it had
    loaded and every bit of state they keep (the guest's memory and vCPU), and
    which handlers those are. :meth:`JSSandbox.restore` brings both back, also
    after :meth:`~JSSandbox.unload` and a load of other handlers, as
    hyperlight-js's ``restore(snapshot)`` does. Opaque; it belongs to the
    sandbox that took it."""

    __slots__ = ("_load", "_owner", "_state")

    def __init__(self, owner: object, state: Snapshot, load: _Load | None) -> None:
        self._owner = owner
        self._state = state
        self._load = load

    @property
    def handlers(self) -> Mapping[str, str]:
        """Handler name -> source of the handlers loaded when it was taken (none
        for a snapshot of the sandbox with nothing loaded)."""
        return MappingProxyType(dict(self._load.handlers) if self._load is not None else {})

    @property
    def taken_at(self) -> float:
        """When it was taken (``time.time()``)."""
        return self._state.taken_at

    def __repr__(self) -> str:
        count = len(self._load.handlers) if self._load is not None else 0
        return f"<JSSnapshot of {count} handlers taken at {self.taken_at:.3f}>"


class JSSandbox:
    """JavaScript handlers in a KVM micro-VM.

    ``heap_size`` is the engine's memory limit (allocations beyond it throw
    ``InternalError: out of memory`` in JavaScript); ``config`` overrides the
    sandbox configuration :func:`hlasync.js.default_config` derives from it;
    ``output(level, text)`` receives console output (default: stdout, and
    stderr for warn/error). ``debug_port`` (or ``config.debug_port``) serves
    gdb and lldb on that port (docs/debugging.md): the first handler call
    waits at the runtime's ``js_call`` entry until a debugger attaches, and
    time stopped in the debugger does not count against ``timeout``.

    ``keep_state`` chooses what a call starts from. False (the default): the
    state :meth:`load` left, always; the sandbox is restored after every
    call, whatever happened, so nothing one call leaves reaches the next (as
    in every pool). True: hyperlight-js's model: handlers keep their state
    (module variables, globals, caches) from one call to the next until
    :meth:`restore`; a call that does not complete (a timeout,
    :meth:`interrupt`, a crash) leaves the sandbox :attr:`poisoned`, and
    calls raise :class:`~hlasync.SandboxPoisoned` until :meth:`restore`,
    :meth:`unload` or :meth:`load`.

        with JSSandbox() as js:
            js.add_handler("greet", "function handler(e) { return 'Hello, ' + e.name }")
            js.load()
            js.call_handler("greet", {"name": "World"})     # 'Hello, World'
    """

    def __init__(
        self,
        *,
        heap_size: int = runtime.DEFAULT_HEAP_SIZE,
        config: SandboxConfig | None = None,
        output: OutputSink | None = None,
        sandbox_id: str | None = None,
        keep_state: bool = False,
        debug_port: int | None = None,
    ) -> None:
        if not isinstance(keep_state, bool):
            raise TypeError(f"keep_state must be a bool, got {keep_state!r}")
        config = config if config is not None else runtime.default_config(heap_size)
        if debug_port is not None:
            config = dataclasses.replace(config, debug_port=debug_port)
        runtime.check_config(config, heap_size)  # heap_size too, whatever the config
        self.heap_size = heap_size
        self._keep_state = keep_state
        self._bridge = HostBridge(output)
        self._handlers: dict[str, str] = {}
        self._modules: dict[str, str] = {}
        self._revision = 0  # of the modules and host functions: a change needs a load()
        self._load: _Load | None = None  # the load the engine's state descends from
        self._loaded = False  # the handlers, modules and host functions are _load's
        self._poisoned_by: str | None = None  # keep_state: the call that left it poisoned
        self._token = object()  # what its snapshots belong to
        self._sandbox = Sandbox(runtime.guest_path(), config, sandbox_id=sandbox_id)
        if not config.hot_restore:
            # Every call ends with a restore, which on the exit path would park a
            # spinning guest: only a hot sandbox (restored in place) spins.
            self._sandbox._spin_allowed = False
        debugger = self._sandbox._debugger
        #: A debugger waits for the first handler call, not for the engine's start.
        self._debug_first = debugger is not None
        if debugger is not None:
            debugger.cancel_stop()
        try:
            for name, function in self._bridge.sandbox_functions().items():
                self._sandbox.register_host_function(name, function)
            runtime.start_engine(self._sandbox, heap_size)
            self._engine = self._sandbox.snapshot()  # the bare engine: load() starts here
            self._sandbox._set_baseline(self._engine)
        except BaseException:
            self._sandbox.close()
            raise

    # ------------------------------------------------------------ content
    @property
    def id(self) -> str:
        return self._sandbox.id

    @property
    def sandbox(self) -> Sandbox:
        """The underlying :class:`~hlasync.Sandbox` (guest ``jsruntime``)."""
        return self._sandbox

    @property
    def keep_state(self) -> bool:
        """Whether handlers keep their state between calls (see the class)."""
        return self._keep_state

    @property
    def handlers(self) -> Mapping[str, str]:
        """Handler name -> source, as added (loaded or not)."""
        return MappingProxyType(self._handlers)

    @property
    def loaded(self) -> bool:
        """Whether the handlers as they are now have been loaded."""
        return self._loaded

    @property
    def poisoned(self) -> bool:
        """hyperlight-js's ``poisoned()``: a call did not complete (a timeout,
        :meth:`interrupt`, a crash) and the state it ran in is lost, so calls
        and :meth:`snapshot` raise :class:`~hlasync.SandboxPoisoned` until
        :meth:`restore`, :meth:`unload` or :meth:`load`. Only with
        ``keep_state=True``: otherwise the sandbox is restored after such a
        call at once (True then only if that restore failed: close it)."""
        return self._poisoned_by is not None or self._sandbox.state is SandboxState.POISONED

    def add_handler(self, name: str, source: str) -> None:
        """Add (or replace) handler ``name``: a script defining ``function
        handler(event)`` or an ES module exporting ``handler``. It is compiled
        now (:class:`~hlasync.JSSyntaxError` with line and column if it does not
        compile) and runs from the next :meth:`load`. With ``keep_state=True``
        the handlers' state is left as it was (also while poisoned)."""
        protocol.check_name("handler", name)
        _check_source(name, source)
        self._check_idle()
        # The check compiles in the guest: then back to where the handlers were.
        keep = self._sandbox.snapshot() if self._keep_state and not self.poisoned else None
        try:
            if self._sandbox.state is SandboxState.POISONED:
                self._reset()  # a clean engine to compile in (still poisoned for calls)
            runtime.check_handler(self._sandbox, name, source)
        finally:
            self._reset(keep)
        self._handlers[name] = source
        self._loaded = False

    def remove_handler(self, name: str) -> None:
        """Remove handler ``name``; effective at :meth:`load`. ValueError for a
        name no handler can have (``""``), KeyError if there is none."""
        protocol.check_name("handler", name)
        del self._handlers[name]
        self._loaded = False

    def clear_handlers(self) -> None:
        """Remove every handler (hyperlight-js's ``clear_handlers``); effective at
        :meth:`load`. Modules and host functions stay."""
        self._handlers.clear()
        self._loaded = False

    def add_module(self, name: str, source: str) -> None:
        """Make ES module ``source`` importable as ``name`` by handlers and other modules."""
        protocol.check_name("module", name)
        _check_source(name, source)
        if name in self._bridge.functions:
            raise ValueError(f"module {name!r} is already the name of host functions")
        self._modules[name] = source
        self._revision += 1
        self._loaded = False

    def register_host_function(self, module: str, name: str, function: Callable[..., Any]) -> None:
        """Make ``function`` importable in JavaScript as ``import { name } from "module"``.

        It takes and returns JSON values; an exception it raises is thrown in
        JavaScript with the same name and message. Effective at :meth:`load`.
        """
        if module in self._modules:
            raise ValueError(f"module {module!r} is already an ES module")
        self._bridge.register(module, name, function)
        self._revision += 1
        self._loaded = False

    def load(self) -> None:
        """Compile the modules and handlers into a fresh engine and run their
        top level; calls start from the state this leaves (with
        ``keep_state=True``, the first call after it). Clears
        :attr:`poisoned`. Raises JSSyntaxError (or JSError, for a handler
        whose top level throws); the sandbox then has no handler loaded until
        the next successful load()."""
        self._check_idle()
        self._enter(None)
        try:
            runtime.install(
                self._sandbox,
                handlers=self._handlers,
                modules=self._modules,
                host_modules=self._bridge.modules(),
            )
        except BaseException:
            self._reset()
            raise
        self._enter(_Load(dict(self._handlers), self._revision, self._sandbox.snapshot()))
        self._loaded = True

    def unload(self) -> None:
        """Unload the handlers (hyperlight-js's ``LoadedJSSandbox.unload()``): the
        engine is back to its state before the first :meth:`load`, and no handler
        is loaded or added; modules and host functions stay. Clears
        :attr:`poisoned`. Add handlers and :meth:`load` again; a call meanwhile
        raises SandboxBusy."""
        self._check_idle()
        self._handlers.clear()
        self._enter(None)

    # --------------------------------------------------------------- calls
    def call_handler(
        self,
        name: str,
        event: object = None,
        *,
        timeout: float | None = None,
        cpu_timeout: float | None = None,
        gc: bool = True,
    ) -> Any:
        """Call handler ``name`` with ``event`` (a JSON value) and return its JSON result.

        ``timeout`` (wall-clock seconds) and ``cpu_timeout`` (guest CPU
        seconds) stop a handler that runs too long, whichever expires first:
        its JavaScript stack is recorded, a core dump written, and
        :class:`~hlasync.GuestTimeout` raised (with ``kind``, ``js_stack`` and
        ``core_path``). None is no limit; 0, a negative number or a non-number
        raises ValueError, as in the supervisor's pools and in hyperlight-js.
        A limit that cannot be armed raises :class:`~hlasync.CallError` and the
        handler does not run (fail closed).

        By default the sandbox is restored to its loaded state after every
        call, whatever happened. With ``keep_state=True`` the handlers' state
        stays for the next call, and a call stopped by a limit, by
        :meth:`interrupt` or by a crash leaves the sandbox :attr:`poisoned`:
        later calls raise :class:`~hlasync.SandboxPoisoned` until
        :meth:`restore`, :meth:`unload` or :meth:`load`.

        ``gc`` is hyperlight-js's flag to run the engine's garbage collector
        after the handler, whether it returned or threw (default True). With
        ``keep_state=True`` it runs then (a ``WeakRef`` to garbage is empty at
        the next call); without, the restore after the call discards
        everything a collection would free, so it is not run. TypeError
        unless a bool.

        ValueError for a name no handler can have (``""``), FunctionNotFound
        for one that is not loaded, SandboxBusy before :meth:`load`.
        """
        _check_limit("timeout", timeout)
        _check_limit("cpu_timeout", cpu_timeout)
        if not isinstance(gc, bool):
            raise TypeError(f"gc must be a bool, got {gc!r}")
        # A collection only matters to state that is kept: a fresh sandbox is
        # restored after the call, which drops the garbage anyway.
        arguments = runtime.call_arguments(self.id, name, event, gc=gc and self._keep_state)
        # A call refused from here on (poisoned, not loaded) is a span and counts,
        # as one on a closed Sandbox does; bad arguments (above) are neither.
        span = telemetry.begin_call(name, guest=self._sandbox.image.path.name, sandbox_id=self.id)
        if span is None:
            return self._run_handler(name, arguments, timeout, cpu_timeout, None)
        try:  # host functions run inside the span (the runner makes it current)
            result = self._run_handler(name, arguments, timeout, cpu_timeout, span)
        except BaseException as exc:
            span.end(exc)
            raise
        span.end(None)
        return result

    def _run_handler(
        self,
        name: str,
        arguments: tuple[Any, ...],
        timeout: float | None,
        cpu_timeout: float | None,
        span: telemetry.CallSpan | None,
    ) -> Any:
        self._check_not_poisoned(f"call handler {name!r}")
        if not self._loaded:
            raise SandboxBusy(
                f"JS sandbox {self.id}: handlers changed or never loaded; call load() first",
                sandbox_id=self.id,
            )
        debugger = self._sandbox._debugger
        if self._debug_first and debugger is not None:
            self._debug_first = False
            debugger.stop_at_next_call()
        watch = None
        if timeout is not None or cpu_timeout is not None:
            watch = _Watch(self, name, timeout, cpu_timeout)
            watch.start()  # fail closed: CallError, and the handler does not run
        error: BaseException | None = None
        try:
            reply = self._sandbox._call_with(span, "js_call", *arguments)
        except GuestCancelled as exc:
            error = exc
            if watch is not None:
                watch.stop()
                if watch.expired is not None:
                    error = watch.timeout_error(exc)
                    raise error from None
            raise
        except BaseException as exc:
            error = exc
            raise
        finally:
            if watch is not None:
                watch.stop()
            self._after_call(name, error)
        return protocol.decode_reply(reply, sandbox_id=self.id, handler=name)

    def interrupt(self) -> bool:
        """Stop the running handler call (from any thread); see :meth:`Sandbox.interrupt`.
        With ``keep_state=True`` the sandbox is then :attr:`poisoned`."""
        return self._sandbox.interrupt()

    @property
    def current_call(self) -> CallHandle | None:
        return self._sandbox.current_call

    def generate_crashdump(self, directory: str | os.PathLike[str] | None = None) -> Path:
        """A core dump now (also while a handler runs, with its JavaScript stack)."""
        stack = capture_stack(self._sandbox)
        return self._sandbox._dump_now(directory, "on-demand", stack.annotations())

    def snapshot(self) -> JSSnapshot:
        """The engine as it is now, with its loaded handlers and their state
        (:class:`JSSnapshot`); SandboxPoisoned while :attr:`poisoned`."""
        self._check_not_poisoned("take a snapshot")
        return JSSnapshot(self._token, self._sandbox.snapshot(), self._load)

    def restore(self, snapshot: JSSnapshot | None = None) -> None:
        """Back to ``snapshot``: the handlers loaded when it was taken, with
        their state (modules and host functions stay as registered: one
        changed since needs a :meth:`load`). None: back to the state the last
        :meth:`load` left (the bare engine before any), handlers as they are.
        Clears :attr:`poisoned`. ValueError for another sandbox's snapshot."""
        if snapshot is not None:
            if not isinstance(snapshot, JSSnapshot):
                raise TypeError(
                    f"restore() takes a JSSnapshot from JSSandbox.snapshot(), got {snapshot!r}"
                )
            if snapshot._owner is not self._token:
                raise ValueError("the snapshot belongs to another JSSandbox")
        self._check_idle()
        if snapshot is None:
            self._sandbox.restore(self._baseline())
            self._poisoned_by = None
            return
        self._sandbox.restore(snapshot._state)
        self._poisoned_by = None
        load = snapshot._load
        self._load = load
        self._sandbox._set_baseline(self._baseline())
        self._handlers.clear()  # in place: handlers is a live view of it
        self._handlers.update(load.handlers if load is not None else {})
        self._loaded = load is not None and load.revision == self._revision

    # ----------------------------------------------------------- lifecycle
    def close(self) -> None:
        self._sandbox.close()

    def __enter__(self) -> JSSandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "loaded" if self._loaded else "not loaded"
        mode = ", state kept" if self._keep_state else ""
        poisoned = ", poisoned" if self.poisoned else ""
        return f"<JSSandbox {self.id} {len(self._handlers)} handlers, {state}{mode}{poisoned}>"

    # ----------------------------------------------------------- internals
    def _check_idle(self) -> None:
        if self._sandbox.state is SandboxState.CLOSED:
            raise SandboxClosed(f"JS sandbox {self.id} is closed", sandbox_id=self.id)

    def _check_not_poisoned(self, what: str) -> None:
        """SandboxPoisoned, saying why and what helps, while :attr:`poisoned`."""
        self._check_idle()
        if not self.poisoned:
            return
        cause = self._poisoned_by or "an earlier call did not complete"
        raise SandboxPoisoned(
            f"JS sandbox {self.id} is poisoned: {cause}, and the state the handlers kept is "
            f"lost; cannot {what}: restore(snapshot), restore() (the state load() left), "
            "unload() or load() first",
            sandbox_id=self.id,
        )

    def _baseline(self) -> Snapshot:
        """What the engine's state descends from: the last load's, or the bare engine's."""
        return self._load.state if self._load is not None else self._engine

    def _enter(self, load: _Load | None) -> None:
        """Make ``load`` (None: no handler loaded) the state calls start from,
        and go there."""
        self._loaded = False
        self._load = load
        baseline = self._baseline()
        self._sandbox.restore(baseline)
        self._sandbox._set_baseline(baseline)
        self._poisoned_by = None

    def _after_call(self, handler: str, error: BaseException | None) -> None:
        """Without keep_state: back to the loaded state. With it: the state
        stays, and a call that left the guest mid-way poisons the sandbox."""
        if not self._keep_state:
            self._reset()
        elif self._sandbox.state is SandboxState.POISONED and self._poisoned_by is None:
            what = type(error).__name__ if error is not None else "stopped"
            self._poisoned_by = f"handler {handler!r} did not complete ({what})"

    def _reset(self, snapshot: Snapshot | None = None) -> None:
        if self._sandbox.state is not SandboxState.CLOSED:
            self._sandbox.restore(snapshot)


def _check_limit(name: str, value: object) -> None:
    """ValueError unless ``value`` is None (no limit) or a positive number of
    seconds: the rule of :meth:`JSSandbox.call_handler` and the supervisor's
    ``check_limit`` (hyperlight-js refuses a zero timeout too)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number of seconds or None, got {value!r}")


def _check_source(name: str, source: object) -> None:
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"the source of {name!r} must be a non-empty str")


class _Watch:
    """Wall-clock and CPU-time limits of one synchronous handler call, the
    first to expire wins: on expiry it records the JS stack, has the call
    dumped and stopped. It fails closed: :meth:`start` raises CallError when a
    limit cannot be armed (the call must then not start), and an expired limit
    stops the call even if the stack cannot be asked for."""

    def __init__(
        self, js: JSSandbox, handler: str, timeout: float | None, cpu_timeout: float | None
    ) -> None:
        self._js = js
        self._handler = handler
        self._timeout = timeout
        self._cpu_timeout = cpu_timeout
        self._caller = threading.get_ident()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hlasync-js-watch", daemon=True)
        self._clocks: list[int] = []
        self._cpu_start = 0.0
        self._paused_start = 0.0
        self.expired: str | None = None
        self.expired_at = 0.0
        self.started_at = 0.0
        self.js_stack: str | None = None
        self.core_path: Path | None = None
        self.dump_error: CrashdumpError | None = None

    def start(self) -> None:
        """Arm the limits. CallError if one cannot be armed: the handler must not run."""
        try:
            if self._cpu_timeout is not None:
                # CPU time: the caller's (host code) and the vCPU owner's (the guest).
                owner = self._js.sandbox._machine.vcpu.owner.ident
                if owner is None:
                    raise OSError("the vCPU's owner thread is not running")
                self._clocks = [
                    time.pthread_getcpuclockid(self._caller),
                    time.pthread_getcpuclockid(owner),
                ]
                self._cpu_start = self._cpu_now()
            self.started_at = time.monotonic()
            self._paused_start = self._js.sandbox._debug_paused()
            self._thread.start()
        except Exception as exc:
            raise CallError(
                f"JS sandbox {self._js.id}: the execution limits of handler "
                f"{self._handler!r} could not be armed ({exc}); the handler did not run",
                sandbox_id=self._js.id,
                function=self._handler,
            ) from exc

    def _cpu_now(self) -> float:
        """The caller's CPU clock, less its waits for a hot guest's answer on
        the doorbell (the guest's time, counted on the owner), plus the owner's."""
        total = 0.0
        for index, clock in enumerate(self._clocks):
            with contextlib.suppress(OSError):  # the owner ended (the sandbox closed)
                now = time.clock_gettime(clock)
                total += now
                if index == 0:
                    holder = self._js.sandbox._holder
                    if isinstance(holder, Call):
                        total -= holder.waited_cpu(now)
        return total

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.ident is not None:  # started
            self._thread.join()

    def _run(self) -> None:
        due: str | None = None
        while not self._stopped.wait(0.002):
            due = due or self._due()
            if due is not None and self._expire(due):
                return

    def _due(self) -> str | None:
        """The limit that has expired ("wall" or "cpu"), or None."""
        if self._timeout is not None:
            # Time stopped in a debugger (SandboxConfig.debug_port) does not count.
            paused = self._js.sandbox._debug_paused() - self._paused_start
            if time.monotonic() - self.started_at - paused >= self._timeout:
                return "wall"
        if self._cpu_timeout is not None and self._cpu_now() - self._cpu_start >= self._cpu_timeout:
            return "cpu"
        return None

    def _expire(self, kind: str) -> bool:
        """Stop the call; False when it has not started yet (try again)."""
        sandbox = self._js.sandbox
        handle = sandbox.current_call
        if handle is None:
            return False  # not started yet (or ended: then stop() ends this thread)
        expired_at = time.monotonic()
        try:
            stack = capture_stack(sandbox)
        except Exception as exc:  # noqa: BLE001 - the stop matters more than the stack
            stack = JSStack(None, f"the engine could not be asked ({exc})")
        reason = "timeout" if kind == "wall" else "cpu-timeout"
        result = sandbox._stop(handle._call, reason, annotations=stack.annotations())
        if result.stopped:  # not when it had ended, or interrupt() stopped it first
            self.expired, self.expired_at, self.js_stack = kind, expired_at, stack.stack
            limit = self._timeout if kind == "wall" else self._cpu_timeout
            if kind == "wall":
                late = expired_at - self.started_at - (limit or 0.0)
            else:
                late = self._cpu_now() - self._cpu_start - (limit or 0.0)
            telemetry.watchdog_late(late, kind)
            telemetry.timed_out(
                kind,
                sandbox_id=self._js.id,
                function=self._handler,
                limit=limit,
                elapsed=expired_at - self.started_at,
            )
        if result.dump is not None and result.dump.wait(30):
            self.core_path, self.dump_error = result.dump.path, result.dump.error
        return True

    def timeout_error(self, cancelled: GuestCancelled) -> GuestTimeout:
        kind = self.expired or "wall"
        limit = (self._timeout if kind == "wall" else self._cpu_timeout) or 0.0
        error = GuestTimeout(
            sandbox_id=self._js.id,
            function=self._handler,
            kind=kind,
            limit=limit,
            elapsed=self.expired_at - self.started_at,
            core_path=self.core_path or cancelled.core_path,
        )
        error.crashdump_error = self.dump_error or cancelled.crashdump_error
        error.js_stack = self.js_stack
        return error
