"""The process mode's view of one worker process, and of one worker's part
of a target.

:class:`WorkerHandle` holds what the supervisor knows of a worker process
(its process, its launch generation, its calls in flight, its shards) and
owns the sending side of its channel: messages queued on the loop and written
in batches (one frame per loop iteration), the writer task that finishes what
the socket did not take at once, and requests that wait for the worker's
answer. :class:`Shard` is one worker's part of a target. The reading side is
:mod:`.proc_dispatch`'s.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable
from typing import Any

import anyio

from ..errors import SupervisorError
from .channel import encode
from .jobs import Job
from .marks import StartMarks
from .messages import Call, HostReply, Message, ToSupervisor, ToWorker
from .specs import TargetSpec
from .targets import Target

__all__ = ["Answer", "Finish", "Shard", "WorkerHandle"]

#: What a request to a worker waits for: the answer's class, the request's identity.
Answer = tuple[type[Message], int | str]
#: Decides a call's outcome (result, error) and tells the front.
Finish = Callable[[Job, Any, BaseException | None], None]


class Shard:
    """One worker's part of a target."""

    __slots__ = (
        "ahead_window",
        "capacity",
        "inflight",
        "key",
        "last_answer",
        "ready",
        "sandbox_ids",
        "spec",
        "target",
        "worker",
    )

    def __init__(
        self,
        target: Target,
        worker: WorkerHandle,
        key: str,
        spec: TargetSpec,
        depth: int = 1,
        ahead_window: float = 0.0,
    ) -> None:
        self.target = target
        self.worker = worker
        self.key = key
        self.spec = spec
        #: Calls sent to the worker at once: ``depth`` per sandbox (the others
        #: queue there, so results come back while the next calls are on the way).
        self.capacity = spec.size * depth
        self.inflight = 0
        #: When its worker last answered one of its calls (time.monotonic()), and
        #: for how long after that it may get calls beyond its free sandboxes
        #: (see proc_shards.pick).
        self.last_answer = 0.0
        self.ahead_window = ahead_window
        self.ready = False
        self.sandbox_ids: list[str] = []


class WorkerHandle:
    """One worker process and its channel, seen from the supervisor.

    ``on_loop`` runs a function on the event loop soon (the flush of what was
    queued); ``finish`` fails a call whose message cannot be sent.
    """

    def __init__(
        self, index: int, on_loop: Callable[[Callable[[], None]], None], finish: Finish
    ) -> None:
        self.index = index
        self._on_loop = on_loop
        self._finish = finish
        self.process: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self.pid = 0
        self.ready = anyio.Event()
        self.alive = False
        self.leaving = False  # asked to shut down: its end is expected
        #: Counts the launches of a process for this index. The next launch
        #: starts only once the channel of the one before has ended.
        self.generation = 0
        self.gone = anyio.Event()
        self.outgoing: list[ToWorker] = []
        self.unsent = bytearray()
        self.flush_scheduled = False
        self.writable = anyio.Event()
        self.inflight: dict[int, tuple[Job, Shard]] = {}
        self.shards: dict[str, Shard] = {}
        #: Requests waiting for their answer, by the answer's class and the
        #: request's identity; the outcome is the answer, or why there is none.
        self.waiting: dict[Answer, tuple[anyio.Event, list[ToSupervisor | BaseException]]] = {}
        self.counters: dict[str, int] = {}
        #: Its process's start marks (:mod:`.marks`; None for a worker that has
        #: none, a Ray actor), and the slot of each call in ``inflight``.
        self.marks: StartMarks | None = None
        self.slots: dict[int, int] = {}
        #: The Ray node it runs on (hlasync.ray), and how messages name it.
        self.node: str | None = None
        self.where = ""
        #: Stops the loop's watch of ``sock`` (set while a reader callback
        #: reads it, asyncio): called before the socket closes, so that the
        #: selector never keeps a closed descriptor whose number comes back.
        self.unwatch: Callable[[], None] | None = None

    def close_channel(self) -> None:
        """Close the channel's socket (its reader ends; the loop stops watching it first)."""
        if self.unwatch is not None:
            self.unwatch()
        if self.sock is not None:
            notify = getattr(anyio, "notify_closing", None)  # anyio >= 4.7
            if notify is not None:
                notify(self.sock)  # a task in wait_readable/wait_writable (trio) wakes
            self.sock.close()
            self.sock = None

    def serves(self, generation: int) -> bool:
        """Whether launch ``generation`` is this worker's process now, its channel open."""
        return self.generation == generation and self.alive

    def open(self, sock: socket.socket) -> int:
        """A new launch's channel is ``sock``: its generation (the state of the
        launch before is dropped)."""
        self.generation += 1
        generation = self.generation
        self.sock = sock
        self.ready, self.gone = anyio.Event(), anyio.Event()
        self.alive, self.leaving = True, False
        self.outgoing, self.unsent, self.flush_scheduled = [], bytearray(), False
        self.writable = anyio.Event()
        self.slots = {}
        return generation

    # ---------------------------------------------------------- start marks
    def use_marks(self, marks: StartMarks | None) -> None:
        """The start marks of the process being launched (those of the one
        before, read when it died, are closed)."""
        if self.marks is not None:
            self.marks.close()
        self.marks = marks
        self.slots = {}

    def take_slot(self, call_id: int) -> int:
        """The start-mark slot of a call about to be sent (-1: none)."""
        marks = self.marks
        if marks is None:
            return -1
        slot = self.slots[call_id] = marks.take()
        return slot

    def give_back_slot(self, call_id: int) -> None:
        """The call was answered (or never sent): its slot serves another."""
        slot = self.slots.pop(call_id, None)
        if slot is not None and self.marks is not None:
            self.marks.give_back(slot)

    def may_have_started(self, call_id: int) -> bool | None:
        """After the process died: whether the call may have started (or killed
        it, see :meth:`.StartMarks.may_have_run`); None when this worker has no
        marks."""
        if self.marks is None:
            return None
        return self.marks.may_have_run(self.slots.get(call_id, -1))

    # ------------------------------------------------------------- sending
    def send(self, message: ToWorker) -> None:
        """Queue ``message`` (on the loop); one frame per loop iteration."""
        self.outgoing.append(message)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self._on_loop(self.flush)

    def flush(self) -> None:
        self.flush_scheduled = False
        if not self.outgoing or self.sock is None:
            return
        batch, self.outgoing = self.outgoing, []
        try:
            self.unsent += encode(batch)
        except Exception as exc:  # noqa: BLE001 - a value that does not pickle
            self._unsendable(batch, exc)
            return
        self.write()

    def write(self) -> None:
        sock = self.sock
        while self.unsent and sock is not None:
            try:
                sent = sock.send(self.unsent)
            except BlockingIOError:
                self.writable.set()  # the writer task waits until it can go on
                return
            except OSError:
                self.unsent.clear()  # the reader notices the end
                return
            del self.unsent[:sent]

    async def writer(self, generation: int) -> None:
        """Writes what the socket of launch ``generation`` did not take at once;
        ends with that launch's channel."""
        try:
            while self.serves(generation):
                await self.writable.wait()
                if not self.serves(generation) or self.sock is None:
                    return  # its channel ended: a later launch has a writer of its own
                self.writable = anyio.Event()
                await anyio.wait_writable(self.sock)
                self.write()
        except (OSError, ValueError, anyio.ClosedResourceError):
            return  # the socket closed under us: the reader reports it

    def _unsendable(self, batch: list[ToWorker], exc: Exception) -> None:
        """One message in ``batch`` does not pickle: send the others, fail its call."""
        for message in batch:
            try:
                self.unsent += encode([message])
            except Exception:  # noqa: BLE001 - this one
                match message:
                    case Call(call_id=call_id):
                        found = self.inflight.pop(call_id, None)
                        self.give_back_slot(call_id)
                        if found is not None:
                            job, shard = found
                            shard.inflight -= 1
                            self._finish(
                                job,
                                None,
                                SupervisorError(f"the call's arguments cannot be sent: {exc}"),
                            )
                    case HostReply(reply_id=reply_id):
                        error = TypeError(f"the host function's result cannot be sent: {exc}")
                        self.unsent += encode([HostReply(reply_id, False, error)])
        self.write()

    # ------------------------------------------------------------ requests
    async def request(self, message: ToWorker, answer: Answer) -> ToSupervisor:
        """Send ``message`` and wait for the worker's answer ``answer`` (its
        class and the request's identity); raises what fails the request (a
        cancelled wait leaves the answer unclaimed: a shard made for nobody is
        closed when it arrives)."""
        if answer in self.waiting:  # its answer would reach one of them only
            raise SupervisorError(f"a second request for {answer[0].__name__} {answer[1]!r}")
        event = anyio.Event()
        outcome: list[ToSupervisor | BaseException] = []
        self.waiting[answer] = (event, outcome)
        self.send(message)
        try:
            await event.wait()
        except BaseException:
            self.waiting.pop(answer, None)
            raise
        reply = outcome[0]
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def answered(self, answer: Answer, outcome: ToSupervisor | BaseException) -> bool:
        """Hand ``outcome`` to the request waiting for ``answer``; False when none waits."""
        waiter = self.waiting.pop(answer, None)
        if waiter is None:
            return False
        event, outcomes = waiter
        outcomes.append(outcome)
        event.set()
        return True

    def fail_requests(self, error: BaseException) -> None:
        """Every request still waiting for an answer fails with ``error``."""
        for event, outcome in self.waiting.values():
            outcome.append(error)
            event.set()
        self.waiting.clear()
