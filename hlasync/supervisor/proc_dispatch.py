"""The process mode's reading side: the task that reads a worker's channel
(a task of the loop itself: no thread hand-off, the loop wakes on the socket)
and the dispatch of every message a worker sends: call outcomes, events,
host calls, guest output, answers to requests, and messages this process
cannot unpickle. :class:`WorkerMessages` is the base of
:class:`~.processes.ProcessBackend`; the backend provides the hooks it calls
(a call's outcome, a worker's unexpected end, tasks of the supervisor)."""

from __future__ import annotations

import abc
import dataclasses
import logging
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any, assert_never

import anyio
import sniffio

from .. import _telemetry as telemetry
from .. import events as ev
from ..errors import HlasyncError, SupervisorError
from .backend import Front
from .channel import Decoder, Reader, describe
from .jobs import Job
from .messages import (
    CancelHost,
    Close,
    Closed,
    Created,
    CreateFailed,
    Done,
    DumpDone,
    Hello,
    HostCall,
    HostReply,
    Log,
    Message,
    Output,
    Published,
    Stderr,
    ToSupervisor,
    Undecodable,
)
from .proc_handle import WorkerHandle
from .proc_hostcalls import HostCalls
from .proc_shards import CallQueue

__all__ = ["MESSAGES_PER_TURN", "WorkerMessages"]

#: Messages of a worker the loop handles in one go before it lets its other
#: tasks run (a flood of guest output, and an ``output`` callback slower than
#: the guest, hold it no longer than this many lines).
MESSAGES_PER_TURN = 64


class WorkerMessages(abc.ABC):
    """Reads worker channels and handles what they carry (on the loop)."""

    _front: Front
    _hosts: HostCalls
    _queue: CallQueue
    _closing: bool
    counters: Counter[str]

    @abc.abstractmethod
    def _spawn(self, function: Callable[..., Any], *args: Any) -> None:
        """Run ``function(*args)`` as a task of the supervisor."""

    @abc.abstractmethod
    def _call_done(self, job: Job, result: Any, error: BaseException | None) -> None:
        """A worker's outcome of ``job`` (its sandbox is free again)."""

    @abc.abstractmethod
    async def _worker_died(self, worker: WorkerHandle) -> None:
        """``worker``'s channel ended when nobody asked it to."""

    async def _reader(self, worker: WorkerHandle) -> None:
        sock = worker.sock
        assert sock is not None
        reader = Reader(sock)
        decoder = Decoder[ToSupervisor]()
        try:
            if sniffio.current_async_library() == "asyncio" and _keeps_readers():
                await self._read_on_callback(worker, reader, decoder)
            else:
                while True:
                    try:
                        await anyio.wait_readable(sock)
                        data = reader.read()
                    except BlockingIOError:
                        continue
                    except (OSError, ValueError, anyio.ClosedResourceError):
                        break
                    if not data:
                        break
                    await self._frames(worker, decoder, data)
        finally:
            worker.alive = False
            worker.gone.set()
            worker.writable.set()  # its writer ends too
            if not worker.leaving and not self._closing:
                self._spawn(self._worker_died, worker)

    async def _read_on_callback(
        self, worker: WorkerHandle, reader: Reader, decoder: Decoder[ToSupervisor]
    ) -> None:
        """asyncio: the channel is read by a callback the loop keeps on the
        socket for as long as it lives (``add_reader`` once: no selector
        registration and removal, two ``epoll_ctl`` calls, per frame as
        ``wait_readable`` makes). The callback only reads and decodes; this
        task handles the messages, so that what they run (output callbacks,
        event delivery) runs in a task as before, at most
        :data:`MESSAGES_PER_TURN` of them per turn of the loop. While that
        many or more wait, the callback is taken off the socket (the worker's
        writes wait in the socket's buffer, then in the worker) and put back
        once they are handled. Returns, or raises what decoding raised, when
        the channel ends."""
        import asyncio

        loop = asyncio.get_running_loop()
        assert worker.sock is not None
        fd = worker.sock.fileno()
        messages: deque[ToSupervisor | Undecodable] = deque()
        waiter: asyncio.Future[None] | None = None
        ended = paused = False
        failure: BaseException | None = None
        counters = self.counters

        def wake() -> None:
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

        def end(error: BaseException | None = None) -> None:
            nonlocal ended, failure
            if not ended:
                ended, failure = True, error
                if not paused:  # a paused watch is removed already
                    loop.remove_reader(fd)
            wake()

        def readable() -> None:
            nonlocal paused
            if ended:
                return
            try:
                data = reader.read()
            except BlockingIOError:
                return
            except (OSError, ValueError):
                end()
                return
            if not data:
                end()
                return
            try:
                for batch in decoder.feed(data):  # whole frames; one cut short waits
                    counters["channel_frames"] += 1
                    counters["channel_messages"] += len(batch)
                    messages.extend(batch)
            except Exception as exc:  # noqa: BLE001 - raised by the reading task
                end(exc)
                return
            if len(messages) >= MESSAGES_PER_TURN:
                loop.remove_reader(fd)
                paused = True
            wake()

        loop.add_reader(fd, readable)
        worker.unwatch = end
        try:
            while True:
                if messages:
                    for _ in range(min(len(messages), MESSAGES_PER_TURN)):
                        self._handle_reported(worker, messages.popleft())
                    if messages:
                        await anyio.lowlevel.checkpoint()  # the loop's other work first
                    continue
                if paused and not ended:
                    paused = False
                    loop.add_reader(fd, readable)
                if ended:
                    if failure is not None:
                        raise failure
                    return
                waiter = loop.create_future()
                await waiter
                waiter = None
        finally:
            if worker.unwatch is end:
                worker.unwatch = None
            end()  # the watch is removed once: the number may be another socket's by now

    async def _frames(
        self, worker: WorkerHandle, decoder: Decoder[ToSupervisor], data: Any
    ) -> None:
        """Handle the messages of every whole frame in ``data`` (and what came
        before it), at most :data:`MESSAGES_PER_TURN` per turn of the loop."""
        handled = 0
        for batch in decoder.feed(data):
            counters = self.counters
            counters["channel_frames"] += 1
            counters["channel_messages"] += len(batch)
            for message in batch:
                if handled == MESSAGES_PER_TURN:
                    await anyio.lowlevel.checkpoint()
                    handled = 0
                self._handle_reported(worker, message)
                handled += 1

    def _handle_reported(self, worker: WorkerHandle, message: ToSupervisor | Undecodable) -> None:
        """One message; what handling it raised is reported, the channel goes on."""
        try:
            self._handle(worker, message)
        except Exception as exc:  # noqa: BLE001 - the channel goes on
            self._front.report(exc)

    def _handle(self, worker: WorkerHandle, message: ToSupervisor | Undecodable) -> None:
        match message:
            case Done(call_id=call_id, result=result, error=error, counters=counters):
                worker.counters = counters
                self._done(worker, call_id, result, error, message.sandbox_id, message.path)
            case Published(event=event):
                if isinstance(event, ev.CallFailed):
                    self._hosts.restore_cause(event.call_id, event.error)
                elif isinstance(event, ev.CrashDumpWritten | ev.CrashDumpFailed):
                    _count_dump(event)
                    if not self._front.events.wants(type(event)):
                        return  # sent for the metrics alone
                if worker.node is not None:
                    event = dataclasses.replace(event, node=worker.node)
                self._front.deliver(event)
            case HostCall(call_id=call_id):
                found = worker.inflight.get(call_id)
                span = found[0].span if found is not None else None
                self._spawn(self._hosts.run, worker, worker.generation, message, span)
            case Output(key=key, level=level, text=text):
                self._hosts.output(key, level, text)
            case CancelHost(call_id=call_id):
                self._hosts.cancel(call_id)
            case Created(key=key) | CreateFailed(key=key):
                answered = worker.answered((Created, key), message)
                if not answered and isinstance(message, Created):  # made for nobody: discard it
                    worker.send(Close(key))
            case Closed(key=key):
                worker.answered((Closed, key), message)
            case DumpDone(reply_id=reply_id):
                worker.answered((DumpDone, reply_id), message)
            case Stderr(text=text):  # what the worker printed (dump paths, warnings)
                sys.stderr.write(text)
                sys.stderr.flush()
            case Log():
                _log_again(worker, message)
            case Hello():
                worker.ready.set()
            case Undecodable(kind=kind, ident=ident, reason=reason):
                self._undecodable(worker, kind, ident, reason)
            case _:
                assert_never(message)

    def _done(
        self,
        worker: WorkerHandle,
        call_id: int,
        result: Any,
        error: Any,
        sandbox_id: str | None = None,
        path: str | None = None,
    ) -> None:
        """The outcome of a call ``worker`` ran (its sandbox is free again)."""
        found = worker.inflight.pop(call_id, None)
        if found is None:
            return
        worker.give_back_slot(call_id)
        job, shard = found
        job.sandbox_id, job.path = sandbox_id, path
        shard.inflight -= 1
        shard.last_answer = time.monotonic()
        if isinstance(error, BaseException):
            self._hosts.restore_cause(call_id, error)
        if isinstance(error, HlasyncError) and worker.node is not None:
            error.node = worker.node
        self._call_done(job, result, error)
        if self._queue.has_queue(shard.target):
            self._queue.dispatch(shard.target)

    def _undecodable(
        self, worker: WorkerHandle, kind: type[Message], ident: int | str, reason: str
    ) -> None:
        """A message from ``worker`` that this process cannot unpickle (it holds a
        class only the worker has): whatever waits for it fails, saying why."""
        where = f"worker process {worker.index} (pid {worker.pid}{worker.where})"
        error = SupervisorError(
            f"{where} sent a {kind.__name__} message this process cannot unpickle: {reason}"
        )
        if kind is Done and isinstance(ident, int):
            self._done(worker, ident, None, error)
        elif kind is HostCall and isinstance(ident, int):  # the guest waits for an answer
            worker.send(HostReply(ident, False, describe(error)))
        elif kind in (Created, CreateFailed):
            worker.answered((Created, ident), error)
        elif kind in (Closed, DumpDone):
            worker.answered((kind, ident), error)
        else:
            self._front.report(error)


def _keeps_readers() -> bool:
    """Whether the running asyncio loop can keep a reader callback on a
    socket (selector loops, uvloop); else the channel is read with
    ``anyio.wait_readable``, which works on any."""
    import asyncio

    loop = asyncio.get_running_loop()
    return isinstance(loop, asyncio.SelectorEventLoop) or type(loop).__module__.startswith("uvloop")


#: The events a worker process always sends: its dumps, for the dump metrics.
DUMP_EVENTS = ("CrashDumpFailed", "CrashDumpWritten")


def _count_dump(event: ev.CrashDumpWritten | ev.CrashDumpFailed) -> None:
    """A worker's dump in this process's ``hlasync.crashdumps`` metrics (its
    log record is the worker's own, on its stderr)."""
    if isinstance(event, ev.CrashDumpWritten):
        telemetry.dump_counted(event.reason, failed=False, path=str(event.path))
    else:
        telemetry.dump_counted(event.reason, failed=True)


def _log_again(worker: WorkerHandle, record: Log) -> None:
    """A worker's log record, on the same logger here, with the worker's
    index and process id as two more fields."""
    logger = logging.getLogger(record.name)
    if not logger.isEnabledFor(record.level):
        return
    extra = {**record.fields, "hlasync.worker": worker.index, "hlasync.pid": worker.pid}
    made = logger.makeRecord(
        record.name, record.level, "(worker)", 0, "%s", (record.message,), None, extra=extra
    )
    made.created = record.created
    logger.handle(made)
