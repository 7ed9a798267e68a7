"""The process mode (``Supervisor(processes=N)``): sandboxes live in N worker
processes (:mod:`.worker`), each with its own vCPU threads, watchdog and dump
writing, so the per-call Python work of different workers runs under
different GILs.

The supervisor's side, all on the event loop, is :class:`ProcessBackend`,
made of these parts:

- :mod:`.proc_handle`: a worker process as seen from here (``WorkerHandle``)
  and the sending side of its channel; a target's part in one worker (``Shard``).
- :mod:`.proc_shards`: a target is split into one shard per worker (a pool
  of 4 over 2 processes: 2 + 2); calls wait in one FIFO queue per target and
  go to a shard with a free sandbox, so a worker only ever receives calls it
  can start at once (a hot pool's worker gets a few more: ``HOT_QUEUE_DEPTH``).
- :mod:`.proc_dispatch`: the reading side: each worker's channel is read by a
  task of the loop itself, and every message is dispatched (the base class
  of ``ProcessBackend``).
- :mod:`.proc_hostcalls`: host functions run here for the workers' guests,
  and their output.
- :mod:`.proc_relaunch`: a worker that dies is replaced and remakes its shards.

This module holds the backend itself: starting worker processes (and
stopping them), making and closing targets, dumps, submitting and abandoning
calls, and the counts the front's statistics read.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from .. import events as ev
from ..errors import GuestCancelled, SupervisorClosed, SupervisorError
from ..guest.image import GuestImage
from .backend import Front
from .host import STOP_TIMEOUT
from .jobs import Job
from .loop import Outbox
from .marks import StartMarks
from .messages import (
    Abandon,
    Close,
    Closed,
    Create,
    Created,
    CreateFailed,
    Dump,
    DumpDone,
    Init,
    Interest,
    Register,
    Shutdown,
)
from .proc_dispatch import DUMP_EVENTS, WorkerMessages
from .proc_handle import Shard, WorkerHandle
from .proc_hostcalls import HOST_THREADS, HostCalls
from .proc_relaunch import Relauncher, describe_status, reaped
from .proc_shards import QUEUE_AHEAD_WINDOW, CallQueue, shards_of
from .settings import hold_limit, worker_policy
from .specs import HostKey, TargetSpec
from .spinboard import SpinBoard
from .targets import Pool, SupervisedSandbox, Target

__all__ = ["HOST_THREADS", "HOT_QUEUE_DEPTH", "START_TIMEOUT", "ProcessBackend"]

_logger = logging.getLogger("hlasync.supervisor")

#: Calls sent ahead per member of a hot pool (see ProcessBackend.hot_queue_depth);
#: measured on the 2-CPU project machine, 1 worker process, hot pool of 2, 32
#: tasks: 4,238 calls/s at 1, 5,382 at 2, 5,562 at 4, 6,992 at 8 (one run).
HOT_QUEUE_DEPTH = 4
#: Seconds a new worker process may take to start and say hello.
START_TIMEOUT = 30.0
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


class ProcessBackend(WorkerMessages):
    """Sandboxes in worker processes (a :class:`.backend.Backend`)."""

    #: Calls in flight per sandbox of a worker (1: a call is sent when a sandbox
    #: is free; more queue in the worker, for channels with a long round trip).
    queue_depth = 1
    #: The same for a hot pool's members (SandboxConfig.hot_restore): a call and
    #: its restore in place take less time than the channel's round trip, so with
    #: one call per member the worker would wait for the next call after each.
    hot_queue_depth = HOT_QUEUE_DEPTH
    #: Seconds after a shard's last answer within which it may get calls beyond
    #: its free sandboxes (see proc_shards.pick).
    queue_ahead_window = QUEUE_AHEAD_WINDOW
    #: Whether its workers hold outcomes (they need start marks: local processes).
    holds = True
    uses_tasks = True

    def __init__(
        self,
        front: Front,
        processes: int,
        workers: int,
        pin_cpus: tuple[int, ...] | None,
    ) -> None:
        self._front = front
        self.processes = processes
        self.workers_per_process = workers
        self.workers = processes * workers
        self._pin_cpus = pin_cpus
        self._workers = [
            WorkerHandle(index, self._later_on_loop, self._finish) for index in range(processes)
        ]
        self._queue = CallQueue(self._finish)
        self._targets: list[Target] = []
        self._reply_ids = itertools.count(1)
        self._shard_ids = itertools.count(1)
        self.counters: Counter[str] = Counter()
        self._outbox: Outbox | None = None
        self._group: anyio.abc.TaskGroup | None = None
        #: The cancel scopes of its tasks (see _spawn).
        self._task_scopes: set[anyio.CancelScope] = set()
        self._tasks_stopped = False
        self._closing = False
        #: Seconds its workers may hold an outcome to send it with others
        #: (HLASYNC_HOLD_LIMIT, read once: every launch gets the same).
        self._hold_limit = hold_limit() if self.holds else 0.0
        #: The scheduling policy of its local worker processes (HLASYNC_WORKER_SCHED, read once).
        self._policy = worker_policy() if self.holds else "other"
        #: The spin slots its local worker processes share (made at the first launch).
        self.board: SpinBoard | None = None
        #: Targets being closed: a second close waits for the first.
        self._closing_targets: dict[Target, anyio.Event] = {}
        self._hosts = HostCalls(front.events)
        self._relauncher = Relauncher(
            front,
            self._queue,
            self.counters,
            finish=self._finish,
            launch=self._launch,
            kill=self._kill,
            make_shard=self._make_shard,
            reaped=self._forget_spinning,
            closing=lambda: self._closing,
        )

    # ------------------------------------------------------------- lifecycle
    def spawn_operation(self, work: Callable[[], None]) -> None:
        threading.Thread(target=work, name="hlasync-op", daemon=True).start()

    def report(self, error: BaseException) -> bool:
        return False  # the front logs, counts and publishes it

    async def start(self, outbox: Outbox, group: anyio.abc.TaskGroup | None) -> None:
        assert group is not None  # uses_tasks: the front made it
        self._outbox = outbox
        self._hosts.outbox = outbox
        self._group = group
        self._front.on_interest_change(self._interest_changed)
        try:
            await _all(self._launch_first, self._workers)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.shutdown()
            raise

    def _on_loop(self, function: Callable[[], None]) -> None:
        assert self._outbox is not None
        self._outbox.on_loop(function)

    def _later_on_loop(self, function: Callable[[], None]) -> None:
        """Where a worker's channel flushes: sends are queued on the loop, and
        the flush runs there after the tasks ready now, without a wake-up of
        the loop through its pipe (one system call less per frame)."""
        assert self._outbox is not None
        self._outbox.later_on_loop(function)

    def _spawn(self, function: Callable[..., Any], *args: Any) -> None:
        """Run ``function(*args)`` as a task of the supervisor; a failure is
        reported, never raised into the caller's task."""

        async def guarded() -> None:
            # Shielded from the scopes around the supervisor: the channels are
            # read until it shuts down (stop_tasks), also when the code that
            # entered it is cancelled first (a shielded call there would
            # otherwise never get its outcome).
            with anyio.CancelScope(shield=True) as scope:
                if self._tasks_stopped:  # started after stop_tasks: it never runs
                    scope.cancel()
                self._task_scopes.add(scope)
                try:
                    await function(*args)
                except anyio.get_cancelled_exc_class():
                    raise
                except Exception as exc:  # noqa: BLE001 - reported; the supervisor goes on
                    self._front.report(exc)
                finally:
                    self._task_scopes.discard(scope)

        assert self._group is not None
        self._group.start_soon(guarded)

    def stop_tasks(self) -> None:
        self._tasks_stopped = True
        for scope in list(self._task_scopes):
            scope.cancel()

    async def _start_worker(self, worker: WorkerHandle) -> socket.socket:
        """Start ``worker``'s process (``worker.process``, ``worker.pid``); the
        supervisor's end of its channel."""
        env = dict(os.environ)
        paths = [_PACKAGE_ROOT, *env.get("PYTHONPATH", "").split(os.pathsep)]
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        try:
            if self.board is None:
                self.board = SpinBoard.create(len(self._workers))
            marks = StartMarks.create()
        except OSError as exc:
            raise SupervisorError(f"cannot start worker process {worker.index}: {exc}") from exc
        board = self.board
        board.clear(worker.index)  # what a dead process of this worker still counted
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "hlasync.supervisor.worker",
                    str(child.fileno()),
                    str(marks.fd),
                    repr(self._hold_limit),
                    str(board.fd),
                    str(worker.index),
                    self._policy,
                ],
                pass_fds=[child.fileno(), marks.fd, board.fd],
                env=env,
                close_fds=True,
            )
        except OSError as exc:
            parent.close()
            marks.close()
            raise SupervisorError(f"cannot start worker process {worker.index}: {exc}") from exc
        finally:
            child.close()
        worker.process, worker.pid = process, process.pid
        worker.use_marks(marks)
        return parent

    async def _launch_first(self, worker: WorkerHandle) -> None:
        if await self._launch(worker) is None:
            status = worker.process.poll() if worker.process is not None else None
            raise SupervisorError(
                f"worker process {worker.index} (pid {worker.pid}{worker.where}) ended "
                f"({describe_status(status)}) before it started"
            )

    async def _launch(self, worker: WorkerHandle) -> int | None:
        """Start a new process for ``worker`` and wait (bounded) for its hello:
        this launch's generation once it said hello, None when the process ended
        first (that end is a death like any other, reported and followed by a
        launch of its own: this one is over)."""
        parent = await self._start_worker(worker)
        parent.setblocking(False)
        generation = worker.open(parent)
        ready, gone = worker.ready, worker.gone
        self._spawn(self._reader, worker)
        self._spawn(worker.writer, generation)
        pins = None
        if self._pin_cpus:
            per = self.workers_per_process
            pins = [
                self._pin_cpus[(worker.index * per + t) % len(self._pin_cpus)] for t in range(per)
            ]
        worker.send(
            Init(
                workers=self.workers_per_process,
                pin_cpus=pins,
                sys_path=[p for p in sys.path if p],
                interest=self._interest(),
            ),
        )
        with anyio.move_on_after(START_TIMEOUT):
            await _either(ready, gone)
        if gone.is_set():
            return None
        if not ready.is_set():
            self._kill(worker)
            raise SupervisorError(
                f"worker process {worker.index} (pid {worker.pid}{worker.where}) did not start "
                f"within {START_TIMEOUT:.0f} s"
            )
        return generation

    def _forget_spinning(self, worker: WorkerHandle) -> None:
        """``worker``'s process is gone: the spin slots and hot sandboxes it
        counted in the board are no one's (cleared before its next process
        starts too; here also when none can start)."""
        if self.board is not None:
            self.board.clear(worker.index)

    def _kill(self, worker: WorkerHandle) -> None:
        if worker.process is not None and worker.process.poll() is None:
            worker.process.kill()

    async def shutdown(self) -> None:
        """Fail what waits here, ask every worker to stop (their running calls end
        with GuestCancelled), wait for them (bounded), kill stragglers."""
        self._closing = True
        self._queue.fail_all(SupervisorClosed("the supervisor shut down before the call ran"))
        self._queue.fail_all_awaiting()
        for worker in self._workers:
            if worker.alive:
                worker.leaving = True
                worker.send(Shutdown())
        with anyio.move_on_after(STOP_TIMEOUT + 3.0):
            for worker in self._workers:
                if worker.alive:
                    await worker.gone.wait()
        stopped = SupervisorClosed("the supervisor shut down while the call ran")
        for worker in self._workers:
            self._kill(worker)
            if worker.process is not None and await reaped(worker.process, 5.0) is None:
                _logger.warning("worker process %s did not exit", worker.pid)
            for job, shard in list(worker.inflight.values()):
                shard.inflight -= 1
                self._finish(job, None, stopped)
            worker.inflight.clear()
            worker.use_marks(None)
            worker.close_channel()
            worker.fail_requests(stopped)
        if self.board is not None:
            self.board.close()
            self.board = None
        # Idle host threads end now; one stuck in a host function is left behind.
        self._hosts.shutdown()
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline and any(
            t.name.startswith("hlasync-host") and t.is_alive() for t in threading.enumerate()
        ):
            await anyio.sleep(0.005)

    # -------------------------------------------------------------- targets
    async def create(
        self,
        target: Target,
        spec: TargetSpec,
        image: GuestImage,
        callables: dict[HostKey, Callable[..., Any]],
        output: Callable[..., None] | None,
    ) -> None:
        """Make ``target``'s shards, one per worker (fewer for a small pool)."""
        del image  # each worker loads the guest itself
        live = [w for w in self._workers if w.alive]
        if not live:
            raise SupervisorClosed("no worker process is running")
        count = 1 if spec.kind == "sandbox" else min(spec.size, len(live))
        depth = self.hot_queue_depth if spec.hot_pool else self.queue_depth
        # Spread targets: start with the worker holding the fewest sandboxes.
        live.sort(key=lambda w: sum(s.capacity for s in w.shards.values()))
        shards: list[Shard] = []
        for position in range(count):
            size = spec.size // count + (1 if position < spec.size % count else 0)
            key = f"{spec.name}#{next(self._shard_ids)}"
            shard_spec = dataclasses.replace(spec, name=key, size=size)
            ahead = self.queue_ahead_window + self._hold_limit  # its answers may be held
            shard = Shard(target, live[position], key, shard_spec, depth, ahead)
            shards.append(shard)
        for shard in shards:
            self._hosts.add(shard.key, callables, output)
        target._shards = shards  # type: ignore[attr-defined]
        try:
            await _all(self._make_shard, shards)
        except BaseException:
            for shard in shards:
                if shard.ready:
                    shard.worker.send(Close(shard.key))
                shard.worker.shards.pop(shard.key, None)
            raise
        self._targets.append(target)
        ids = [sandbox_id for shard in shards for sandbox_id in shard.sandbox_ids]
        if isinstance(target, SupervisedSandbox):
            target.id = target.name = ids[0]
        self._front.announce(target, ids)

    async def _make_shard(self, shard: Shard) -> None:
        worker = shard.worker
        worker.shards[shard.key] = shard
        reply = await worker.request(Create(shard.key, shard.spec), (Created, shard.key))
        match reply:
            case Created(sandbox_ids=sandbox_ids):
                shard.sandbox_ids = list(sandbox_ids)
                shard.ready = True
            case CreateFailed(error=error):
                worker.shards.pop(shard.key, None)
                raise error
            case _:
                raise SupervisorError(f"{reply!r} does not answer {shard.key}'s creation")

    def register_host_function(
        self, target: Target, name: str, function: Callable[..., Any]
    ) -> None:
        for shard in shards_of(target):
            self._hosts.register(shard.key, name, function)
            shard.worker.send(Register(shard.key, name))

    def sandbox_ids(self, target: Target) -> list[str]:
        return [sandbox_id for shard in shards_of(target) for sandbox_id in shard.sandbox_ids]

    def nodes_of(self, target: Target) -> dict[str, str | None]:
        """The Ray node of each of the target's sandboxes (hlasync.ray)."""
        return {
            sandbox_id: shard.worker.node
            for shard in shards_of(target)
            for sandbox_id in shard.sandbox_ids
        }

    async def close_target(self, target: Target) -> None:
        """Close a target once its calls are done (waiting is cancellable). A
        close of a target that is being closed waits for that one: one request
        per target, and each answer has one waiter."""
        closing = self._closing_targets.get(target)
        if closing is not None:
            await closing.wait()
            return
        closing = self._closing_targets[target] = anyio.Event()
        try:
            await self._close_target(target)
        finally:
            del self._closing_targets[target]  # a later close finds it closed
            closing.set()

    async def _close_target(self, target: Target) -> None:
        while self._queue.has_waiting(target) or any(s.inflight for s in shards_of(target)):
            await anyio.sleep(0.005)
        target._closed = True
        if target in self._targets:
            self._targets.remove(target)
        with anyio.CancelScope(shield=True):
            for shard in shards_of(target):
                worker = shard.worker
                worker.shards.pop(shard.key, None)
                if worker.alive:
                    await worker.request(Close(shard.key), (Closed, shard.key))
                self._hosts.remove(shard.key)
                for sandbox_id in shard.sandbox_ids:
                    self._front.events.publish(ev.SandboxClosed, sandbox_id=sandbox_id)
        self._queue.answer_awaiting(target, SupervisorClosed(f"{target.name} is closed"))

    async def generate_crashdump(
        self, target: SupervisedSandbox, directory: str | os.PathLike[str] | None
    ) -> Path:
        (shard,) = shards_of(target)
        await self._queue.sandbox_up(shard, lambda: self._closing)
        reply_id = next(self._reply_ids)
        where = None if directory is None else os.fspath(directory)
        reply = await shard.worker.request(Dump(reply_id, shard.key, where), (DumpDone, reply_id))
        match reply:
            case DumpDone(error=None, path=str(path)):
                return Path(path)
            case DumpDone(error=BaseException() as error):
                raise error
            case _:
                raise SupervisorError(f"{reply!r} does not answer a dump of {shard.key}")

    # ----------------------------------------------------------------- calls
    def submit(self, job: Job) -> None:
        self._queue.submit(job)

    def abandon(self, job: Job, dump_on_cancel: bool) -> None:
        if self._queue.withdraw(job):
            job.abandoned = True
            error = GuestCancelled(
                "call cancelled while queued", sandbox_id=job.target.name, function=job.name
            )
            self._finish(job, None, error)
            return
        job.abandoned = True
        for worker in self._workers:
            if job.call_id in worker.inflight:
                worker.send(Abandon(job.call_id, dump_on_cancel))
                self._hosts.cancel(job.call_id)

    def _call_done(self, job: Job, result: Any, error: BaseException | None) -> None:
        """A worker's outcome of ``job`` (its sandbox is free again)."""
        self._finish(job, result, error)

    def _finish(self, job: Job, result: Any, error: BaseException | None) -> None:
        self._hosts.forget(job.call_id)
        if job.finished:
            return
        job.finished = True
        job.result, job.error = result, error
        self._front.job_done(job)

    # -------------------------------------------------------- worker deaths
    async def _worker_died(self, worker: WorkerHandle) -> None:
        """An unexpected end: fail its calls, say so, start a new one, remake its shards."""
        await self._relauncher.worker_died(worker)

    # ------------------------------------------------------------ reporting
    def _interest_changed(self) -> None:
        names = self._interest()
        for worker in self._workers:
            if worker.alive:
                worker.send(Interest(names))

    def _interest(self) -> list[str]:
        """The events workers send: the subscribers', and every dump's (counted
        here in the dump metrics, see WorkerMessages._published)."""
        return sorted({*self._front.interest(), *DUMP_EVENTS})

    def counts(self) -> dict[str, int]:
        # A hot pool's worker holds calls sent ahead of its free sandboxes: they
        # wait there (pending), at most one per sandbox runs.
        running = waiting = 0
        for worker in self._workers:
            for shard in worker.shards.values():
                running += min(shard.inflight, shard.spec.size)
                waiting += max(shard.inflight - shard.spec.size, 0)
        return {
            "pending": self._queue.pending() + waiting,
            "running": running,
            "sandboxes": sum(s.spec.size for t in self._targets for s in shards_of(t) if s.ready),
        }

    def pool_loads(self) -> list[tuple[str, int, int]]:
        loads = []
        for target in list(self._targets):
            if isinstance(target, Pool):
                shards = [s for s in shards_of(target) if s.ready]
                size = sum(s.spec.size for s in shards)
                busy = sum(min(s.inflight, s.spec.size) for s in shards)
                loads.append((target.name, size, busy))
        return loads

    def remote_sandboxes(self) -> int:
        return self.counts()["sandboxes"]

    def worker_counters(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for worker in self._workers:
            total.update(worker.counters)
        return total


async def _all(function: Callable[[Any], Any], items: list[Any]) -> None:
    """``await function(item)`` for every item side by side; the first failure
    is raised as itself (not in an exception group) once all have ended."""
    errors: list[BaseException] = []

    async def one(item: Any) -> None:
        try:
            await function(item)
        except Exception as exc:  # noqa: BLE001 - raised below, after the others end
            errors.append(exc)

    async with anyio.create_task_group() as group:
        for item in items:
            group.start_soon(one, item)
    if errors:
        raise errors[0]


async def _either(first: anyio.Event, second: anyio.Event) -> None:
    """Wait until ``first`` or ``second`` is set."""
    async with anyio.create_task_group() as group:

        async def wait(event: anyio.Event) -> None:
            await event.wait()
            group.cancel_scope.cancel()

        group.start_soon(wait, first)
        group.start_soon(wait, second)
