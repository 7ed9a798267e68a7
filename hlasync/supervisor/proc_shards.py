"""Shard bookkeeping of the process mode, all on the event loop.

A target is split into one :class:`~.proc_handle.Shard` per worker; calls wait
here in one FIFO queue per target and go to a shard with a free sandbox
(:func:`pick`), so a worker only ever receives calls it can start at once
(up to ``Shard.capacity``: a hot pool's worker gets a few per sandbox).
:class:`CallQueue` holds those queues, the requests that wait for a target's
shard to be made again (a dump asked while its worker is replaced), and fails
both when a target loses all its shards.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import anyio

from .. import _telemetry as telemetry
from ..errors import SupervisorClosed
from .jobs import Job
from .messages import Call
from .proc_handle import Finish, Shard
from .targets import Target

__all__ = ["QUEUE_AHEAD_WINDOW", "CallQueue", "pick", "shards_of"]


def shards_of(target: Target) -> list[Shard]:
    """``target``'s shards (none before the process backend made them)."""
    return getattr(target, "_shards", [])


#: Seconds since a shard's last answer within which it may get calls ahead of
#: its free sandboxes (a hot pool's, up to ``Shard.capacity``), in worker
#: processes (``Shard.ahead_window``; a backend with a slower channel sets its
#: own): a shard that has answered nothing for longer is busy with long calls,
#: and a call sent there would wait behind them while another worker's sandbox
#: may come free first. A busy worker holds answers for up to its hold limit
#: (:data:`~.channel.HOLD_LIMIT`) to send them together: the window is this
#: plus that limit.
QUEUE_AHEAD_WINDOW = 0.003


def pick(target: Target) -> Shard | None:
    """The shard of ``target`` for one more call: the one with a free sandbox
    and the fewest calls per sandbox; else, to be queued in its worker (a hot
    pool's), the one with the most room among those that answered a call
    within their ``ahead_window``; None when no shard may take it now."""
    best: Shard | None = None
    ahead: Shard | None = None
    now = 0.0
    for shard in shards_of(target):
        if not (shard.ready and shard.worker.alive and shard.inflight < shard.capacity):
            continue
        size = shard.spec.size
        if shard.inflight < size:
            if best is None or shard.inflight * best.spec.size < best.inflight * size:
                best = shard
        elif best is None:
            now = now or time.monotonic()
            if now - shard.last_answer > shard.ahead_window:
                continue
            if ahead is None or shard.inflight * ahead.capacity < ahead.inflight * shard.capacity:
                ahead = shard
    return best if best is not None else ahead


def send_call(shard: Shard, job: Job) -> None:
    """Send ``job`` to ``shard``'s worker (one of its sandboxes is free). Host
    functions given by reference run there: they get the call's trace context."""
    trace = telemetry.inject(job.span) if shard.spec.references else None
    shard.inflight += 1
    worker = shard.worker
    worker.inflight[job.call_id] = (job, shard)
    job.started_at = time.monotonic()
    slot = worker.take_slot(job.call_id)
    worker.send(
        Call(job.call_id, shard.key, job.name, job.args, job.timeout, job.cpu_timeout, trace, slot)
    )


class CallQueue:
    """Calls waiting for a free sandbox, per target (FIFO within a target;
    targets never compete for the same sandboxes), and requests waiting for a
    target's sandbox. ``finish`` decides the outcome of a call that fails here."""

    def __init__(self, finish: Finish) -> None:
        self._finish = finish
        self._waiting: dict[Target, deque[Job]] = {}
        #: Requests that need a target's sandbox (dumps) while its shard is being
        #: made again: answered where its queued calls are (see sandbox_up).
        self._awaiting_sandbox: dict[Target, list[tuple[anyio.Event, list[BaseException]]]] = {}

    # ----------------------------------------------------------------- calls
    def submit(self, job: Job) -> None:
        """Send ``job`` at once if its target has room and no call waits, else queue it."""
        target = job.target
        queue = self._waiting.get(target)
        if not queue:
            shard = pick(target)
            if shard is not None:
                send_call(shard, job)
                return
            if queue is None:
                queue = self._waiting[target] = deque()
        queue.append(job)

    def requeue(self, jobs: list[Job]) -> None:
        """Put calls that were sent but never started (their worker died) back
        at the front of their targets' queues, in the order they were sent."""
        for job in reversed(jobs):
            self._waiting.setdefault(job.target, deque()).appendleft(job)

    def dispatch(self, target: Target | None = None) -> None:
        """Send waiting calls, oldest first, to shards with a free sandbox (of
        ``target``, or of every target)."""
        targets = [target] if target is not None else list(self._waiting)
        for each in targets:
            queue = self._waiting.get(each)
            while queue:
                shard = pick(each)
                if shard is None:
                    break
                send_call(shard, queue.popleft())
            if queue is not None and not queue:
                del self._waiting[each]

    def withdraw(self, job: Job) -> bool:
        """Take ``job`` out of its queue; False if it is not waiting here."""
        queue = self._waiting.get(job.target)
        if queue is not None and job in queue:
            queue.remove(job)
            return True
        return False

    def has_queue(self, target: Target) -> bool:
        """Whether ``target`` has a queue here (calls wait, or did since the last dispatch)."""
        return target in self._waiting

    def has_waiting(self, target: Target) -> bool:
        """Whether calls of ``target`` wait here."""
        return bool(self._waiting.get(target))

    def pending(self) -> int:
        """How many calls wait here."""
        return sum(len(queue) for queue in self._waiting.values())

    def fail_all(self, error: BaseException) -> None:
        """Every waiting call fails with ``error`` (shutdown)."""
        for queue in list(self._waiting.values()):
            while queue:
                self._finish(queue.popleft(), None, error)
        self._waiting.clear()

    # ---------------------------------------------------- waiting for shards
    async def sandbox_up(self, shard: Shard, closing: Callable[[], bool]) -> None:
        """Return once ``shard``'s sandboxes can be asked for something. While its
        worker is being replaced this waits as a queued call does: until the
        shard is made again, or it fails with the error its queued calls get
        when it cannot be (or the supervisor shuts down: ``closing()``)."""
        target = shard.target
        while True:
            if target._closed:
                raise SupervisorClosed(f"{target.name} is closed")
            if closing():
                raise SupervisorClosed("the supervisor shut down before the sandbox was back")
            if shard.ready and shard.worker.alive:
                return
            waiter: tuple[anyio.Event, list[BaseException]] = (anyio.Event(), [])
            waiters = self._awaiting_sandbox.setdefault(target, [])
            waiters.append(waiter)
            try:
                await waiter[0].wait()
            finally:
                if waiter in waiters:  # cancelled
                    waiters.remove(waiter)
                    if not waiters:
                        self._awaiting_sandbox.pop(target, None)
            if waiter[1]:
                raise waiter[1][0]

    def answer_awaiting(self, target: Target, error: BaseException | None = None) -> None:
        """Wake the requests waiting for ``target``'s sandbox (they look again),
        or fail them with ``error``."""
        for event, outcome in self._awaiting_sandbox.pop(target, []):
            if error is not None:
                outcome.append(error)
            event.set()

    def fail_all_awaiting(self) -> None:
        """Every request waiting for a sandbox fails (shutdown)."""
        for target in list(self._awaiting_sandbox):
            self.answer_awaiting(
                target, SupervisorClosed("the supervisor shut down before the sandbox was back")
            )

    def fail_targets_of(self, shards: list[Shard], error: BaseException) -> None:
        """Targets left with no shard at all fail their waiting calls."""
        for target in {id(s.target): s.target for s in shards}.values():
            if any(s.ready or s.worker.alive for s in shards_of(target) if s not in shards):
                continue
            target._closed = True
            lost = SupervisorClosed(f"{target.name} lost its sandboxes: {error}")
            queue = self._waiting.pop(target, deque())
            while queue:
                self._finish(queue.popleft(), None, lost)
            self.answer_awaiting(target, lost)
