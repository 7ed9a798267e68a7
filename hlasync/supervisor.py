"""Async supervisor: sandboxes on dedicated vCPU threads, pools, watchdogs,
crash dumps of hung guests, and event streams.

Threads (all joined on shutdown):

- ``hlasync-vcpu-N`` (``workers`` of them) run every guest call (every
  ``KVM_RUN``); the event loop never blocks on a guest.
- ``hlasync-watchdog`` enforces per-call wall-clock and guest CPU-time
  limits: on expiry it asks the call to dump itself and stop, without waiting
  (the worker running the call writes the dump), so expiries are handled
  concurrently.
- ``hlasync-op-N`` (one per operation, short-lived) create, dump and close
  sandboxes for the loop; the awaiting task may be cancelled at any time.

Every thread's loop is guarded: a failure is logged and published as a
:class:`~hlasync.events.SupervisorError` event, and the thread goes on.

Calls wait in one FIFO queue; a worker takes the oldest call whose target
has room (a pool runs at most ``size`` calls, a dedicated sandbox one).
Results and events reach the loop through a thread-safe queue and a single
wake-up per batch (``call_soon_threadsafe`` on asyncio, ``run_sync_soon`` on
trio), never through one blocking cross-thread call per result.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import itertools
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel
import sniffio

from . import events as ev
from .abi import Arg, FunctionSignature, Value
from .config import SandboxConfig
from .errors import (
    CrashdumpError,
    GuestCancelled,
    GuestCrashed,
    GuestTimeout,
    HlasyncError,
    HostFunctionError,
    SupervisorBusy,
    SupervisorClosed,
)
from .guest.image import GuestImage
from .kvm import Vcpu
from .sandbox import CrashdumpRecord, Sandbox, SandboxState, check_call
from .sandbox.calls import Call, DumpRequest
from .sandbox.core import StopResult

__all__ = [
    "JSPool",
    "PendingCall",
    "Pool",
    "SupervisedSandbox",
    "Supervisor",
    "SupervisorStatistics",
]

_logger = logging.getLogger("hlasync.supervisor")
_T = TypeVar("_T")
_DEFAULT: Any = object()  # "use the supervisor-wide default"
_tls = threading.local()  # .job: the call running on this worker thread

#: Seconds aclose() waits, after stopping the calls still running, for the threads.
STOP_TIMEOUT = 2.0


class SupervisorStatistics(NamedTuple):
    workers: int
    sandboxes: int
    pending: int  # calls waiting for a vCPU
    running: int
    started: int
    completed: int
    failed: int
    timed_out: int
    cancelled: int
    dumps_written: int
    dumps_failed: int
    subscribers: int
    events_published: int
    events_dropped: int
    internal_errors: int  # SupervisorError events: failures the supervisor survived


class _Job:
    """One call, from submission to completion."""

    __slots__ = (
        "abandoned",
        "args",
        "call",
        "call_id",
        "core_path",
        "cpu_clock",
        "cpu_start",
        "cpu_timeout",
        "done",
        "dump_error",
        "error",
        "expired",
        "expired_at",
        "finished",
        "host_scopes",
        "js_stack",
        "lock",
        "name",
        "queued_at",
        "result",
        "sandbox",
        "signature",
        "started_at",
        "target",
        "timeout",
    )

    def __init__(
        self,
        call_id: int,
        target: _Target,
        signature: FunctionSignature,
        args: tuple[Arg, ...],
        timeout: float | None,
        cpu_timeout: float | None,
    ) -> None:
        self.call_id = call_id
        self.target = target
        self.signature = signature  # the arguments were checked against it
        self.name = signature.name
        self.args = args
        self.timeout = timeout
        self.cpu_timeout = cpu_timeout
        self.done = anyio.Event()  # set on the loop once the outcome is known
        self.lock = threading.Lock()
        self.finished = False  # outcome decided (worker or watchdog), under lock
        self.result: Value = None
        self.error: BaseException | None = None
        self.sandbox: Sandbox | None = None
        self.call: Call | None = None  # once a worker has begun it on its sandbox
        self.queued_at = time.monotonic()
        self.started_at = 0.0
        self.expired: str | None = None  # "wall" or "cpu"
        self.expired_at = 0.0
        self.core_path: Path | None = None
        self.dump_error: CrashdumpError | None = None
        self.abandoned = False
        self.cpu_clock = 0
        self.cpu_start = 0.0
        self.host_scopes: list[anyio.CancelScope] = []
        self.js_stack: str | None = None  # a JS handler's stack when its limit expired


class _Target:
    """Where calls go: a pool or a dedicated sandbox. Capacity is guarded by
    the supervisor's scheduler lock."""

    fresh_state: bool  # restore after every call
    #: Fields to record before a hung call of this target is dumped and stopped
    #: (taken while the guest still runs; JS pools ask the engine for its stack).
    _stop_annotations: Callable[[Sandbox], Mapping[str, object]] | None = None

    def __init__(self, supervisor: Supervisor, name: str, image: GuestImage) -> None:
        self._supervisor = supervisor
        self.name = name
        self.image = image
        #: Guest functions by name, with signatures read from the ELF.
        self.functions: Mapping[str, FunctionSignature] = {f.name: f for f in image.functions}
        self._free: list[Sandbox] = []
        self._members: list[Sandbox] = []
        self._closed = False
        #: Host functions as registered on every member (wrapped for the supervisor).
        self._host_functions: dict[str, Callable[..., Any]] = {}
        #: Makes a replacement member (pools); None: members are not replaced.
        self._factory: Callable[[], Sandbox] | None = None

    def _take_locked(self, worker: int) -> Sandbox | None:
        """A free sandbox, preferably one this worker ran last (a vCPU that stays on
        one thread avoids KVM reloading it elsewhere)."""
        free = self._free
        if not free:
            return None
        for position in range(len(free) - 1, -1, -1):
            if free[position]._last_worker == worker:
                return free.pop(position)
        return free.pop()

    def _give_locked(self, sandbox: Sandbox) -> None:
        if not self._closed and sandbox.state is not SandboxState.CLOSED:
            self._free.append(sandbox)

    def register_host_function(self, name: str, function: Callable[..., Any]) -> None:
        """Make ``function`` callable by the guest as ``name`` in every sandbox of
        this target (``async def`` functions run on the supervisor's loop)."""
        wrapped = self._supervisor._host_function(function)
        self._host_functions[name] = wrapped
        for sandbox in list(self._members):
            sandbox.register_host_function(name, wrapped)

    async def call(
        self,
        name: str,
        *args: Arg,
        timeout: float | None = _DEFAULT,
        cpu_timeout: float | None = _DEFAULT,
    ) -> Value:
        """Run guest function ``name``; see :meth:`Supervisor.call`."""
        return await self._supervisor.call(
            self, name, *args, timeout=timeout, cpu_timeout=cpu_timeout
        )

    def call_nowait(
        self,
        name: str,
        *args: Arg,
        timeout: float | None = _DEFAULT,
        cpu_timeout: float | None = _DEFAULT,
    ) -> PendingCall:
        """Queue a call without waiting for room; see :meth:`Supervisor.call_nowait`."""
        return self._supervisor.call_nowait(
            self, name, *args, timeout=timeout, cpu_timeout=cpu_timeout
        )

    async def aclose(self) -> None:
        """Close this target's sandboxes once their calls are done."""
        await self._supervisor._close_target(self)


class Pool(_Target):
    """``size`` identical sandboxes; each call gets a fresh one (restored to
    its initial snapshot after every call)."""

    fresh_state = True

    def __init__(self, supervisor: Supervisor, name: str, image: GuestImage, size: int) -> None:
        super().__init__(supervisor, name, image)
        self.size = size

    @property
    def sandbox_ids(self) -> list[str]:
        return [sb.id for sb in self._members]

    def __repr__(self) -> str:
        return f"<Pool {self.name} of {self.size} x {self.image.path.name}>"


class JSPool(Pool):
    """``size`` JS sandboxes with the same handlers, modules and host functions;
    every call starts from the state right after they were loaded."""

    def __init__(
        self,
        supervisor: Supervisor,
        name: str,
        image: GuestImage,
        size: int,
        handlers: Mapping[str, str],
    ) -> None:
        super().__init__(supervisor, name, image, size)
        self.handlers: Mapping[str, str] = dict(handlers)

    @staticmethod
    def _stop_annotations(sandbox: Sandbox) -> Mapping[str, object]:
        from .js.stack import capture_stack

        return capture_stack(sandbox).annotations()

    async def call_handler(
        self,
        name: str,
        event: object = None,
        *,
        timeout: float | None = _DEFAULT,
        cpu_timeout: float | None = _DEFAULT,
    ) -> Any:
        """Call handler ``name`` with ``event`` (a JSON value); see :meth:`JSSandbox.call_handler`.

        ``timeout``/``cpu_timeout`` as for :meth:`Supervisor.call`; a
        :class:`~hlasync.GuestTimeout` carries the handler's JavaScript stack
        (``js_stack``), and so do its dump and the ``CallTimedOut`` event.
        """
        from .js import protocol, runtime

        arguments = runtime.call_arguments(self.name, name, event)
        reply = await self.call("js_call", *arguments, timeout=timeout, cpu_timeout=cpu_timeout)
        return protocol.decode_reply(reply, sandbox_id=self.name, handler=name)

    def __repr__(self) -> str:
        return f"<JSPool {self.name} of {self.size} x {len(self.handlers)} handlers>"


class SupervisedSandbox(_Target):
    """A dedicated sandbox: calls run one at a time and guest state persists
    between them. After a fault, timeout or cancellation it is restored to
    its initial state."""

    fresh_state = False

    def __init__(self, supervisor: Supervisor, sandbox: Sandbox) -> None:
        super().__init__(supervisor, sandbox.id, sandbox.image)
        self.sandbox = sandbox
        self.id = sandbox.id

    async def generate_crashdump(self, directory: str | os.PathLike[str] | None = None) -> Path:
        """Dump this sandbox now, also while a call runs; see :meth:`Sandbox.generate_crashdump`."""
        return await self._supervisor.generate_crashdump(self, directory)

    def __repr__(self) -> str:
        return f"<SupervisedSandbox {self.id} {self.image.path.name}>"


class PendingCall:
    """A call queued by ``call_nowait``: ``await`` it for the result."""

    def __init__(self, supervisor: Supervisor, job: _Job) -> None:
        self._supervisor = supervisor
        self._job = job

    @property
    def call_id(self) -> int:
        return self._job.call_id

    def done(self) -> bool:
        return self._job.done.is_set()

    def __await__(self) -> Generator[Any, None, Value]:
        return self._supervisor._await_job(self._job).__await__()


@dataclass
class _Wake:
    """Non-blocking "run this on the loop soon", from any thread."""

    soon: Callable[[Callable[[], None]], object]


def _loop_waker() -> _Wake:
    library = sniffio.current_async_library()
    if library == "asyncio":
        import asyncio

        loop = asyncio.get_running_loop()
        return _Wake(loop.call_soon_threadsafe)
    if library == "trio":
        import trio

        token = trio.lowlevel.current_trio_token()
        return _Wake(token.run_sync_soon)
    raise RuntimeError(f"unsupported async library {library!r}")


class Supervisor:
    """Runs guest calls from async code on dedicated vCPU threads.

    ``workers`` vCPU threads (pinned to ``pin_cpus`` if given, round robin);
    ``max_pending`` bounds the queue (``call()`` waits for room,
    ``call_nowait()`` raises :class:`SupervisorBusy`); ``timeout`` and
    ``cpu_timeout`` are defaults for every call; ``dump_on_cancel`` writes a
    core dump when a caller cancels a running call; ``shutdown_grace`` is how
    long shutdown lets running calls finish before stopping them.

    Use as ``async with Supervisor(...) as sup:`` (on asyncio or trio).
    """

    def __init__(
        self,
        *,
        workers: int = 2,
        pin_cpus: Sequence[int] | None = None,
        max_pending: int = 10_000,
        timeout: float | None = None,
        cpu_timeout: float | None = None,
        dump_on_cancel: bool = False,
        shutdown_grace: float = 5.0,
    ) -> None:
        if type(workers) is not int or workers < 1:
            raise ValueError("workers must be a positive int")
        if type(max_pending) is not int or max_pending < 1:
            raise ValueError("max_pending must be a positive int")
        _check_limit("timeout", timeout)
        _check_limit("cpu_timeout", cpu_timeout)
        if shutdown_grace < 0:
            raise ValueError("shutdown_grace must be >= 0")
        if pin_cpus is not None:
            available = os.sched_getaffinity(0)
            if not pin_cpus or any(cpu not in available for cpu in pin_cpus):
                raise ValueError(f"pin_cpus must name CPUs this process may use: {available}")
        self.workers = workers
        self.pin_cpus = tuple(pin_cpus) if pin_cpus is not None else None
        self.max_pending = max_pending
        self.timeout = timeout
        self.cpu_timeout = cpu_timeout
        self.dump_on_cancel = dump_on_cancel
        self.shutdown_grace = shutdown_grace

        self._lock = threading.Lock()  # scheduler: pending queue, capacities, counters
        self._work = threading.Condition(self._lock)
        self._pending: collections.deque[_Job] = collections.deque()
        self._running: set[_Job] = set()
        self._targets: list[_Target] = []
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._state = "new"  # new, open, closing, closed
        self._ids = itertools.count(1)
        self._counters: collections.Counter[str] = collections.Counter()

        self._posted: list[object] = []  # jobs and events for the loop
        self._post_lock = threading.Lock()
        self._wake_scheduled = False
        self._wake: _Wake | None = None
        self._token: Any = None

        self._streams: list[ev.EventStream] = []
        self._interest: dict[type[ev.Event], bool] = {}

        self._watch = threading.Condition(threading.Lock())
        self._watched: set[_Job] = set()
        self._operations: set[threading.Thread] = set()  # hlasync-op-N threads still running
        self._operation_ids = itertools.count(1)

    # ------------------------------------------------------------- lifecycle
    async def __aenter__(self) -> Supervisor:
        if self._state != "new":
            raise RuntimeError("a Supervisor can be entered only once")
        self._wake = _loop_waker()
        self._token = anyio.lowlevel.current_token()
        self._slots = anyio.Semaphore(self.max_pending)
        self._all_done = anyio.Event()
        self._outstanding = 0
        for index in range(self.workers):
            self._spawn(f"hlasync-vcpu-{index}", self._worker_main, index)
        self._spawn("hlasync-watchdog", self._watchdog_main)
        self._state = "open"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _spawn(self, name: str, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    async def aclose(self) -> None:
        """Shut down: refuse new calls, let running ones finish for
        ``shutdown_grace`` seconds, stop the rest, join the threads and close
        every sandbox. Idempotent.

        Bounded: a call stuck in a synchronous host function cannot be
        stopped; after :data:`STOP_TIMEOUT` more seconds its caller gets
        :class:`SupervisorClosed`, its worker thread is left to finish on its
        own (a daemon) and its sandbox's VM is released when the host
        function returns.
        """
        if self._state in ("closing", "closed"):
            return
        if self._state == "new":
            self._state = "closed"
            return
        self._state = "closing"
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(self.shutdown_grace):
                if self._outstanding:
                    await self._all_done.wait()
            closed = SupervisorClosed("the supervisor shut down before the call ran")
            with self._lock:
                waiting, self._pending = list(self._pending), collections.deque()
                running = list(self._running)
            for job in waiting:
                self._finish(job, None, closed)
            for job in running:
                self._stop_job(job)
            with self._lock:
                self._stopping = True
                self._work.notify_all()
            with self._watch:
                self._watch.notify_all()
            deadline = time.monotonic() + STOP_TIMEOUT
            while time.monotonic() < deadline and any(
                t.is_alive() for t in [*self._threads, *self._operations]
            ):
                await anyio.sleep(0.002)
            stuck = [t.name for t in self._threads if t.is_alive()]
            if stuck:
                _logger.warning(
                    "supervisor shut down with threads still blocked in host functions: %s",
                    ", ".join(stuck),
                )
            stopped = SupervisorClosed(
                "the supervisor shut down while the call was blocked in a host function"
            )
            for job in list(self._running):
                self._finish(job, None, stopped)
            for target in list(self._targets):
                for sandbox in list(target._members):
                    self._close_sandbox(sandbox, timeout=0.0 if stuck else STOP_TIMEOUT)
            self._drain()  # completions and events posted while stopping
            self._state = "closed"
            for stream in self._streams:
                stream._close()
            self._streams.clear()

    def _stop_job(
        self,
        job: _Job,
        dump_reason: str | None = None,
        annotations: Mapping[str, object] | None = None,
    ) -> StopResult | None:
        """Stop a running job's call (and cancel its async host functions); never blocks."""
        for scope in list(job.host_scopes):
            self._on_loop(scope.cancel)
        with job.lock:
            call = job.call
        if call is None or job.sandbox is None:
            return None
        return job.sandbox._stop(call, dump_reason, annotations=annotations)

    # -------------------------------------------------------------- creation
    async def create_pool(
        self,
        guest: str | os.PathLike[str] | GuestImage,
        size: int = 4,
        config: SandboxConfig | None = None,
        *,
        name: str | None = None,
        host_functions: Mapping[str, Callable[..., Any]] | None = None,
        output: Callable[[str], None] | None = None,
    ) -> Pool:
        """``size`` sandboxes of ``guest``; each call gets one in its initial state.

        ``host_functions`` may include ``async def`` functions: they run on
        this event loop and are cancelled by the watchdog. Guest prints become
        :class:`~hlasync.events.GuestOutput` events (and go to ``output``, or
        to stdout when nobody subscribes to them). A member whose restore
        fails is closed and replaced by a new one.
        """
        self._check_open()
        if type(size) is not int or size < 1:
            raise ValueError("size must be a positive int")
        image = await self._in_thread(lambda: _load_image(guest))
        pool = Pool(self, name or f"pool-{next(self._ids)}", image, size)
        pool._host_functions = self._wrap_host_functions(host_functions)
        pool._factory = lambda: self._new_sandbox(image, config, pool._host_functions, output)
        factory = pool._factory
        sandboxes = await self._in_thread(
            lambda: _create_all(factory, size), discard=self._close_sandboxes
        )
        with self._lock:
            pool._members = list(sandboxes)
            pool._free = list(sandboxes)
            self._targets.append(pool)
        for sandbox in sandboxes:
            self._publish(
                ev.SandboxCreated, sandbox_id=sandbox.id, guest=str(image.path), pool=pool.name
            )
        return pool

    async def create_sandbox(
        self,
        guest: str | os.PathLike[str] | GuestImage,
        config: SandboxConfig | None = None,
        *,
        host_functions: Mapping[str, Callable[..., Any]] | None = None,
        output: Callable[[str], None] | None = None,
    ) -> SupervisedSandbox:
        """A dedicated sandbox that keeps its state between calls (run one at a time)."""
        self._check_open()
        image = await self._in_thread(lambda: _load_image(guest))
        wrapped = self._wrap_host_functions(host_functions)
        sandbox = await self._in_thread(
            lambda: self._new_sandbox(image, config, wrapped, output),
            discard=lambda sb: self._close_sandboxes([sb]),
        )
        target = SupervisedSandbox(self, sandbox)
        target._host_functions = wrapped
        with self._lock:
            target._members = [sandbox]
            target._free = [sandbox]
            self._targets.append(target)
        self._publish(ev.SandboxCreated, sandbox_id=sandbox.id, guest=str(image.path), pool=None)
        return target

    async def create_js_pool(
        self,
        handlers: Mapping[str, str],
        size: int = 4,
        *,
        modules: Mapping[str, str] | None = None,
        host_functions: Mapping[str, Mapping[str, Callable[..., Any]]] | None = None,
        heap_size: int | None = None,
        config: SandboxConfig | None = None,
        name: str | None = None,
        output: Callable[[str, str], None] | None = None,
    ) -> JSPool:
        """``size`` JavaScript sandboxes loaded with ``handlers`` (name -> source).

        ``modules`` are ES modules handlers may import by name;
        ``host_functions`` maps a module name to the functions JavaScript
        imports from it (``{"db": {"get": get}}``: ``import { get } from "db"``),
        plain or ``async def`` (run on this loop, cancelled by the watchdog).
        The engine and handlers are initialised once; every sandbox starts from
        that snapshot and is restored to it after every call. Console output
        becomes :class:`~hlasync.events.GuestOutput` events with their level
        (and goes to ``output(level, text)``, or to stdout/stderr when nobody
        subscribes). Raises JSSyntaxError for a handler that does not compile.
        """
        from .js import protocol, runtime
        from .js.host import HostBridge, default_output

        self._check_open()
        if type(size) is not int or size < 1:
            raise ValueError("size must be a positive int")
        if not isinstance(handlers, Mapping) or not handlers:
            raise ValueError("handlers must be a non-empty mapping of name -> source")
        for handler, source in handlers.items():
            protocol.check_name("handler", handler)
            if not isinstance(source, str) or not source.strip():
                raise ValueError(f"the source of handler {handler!r} must be a non-empty str")
        heap = runtime.DEFAULT_HEAP_SIZE if heap_size is None else heap_size
        config = config if config is not None else runtime.default_config(heap)
        image = await self._in_thread(lambda: _load_image(runtime.guest_path()))

        def console(level: str, text: str) -> None:
            job = getattr(_tls, "job", None)
            sandbox_id = job.sandbox.id if job is not None and job.sandbox is not None else None
            if output is not None:
                output(level, text)
            if self._wants(ev.GuestOutput):
                self._post(ev.GuestOutput.from_text(sandbox_id, text, level=level))
            elif output is None:
                default_output(level, text)

        bridge = HostBridge(console)
        for module, functions in (host_functions or {}).items():
            for function_name, function in functions.items():
                bridge.register(module, function_name, self._host_function(function))
        sandbox_functions = bridge.sandbox_functions()
        pool = JSPool(self, name or f"js-pool-{next(self._ids)}", image, size, handlers)
        sources = dict(handlers)
        module_sources = dict(modules or {})
        baseline: list[Any] = []

        def first() -> Sandbox:
            sandbox = self._new_sandbox(image, config, sandbox_functions, None)
            try:
                runtime.start_engine(sandbox, heap)
                runtime.install(
                    sandbox,
                    handlers=sources,
                    modules=module_sources,
                    host_modules=bridge.modules(),
                )
                loaded = sandbox.snapshot()
                sandbox._set_baseline(loaded)
            except BaseException:
                sandbox.close()
                raise
            baseline.append(loaded)
            return sandbox

        def another() -> Sandbox:  # from the loaded snapshot: no engine start, no compiling
            sandbox = self._new_sandbox(image, config, sandbox_functions, None)
            try:
                sandbox.restore(baseline[0])
                sandbox._set_baseline(baseline[0])
            except BaseException:
                sandbox.close()
                raise
            return sandbox

        def make_all() -> list[Sandbox]:
            made = [first()]
            try:
                made += _create_all(another, size - 1)
            except BaseException:
                made[0].close()
                raise
            return made

        pool._factory = another
        pool._host_functions = sandbox_functions
        sandboxes = await self._in_thread(make_all, discard=self._close_sandboxes)
        with self._lock:
            pool._members = list(sandboxes)
            pool._free = list(sandboxes)
            self._targets.append(pool)
        for sandbox in sandboxes:
            self._publish(
                ev.SandboxCreated, sandbox_id=sandbox.id, guest=str(image.path), pool=pool.name
            )
        return pool

    def _wrap_host_functions(
        self, host_functions: Mapping[str, Callable[..., Any]] | None
    ) -> dict[str, Callable[..., Any]]:
        return {name: self._host_function(fn) for name, fn in (host_functions or {}).items()}

    def _new_sandbox(
        self,
        image: GuestImage,
        config: SandboxConfig | None,
        host_functions: Mapping[str, Callable[..., Any]],
        output: Callable[[str], None] | None,
    ) -> Sandbox:
        holder: list[Sandbox] = []

        def on_output(text: str) -> None:
            sandbox_id = holder[0].id if holder else None
            if output is not None:
                output(text)
            if self._wants(ev.GuestOutput):
                # Long output is cut (visibly: ``truncated``) so events stay small.
                self._post(ev.GuestOutput.from_text(sandbox_id, text))
            elif output is None:
                sys.stdout.write(text)
                sys.stdout.flush()

        sandbox = Sandbox(image, config, output=on_output)
        holder.append(sandbox)
        sandbox.add_crashdump_listener(self._on_crashdump)
        for name, function in dict(host_functions).items():
            sandbox.register_host_function(name, function)
        return sandbox

    def _host_function(self, function: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.iscoroutinefunction(function):
            return self._async_host(function)
        return function

    def _async_host(self, function: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
        """Run an ``async def`` host function on the loop, cancellable by the watchdog."""

        async def run(job: _Job | None, args: tuple[Any, ...]) -> Any:
            with anyio.CancelScope() as scope:
                if job is not None:
                    job.host_scopes.append(scope)
                    if job.expired or job.abandoned:
                        scope.cancel()
                try:
                    return await function(*args)
                finally:
                    if job is not None:
                        job.host_scopes.remove(scope)
            raise TimeoutError("host function cancelled by the watchdog")

        def call_from_worker(*args: Any) -> Any:
            return anyio.from_thread.run(run, getattr(_tls, "job", None), args, token=self._token)

        return call_from_worker

    async def close_sandbox(self, target: SupervisedSandbox) -> None:
        """Close a dedicated sandbox (after its queued calls)."""
        await self._close_target(target)

    async def _close_target(self, target: _Target) -> None:
        """Close a target once its calls are done (waiting is cancellable)."""
        if self._state == "closed":
            return  # aclose() closed every sandbox
        while True:
            with self._lock:
                busy = len(target._free) < len(target._members) or any(
                    job.target is target for job in self._pending
                )
                if not busy:
                    target._closed = True
                    members, target._free, target._members = target._members, [], []
                    if target in self._targets:
                        self._targets.remove(target)
                    break
            await anyio.sleep(0.005)
        if members:
            await self._in_thread(lambda: self._close_sandboxes(members))

    def _close_sandboxes(self, sandboxes: list[Sandbox]) -> None:
        for sandbox in sandboxes:
            self._close_sandbox(sandbox)

    def _close_sandbox(self, sandbox: Sandbox, timeout: float = STOP_TIMEOUT) -> None:
        if sandbox.state is SandboxState.CLOSED:
            return
        sandbox.close(timeout=timeout)
        self._publish(ev.SandboxClosed, sandbox_id=sandbox.id)

    # ----------------------------------------------------------------- calls
    async def call(
        self,
        target: _Target,
        name: str,
        *args: Arg,
        timeout: float | None = _DEFAULT,
        cpu_timeout: float | None = _DEFAULT,
    ) -> Value:
        """Run guest function ``name`` on ``target`` and return its result.

        Waits for room when ``max_pending`` calls are queued. ``timeout`` is
        the wall-clock limit and ``cpu_timeout`` the guest CPU-time limit of
        the call once it runs on a vCPU (queueing does not count; wrap the
        call in ``anyio.fail_after`` to bound the total). On expiry the hung
        guest is dumped and stopped and :class:`GuestTimeout` is raised.
        Cancelling the awaiting task stops the guest.
        """
        job = self._make_job(target, name, args, timeout, cpu_timeout)
        try:
            self._slots.acquire_nowait()  # no extra trip through the event loop when there is room
        except anyio.WouldBlock:
            await self._slots.acquire()
        if self._state != "open":  # shut down while this caller waited for room
            self._slots.release()
            raise SupervisorClosed("the supervisor shut down before the call was queued")
        self._submit(job)
        return await self._await_job(job)

    def call_nowait(
        self,
        target: _Target,
        name: str,
        *args: Arg,
        timeout: float | None = _DEFAULT,
        cpu_timeout: float | None = _DEFAULT,
    ) -> PendingCall:
        """Queue a call now, or raise :class:`SupervisorBusy` if the queue is full."""
        job = self._make_job(target, name, args, timeout, cpu_timeout)
        try:
            self._slots.acquire_nowait()
        except anyio.WouldBlock:
            self._counters["busy"] += 1
            raise SupervisorBusy(f"{self.max_pending} calls are already pending") from None
        self._submit(job)
        return PendingCall(self, job)

    def _make_job(
        self,
        target: _Target,
        name: str,
        args: tuple[Arg, ...],
        timeout: float | None,
        cpu_timeout: float | None,
    ) -> _Job:
        self._check_open()
        if not isinstance(target, _Target) or target._supervisor is not self:
            raise TypeError("target must be a Pool or SupervisedSandbox of this supervisor")
        if target._closed:
            raise SupervisorClosed(f"{target.name} is closed")
        timeout = self.timeout if timeout is _DEFAULT else timeout
        cpu_timeout = self.cpu_timeout if cpu_timeout is _DEFAULT else cpu_timeout
        _check_limit("timeout", timeout)
        _check_limit("cpu_timeout", cpu_timeout)
        signature = check_call(target.image, target.functions, target.name, name, args)
        return _Job(next(self._ids), target, signature, args, timeout, cpu_timeout)

    def _submit(self, job: _Job) -> None:
        self._outstanding += 1
        if self._all_done.is_set():
            self._all_done = anyio.Event()
        with self._lock:
            self._pending.append(job)
            self._work.notify()

    async def _await_job(self, job: _Job) -> Value:
        try:
            await job.done.wait()
        except anyio.get_cancelled_exc_class():
            self._abandon(job)
            raise
        if job.error is not None:
            raise job.error
        return job.result

    def _abandon(self, job: _Job) -> None:
        """The caller gave up (cancelled): stop the guest, now, without waiting."""
        with self._lock:
            queued = job in self._pending
            if queued:
                self._pending.remove(job)
        if queued:
            job.abandoned = True
            self._finish(
                job,
                None,
                GuestCancelled(
                    "call cancelled while queued", sandbox_id=job.target.name, function=job.name
                ),
            )
            return
        with job.lock:
            # The worker reads this under the same lock as it publishes job.call: either
            # it sees the flag before the guest runs, or we see the call and stop it.
            job.abandoned = True
        self._stop_job(job, "cancelled" if self.dump_on_cancel else None)

    # --------------------------------------------------------------- workers
    def _worker_main(self, index: int) -> None:
        if self.pin_cpus:
            cpu = self.pin_cpus[index % len(self.pin_cpus)]
            os.sched_setaffinity(threading.get_native_id(), {cpu})
        Vcpu.block_kick_signal()
        while True:
            with self._work:
                while True:
                    job = self._take_locked(index)
                    if job is not None:
                        break
                    if self._stopping:
                        return
                    self._work.wait()
            try:
                self._run(job)
            except BaseException as exc:  # noqa: BLE001 - a worker outlives any failure
                self._thread_failed(exc, job.sandbox)
                self._finish(job, None, exc)

    def _thread_failed(self, error: BaseException, sandbox: Sandbox | None = None) -> None:
        """Report a failure in one of the supervisor's threads; the thread goes on."""
        thread = threading.current_thread().name
        _logger.error("%s: %s: %s", thread, type(error).__name__, error, exc_info=error)
        self._count("internal_errors")
        self._publish(
            ev.SupervisorError,
            sandbox_id=sandbox.id if sandbox is not None else None,
            thread=thread,
            error=error,
        )

    def _take_locked(self, worker: int) -> _Job | None:
        """The oldest pending call whose target has room (FIFO, no head-of-line blocking)."""
        for position, job in enumerate(self._pending):
            sandbox = job.target._take_locked(worker)
            if sandbox is not None:
                sandbox._last_worker = worker
                del self._pending[position]
                job.sandbox = sandbox
                self._running.add(job)
                self._counters["started"] += 1
                return job
        return None

    def _run(self, job: _Job) -> None:
        sandbox = job.sandbox
        assert sandbox is not None
        job.started_at = time.monotonic()
        if self._wants(ev.CallStarted):
            self._publish(
                ev.CallStarted,
                sandbox_id=sandbox.id,
                function=job.name,
                call_id=job.call_id,
                queued=job.started_at - job.queued_at,
            )
        try:
            call = sandbox._begin_call(job.name)
        except HlasyncError as exc:  # closed or poisoned under us
            self._finish(job, None, exc)
            self._reset(job.target, sandbox)
            return
        with job.lock:
            job.call = call
            abandoned = job.abandoned
        if abandoned:  # cancelled after it was taken: it stops before any guest code runs
            sandbox._stop(call)
        if job.timeout is not None or job.cpu_timeout is not None:
            job.cpu_clock = time.pthread_getcpuclockid(threading.get_ident())
            job.cpu_start = time.clock_gettime(job.cpu_clock)
            with self._watch:
                self._watched.add(job)
                self._watch.notify()
        _tls.job = job
        result: Value = None
        error: BaseException | None = None
        try:
            result = sandbox._run_begun(call, job.signature, job.args)
        except (GuestCancelled, HostFunctionError) as exc:
            if job.expired:
                # The dump made as it stopped (its callback may not have run yet).
                job.core_path = job.core_path or exc.core_path
                job.dump_error = job.dump_error or exc.crashdump_error
                error = self._timeout_error(job)
            else:
                error = exc
        except BaseException as exc:  # noqa: BLE001 - every outcome goes to the caller
            error = exc
        finally:
            _tls.job = None
            with self._watch:
                self._watched.discard(job)
        self._finish(job, result, error)
        self._reset(job.target, sandbox)

    def _timeout_error(self, job: _Job) -> GuestTimeout:
        assert job.sandbox is not None and job.expired is not None
        limit = job.timeout if job.expired == "wall" else job.cpu_timeout
        error = GuestTimeout(
            sandbox_id=job.sandbox.id,
            function=job.name,
            kind=job.expired,
            limit=limit or 0.0,
            elapsed=job.expired_at - job.started_at,
            core_path=job.core_path,
        )
        error.crashdump_error = job.dump_error
        error.js_stack = job.js_stack
        return error

    def _reset(self, target: _Target, sandbox: Sandbox) -> None:
        """Make the sandbox ready for its next call and give it back; a sandbox
        that cannot be restored leaves its target (a pool gets a new one)."""
        try:
            if target.fresh_state or sandbox.state is not SandboxState.READY:
                sandbox.restore()
        except Exception as exc:  # noqa: BLE001 - whatever broke it, it must not be reused
            if not (self._stopping and sandbox.state is SandboxState.CLOSED):
                self._thread_failed(exc, sandbox)
            self._retire(target, sandbox)
            return
        with self._work:
            target._give_locked(sandbox)
            if self._pending:
                self._work.notify()

    def _retire(self, target: _Target, sandbox: Sandbox) -> None:
        """Take a broken sandbox out of its target, close it and, for a pool,
        start making a replacement. A target left with no sandbox and no
        replacement fails its queued calls instead of starving them."""
        with self._lock:
            if sandbox in target._members:
                target._members.remove(sandbox)
            replace = target._factory is not None and not target._closed and self._state == "open"
        self._close_sandbox(sandbox, timeout=0.0)
        if replace:
            thread = threading.Thread(
                target=self._replace_member,
                args=(target,),
                name=f"hlasync-op-{next(self._operation_ids)}",
                daemon=True,
            )
            self._operations.add(thread)
            thread.start()
        elif not target._members:
            self._target_lost(target, SupervisorClosed(f"{target.name} has no sandbox left"))

    def _replace_member(self, target: _Target) -> None:
        try:
            assert target._factory is not None
            sandbox = target._factory()
        except BaseException as exc:  # noqa: BLE001 - reported; the target shrinks
            self._thread_failed(exc)
            with self._lock:
                empty = not target._members
            if empty:
                lost = SupervisorClosed(f"{target.name} lost its last sandbox: {exc}")
                lost.__cause__ = exc
                self._target_lost(target, lost)
            return
        finally:
            self._operations.discard(threading.current_thread())
        with self._work:
            keep = not target._closed and self._state == "open"
            if keep:
                target._members.append(sandbox)
                target._free.append(sandbox)
                self._work.notify()
        if not keep:
            sandbox.close()
            return
        self._publish(
            ev.SandboxCreated, sandbox_id=sandbox.id, guest=str(target.image.path), pool=target.name
        )

    def _target_lost(self, target: _Target, error: SupervisorClosed) -> None:
        """Refuse new calls to ``target`` and fail its queued ones with ``error``."""
        with self._lock:
            target._closed = True
            jobs = [job for job in self._pending if job.target is target]
            for job in jobs:
                self._pending.remove(job)
        for job in jobs:
            self._finish(job, None, error)

    def _finish(self, job: _Job, result: Value, error: BaseException | None) -> None:
        """Decide the call's outcome (first decision wins) and tell the loop."""
        with job.lock:
            if job.finished:
                return
            job.finished = True
            job.result, job.error = result, error
        self._running.discard(job)  # one atomic set operation: no lock needed
        sandbox_id = job.sandbox.id if job.sandbox is not None else None
        duration = time.monotonic() - (job.started_at or job.queued_at)
        if error is None:
            if self._wants(ev.CallCompleted):
                self._publish(
                    ev.CallCompleted,
                    sandbox_id=sandbox_id,
                    function=job.name,
                    call_id=job.call_id,
                    duration=duration,
                )
        else:
            if isinstance(error, GuestTimeout):
                self._publish(
                    ev.CallTimedOut,
                    sandbox_id=sandbox_id,
                    function=job.name,
                    call_id=job.call_id,
                    kind=error.kind,
                    elapsed=error.elapsed,
                    core_path=error.core_path,
                    js_stack=error.js_stack,
                )
            elif isinstance(error, GuestCrashed):
                self._publish(
                    ev.GuestCrashed,
                    sandbox_id=sandbox_id,
                    function=job.name,
                    call_id=job.call_id,
                    vector=error.vector,
                    vector_name=error.vector_name,
                    rip=error.rip,
                    symbol=error.symbol,
                    core_path=error.core_path,
                )
            self._publish(
                ev.CallFailed,
                sandbox_id=sandbox_id,
                function=job.name,
                call_id=job.call_id,
                duration=duration,
                error=error,
            )
        self._post(job)

    # -------------------------------------------------------------- watchdog
    def _watchdog_main(self) -> None:
        Vcpu.block_kick_signal()
        while True:
            expired: list[tuple[_Job, str]] = []
            with self._watch:
                if self._stopping:
                    return
                now = time.monotonic()
                wake_at = math.inf
                for job in list(self._watched):
                    if job.timeout is not None:
                        deadline = job.started_at + job.timeout
                        if now >= deadline:
                            expired.append((job, "wall"))
                            self._watched.discard(job)
                            continue
                        wake_at = min(wake_at, deadline)
                    if job.cpu_timeout is not None:
                        try:
                            used = time.clock_gettime(job.cpu_clock) - job.cpu_start
                        except OSError:  # the worker thread is gone
                            self._watched.discard(job)
                            continue
                        if used >= job.cpu_timeout:
                            expired.append((job, "cpu"))
                            self._watched.discard(job)
                            continue
                        # CPU time cannot grow faster than wall time.
                        wake_at = min(wake_at, now + job.cpu_timeout - used)
                if not expired:
                    self._watch.wait(None if wake_at == math.inf else max(wake_at - now, 0.0005))
                    continue
            for job, kind in expired:
                try:
                    self._expire(job, kind)
                except BaseException as exc:  # noqa: BLE001 - the watchdog outlives any failure
                    self._thread_failed(exc, job.sandbox)

    def _expire(self, job: _Job, kind: str) -> None:
        """Ask the hung call to dump itself and stop; never waits for the dump."""
        with job.lock:
            if job.finished or job.expired:
                return
            job.expired = kind
            job.expired_at = time.monotonic()
        reason = "timeout" if kind == "wall" else "cpu-timeout"
        annotate = job.target._stop_annotations
        if annotate is None or job.sandbox is None:
            self._stop_expired(job, reason, None)
            return
        sandbox = job.sandbox

        def annotate_then_stop() -> None:  # a bounded wait: not on the watchdog's thread
            try:
                annotations = annotate(sandbox)
                stack = annotations.get("js_stack")
                job.js_stack = stack if isinstance(stack, str) else None
            except Exception as exc:  # noqa: BLE001 - the stop must happen anyway
                self._thread_failed(exc, sandbox)
                annotations = None
            self._stop_expired(job, reason, annotations)

        threading.Thread(target=annotate_then_stop, name="hlasync-expiry", daemon=True).start()

    def _stop_expired(
        self, job: _Job, reason: str, annotations: Mapping[str, object] | None
    ) -> None:
        stop = self._stop_job(job, reason, annotations)
        if stop is None or not stop.stopped:
            return  # ending anyway; the worker reports the outcome
        if stop.dump is not None:
            stop.dump.add_done_callback(lambda request: self._expiry_dumped(job, request))
        elif stop.in_host:
            self._finish(job, None, self._timeout_error(job))

    def _expiry_dumped(self, job: _Job, request: DumpRequest) -> None:
        job.core_path = request.path
        job.dump_error = request.error
        if request.borrowed:
            # Written while the guest was blocked in a host function, which may not return
            # soon: answer the caller now; the sandbox comes back when the function returns.
            self._finish(job, None, self._timeout_error(job))

    # ------------------------------------------------------- dumps, threads
    async def generate_crashdump(
        self, target: SupervisedSandbox, directory: str | os.PathLike[str] | None = None
    ) -> Path:
        """Dump a dedicated sandbox now, also while a call runs on it."""
        if not isinstance(target, SupervisedSandbox):
            raise TypeError("generate_crashdump() takes a SupervisedSandbox")
        return await self._in_thread(lambda: target.sandbox.generate_crashdump(directory))

    def _on_crashdump(self, record: CrashdumpRecord) -> None:
        if record.error is None and record.path is not None:
            self._count("dumps_written")
            self._publish(
                ev.CrashDumpWritten,
                sandbox_id=record.sandbox_id,
                path=record.path,
                reason=record.reason,
                function=record.function,
                size=record.size,
                seconds=record.seconds,
            )
        else:
            self._count("dumps_failed")
            self._publish(
                ev.CrashDumpFailed,
                sandbox_id=record.sandbox_id,
                reason=record.reason,
                function=record.function,
                error=record.error or CrashdumpError("unknown failure"),
            )

    async def _in_thread(
        self,
        function: Callable[[], _T],
        *,
        discard: Callable[[_T], object] | None = None,
    ) -> _T:
        """Run blocking ``function`` on a new ``hlasync-op-N`` thread and await it.

        The awaiting task may be cancelled at any time: it stops waiting, and
        ``discard`` is applied to a result that arrives afterwards (closing
        sandboxes nobody will receive). One thread per operation: a slow
        operation never holds up another.
        """
        done = anyio.Event()
        guard = threading.Lock()
        outcome: list[tuple[bool, Any]] = []
        abandoned = False

        def work() -> None:
            try:
                result: tuple[bool, Any] = (True, function())
            except BaseException as exc:  # noqa: BLE001 - re-raised on the loop
                result = (False, exc)
            with guard:
                outcome.append(result)
                drop = abandoned
            self._operations.discard(threading.current_thread())
            if drop:
                if result[0] and discard is not None:
                    self._discard(discard, result[1])
                return
            self._on_loop(done.set)

        thread = threading.Thread(
            target=work, name=f"hlasync-op-{next(self._operation_ids)}", daemon=True
        )
        self._operations.add(thread)
        thread.start()
        try:
            await done.wait()
        except BaseException:
            with guard:
                abandoned = True
                arrived = outcome[0] if outcome else None
            if arrived is not None and arrived[0] and discard is not None:
                self._discard(discard, arrived[1])
            raise
        ok, value = outcome[0]
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    def _discard(self, discard: Callable[[_T], object], value: _T) -> None:
        try:
            discard(value)
        except BaseException as exc:  # noqa: BLE001 - reported, never raised into a caller
            self._thread_failed(exc)

    # ---------------------------------------------------------------- events
    def subscribe(
        self,
        *event_types: type[ev.Event],
        buffer: int = 1000,
        overflow: ev.Overflow | str = ev.Overflow.DROP_OLDEST,
        max_bytes: int = ev.DEFAULT_MAX_BYTES,
    ) -> ev.Subscription:
        """``async with sup.subscribe(CrashDumpWritten, ...) as events: async for e in events``.

        Each subscriber has its own buffer of at most ``buffer`` events and
        ``max_bytes`` bytes (guest output counts by its length). When it is
        full, ``overflow`` drops the oldest (default) or the newest event;
        drops are counted and announced with ``EventsDropped``. Crash dump
        events are never dropped. No types: every event.
        """
        stream = ev.EventStream(tuple(event_types), buffer, ev.Overflow(overflow), max_bytes)
        if self._state == "closed":
            stream._close()
        else:
            self._streams.append(stream)
            self._interest = {}  # threads may hold the old map: replace it, never clear it
        return ev.Subscription(stream, self._unsubscribe)

    def _unsubscribe(self, stream: ev.EventStream) -> None:
        if stream in self._streams:
            self._streams.remove(stream)
            self._interest = {}
        self._counters["events_dropped"] += stream.statistics().dropped

    def _wants(self, kind: type[ev.Event]) -> bool:
        """Whether any subscriber takes ``kind`` (from any thread; cached per subscriber set)."""
        interest = self._interest
        wanted = interest.get(kind)
        if wanted is None:
            wanted = any(issubclass(kind, t) for s in list(self._streams) for t in s.types)
            interest[kind] = wanted
        return wanted

    def _publish(self, event_type: type[ev.Event], /, **fields: Any) -> None:
        if self._wants(event_type):
            self._post(event_type(**fields))

    # ------------------------------------------------------ loop hand-over
    def _post(self, item: object) -> None:
        """Queue a finished job or an event for the loop; one wake-up per batch."""
        with self._post_lock:
            self._posted.append(item)
            if self._wake_scheduled:
                return
            self._wake_scheduled = True
        self._on_loop(self._drain)

    def _on_loop(self, function: Callable[[], None]) -> None:
        assert self._wake is not None
        with contextlib.suppress(RuntimeError):  # the loop is gone (process shutting down)
            self._wake.soon(function)

    def _drain(self) -> None:
        with self._post_lock:
            items, self._posted = self._posted, []
            self._wake_scheduled = False
        for item in items:
            if isinstance(item, _Job):
                self._job_done(item)
            else:
                assert isinstance(item, ev.Event)
                self._counters["events_published"] += 1
                for stream in self._streams:
                    if stream.wants(item):
                        stream._push(item)

    def _job_done(self, job: _Job) -> None:
        error = job.error
        if error is None:
            self._counters["completed"] += 1
        elif isinstance(error, GuestTimeout):
            self._counters["timed_out"] += 1
        elif isinstance(error, GuestCancelled) or job.abandoned:
            self._counters["cancelled"] += 1
        else:
            self._counters["failed"] += 1
        self._slots.release()
        self._outstanding -= 1
        if self._outstanding == 0:
            self._all_done.set()
        job.done.set()

    # ------------------------------------------------------------ reporting
    def statistics(self) -> SupervisorStatistics:
        with self._lock:
            pending, running = len(self._pending), len(self._running)
            sandboxes = sum(len(t._members) for t in self._targets)
        c = self._counters
        dropped = c["events_dropped"] + sum(s.statistics().dropped for s in self._streams)
        return SupervisorStatistics(
            workers=self.workers,
            sandboxes=sandboxes,
            pending=pending,
            running=running,
            started=c["started"],
            completed=c["completed"],
            failed=c["failed"],
            timed_out=c["timed_out"],
            cancelled=c["cancelled"],
            dumps_written=c["dumps_written"],
            dumps_failed=c["dumps_failed"],
            subscribers=len(self._streams),
            events_published=c["events_published"],
            events_dropped=dropped,
            internal_errors=c["internal_errors"],
        )

    def _count(self, name: str) -> None:
        with self._lock:
            self._counters[name] += 1

    def _check_open(self) -> None:
        if self._state != "open":
            raise SupervisorClosed(
                "the supervisor is not running (use `async with Supervisor() as sup`)"
                if self._state == "new"
                else "the supervisor is shut down"
            )

    def __repr__(self) -> str:
        return f"<Supervisor {self._state}, {self.workers} workers>"


def _check_limit(name: str, value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number of seconds or None, got {value!r}")


def _create_all(factory: Callable[[], Sandbox], count: int) -> list[Sandbox]:
    """``count`` sandboxes from ``factory``; none are left open if one fails."""
    made: list[Sandbox] = []
    try:
        for _ in range(count):
            made.append(factory())
    except BaseException:
        for sandbox in made:
            sandbox.close()
        raise
    return made


def _load_image(guest: str | os.PathLike[str] | GuestImage) -> GuestImage:
    return guest if isinstance(guest, GuestImage) else GuestImage.load(guest)
