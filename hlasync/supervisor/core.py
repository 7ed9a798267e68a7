"""The supervisor's front: its API on the event loop. It checks and queues
calls, awaits their outcomes, creates and closes targets, and fans events
out to subscribers; running the calls is a backend's: the worker host on
threads of this process (:mod:`.threads`), or worker processes
(:mod:`.processes`). A backend sees the front only through the
:class:`~.backend.Front` the front hands it (a :class:`~.front.FrontLink`)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.abc
import anyio.lowlevel
import sniffio

from .. import _telemetry as telemetry
from .. import events as ev
from ..abi import Arg, Value
from ..config import SandboxConfig
from ..errors import GuestCancelled, GuestTimeout, SupervisorBusy, SupervisorClosed
from ..guest.image import GuestImage
from ..sandbox import check_call
from .backend import Backend, Front
from .front import FrontLink
from .hub import EventHub
from .jobs import Job
from .loop import Outbox, loop_waker
from .making import TargetMaker
from .operations import run_operation
from .processes import ProcessBackend
from .settings import DEFAULT, check_limit, check_no_debugger, check_settings
from .stats import SupervisorStatistics, gather
from .targets import JSPool, PendingCall, Pool, SupervisedSandbox, Target
from .threads import ThreadBackend

__all__ = ["Supervisor", "SupervisorStatistics"]

_logger = logging.getLogger("hlasync.supervisor")
_T = TypeVar("_T")


class Supervisor:
    """Runs guest calls from async code on dedicated vCPU threads.

    ``workers`` vCPU threads (pinned to ``pin_cpus`` if given, round robin);
    with ``processes=N`` (N >= 1), N worker processes of ``workers`` vCPU
    threads each hold the sandboxes (calls of different processes do not
    share a GIL; see docs/supervisor.md for the trade-offs). ``max_pending``
    bounds the queue (``call()`` waits for room, ``call_nowait()`` raises
    :class:`SupervisorBusy`); ``timeout`` and ``cpu_timeout`` are defaults
    for every call; ``dump_on_cancel`` writes a core dump when a caller
    cancels a running call; ``shutdown_grace`` is how long shutdown lets
    running calls finish before stopping them.

    Use as ``async with Supervisor(...) as sup:`` (on asyncio or trio).
    """

    def __init__(
        self,
        *,
        workers: int = 2,
        processes: int | None = None,
        pin_cpus: Sequence[int] | None = None,
        max_pending: int = 10_000,
        timeout: float | None = None,
        cpu_timeout: float | None = None,
        dump_on_cancel: bool = False,
        shutdown_grace: float = 5.0,
    ) -> None:
        processes = check_settings(
            workers, processes, pin_cpus, max_pending, timeout, cpu_timeout, shutdown_grace
        )
        self.processes = processes
        self.pin_cpus = tuple(pin_cpus) if pin_cpus is not None else None
        self.max_pending = max_pending
        self.timeout = timeout
        self.cpu_timeout = cpu_timeout
        self.dump_on_cancel = dump_on_cancel
        self.shutdown_grace = shutdown_grace

        self._hub = EventHub()
        front = FrontLink(
            self._hub,
            token=lambda: self._token,
            report=self._report,
            announce=self._announce,
            job_done=self._job_done,
            in_thread=self._in_thread,
        )
        self._backend: Backend = self._make_backend(front, processes, workers)
        self.workers = self._backend.workers
        self._state = "new"  # new, open, closing, closed
        self._ids = iter(range(1, 1 << 62))
        self._maker = TargetMaker(self, self._backend, self._in_thread, self._ids, self._check_open)
        self._outbox: Outbox | None = None
        self._token: Any = None
        self._group: anyio.abc.TaskGroup | None = None
        self._operations: set[threading.Thread] = set()

    # ------------------------------------------------------------- lifecycle
    async def __aenter__(self) -> Supervisor:
        if self._state != "new":
            raise RuntimeError("a Supervisor can be entered only once")
        outbox = self._outbox = Outbox(loop_waker(), self._deliver)
        self._hub.attach(outbox.post)
        self._token = anyio.lowlevel.current_token()
        self._slots = anyio.Semaphore(self.max_pending)
        #: Makes a call's ``done`` (see Job.done).
        self._new_done: Callable[[], asyncio.Future[None] | anyio.Event] = (
            asyncio.get_running_loop().create_future
            if sniffio.current_async_library() == "asyncio"
            else anyio.Event
        )
        #: Set when no call is outstanding; made only while shutdown waits for one.
        self._all_done: anyio.Event | None = None
        self._outstanding = 0
        self._counters = self._backend.counters
        if self._backend.uses_tasks:
            group = self._group = anyio.create_task_group()
            await group.__aenter__()
            try:
                await self._backend.start(outbox, group)
            except BaseException as exc:
                self._backend.stop_tasks()
                group.cancel_scope.cancel()
                # The group raises the start's error again, wrapped in an
                # ExceptionGroup: the caller gets the error itself.
                with contextlib.suppress(BaseException):
                    await group.__aexit__(type(exc), exc, exc.__traceback__)
                self._state = "closed"
                raise
        else:
            await self._backend.start(outbox, None)
        self._state = "open"
        telemetry.add_source(self)  # its pools and remote sandboxes in the gauges
        return self

    def _telemetry_pools(self) -> list[tuple[str, int, int]]:
        return self._backend.pool_loads() if self._state == "open" else []

    def _telemetry_remote_sandboxes(self) -> int:
        return self._backend.remote_sandboxes() if self._state == "open" else 0

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Shut down: refuse new calls, let running ones finish for
        ``shutdown_grace`` seconds, stop the rest, join the threads (and
        worker processes) and close every sandbox. Idempotent.

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
        telemetry.discard_source(self)
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(self.shutdown_grace):
                if self._outstanding:
                    self._all_done = anyio.Event()
                    await self._all_done.wait()
            await self._backend.shutdown()
            assert self._outbox is not None
            self._outbox.drain()  # completions and events posted while stopping
            self._state = "closed"
            self._hub.close()
        if self._group is not None:  # the channel tasks of worker processes
            group, self._group = self._group, None
            self._backend.stop_tasks()
            group.cancel_scope.cancel()
            await group.__aexit__(None, None, None)

    # -------------------------------------------------------------- creation
    async def create_pool(
        self,
        guest: str | os.PathLike[str] | GuestImage,
        size: int = 4,
        config: SandboxConfig | None = None,
        *,
        name: str | None = None,
        host_functions: Mapping[str, Callable[..., Any] | str] | None = None,
        output: Callable[[str], None] | None = None,
    ) -> Pool:
        """``size`` sandboxes of ``guest``; each call gets one in its initial state.

        ``host_functions`` may include ``async def`` functions: they run on
        this event loop and are cancelled by the watchdog. A value may also
        be an importable reference, ``"package.module:function"``: it is
        imported and run where the sandbox is (in a worker process, without
        a round trip to this one). Guest prints become
        :class:`~hlasync.events.GuestOutput` events (and go to ``output``, or
        to stdout when nobody subscribes to them). A member whose restore
        fails is closed and replaced by a new one. No ``debug_port`` (ValueError).
        """
        check_no_debugger(config, "create_pool")
        return await self._maker.pool(guest, size, config, name, host_functions, output)

    async def create_sandbox(
        self,
        guest: str | os.PathLike[str] | GuestImage,
        config: SandboxConfig | None = None,
        *,
        host_functions: Mapping[str, Callable[..., Any] | str] | None = None,
        output: Callable[[str], None] | None = None,
    ) -> SupervisedSandbox:
        """A dedicated sandbox that keeps its state between calls (run one at a time);
        ``config.debug_port`` serves a debugger (docs/debugging.md)."""
        return await self._maker.sandbox(guest, config, host_functions, output)

    async def create_js_pool(
        self,
        handlers: Mapping[str, str],
        size: int = 4,
        *,
        modules: Mapping[str, str] | None = None,
        host_functions: Mapping[str, Mapping[str, Callable[..., Any] | str]] | None = None,
        heap_size: int | None = None,
        config: SandboxConfig | None = None,
        name: str | None = None,
        output: Callable[[str, str], None] | None = None,
    ) -> JSPool:
        """``size`` JavaScript sandboxes loaded with ``handlers`` (name -> source).

        ``modules`` are ES modules handlers may import by name;
        ``host_functions`` maps a module name to the functions JavaScript
        imports from it (``{"db": {"get": get}}``: ``import { get } from "db"``),
        plain or ``async def`` (run on this loop, cancelled by the watchdog),
        or importable references as for :meth:`create_pool`. The engine and
        handlers are initialised once; every sandbox starts from that
        snapshot and is restored to it after every call. Console output
        becomes :class:`~hlasync.events.GuestOutput` events with their level
        (and goes to ``output(level, text)``, or to stdout/stderr when nobody
        subscribes). Raises JSSyntaxError for a handler that does not compile.
        ValueError for a config with ``debug_port`` (debug a ``JSSandbox``).
        """
        check_no_debugger(config, "create_js_pool")
        return await self._maker.js_pool(
            handlers, size, modules, host_functions, heap_size, config, name, output
        )

    def _announce(self, target: Target, sandbox_ids: list[str]) -> None:
        """``SandboxCreated`` for each of ``target``'s new sandboxes."""
        pool = target.name if isinstance(target, Pool) else None
        nodes = self._backend.nodes_of(target)
        for sandbox_id in sandbox_ids:
            self._hub.publish(
                ev.SandboxCreated,
                sandbox_id=sandbox_id,
                node=nodes.get(sandbox_id),
                guest=str(target.image.path),
                pool=pool,
            )

    async def close_sandbox(self, target: SupervisedSandbox) -> None:
        """Close a dedicated sandbox (after its queued calls)."""
        await self._close_target(target)

    async def _close_target(self, target: Target) -> None:
        """Close a target once its calls are done (waiting is cancellable)."""
        if self._state == "closed":
            return  # aclose() closed every sandbox
        await self._backend.close_target(target)

    def _register_host_function(
        self, target: Target, name: str, function: Callable[..., Any]
    ) -> None:
        """``target.register_host_function()``: its backend gives its sandboxes the function."""
        self._backend.register_host_function(target, name, function)

    def _sandbox_ids(self, target: Target) -> list[str]:
        """``Pool.sandbox_ids``: the ids of ``target``'s sandboxes, as its backend knows them."""
        return self._backend.sandbox_ids(target)

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
            try:
                self._slots.acquire_nowait()  # no extra trip through the loop when there is room
            except anyio.WouldBlock:
                await self._slots.acquire()
            if self._state != "open":  # shut down while this caller waited for room
                self._slots.release()
                raise SupervisorClosed("the supervisor shut down before the call was queued")
        except BaseException as exc:
            if job.span is not None:  # never queued: its span ends here
                job.span.end(exc, cancelled=isinstance(exc, anyio.get_cancelled_exc_class()))
            raise
        self._submit(job)
        # _await_job, inline (one coroutine less per call)
        done = job.done
        assert done is not None
        try:
            await (done.wait() if isinstance(done, anyio.Event) else done)
        except anyio.get_cancelled_exc_class():
            self._backend.abandon(job, self.dump_on_cancel)
            raise
        return job.outcome()

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
            self._counters["busy"] += 1
            busy = SupervisorBusy(f"{self.max_pending} calls are already pending")
            if job.span is not None:
                job.span.end(busy)
            raise busy from None
        self._submit(job)
        return PendingCall(job, functools.partial(self._await_job, job))

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
        job = Job(next(self._ids), target, signature, args, timeout, cpu_timeout)
        job.done = self._new_done()
        handler = telemetry.handler_call.get()
        job.span = telemetry.begin_call(
            handler.name if handler is not None else name,
            guest=target.image.path.name,
            sandbox_id=target.id if isinstance(target, SupervisedSandbox) else None,
            target=target.name,
            call_id=job.call_id,
        )
        if handler is not None and job.span is not None:
            handler.span, job.span.held = job.span, True
            telemetry.handler_call.set(None)  # nested calls are their own
        return job

    def _submit(self, job: Job) -> None:
        self._outstanding += 1
        self._backend.submit(job)

    async def _await_job(self, job: Job) -> Value:
        """A :class:`PendingCall`'s wait, which any number of tasks may await:
        a cancelled one leaves the call's future as it is for the others."""
        done = job.done
        assert done is not None
        try:
            if isinstance(done, anyio.Event):
                await done.wait()
            elif done.done():
                await anyio.lowlevel.checkpoint()  # a checkpoint, as Event.wait() makes
            else:
                await asyncio.shield(done)
        except anyio.get_cancelled_exc_class():
            self._backend.abandon(job, self.dump_on_cancel)
            raise
        return job.outcome()

    # ----------------------------------------------------- dumps, operations
    async def generate_crashdump(
        self, target: SupervisedSandbox, directory: str | os.PathLike[str] | None = None
    ) -> Path:
        """Dump a dedicated sandbox now, also while a call runs on it."""
        if not isinstance(target, SupervisedSandbox):
            raise TypeError("generate_crashdump() takes a SupervisedSandbox")
        self._check_open()
        return await self._backend.generate_crashdump(target, directory)

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
        assert self._outbox is not None
        return await run_operation(
            function,
            spawn=self._spawn_operation,
            on_loop=self._outbox.on_loop,
            report=self._report,
            discard=discard,
        )

    def _make_backend(self, front: Front, processes: int, workers: int) -> Backend:
        """The worker host: threads of this process, or worker processes (a
        subclass makes another, as RaySupervisor does). ``front`` is all the
        backend may use of this supervisor."""
        if processes:
            return ProcessBackend(front, processes, workers, self.pin_cpus)
        return ThreadBackend(front, workers, self.pin_cpus)

    def _spawn_operation(self, work: Callable[[], None]) -> None:
        self._backend.spawn_operation(work)

    def _report(self, error: BaseException) -> None:
        """A failure the supervisor survives: logged, counted, published."""
        if self._backend.report(error):
            return
        _logger.error("%s: %s", type(error).__name__, error, exc_info=error)
        self._counters["internal_errors"] += 1
        self._hub.publish(
            ev.SupervisorError,
            sandbox_id=None,
            thread=threading.current_thread().name,
            error=error,
        )

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
        counters = self._counters
        if error is None:
            counters["completed"] += 1
        elif isinstance(error, GuestTimeout):
            counters["timed_out"] += 1
        elif isinstance(error, GuestCancelled) or job.abandoned:
            counters["cancelled"] += 1
        else:
            counters["failed"] += 1
        if isinstance(error, GuestTimeout) and "_lateness" in error.__dict__:
            telemetry.watchdog_late(error.__dict__["_lateness"], error.kind)
        if job.span is not None:
            sandbox_id = job.sandbox.id if job.sandbox is not None else job.sandbox_id
            job.span.end(error, path=job.path, sandbox_id=sandbox_id, cancelled=job.abandoned)
        self._slots.release()
        self._outstanding -= 1
        if self._outstanding == 0 and self._all_done is not None:
            self._all_done.set()
        job.delivered = True
        done = job.done
        assert done is not None
        if isinstance(done, anyio.Event):
            done.set()
        elif not done.done():  # not cancelled with its caller
            done.set_result(None)

    # ------------------------------------------------------------ reporting
    def statistics(self) -> SupervisorStatistics:
        return gather(self.workers, self.processes, self._backend, self._hub)

    def _check_open(self) -> None:
        if self._state != "open":
            raise SupervisorClosed(
                "the supervisor is not running (use `async with Supervisor() as sup`)"
                if self._state == "new"
                else "the supervisor is shut down"
            )

    def __repr__(self) -> str:
        mode = f"{self.processes} processes x " if self.processes else ""
        return f"<Supervisor {self._state}, {mode}{self.workers // max(self.processes, 1)} workers>"
