"""The supervisor's front: its API on the event loop. It checks and queues
calls, awaits their outcomes, creates and closes targets, and fans events
out to subscribers; running the calls is the worker host's (:mod:`.host`)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import anyio
import anyio.lowlevel

from .. import events as ev
from ..abi import Arg, Value
from ..config import SandboxConfig
from ..errors import GuestCancelled, GuestTimeout, SupervisorBusy, SupervisorClosed
from ..guest.image import GuestImage
from ..sandbox import Sandbox, check_call
from .creation import JSFactory, create_all, js_console, load_image, new_sandbox
from .host import STOP_TIMEOUT, WorkerHost
from .hostcalls import wrap_host_function, wrap_host_functions
from .hub import EventHub
from .jobs import DEFAULT, Job, check_limit
from .loop import Outbox, loop_waker
from .targets import JSPool, PendingCall, Pool, SupervisedSandbox, Target

__all__ = ["Supervisor", "SupervisorStatistics"]

_T = TypeVar("_T")


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
        check_limit("timeout", timeout)
        check_limit("cpu_timeout", cpu_timeout)
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

        self._hub = EventHub()
        self._host = WorkerHost(workers, self.pin_cpus, self._hub)
        self._state = "new"  # new, open, closing, closed
        self._ids = iter(range(1, 1 << 62))
        self._outbox: Outbox | None = None
        self._token: Any = None

    # ------------------------------------------------------------- lifecycle
    async def __aenter__(self) -> Supervisor:
        if self._state != "new":
            raise RuntimeError("a Supervisor can be entered only once")
        outbox = self._outbox = Outbox(loop_waker(), self._deliver)
        self._hub.attach(outbox.post)
        self._token = anyio.lowlevel.current_token()
        self._slots = anyio.Semaphore(self.max_pending)
        self._all_done = anyio.Event()
        self._outstanding = 0
        self._host.start(outbox.post, outbox.on_loop)
        self._state = "open"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

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
        host = self._host
        host.accepting = False
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(self.shutdown_grace):
                if self._outstanding:
                    await self._all_done.wait()
            closed = SupervisorClosed("the supervisor shut down before the call ran")
            waiting, running = host.take_all()
            for job in waiting:
                host.finish(job, None, closed)
            for job in running:
                host.stop_job(job)
            host.stop_threads()
            deadline = time.monotonic() + STOP_TIMEOUT
            while time.monotonic() < deadline and host.alive():
                await anyio.sleep(0.002)
            stuck = [t.name for t in host.threads if t.is_alive()]
            if stuck:
                from .host import _logger

                _logger.warning(
                    "supervisor shut down with threads still blocked in host functions: %s",
                    ", ".join(stuck),
                )
            stopped = SupervisorClosed(
                "the supervisor shut down while the call was blocked in a host function"
            )
            for job in list(host.running):
                host.finish(job, None, stopped)
            host.close_all(timeout=0.0 if stuck else STOP_TIMEOUT)
            assert self._outbox is not None
            self._outbox.drain()  # completions and events posted while stopping
            self._state = "closed"
            self._hub.close()

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
        image = await self._in_thread(lambda: load_image(guest))
        pool = Pool(self, name or f"pool-{next(self._ids)}", image, size)
        pool._host_functions = wrap_host_functions(host_functions, self._token)
        pool._factory = lambda: self._new_sandbox(image, config, pool._host_functions, output)
        factory = pool._factory
        sandboxes = await self._in_thread(
            lambda: create_all(factory, size), discard=self._host.close_sandboxes
        )
        self._add_target(pool, sandboxes)
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
        image = await self._in_thread(lambda: load_image(guest))
        wrapped = wrap_host_functions(host_functions, self._token)
        sandbox = await self._in_thread(
            lambda: self._new_sandbox(image, config, wrapped, output),
            discard=lambda sb: self._host.close_sandboxes([sb]),
        )
        target = SupervisedSandbox(self, sandbox)
        target._host_functions = wrapped
        self._add_target(target, [sandbox])
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
        from ..js import protocol, runtime
        from ..js.host import HostBridge

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
        image = await self._in_thread(lambda: load_image(runtime.guest_path()))

        bridge = HostBridge(js_console(self._hub, output))
        for module, functions in (host_functions or {}).items():
            for function_name, function in functions.items():
                bridge.register(module, function_name, wrap_host_function(function, self._token))
        sandbox_functions = bridge.sandbox_functions()
        pool = JSPool(self, name or f"js-pool-{next(self._ids)}", image, size, handlers)
        factory = JSFactory(
            lambda: self._new_sandbox(image, config, sandbox_functions, None),
            heap,
            handlers,
            dict(modules or {}),
            bridge.modules(),
        )
        pool._factory = factory.another
        pool._host_functions = sandbox_functions
        sandboxes = await self._in_thread(
            lambda: factory.make_all(size), discard=self._host.close_sandboxes
        )
        self._add_target(pool, sandboxes)
        return pool

    def _new_sandbox(
        self,
        image: GuestImage,
        config: SandboxConfig | None,
        host_functions: Mapping[str, Callable[..., Any]],
        output: Callable[[str], None] | None,
    ) -> Sandbox:
        return new_sandbox(
            image, config, host_functions, output, self._hub, self._host.on_crashdump
        )

    def _add_target(self, target: Target, sandboxes: list[Sandbox]) -> None:
        self._host.add_target(target, sandboxes)
        pool = target.name if isinstance(target, Pool) else None
        for sandbox in sandboxes:
            self._hub.publish(
                ev.SandboxCreated, sandbox_id=sandbox.id, guest=str(target.image.path), pool=pool
            )

    async def close_sandbox(self, target: SupervisedSandbox) -> None:
        """Close a dedicated sandbox (after its queued calls)."""
        await self._close_target(target)

    async def _close_target(self, target: Target) -> None:
        """Close a target once its calls are done (waiting is cancellable)."""
        if self._state == "closed":
            return  # aclose() closed every sandbox
        while True:
            members = self._host.detach_if_idle(target)
            if members is not None:
                break
            await anyio.sleep(0.005)
        if members:
            await self._in_thread(lambda: self._host.close_sandboxes(members))

    # ----------------------------------------------------------------- calls
    async def call(
        self,
        target: Target,
        name: str,
        *args: Arg,
        timeout: float | None = DEFAULT,
        cpu_timeout: float | None = DEFAULT,
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
        target: Target,
        name: str,
        *args: Arg,
        timeout: float | None = DEFAULT,
        cpu_timeout: float | None = DEFAULT,
    ) -> PendingCall:
        """Queue a call now, or raise :class:`SupervisorBusy` if the queue is full."""
        job = self._make_job(target, name, args, timeout, cpu_timeout)
        try:
            self._slots.acquire_nowait()
        except anyio.WouldBlock:
            self._host.counters["busy"] += 1
            raise SupervisorBusy(f"{self.max_pending} calls are already pending") from None
        self._submit(job)
        return PendingCall(self, job)

    def _make_job(
        self,
        target: Target,
        name: str,
        args: tuple[Arg, ...],
        timeout: float | None,
        cpu_timeout: float | None,
    ) -> Job:
        self._check_open()
        if not isinstance(target, Target) or target._supervisor is not self:
            raise TypeError("target must be a Pool or SupervisedSandbox of this supervisor")
        if target._closed:
            raise SupervisorClosed(f"{target.name} is closed")
        timeout = self.timeout if timeout is DEFAULT else timeout
        cpu_timeout = self.cpu_timeout if cpu_timeout is DEFAULT else cpu_timeout
        check_limit("timeout", timeout)
        check_limit("cpu_timeout", cpu_timeout)
        signature = check_call(target.image, target.functions, target.name, name, args)
        return Job(next(self._ids), target, signature, args, timeout, cpu_timeout)

    def _submit(self, job: Job) -> None:
        self._outstanding += 1
        if self._all_done.is_set():
            self._all_done = anyio.Event()
        self._host.submit(job)

    async def _await_job(self, job: Job) -> Value:
        try:
            await job.done.wait()
        except anyio.get_cancelled_exc_class():
            self._abandon(job)
            raise
        if job.error is not None:
            raise job.error
        return job.result

    def _abandon(self, job: Job) -> None:
        """The caller gave up (cancelled): stop the guest, now, without waiting."""
        if self._host.dequeue(job):
            job.abandoned = True
            self._host.finish(
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
        self._host.stop_job(job, "cancelled" if self.dump_on_cancel else None)

    # ----------------------------------------------------- dumps, operations
    async def generate_crashdump(
        self, target: SupervisedSandbox, directory: str | os.PathLike[str] | None = None
    ) -> Path:
        """Dump a dedicated sandbox now, also while a call runs on it."""
        if not isinstance(target, SupervisedSandbox):
            raise TypeError("generate_crashdump() takes a SupervisedSandbox")
        return await self._in_thread(lambda: target.sandbox.generate_crashdump(directory))

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
        assert self._outbox is not None
        on_loop = self._outbox.on_loop

        def work() -> None:
            try:
                result: tuple[bool, Any] = (True, function())
            except BaseException as exc:  # noqa: BLE001 - re-raised on the loop
                result = (False, exc)
            with guard:
                outcome.append(result)
                drop = abandoned
            if drop:
                if result[0] and discard is not None:
                    self._discard(discard, result[1])
                return
            on_loop(done.set)

        self._host.spawn_operation(work)
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
            self._host.thread_failed(exc)

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
        return self._hub.subscribe(tuple(event_types), buffer, overflow, max_bytes)

    def _deliver(self, items: list[object]) -> None:
        """A batch from the outbox, on the loop: finished calls and events."""
        for item in items:
            if isinstance(item, Job):
                self._job_done(item)
            else:
                assert isinstance(item, ev.Event)
                self._hub.deliver(item)

    def _job_done(self, job: Job) -> None:
        error = job.error
        counters = self._host.counters
        if error is None:
            counters["completed"] += 1
        elif isinstance(error, GuestTimeout):
            counters["timed_out"] += 1
        elif isinstance(error, GuestCancelled) or job.abandoned:
            counters["cancelled"] += 1
        else:
            counters["failed"] += 1
        self._slots.release()
        self._outstanding -= 1
        if self._outstanding == 0:
            self._all_done.set()
        job.done.set()

    # ------------------------------------------------------------ reporting
    def statistics(self) -> SupervisorStatistics:
        host = self._host
        with host.lock:
            pending, running = len(host.pending), len(host.running)
            sandboxes = sum(len(t._members) for t in host.targets)
        c = host.counters
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
            subscribers=self._hub.subscribers,
            events_published=self._hub.published,
            events_dropped=self._hub.dropped,
            internal_errors=c["internal_errors"],
        )

    def _check_open(self) -> None:
        if self._state != "open":
            raise SupervisorClosed(
                "the supervisor is not running (use `async with Supervisor() as sup`)"
                if self._state == "new"
                else "the supervisor is shut down"
            )

    def __repr__(self) -> str:
        return f"<Supervisor {self._state}, {self.workers} workers>"
