"""Worker deaths in the process mode, and their replacements.

A worker that dies (or ends without being asked to) fails its calls with
:class:`~hlasync.WorkerLost`, publishes :class:`~hlasync.events.WorkerDied`,
and is replaced: a new process with the same index makes its shards again
(dedicated sandboxes start over from their initial state). Each launch of a
worker's process is a generation of it: a launch whose process ends before
its hello, or while it makes the shards again, is over at once (that end is
a death like any other, and the next launch takes over). A target left with
no shard at all fails its waiting calls. Also how a process's end is read
(:func:`reaped`) and told (:func:`describe_status`).
"""

from __future__ import annotations

import logging
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Awaitable, Callable

import anyio

from .. import _telemetry as telemetry
from .. import events as ev
from ..errors import HlasyncError, WorkerLost
from .backend import Front
from .jobs import Job
from .proc_handle import Finish, Shard, WorkerHandle
from .proc_shards import CallQueue
from .targets import SupervisedSandbox

__all__ = ["Relauncher", "describe_status", "reaped"]

_logger = logging.getLogger("hlasync.supervisor")


class Relauncher:
    """Handles the unexpected end of a worker: the process backend's
    ``launch`` (a new process for a worker: its generation, or None when it
    ended before its hello), ``kill`` and ``make_shard`` do the work;
    ``reaped`` forgets what a worker's process held that outlives it (its
    spin board cell), once the process is certainly gone; ``closing()`` is
    true once the supervisor shuts down."""

    def __init__(
        self,
        front: Front,
        queue: CallQueue,
        counters: Counter[str],
        *,
        finish: Finish,
        launch: Callable[[WorkerHandle], Awaitable[int | None]],
        kill: Callable[[WorkerHandle], None],
        make_shard: Callable[[Shard], Awaitable[None]],
        reaped: Callable[[WorkerHandle], None],
        closing: Callable[[], bool],
    ) -> None:
        self._front = front
        self._queue = queue
        self._counters = counters
        self._finish = finish
        self._launch = launch
        self._kill = kill
        self._make_shard = make_shard
        self._reaped = reaped
        self._closing = closing

    async def worker_died(self, worker: WorkerHandle) -> None:
        """An unexpected end: fail its calls, say so, start a new one, remake its shards."""
        status: int | None = None
        if worker.process is not None:
            status = await reaped(worker.process, 5.0)
            if status is None:
                self._kill(worker)
                # Gone before its start marks are read: nothing runs in it then.
                status = await reaped(worker.process, 5.0)
            if status is not None:  # also when no new process can be started
                self._reaped(worker)
        worker.close_channel()
        lost = WorkerLost(
            f"worker process {worker.index} (pid {worker.pid}{worker.where}) ended "
            f"({describe_status(status)}) while the call ran (or waited) there",
            worker=worker.index,
            exit_status=status,
        )
        lost.node = worker.node
        lost_jobs, never_started = _split_unstarted(
            list(worker.inflight.values()), worker.may_have_started
        )
        worker.inflight.clear()
        if self._closing():
            lost_jobs, never_started = lost_jobs + never_started, []
        for job in lost_jobs:
            self._finish(job, None, lost)
        worker.fail_requests(lost)
        shards = list(worker.shards.values())
        for shard in shards:
            shard.ready = False
            shard.inflight = 0
        _logger.error(
            "%s",
            lost,
            extra={
                telemetry.ATTR_WORKER: worker.index,
                telemetry.ATTR_EXIT_STATUS: status,
                "hlasync.pid": worker.pid,
                "hlasync.node": worker.node,
                "hlasync.lost_calls": len(lost_jobs),
            },
        )
        self._front.events.publish(
            ev.WorkerDied,
            sandbox_id=None,
            node=worker.node,
            worker=worker.index,
            pid=worker.pid,
            exit_status=status,
            lost_calls=len(lost_jobs),
        )
        self._counters["workers_lost"] += 1
        if never_started:  # to the other workers' shards, or to this one's when it is back
            self._queue.requeue(never_started)
            self._queue.dispatch()
        if self._closing():
            return
        try:
            generation = await self._launch(worker)
        except HlasyncError as exc:
            self._front.report(exc)
            self._queue.fail_targets_of(shards, exc)
            return
        if generation is None:
            return  # it ended before its hello: that death makes the shards again
        await self._remake(worker, generation, shards)

    async def _remake(self, worker: WorkerHandle, generation: int, shards: list[Shard]) -> None:
        """Launch ``generation`` of ``worker`` said hello: it makes ``shards`` again."""

        def over() -> bool:
            """The new process died in turn (its death makes the shards again),
            or the supervisor is shutting down."""
            return self._closing() or not worker.serves(generation)

        telemetry.worker_restarted(worker.index)
        self._front.events.publish(
            ev.WorkerStarted,
            sandbox_id=None,
            node=worker.node,
            worker=worker.index,
            pid=worker.pid,
        )
        for shard in shards:
            if over():
                return
            try:
                await self._make_shard(shard)
            except Exception as exc:  # noqa: BLE001 - reported; that target loses the shard
                if over():
                    return
                self._front.report(exc)
                self._queue.fail_targets_of([shard], exc)
                continue
            for sandbox_id in shard.sandbox_ids:
                self._front.events.publish(
                    ev.SandboxCreated,
                    sandbox_id=sandbox_id,
                    node=worker.node,
                    guest=str(shard.target.image.path),
                    pool=None if isinstance(shard.target, SupervisedSandbox) else shard.target.name,
                )
            if isinstance(shard.target, SupervisedSandbox):
                shard.target.id = shard.target.name = shard.sandbox_ids[0]
            self._queue.answer_awaiting(shard.target)
        self._queue.dispatch()


def _split_unstarted(
    inflight: list[tuple[Job, Shard]], started: Callable[[int], bool | None]
) -> tuple[list[Job], list[Job]]:
    """A dead worker's calls, in the order they were sent: those that may have
    started (they fail with WorkerLost) and those that cannot have.
    ``started(call_id)`` reads the worker's start marks (:mod:`.marks`). A
    worker without marks (a Ray actor) never holds an outcome back: it starts
    a shard's calls in the order they came and runs at most one per sandbox,
    so of a shard's unanswered calls only the first ``size`` may have run; the
    others waited in the worker (a hot pool's calls sent ahead). A cancelled
    call is not sent again, nor one sent again before: whatever killed its
    worker may have come with it (arguments the worker cannot read end it),
    and a worker dies for it once more at most."""
    may_have_run: list[Job] = []
    never_started: list[Job] = []
    seen: dict[Shard, int] = {}
    for job, shard in inflight:
        shard.inflight -= 1
        seen[shard] = seen.get(shard, 0) + 1
        marked = started(job.call_id)
        if marked is None:
            marked = seen[shard] <= shard.spec.size
        if marked or job.abandoned or job.resent:
            may_have_run.append(job)
        else:
            job.resent += 1
            never_started.append(job)
    return may_have_run, never_started


async def reaped(process: subprocess.Popen[bytes], timeout: float) -> int | None:
    """``process``'s exit status once it has ended (None after ``timeout``);
    polled, so no thread waits."""
    deadline = time.monotonic() + timeout
    while True:
        status = process.poll()
        if status is not None or time.monotonic() >= deadline:
            return status
        await anyio.sleep(0.005)


def describe_status(status: int | None) -> str:
    """A process's end in words: its exit status, or the signal that killed it."""
    if status is None:
        return "exit status unknown"
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exit status {status}"
