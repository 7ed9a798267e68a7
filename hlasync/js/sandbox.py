"""JSSandbox: JavaScript handlers in their own micro-VM, synchronously.

The sandbox runs the bundled ``jsruntime`` guest (QuickJS). Handlers are
added by name, compiled by :meth:`JSSandbox.load`, and every call starts
from the state ``load()`` left: the sandbox is restored after each call, so
nothing one call does (globals, caches, memory, registers) reaches the next.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..config import SandboxConfig
from ..errors import CrashdumpError, GuestCancelled, GuestTimeout, SandboxBusy, SandboxClosed
from ..sandbox import CallHandle, Sandbox, SandboxState, Snapshot
from . import protocol, runtime
from .host import HostBridge, OutputSink
from .stack import capture_stack

__all__ = ["JSSandbox"]


class JSSandbox:
    """JavaScript handlers in a KVM micro-VM.

    ``heap_size`` is the engine's memory limit (allocations beyond it throw
    ``InternalError: out of memory`` in JavaScript); ``config`` overrides the
    sandbox configuration :func:`hlasync.js.default_config` derives from it;
    ``output(level, text)`` receives console output (default: stdout, and
    stderr for warn/error).

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
    ) -> None:
        config = config if config is not None else runtime.default_config(heap_size)
        runtime.default_config(heap_size)  # validates heap_size whatever the config
        self.heap_size = heap_size
        self._bridge = HostBridge(output)
        self._handlers: dict[str, str] = {}
        self._modules: dict[str, str] = {}
        self._loaded = False
        self._sandbox = Sandbox(runtime.guest_path(), config, sandbox_id=sandbox_id)
        self._sandbox._spin_allowed = False  # cpu_timeout counts the caller thread's CPU time
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
    def handlers(self) -> Mapping[str, str]:
        """Handler name -> source, as added (loaded or not)."""
        return MappingProxyType(self._handlers)

    @property
    def loaded(self) -> bool:
        """Whether the handlers as they are now have been loaded."""
        return self._loaded

    def add_handler(self, name: str, source: str) -> None:
        """Add (or replace) handler ``name``: a script defining ``function
        handler(event)`` or an ES module exporting ``handler``. It is compiled
        now (:class:`~hlasync.JSSyntaxError` with line and column if it does not
        compile) and runs from the next :meth:`load`."""
        protocol.check_name("handler", name)
        _check_source(name, source)
        self._check_idle()
        try:
            runtime.check_handler(self._sandbox, name, source)
        finally:
            self._reset()
        self._handlers[name] = source
        self._loaded = False

    def remove_handler(self, name: str) -> None:
        """Remove handler ``name`` (KeyError if there is none); effective at :meth:`load`."""
        del self._handlers[name]
        self._loaded = False

    def add_module(self, name: str, source: str) -> None:
        """Make ES module ``source`` importable as ``name`` by handlers and other modules."""
        protocol.check_name("module", name)
        _check_source(name, source)
        if name in self._bridge.functions:
            raise ValueError(f"module {name!r} is already the name of host functions")
        self._modules[name] = source
        self._loaded = False

    def register_host_function(self, module: str, name: str, function: Callable[..., Any]) -> None:
        """Make ``function`` importable in JavaScript as ``import { name } from "module"``.

        It takes and returns JSON values; an exception it raises is thrown in
        JavaScript with the same name and message. Effective at :meth:`load`.
        """
        if module in self._modules:
            raise ValueError(f"module {module!r} is already an ES module")
        self._bridge.register(module, name, function)
        self._loaded = False

    def load(self) -> None:
        """Compile the modules and handlers into a fresh engine; every call
        starts from the state this leaves. Raises JSSyntaxError (or JSError,
        for a handler whose top level throws); the sandbox then has no handler
        loaded until the next successful load()."""
        self._check_idle()
        self._loaded = False
        self._sandbox.restore(self._engine)
        try:
            runtime.install(
                self._sandbox,
                handlers=self._handlers,
                modules=self._modules,
                host_modules=self._bridge.modules(),
            )
        except BaseException:
            self._reset(self._engine)
            raise
        loaded = self._sandbox.snapshot()
        self._sandbox._set_baseline(loaded)
        self._loaded = True

    # --------------------------------------------------------------- calls
    def call_handler(
        self,
        name: str,
        event: object = None,
        *,
        timeout: float | None = None,
        cpu_timeout: float | None = None,
    ) -> Any:
        """Call handler ``name`` with ``event`` (a JSON value) and return its JSON result.

        ``timeout`` (wall-clock seconds) and ``cpu_timeout`` (guest CPU
        seconds) stop a handler that runs too long: its JavaScript stack is
        recorded, a core dump written, and :class:`~hlasync.GuestTimeout`
        raised (with ``js_stack`` and ``core_path``). The sandbox is restored
        to its loaded state after every call, whatever happened.
        """
        if not self._loaded:
            raise SandboxBusy(
                f"JS sandbox {self.id}: handlers changed or never loaded; call load() first",
                sandbox_id=self.id,
            )
        arguments = runtime.call_arguments(self.id, name, event)
        watch = _Watch(self, name, timeout, cpu_timeout) if timeout or cpu_timeout else None
        try:
            if watch is not None:
                watch.start()
            reply = self._sandbox.call("js_call", *arguments)
        except GuestCancelled as exc:
            if watch is not None and watch.expired is not None:
                raise watch.timeout_error(exc) from None
            raise
        finally:
            if watch is not None:
                watch.stop()
            self._reset()
        return protocol.decode_reply(reply, sandbox_id=self.id, handler=name)

    def interrupt(self) -> bool:
        """Stop the running handler call (from any thread); see :meth:`Sandbox.interrupt`."""
        return self._sandbox.interrupt()

    @property
    def current_call(self) -> CallHandle | None:
        return self._sandbox.current_call

    def generate_crashdump(self, directory: str | os.PathLike[str] | None = None) -> Path:
        """A core dump now (also while a handler runs, with its JavaScript stack)."""
        stack = capture_stack(self._sandbox)
        return self._sandbox._dump_now(directory, "on-demand", stack.annotations())

    def snapshot(self) -> Snapshot:
        return self._sandbox.snapshot()

    def restore(self, snapshot: Snapshot | None = None) -> None:
        """Back to ``snapshot``, or to the loaded state (the bare engine before any load())."""
        self._sandbox.restore(snapshot)

    # ----------------------------------------------------------- lifecycle
    def close(self) -> None:
        self._sandbox.close()

    def __enter__(self) -> JSSandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "loaded" if self._loaded else "not loaded"
        return f"<JSSandbox {self.id} {len(self._handlers)} handlers, {state}>"

    # ----------------------------------------------------------- internals
    def _check_idle(self) -> None:
        if self._sandbox.state is SandboxState.CLOSED:
            raise SandboxClosed(f"JS sandbox {self.id} is closed", sandbox_id=self.id)

    def _reset(self, snapshot: Snapshot | None = None) -> None:
        if self._sandbox.state is not SandboxState.CLOSED:
            self._sandbox.restore(snapshot)


def _check_source(name: str, source: object) -> None:
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"the source of {name!r} must be a non-empty str")


class _Watch:
    """Wall-clock and CPU-time limits of one synchronous handler call: on expiry
    it records the JS stack, has the call dumped and stopped."""

    def __init__(
        self, js: JSSandbox, handler: str, timeout: float | None, cpu_timeout: float | None
    ) -> None:
        for label, value in (("timeout", timeout), ("cpu_timeout", cpu_timeout)):
            if value is not None and (isinstance(value, bool) or not value > 0):
                raise ValueError(f"{label} must be a positive number of seconds or None")
        self._js = js
        self._handler = handler
        self._timeout = timeout
        self._cpu_timeout = cpu_timeout
        self._caller = threading.get_ident()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hlasync-js-watch", daemon=True)
        self.expired: str | None = None
        self.expired_at = 0.0
        self.started_at = 0.0
        self.js_stack: str | None = None
        self.core_path: Path | None = None
        self.dump_error: CrashdumpError | None = None

    def start(self) -> None:
        self.started_at = time.monotonic()
        # CPU time: the caller's (host code) and the vCPU owner's (the guest).
        owner = self._js.sandbox._machine.vcpu.owner.ident
        self._clocks = [time.pthread_getcpuclockid(self._caller)]
        if owner is not None:
            self._clocks.append(time.pthread_getcpuclockid(owner))
        self._cpu_start = self._cpu_now()
        self._thread.start()

    def _cpu_now(self) -> float:
        total = 0.0
        for clock in self._clocks:
            with contextlib.suppress(OSError):  # the owner ended (the sandbox closed)
                total += time.clock_gettime(clock)
        return total

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stopped.wait(0.002):
            now = time.monotonic()
            if self._timeout is not None and now - self.started_at >= self._timeout:
                return self._expire("wall")
            if self._cpu_timeout is not None:
                used = self._cpu_now() - self._cpu_start
                if used >= self._cpu_timeout:
                    return self._expire("cpu")
        return None

    def _expire(self, kind: str) -> None:
        sandbox = self._js.sandbox
        handle = sandbox.current_call
        if handle is None:
            return
        self.expired, self.expired_at = kind, time.monotonic()
        stack = capture_stack(sandbox)
        self.js_stack = stack.stack
        reason = "timeout" if kind == "wall" else "cpu-timeout"
        result = sandbox._stop(handle._call, reason, annotations=stack.annotations())
        if result.dump is not None and result.dump.wait(30):
            self.core_path, self.dump_error = result.dump.path, result.dump.error

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
