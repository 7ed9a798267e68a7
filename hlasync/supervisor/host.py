"""The worker host: the sandboxes, the vCPU threads that run every call on
them, the scheduler queue, the watchdog, restores and replacements, and the
dumps of hung calls. The supervisor's front (``core.py``) only submits calls
and receives their outcomes through the outbox. The events of outcomes and
dumps are built by :mod:`.outcomes`.

Threads (all joined on shutdown):

- ``hlasync-vcpu-N`` (``workers`` of them) run every guest call (every
  ``KVM_RUN``); the event loop never blocks on a guest.
- ``hlasync-stall`` (made when first needed) wakes an idle worker for calls
  of a hot pool that wait while the worker running them takes none (see
  ``_keep_on_busy_locked``).
- ``hlasync-watchdog`` (:mod:`.watchdog`) notices calls past their limits; the
  host then asks the call to dump itself and stop, without waiting (the
  worker running the call writes the dump), so expiries are handled
  concurrently.
- ``hlasync-op-N`` (one per operation, short-lived) create, dump, replace and
  close sandboxes.

Every thread's loop is guarded: a failure is logged and published as a
:class:`~hlasync.events.SupervisorError` event, and the thread goes on.

Calls wait in one FIFO queue; a worker takes the oldest call whose target
has room (a pool runs at most ``size`` calls, a dedicated sandbox one).

Idle workers wait on a stack, each on a lock of its own: a call wakes the
worker that went idle last (its caches are warm, and a sandbox called from
one thread may stay hot, see :mod:`hlasync.sandbox.hot`), and only when its
target has a free sandbox. A worker that gives a sandbox back takes the next
call itself, with no wake-up; it wakes another only for calls left waiting.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from .. import _telemetry as telemetry
from .. import events as ev
from ..abi import Value
from ..errors import (
    GuestCancelled,
    HlasyncError,
    HostFunctionError,
    SupervisorClosed,
)
from ..sandbox import CrashdumpRecord, Sandbox, SandboxState
from ..sandbox.calls import DumpRequest
from ..sandbox.core import StopResult
from .hub import Publisher
from .jobs import Job, set_current_job
from .outcomes import dump_written, publish_dump, publish_outcome, timeout_error
from .settings import urgent_thread
from .targets import Target
from .watchdog import Watchdog

__all__ = ["STOP_TIMEOUT", "WorkerHost"]

_logger = logging.getLogger("hlasync.supervisor")

#: Seconds shutdown waits, after stopping the calls still running, for the threads.
STOP_TIMEOUT = 2.0
#: A hot pool whose calls take less than this (seconds, a running average)
#: keeps its calls on the workers already busy (see _keep_on_busy_locked).
SHORT_CALL = 0.0005
#: Seconds calls may wait while no worker takes one before an idle worker is
#: woken for them (the busy ones are in long calls).
STALL = 0.005


class WorkerHost:
    """Runs submitted calls on ``workers`` vCPU threads (pinned to ``pin_cpus``
    round robin, if given) and reports every outcome with ``complete(job)``."""

    def __init__(self, workers: int, pin_cpus: Sequence[int] | None, hub: Publisher) -> None:
        self.workers = workers
        self.pin_cpus = tuple(pin_cpus) if pin_cpus is not None else None
        self.hub = hub
        self.lock = threading.Lock()  # scheduler: pending queue, capacities, counters
        #: Idle workers' wake-up locks (held while a worker sleeps on it), the
        #: last one to go idle on top; under ``lock``.
        self._idle: list[threading.Lock] = []
        self.pending: collections.deque[Job] = collections.deque()
        self.running: set[Job] = set()
        self.targets: list[Target] = []
        self.counters: collections.Counter[str] = collections.Counter()
        self.threads: list[threading.Thread] = []
        self.operations: set[threading.Thread] = set()  # hlasync-op-N threads still running
        self._operation_ids = itertools.count(1)
        self.stopping = False
        self.accepting = True  # pools replace members only while the supervisor serves
        self.watchdog = Watchdog(self._expire, self.thread_failed)
        #: The worker that runs the short calls of hot pools now (None: none is
        #: busy with them) and when it last took one (under ``lock``), and the
        #: state of the thread that wakes an idle worker when such calls wait
        #: and the runner took none for STALL seconds (``hlasync-stall``).
        self._runner: int | None = None
        self._runner_took = 0.0
        self._runner_woken = False  # an idle worker was woken to be the runner
        self._runner_job: Job | None = None  # the call the runner took last
        self._skipped = False  # the last _take_locked left a call to the runner
        self._stall_watch = threading.Condition(self.lock)
        self._stall_armed = False
        self._stall_sleeping = False
        self._stall_started = False  # made when first needed
        self._stall_woke = 0.0  # when it last woke a worker
        self._complete: Callable[[Job], None] = lambda job: None
        self._on_loop: Callable[[Callable[[], None]], None] = lambda function: None
        #: Cancels a stopped call's ``async def`` host functions (they run on the
        #: event loop: the front's, or across the channel from a worker process).
        self.cancel_host_calls: Callable[[Job], None] = self._cancel_scopes
        #: Told of each call as a vCPU thread takes it, before its guest runs
        #: (a worker process sets its start mark, see :mod:`.marks`).
        self.on_start: Callable[[Job], None] | None = None
        #: Whether ``finish`` publishes a call's outcome events; a worker
        #: process publishes them itself, in one frame with the outcome.
        self.publishes_outcomes = True

    # ------------------------------------------------------------- lifecycle
    def start(
        self,
        complete: Callable[[Job], None],
        on_loop: Callable[[Callable[[], None]], None],
    ) -> None:
        """Start the threads; ``complete`` receives every finished call and
        ``on_loop`` runs a function on the event loop (both from any thread)."""
        self._complete = complete
        self._on_loop = on_loop
        for index in range(self.workers):
            self._spawn(f"hlasync-vcpu-{index}", self._worker_main, index)
        self._spawn("hlasync-watchdog", self.watchdog.main)

    def _spawn(self, name: str, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self.threads.append(thread)

    def spawn_operation(self, work: Callable[[], None]) -> None:
        """Run ``work`` on a new ``hlasync-op-N`` thread (tracked until it ends)."""

        def run() -> None:
            try:
                work()
            finally:
                self.operations.discard(threading.current_thread())

        thread = threading.Thread(
            target=run, name=f"hlasync-op-{next(self._operation_ids)}", daemon=True
        )
        self.operations.add(thread)
        thread.start()

    def take_all(self) -> tuple[list[Job], list[Job]]:
        """Empty the queue: (the calls that were waiting, the calls running)."""
        with self.lock:
            waiting, self.pending = list(self.pending), collections.deque()
            return waiting, list(self.running)

    def stop_threads(self) -> None:
        """Tell the vCPU threads and the watchdog to end (they finish their call first)."""
        with self.lock:
            self.stopping = True
            self._wake_all_locked()
            self._stall_watch.notify_all()
        self.watchdog.stop()

    def alive(self) -> list[threading.Thread]:
        return [t for t in [*self.threads, *self.operations] if t.is_alive()]

    # -------------------------------------------------------------- targets
    def add_target(self, target: Target, sandboxes: list[Sandbox]) -> None:
        with self.lock:
            target._hot = target.fresh_state and all(
                sb.config.hot_restore and sb.config.spin != 0 for sb in sandboxes
            )
            target._members = list(sandboxes)
            target._free = list(sandboxes)
            self.targets.append(target)

    def detach_if_idle(self, target: Target) -> list[Sandbox] | None:
        """Close ``target`` to new calls and take its sandboxes if none is busy
        and no call for it waits; None when it is still busy."""
        with self.lock:
            busy = len(target._free) < len(target._members) or any(
                job.target is target for job in self.pending
            )
            if busy:
                return None
            target._closed = True
            members, target._free, target._members = target._members, [], []
            if target in self.targets:
                self.targets.remove(target)
            return members

    def close_sandboxes(self, sandboxes: list[Sandbox]) -> None:
        for sandbox in sandboxes:
            self.close_sandbox(sandbox)

    def close_sandbox(self, sandbox: Sandbox, timeout: float = STOP_TIMEOUT) -> None:
        if sandbox.state is SandboxState.CLOSED:
            return
        sandbox.close(timeout=timeout)
        self.hub.publish(ev.SandboxClosed, sandbox_id=sandbox.id)

    def close_all(self, timeout: float) -> None:
        for target in list(self.targets):
            for sandbox in list(target._members):
                self.close_sandbox(sandbox, timeout=timeout)

    # ----------------------------------------------------------------- calls
    def submit(self, job: Job) -> None:
        with self.lock:
            self.pending.append(job)
            # No free sandbox, or hot members about to be free for every call
            # waiting: the workers that give one back take them.
            target = job.target
            if self._idle and target._free and len(self.pending) > target._restoring:
                if self._keep_on_busy_locked(target):
                    self._arm_stall_locked()
                else:
                    if self._short_hot(target):
                        self._runner_woken, self._runner_took = True, time.monotonic()
                    self._idle.pop().release()

    @staticmethod
    def _short_hot(target: Target) -> bool:
        """A hot pool whose calls take less than SHORT_CALL on average."""
        return target._hot and target._call_time < SHORT_CALL

    def _keep_on_busy_locked(self, target: Target) -> bool:
        """Whether a call of ``target`` should wait for the worker that runs
        short hot calls now rather than wake another: one thread calling keeps
        a hot pool's members hot, two calling in turn never do (the hot budget
        lets no sandbox spin while other threads call), and for calls this
        short the GIL they share is the limit anyway. The stall thread wakes
        another worker if the runner stops taking calls (a long one came)."""
        return (self._runner is not None or self._runner_woken) and self._short_hot(target)

    def _arm_stall_locked(self) -> None:
        if not self._stall_armed:
            self._stall_armed = True
            if self._stall_sleeping:
                self._stall_watch.notify()
            elif not self._stall_started and not self.stopping:
                self._stall_started = True
                self._spawn("hlasync-stall", self._stall_main)

    def _stall_main(self) -> None:
        """Wake an idle worker when calls wait and no worker took one for STALL
        seconds; sleeps while nothing waits that way."""
        while True:
            try:
                with self.lock:
                    if not self._stall_step_locked():
                        return
            except Exception as exc:  # noqa: BLE001 - the thread goes on
                self.thread_failed(exc)
                time.sleep(STALL)

    def _stall_step_locked(self) -> bool:
        """One turn of the stall thread (under ``lock``); False when it ends."""
        if self.stopping:
            return False
        if not self._stall_armed:
            self._stall_sleeping = True
            self._stall_watch.wait()
            self._stall_sleeping = False
            return True
        if not self.pending or not self._idle:
            self._stall_armed = False  # taken, or every worker is busy
            return True
        now = time.monotonic()
        due = max(self._runner_took, self._stall_woke) + STALL
        if now < due:
            self._stall_watch.wait(due - now)
            return True
        # The runner is in a long call: its pool's calls count as long now (so
        # the worker woken, and those it wakes, spread them as any), and the
        # worker woken takes over.
        job = self._runner_job
        if job is not None and self._runner is not None:
            ran = now - (job.started_at or self._runner_took)
            job.target._call_time = max(job.target._call_time, ran)
        self._stall_woke = now  # at most one wake-up per STALL
        self._runner, self._runner_woken = None, True
        self._stall_armed = False
        self._idle.pop().release()
        return True

    def _first_startable_locked(self) -> Job | None:
        """The oldest waiting call whose target has a free sandbox now."""
        for job in self.pending:
            if job.target._free:
                return job
        return None

    def _wake_one_locked(self) -> None:
        """Wake the worker that went idle last, if one is idle (under ``lock``)."""
        if self._idle:
            self._idle.pop().release()

    def _wake_all_locked(self) -> None:
        idle, self._idle = self._idle, []
        for wake in idle:
            wake.release()

    def dequeue(self, job: Job) -> bool:
        """Take ``job`` out of the queue if it is still waiting there."""
        with self.lock:
            if job in self.pending:
                self.pending.remove(job)
                return True
        return False

    def stop_job(
        self,
        job: Job,
        dump_reason: str | None = None,
        annotations: Mapping[str, object] | None = None,
    ) -> StopResult | None:
        """Stop a running job's call (and cancel its async host functions); never blocks.
        The stop (and its dump) is asked for first: a cancelled host function
        returns at once, and the call could end before a later stop found it."""
        with job.lock:
            call = job.call
        result = None
        if call is not None and job.sandbox is not None:
            result = job.sandbox._stop(call, dump_reason, annotations=annotations)
        self.cancel_host_calls(job)
        return result

    def _cancel_scopes(self, job: Job) -> None:
        for scope in list(job.host_scopes):
            self._on_loop(scope.cancel)

    def abandon(self, job: Job, dump_reason: str | None) -> None:
        """The caller gave up (cancelled): stop the guest, now, without waiting."""
        if self.dequeue(job):
            job.abandoned = True
            self.finish(
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
        self.stop_job(job, dump_reason)

    def shutdown_begin(self) -> None:
        """Refuse replacements, fail what waits, stop what runs, tell the threads to end."""
        self.accepting = False
        closed = SupervisorClosed("the supervisor shut down before the call ran")
        waiting, running = self.take_all()
        for job in waiting:
            self.finish(job, None, closed)
        for job in running:
            self.stop_job(job)
        self.stop_threads()

    def shutdown_end(self) -> bool:
        """After the threads had their time: fail what is still running, close every
        sandbox. False when a thread is still blocked in a host function."""
        stuck = [t.name for t in self.threads if t.is_alive()]
        if stuck:
            _logger.warning(
                "supervisor shut down with threads still blocked in host functions: %s",
                ", ".join(stuck),
            )
        stopped = SupervisorClosed(
            "the supervisor shut down while the call was blocked in a host function"
        )
        for job in list(self.running):
            self.finish(job, None, stopped)
        self.close_all(timeout=0.0 if stuck else STOP_TIMEOUT)
        return not stuck

    # --------------------------------------------------------------- workers
    def _worker_main(self, index: int) -> None:
        if self.pin_cpus:
            cpu = self.pin_cpus[index % len(self.pin_cpus)]
            os.sched_setaffinity(threading.get_native_id(), {cpu})
        wake = threading.Lock()  # released by whoever wakes this worker
        wake.acquire()
        while True:
            with self.lock:
                job = self._take_locked(index)
                self._runner_woken = False
                if job is None:
                    if self.stopping:
                        return
                    if self._runner == index:
                        self._runner = None
                    elif self._skipped:  # left to the runner: if it stalls, one takes them
                        self._arm_stall_locked()
                    self._idle.append(wake)
                elif self.pending:  # calls left waiting: another worker may take one
                    waiting = self._first_startable_locked()
                    if waiting is None:
                        pass  # none can start: the workers giving sandboxes back take them
                    elif self._keep_on_busy_locked(waiting.target):
                        self._arm_stall_locked()
                    else:
                        self._wake_one_locked()
            if job is None:
                wake.acquire()
                continue
            try:
                self._run(job)
            except BaseException as exc:  # noqa: BLE001 - a worker outlives any failure
                self.thread_failed(exc, job.sandbox)
                self.finish(job, None, exc)

    def thread_failed(self, error: BaseException, sandbox: Sandbox | None = None) -> None:
        """Report a failure in one of the supervisor's threads; the thread goes on."""
        thread = threading.current_thread().name
        _logger.error("%s: %s: %s", thread, type(error).__name__, error, exc_info=error)
        self.count("internal_errors")
        self.hub.publish(
            ev.SupervisorError,
            sandbox_id=sandbox.id if sandbox is not None else None,
            thread=thread,
            error=error,
        )

    def count(self, name: str) -> None:
        with self.lock:
            self.counters[name] += 1

    def _take_locked(self, worker: int) -> Job | None:
        """The oldest pending call whose target has room (FIFO, no head-of-line
        blocking), leaving short hot calls to their runner while it takes them
        (see _keep_on_busy_locked)."""
        now = 0.0
        self._skipped = False
        for position, job in enumerate(self.pending):
            target = job.target
            short_hot = self._short_hot(target)
            if short_hot:
                now = now or time.monotonic()
                runner = self._runner
                if runner is not None and runner != worker and now - self._runner_took < STALL:
                    self._skipped = True
                    continue
            sandbox = target._take_locked(worker)
            if sandbox is not None:
                if short_hot:
                    self._runner, self._runner_took, self._runner_job = worker, now, job
                sandbox._last_worker = worker
                del self.pending[position]
                job.sandbox = sandbox
                self.running.add(job)
                self.counters["started"] += 1
                return job
        return None

    def _run(self, job: Job) -> None:
        sandbox = job.sandbox
        assert sandbox is not None
        if self.on_start is not None:
            self.on_start(job)
        job.started_at = time.monotonic()
        if self.hub.wants(ev.CallStarted):
            self.hub.publish(
                ev.CallStarted,
                sandbox_id=sandbox.id,
                function=job.name,
                call_id=job.call_id,
                queued=job.started_at - job.queued_at,
            )
        job.sandbox_id = sandbox.id
        try:
            call = sandbox._begin_call(job.name, job.span)
        except HlasyncError as exc:  # closed or poisoned under us
            self.finish(job, None, exc)
            self._reset(job.target, sandbox)
            return
        job.path = "exit" if call.hot is None else "doorbell"
        with job.lock:
            job.call = call
            abandoned = job.abandoned
        if abandoned:  # cancelled after it was taken: it stops before any guest code runs
            sandbox._stop(call)
        watched = job.timeout is not None or job.cpu_timeout is not None
        if watched:
            self.watchdog.watch(job)
        set_current_job(job)
        result: Value = None
        error: BaseException | None = None
        try:
            result = sandbox._run_begun(call, job.signature, job.args)
        except (GuestCancelled, HostFunctionError) as exc:
            if job.expired:
                # The dump made as it stopped (its callback may not have run yet).
                job.core_path = job.core_path or exc.core_path
                job.dump_error = job.dump_error or exc.crashdump_error
                error = timeout_error(job)
            else:
                error = exc
        except BaseException as exc:  # noqa: BLE001 - every outcome goes to the caller
            error = exc
        finally:
            set_current_job(None)
            if watched:
                self.watchdog.unwatch(job)
        # The caller hears the outcome before the sandbox is restored for the next
        # call; a hot pool's next call waits for this member rather than take a
        # cold one (counted before the caller can make it).
        target = job.target
        in_place = target.fresh_state and sandbox.config.hot_restore
        if in_place:
            with self.lock:
                target._restoring += 1
        # Its running average (two workers racing here lose a sample at most).
        target._call_time += (time.monotonic() - job.started_at - target._call_time) / 8
        try:
            self.finish(job, result, error)
        finally:
            self._reset(target, sandbox, in_place=in_place)

    def _reset(self, target: Target, sandbox: Sandbox, *, in_place: bool = False) -> None:
        """Make the sandbox ready for its next call and give it back; a sandbox
        that cannot be restored leaves its target (a pool gets a new one).
        ``in_place``: a hot pool's member, counted in ``target._restoring``
        while it is restored in place; a restore that needs the exit path
        lets another worker take the calls that wait first."""
        done = False
        try:
            if in_place:
                try:
                    done = sandbox._restore_hot()
                finally:
                    with self.lock:
                        target._restoring -= 1
                        # Calls that waited for this member: another worker takes
                        # them, unless they are short hot calls (this one stays the
                        # only caller, or no member will spin again).
                        if not done and self.pending:
                            if self._keep_on_busy_locked(target):
                                self._arm_stall_locked()
                            else:
                                self._wake_one_locked()
            if not done and (target.fresh_state or sandbox.state is not SandboxState.READY):
                sandbox.restore()
        except Exception as exc:  # noqa: BLE001 - whatever broke it, it must not be reused
            if not (self.stopping and sandbox.state is SandboxState.CLOSED):
                self.thread_failed(exc, sandbox)
            self._retire(target, sandbox)
            return
        with self.lock:
            # This worker takes the next call itself (see _worker_main): no wake-up.
            target._give_locked(sandbox)

    def _retire(self, target: Target, sandbox: Sandbox) -> None:
        """Take a broken sandbox out of its target, close it and, for a pool,
        start making a replacement. A target left with no sandbox and no
        replacement fails its queued calls instead of starving them."""
        with self.lock:
            if sandbox in target._members:
                target._members.remove(sandbox)
            replace = target._factory is not None and not target._closed and self.accepting
        self.close_sandbox(sandbox, timeout=0.0)
        if replace:
            self.spawn_operation(lambda: self._replace_member(target))
        elif not target._members:
            self._target_lost(target, SupervisorClosed(f"{target.name} has no sandbox left"))

    def _replace_member(self, target: Target) -> None:
        try:
            assert target._factory is not None
            sandbox = target._factory()
        except BaseException as exc:  # noqa: BLE001 - reported; the target shrinks
            self.thread_failed(exc)
            with self.lock:
                empty = not target._members
            if empty:
                lost = SupervisorClosed(f"{target.name} lost its last sandbox: {exc}")
                lost.__cause__ = exc
                self._target_lost(target, lost)
            return
        with self.lock:
            keep = not target._closed and self.accepting
            if keep:
                target._members.append(sandbox)
                target._free.append(sandbox)
                if self.pending:
                    self._wake_one_locked()
        if not keep:
            sandbox.close()
            return
        self.hub.publish(
            ev.SandboxCreated, sandbox_id=sandbox.id, guest=str(target.image.path), pool=target.name
        )

    def _target_lost(self, target: Target, error: SupervisorClosed) -> None:
        """Refuse new calls to ``target`` and fail its queued ones with ``error``."""
        with self.lock:
            target._closed = True
            jobs = [job for job in self.pending if job.target is target]
            for job in jobs:
                self.pending.remove(job)
        for job in jobs:
            self.finish(job, None, error)

    def finish(self, job: Job, result: Value, error: BaseException | None) -> None:
        """Decide the call's outcome (first decision wins) and report it."""
        with job.lock:
            if job.finished:
                return
            job.finished = True
            job.result, job.error = result, error
        self.running.discard(job)  # one atomic set operation: no lock needed
        if self.publishes_outcomes:
            publish_outcome(self.hub, job, error)
        self._complete(job)

    def startable(self) -> bool:
        """Whether a waiting call can start now, or once a member restored in
        place is back (not under ``lock``)."""
        with self.lock:
            return any(job.target._free or job.target._restoring for job in self.pending)

    # -------------------------------------------------------------- expiries
    def _expire(self, job: Job, kind: str) -> None:
        """Ask the hung call to dump itself and stop; never waits for the dump."""
        with job.lock:
            if job.finished or job.expired:
                return
            job.expired = kind
            job.expired_at = time.monotonic()
        telemetry.timed_out(
            kind,
            sandbox_id=job.sandbox_id,
            function=job.span.function if job.span is not None else job.name,
            limit=job.timeout if kind == "wall" else job.cpu_timeout,
            elapsed=job.expired_at - job.started_at,
        )
        reason = "timeout" if kind == "wall" else "cpu-timeout"
        annotate = job.target._stop_annotations
        if annotate is None or job.sandbox is None:
            self._stop_expired(job, reason, None)
            return
        sandbox = job.sandbox

        def annotate_then_stop() -> None:  # a bounded wait: not on the watchdog's thread
            urgent_thread()
            try:
                annotations = annotate(sandbox)
                stack = annotations.get("js_stack")
                job.js_stack = stack if isinstance(stack, str) else None
            except Exception as exc:  # noqa: BLE001 - the stop must happen anyway
                self.thread_failed(exc, sandbox)
                annotations = None
            self._stop_expired(job, reason, annotations)

        threading.Thread(target=annotate_then_stop, name="hlasync-expiry", daemon=True).start()

    def _stop_expired(
        self, job: Job, reason: str, annotations: Mapping[str, object] | None
    ) -> None:
        stop = self.stop_job(job, reason, annotations)
        if stop is None or not stop.stopped:
            return  # ending anyway; the worker reports the outcome
        if stop.dump is not None:
            stop.dump.add_done_callback(lambda request: self._expiry_dumped(job, request))
        elif stop.in_host:
            self.finish(job, None, timeout_error(job))

    def _expiry_dumped(self, job: Job, request: DumpRequest) -> None:
        job.core_path = request.path
        job.dump_error = request.error
        if request.borrowed:
            # Written while the guest was blocked in a host function, which may not return
            # soon: answer the caller now; the sandbox comes back when the function returns.
            self.finish(job, None, timeout_error(job))

    # ----------------------------------------------------------------- dumps
    def on_crashdump(self, record: CrashdumpRecord) -> None:
        """Every dump of every sandbox of this host: counted and published."""
        self.count("dumps_written" if dump_written(record) else "dumps_failed")
        publish_dump(self.hub, record)
