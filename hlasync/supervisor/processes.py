"""The process mode (``Supervisor(processes=N)``): sandboxes live in N worker
processes (:mod:`.worker`), each with its own vCPU threads, watchdog and dump
writing, so the per-call Python work of different workers runs under
different GILs.

The supervisor's side, all on the event loop: a target is split into one
shard per worker (a pool of 4 over 2 processes: 2 + 2); calls wait in one
FIFO queue here and go to a shard with a free sandbox, so a worker only ever
receives calls it can start at once. Each worker's channel is read by a task
of the loop itself (no thread hand-off: the loop wakes on the socket) and
written in batches, one frame per loop iteration. Host functions run here
(``async def`` ones on the loop, cancellable by the worker's watchdog;
plain ones on a thread); output and events come back as messages. What a
host function raises stays here: the worker gets a description of it
(:func:`~.channel.describe`), and the call's error, when it comes back, has
the original as its ``__cause__`` again.

A worker that dies (or ends without being asked to) fails its calls with
:class:`~hlasync.WorkerLost`, publishes :class:`~hlasync.events.WorkerDied`,
and is replaced: a new process with the same index makes its shards again
(dedicated sandboxes start over from their initial state). Each launch of a
worker's process is a generation of it: a launch whose process ends before
its hello, or while it makes the shards again, is over at once (that end is
a death like any other, and the next launch takes over). A dump asked of a
dedicated sandbox while its shard is being made again waits for it, as a
queued call does, and fails with the queued calls' error if it cannot be.
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
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, assert_never

import anyio
import anyio.abc

from .. import events as ev
from ..errors import (
    GuestCancelled,
    HlasyncError,
    SupervisorClosed,
    SupervisorError,
    WorkerLost,
)
from ..guest.image import GuestImage
from .channel import Decoder, DescribedError, describe, encode
from .host import STOP_TIMEOUT
from .jobs import Job
from .loop import Outbox
from .messages import (
    Abandon,
    Call,
    CancelHost,
    Close,
    Closed,
    Create,
    Created,
    CreateFailed,
    Done,
    Dump,
    DumpDone,
    Hello,
    HostCall,
    HostReply,
    Init,
    Interest,
    Message,
    Output,
    Published,
    Register,
    Shutdown,
    Stderr,
    ToSupervisor,
    ToWorker,
    Undecodable,
)
from .specs import HostKey, TargetSpec
from .targets import SupervisedSandbox, Target

if TYPE_CHECKING:
    from .core import Supervisor

__all__ = ["ProcessBackend"]

_logger = logging.getLogger("hlasync.supervisor")

#: Seconds a new worker process may take to start and say hello.
START_TIMEOUT = 30.0
#: At most this many plain host functions run at once (each on its own thread).
HOST_THREADS = 64
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
#: What a request to a worker waits for: the answer's class, the request's identity.
_Answer = tuple[type[Message], int | str]


class _Shard:
    """One worker's part of a target."""

    __slots__ = ("capacity", "inflight", "key", "ready", "sandbox_ids", "spec", "target", "worker")

    def __init__(
        self, target: Target, worker: _Worker, key: str, spec: TargetSpec, depth: int = 1
    ) -> None:
        self.target = target
        self.worker = worker
        self.key = key
        self.spec = spec
        #: Calls sent to the worker at once: ``depth`` per sandbox (the others
        #: queue there, so results come back while the next calls are on the way).
        self.capacity = spec.size * depth
        self.inflight = 0
        self.ready = False
        self.sandbox_ids: list[str] = []


class _Worker:
    """One worker process and its channel, seen from the supervisor."""

    def __init__(self, index: int) -> None:
        self.index = index
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
        self.inflight: dict[int, tuple[Job, _Shard]] = {}
        self.shards: dict[str, _Shard] = {}
        #: Requests waiting for their answer, by the answer's class and the
        #: request's identity; the outcome is the answer, or why there is none.
        self.waiting: dict[_Answer, tuple[anyio.Event, list[ToSupervisor | BaseException]]] = {}
        self.counters: dict[str, int] = {}
        #: The Ray node it runs on (hlasync.ray), and how messages name it.
        self.node: str | None = None
        self.where = ""

    def serves(self, generation: int) -> bool:
        """Whether launch ``generation`` is this worker's process now, its channel open."""
        return self.generation == generation and self.alive


class ProcessBackend:
    """Sandboxes in worker processes (a :class:`.backend.Backend`)."""

    #: Calls in flight per sandbox of a worker (1: a call is sent when a sandbox
    #: is free; more queue in the worker, for channels with a long round trip).
    queue_depth = 1
    uses_tasks = True

    def __init__(
        self,
        front: Supervisor,
        processes: int,
        workers: int,
        pin_cpus: tuple[int, ...] | None,
    ) -> None:
        self._front = front
        self.processes = processes
        self.workers_per_process = workers
        self.workers = processes * workers
        self._pin_cpus = pin_cpus
        self._workers = [_Worker(index) for index in range(processes)]
        #: Calls waiting for a free sandbox, per target (FIFO within a target;
        #: targets never compete for the same sandboxes).
        self._waiting: dict[Target, deque[Job]] = {}
        self._targets: list[Target] = []
        self._callables: dict[str, dict[HostKey, Callable[..., Any]]] = {}  # shard key -> ...
        self._outputs: dict[str, Callable[..., None] | None] = {}
        self._host_scopes: dict[int, list[anyio.CancelScope]] = {}
        #: What host functions raised, per call in flight, by host call (the
        #: worker got descriptions; the call's error gets the original back).
        self._raised: dict[int, dict[int, BaseException]] = {}
        self._reply_ids = itertools.count(1)
        self._shard_ids = itertools.count(1)
        self.counters: Counter[str] = Counter()
        self._outbox: Outbox | None = None
        self._group: anyio.abc.TaskGroup | None = None
        self._closing = False
        #: Requests that need a target's sandbox (dumps) while its shard is being
        #: made again: answered where its queued calls are (see _sandbox_up).
        self._awaiting_sandbox: dict[Target, list[tuple[anyio.Event, list[BaseException]]]] = {}
        #: Targets being closed: a second close waits for the first.
        self._closing_targets: dict[Target, anyio.Event] = {}
        #: Plain host functions run here (the loop must not block on them).
        self._host_threads = ThreadPoolExecutor(
            max_workers=HOST_THREADS, thread_name_prefix="hlasync-host"
        )

    # ------------------------------------------------------------- lifecycle
    def spawn_operation(self, work: Callable[[], None]) -> None:
        threading.Thread(target=work, name="hlasync-op", daemon=True).start()

    def report(self, error: BaseException) -> bool:
        return False  # the front logs, counts and publishes it

    async def start(self, outbox: Outbox, group: anyio.abc.TaskGroup | None) -> None:
        assert group is not None  # uses_tasks: the front made it
        self._outbox = outbox
        self._group = group
        self._front._hub.on_change = self._interest_changed
        try:
            await _all(self._launch_first, self._workers)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.shutdown()
            raise

    def _spawn(self, function: Callable[..., Any], *args: Any) -> None:
        """Run ``function(*args)`` as a task of the supervisor; a failure is
        reported, never raised into the caller's task."""

        async def guarded() -> None:
            try:
                await function(*args)
            except anyio.get_cancelled_exc_class():
                raise
            except Exception as exc:  # noqa: BLE001 - reported; the supervisor goes on
                self._front._report(exc)

        assert self._group is not None
        self._group.start_soon(guarded)

    async def _start_worker(self, worker: _Worker) -> socket.socket:
        """Start ``worker``'s process (``worker.process``, ``worker.pid``); the
        supervisor's end of its channel."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ)
        paths = [_PACKAGE_ROOT, *env.get("PYTHONPATH", "").split(os.pathsep)]
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "hlasync.supervisor.worker", str(child.fileno())],
                pass_fds=[child.fileno()],
                env=env,
                close_fds=True,
            )
        except OSError as exc:
            parent.close()
            raise SupervisorError(f"cannot start worker process {worker.index}: {exc}") from exc
        finally:
            child.close()
        worker.process, worker.pid = process, process.pid
        return parent

    async def _launch_first(self, worker: _Worker) -> None:
        if await self._launch(worker) is None:
            status = worker.process.poll() if worker.process is not None else None
            raise SupervisorError(
                f"worker process {worker.index} (pid {worker.pid}{worker.where}) ended "
                f"({_describe(status)}) before it started"
            )

    async def _launch(self, worker: _Worker) -> int | None:
        """Start a new process for ``worker`` and wait (bounded) for its hello:
        this launch's generation once it said hello, None when the process ended
        first (that end is a death like any other, reported and followed by a
        launch of its own: this one is over)."""
        parent = await self._start_worker(worker)
        parent.setblocking(False)
        worker.generation += 1
        generation = worker.generation
        worker.sock = parent
        ready, gone = anyio.Event(), anyio.Event()
        worker.ready, worker.gone = ready, gone
        worker.alive, worker.leaving = True, False
        worker.outgoing, worker.unsent, worker.flush_scheduled = [], bytearray(), False
        worker.writable = anyio.Event()
        self._spawn(self._reader, worker)
        self._spawn(self._writer, worker, generation)
        pins = None
        if self._pin_cpus:
            per = self.workers_per_process
            pins = [
                self._pin_cpus[(worker.index * per + t) % len(self._pin_cpus)] for t in range(per)
            ]
        self._send(
            worker,
            Init(
                workers=self.workers_per_process,
                pin_cpus=pins,
                sys_path=[p for p in sys.path if p],
                interest=self._front._hub.interest_names(),
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

    def _kill(self, worker: _Worker) -> None:
        if worker.process is not None and worker.process.poll() is None:
            worker.process.kill()

    async def shutdown(self) -> None:
        """Fail what waits here, ask every worker to stop (their running calls end
        with GuestCancelled), wait for them (bounded), kill stragglers."""
        self._closing = True
        closed = SupervisorClosed("the supervisor shut down before the call ran")
        for queue in list(self._waiting.values()):
            while queue:
                self._finish(queue.popleft(), None, closed)
        self._waiting.clear()
        for target in list(self._awaiting_sandbox):
            self._answer_awaiting(
                target, SupervisorClosed("the supervisor shut down before the sandbox was back")
            )
        for worker in self._workers:
            if worker.alive:
                worker.leaving = True
                self._send(worker, Shutdown())
        with anyio.move_on_after(STOP_TIMEOUT + 3.0):
            for worker in self._workers:
                if worker.alive:
                    await worker.gone.wait()
        stopped = SupervisorClosed("the supervisor shut down while the call ran")
        for worker in self._workers:
            self._kill(worker)
            if worker.process is not None and await _reaped(worker.process, 5.0) is None:
                _logger.warning("worker process %s did not exit", worker.pid)
            for job, _shard in list(worker.inflight.values()):
                self._finish(job, None, stopped)
            worker.inflight.clear()
            if worker.sock is not None:
                worker.sock.close()
                worker.sock = None
            for event, outcome in worker.waiting.values():
                outcome.append(stopped)
                event.set()
            worker.waiting.clear()
        # Idle host threads end now; one stuck in a host function is left behind.
        self._host_threads.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline and any(
            t.name.startswith("hlasync-host") and t.is_alive() for t in threading.enumerate()
        ):
            await anyio.sleep(0.005)

    # ------------------------------------------------------------- channels
    def _send(self, worker: _Worker, message: ToWorker) -> None:
        """Queue ``message`` (on the loop); one frame per loop iteration."""
        worker.outgoing.append(message)
        if not worker.flush_scheduled:
            worker.flush_scheduled = True
            assert self._outbox is not None
            self._outbox.on_loop(lambda: self._flush(worker))

    def _flush(self, worker: _Worker) -> None:
        worker.flush_scheduled = False
        if not worker.outgoing or worker.sock is None:
            return
        batch, worker.outgoing = worker.outgoing, []
        try:
            worker.unsent += encode(batch)
        except Exception as exc:  # noqa: BLE001 - a value that does not pickle
            self._unsendable(worker, batch, exc)
            return
        self._write(worker)

    def _write(self, worker: _Worker) -> None:
        sock = worker.sock
        while worker.unsent and sock is not None:
            try:
                sent = sock.send(worker.unsent)
            except BlockingIOError:
                worker.writable.set()  # the writer task waits until it can go on
                return
            except OSError:
                worker.unsent.clear()  # the reader notices the end
                return
            del worker.unsent[:sent]

    async def _writer(self, worker: _Worker, generation: int) -> None:
        """Writes what the socket of launch ``generation`` did not take at once;
        ends with that launch's channel."""
        try:
            while worker.serves(generation):
                await worker.writable.wait()
                if not worker.serves(generation) or worker.sock is None:
                    return  # its channel ended: a later launch has a writer of its own
                worker.writable = anyio.Event()
                await anyio.wait_writable(worker.sock)
                self._write(worker)
        except (OSError, ValueError):
            return  # the socket closed under us: the reader reports it

    def _unsendable(self, worker: _Worker, batch: list[ToWorker], exc: Exception) -> None:
        """One message in ``batch`` does not pickle: send the others, fail its call."""
        for message in batch:
            try:
                worker.unsent += encode([message])
            except Exception:  # noqa: BLE001 - this one
                match message:
                    case Call(call_id=call_id):
                        found = worker.inflight.pop(call_id, None)
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
                        worker.unsent += encode([HostReply(reply_id, False, error)])
        self._write(worker)

    async def _reader(self, worker: _Worker) -> None:
        decoder = Decoder[ToSupervisor]()
        sock = worker.sock
        assert sock is not None
        try:
            while True:
                try:
                    await anyio.wait_readable(sock)
                    data = sock.recv(1 << 20)
                except BlockingIOError:
                    continue
                except (OSError, ValueError):
                    data = b""
                if not data:
                    break
                for batch in decoder.feed(data):
                    for message in batch:
                        try:
                            self._handle(worker, message)
                        except Exception as exc:  # noqa: BLE001 - the channel goes on
                            self._front._report(exc)
        finally:
            worker.alive = False
            worker.gone.set()
            worker.writable.set()  # its writer ends too
            if not worker.leaving and not self._closing:
                self._spawn(self._worker_died, worker)

    def _handle(self, worker: _Worker, message: ToSupervisor | Undecodable) -> None:
        match message:
            case Done(call_id=call_id, result=result, error=error, counters=counters):
                worker.counters = counters
                self._done(worker, call_id, result, error)
            case Published(event=event):
                if isinstance(event, ev.CallFailed):
                    self._restore_cause(event.call_id, event.error)
                if worker.node is not None:
                    event = dataclasses.replace(event, node=worker.node)
                self._front._hub.deliver(event)
            case HostCall():
                self._spawn(self._host_call, worker, worker.generation, message)
            case Output(key=key, level=level, text=text):
                self._output(key, level, text)
            case CancelHost(call_id=call_id):
                for scope in self._host_scopes.get(call_id, []):
                    scope.cancel()
            case Created(key=key) | CreateFailed(key=key):
                answered = self._answered(worker, (Created, key), message)
                if not answered and isinstance(message, Created):  # made for nobody: discard it
                    self._send(worker, Close(key))
            case Closed(key=key):
                self._answered(worker, (Closed, key), message)
            case DumpDone(reply_id=reply_id):
                self._answered(worker, (DumpDone, reply_id), message)
            case Stderr(text=text):  # what the worker printed (dump paths, warnings)
                sys.stderr.write(text)
                sys.stderr.flush()
            case Hello():
                worker.ready.set()
            case Undecodable(kind=kind, ident=ident, reason=reason):
                self._undecodable(worker, kind, ident, reason)
            case _:
                assert_never(message)

    def _output(self, key: str, level: str | None, text: str) -> None:
        """What a guest of shard ``key`` printed: to its target's output callback,
        else (when no subscriber takes GuestOutput) to this process's stdout."""
        output = self._outputs.get(key)
        if output is not None:
            if level is None:
                output(text)
            else:
                output(level, text)
        elif not self._front._hub.wants(ev.GuestOutput):
            if level is None:
                sys.stdout.write(text)
                sys.stdout.flush()
            else:
                from ..js.host import default_output

                default_output(level, text)

    def _answered(
        self, worker: _Worker, answer: _Answer, outcome: ToSupervisor | BaseException
    ) -> bool:
        """Hand ``outcome`` to the request waiting for ``answer``; False when none waits."""
        waiter = worker.waiting.pop(answer, None)
        if waiter is None:
            return False
        event, outcomes = waiter
        outcomes.append(outcome)
        event.set()
        return True

    def _done(self, worker: _Worker, call_id: int, result: Any, error: Any) -> None:
        """The outcome of a call ``worker`` ran (its sandbox is free again)."""
        found = worker.inflight.pop(call_id, None)
        if found is None:
            return
        job, shard = found
        shard.inflight -= 1
        if isinstance(error, BaseException):
            self._restore_cause(call_id, error)
        if isinstance(error, HlasyncError) and worker.node is not None:
            error.node = worker.node
        self._call_done(job, result, error)
        if shard.target in self._waiting:
            self._dispatch(shard.target)

    def _undecodable(
        self, worker: _Worker, kind: type[Message], ident: int | str, reason: str
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
            self._send(worker, HostReply(ident, False, describe(error)))
        elif kind in (Created, CreateFailed):
            self._answered(worker, (Created, ident), error)
        elif kind in (Closed, DumpDone):
            self._answered(worker, (kind, ident), error)
        else:
            self._front._report(error)

    async def _request(self, worker: _Worker, message: ToWorker, answer: _Answer) -> ToSupervisor:
        """Send ``message`` and wait for the worker's answer ``answer`` (its
        class and the request's identity); raises what fails the request (a
        cancelled wait leaves the answer unclaimed: a shard made for nobody is
        closed when it arrives)."""
        if answer in worker.waiting:  # its answer would reach one of them only
            raise SupervisorError(f"a second request for {answer[0].__name__} {answer[1]!r}")
        event = anyio.Event()
        outcome: list[ToSupervisor | BaseException] = []
        worker.waiting[answer] = (event, outcome)
        self._send(worker, message)
        try:
            await event.wait()
        except BaseException:
            worker.waiting.pop(answer, None)
            raise
        reply = outcome[0]
        if isinstance(reply, BaseException):
            raise reply
        return reply

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
        # Spread targets: start with the worker holding the fewest sandboxes.
        live.sort(key=lambda w: sum(s.capacity for s in w.shards.values()))
        shards: list[_Shard] = []
        for position in range(count):
            size = spec.size // count + (1 if position < spec.size % count else 0)
            key = f"{spec.name}#{next(self._shard_ids)}"
            shard_spec = _replace(spec, name=key, size=size)
            shards.append(_Shard(target, live[position], key, shard_spec, self.queue_depth))
        for shard in shards:
            self._callables[shard.key] = callables
            self._outputs[shard.key] = output
        target._shards = shards  # type: ignore[attr-defined]
        try:
            await _all(self._make_shard, shards)
        except BaseException:
            for shard in shards:
                if shard.ready:
                    self._send(shard.worker, Close(shard.key))
                shard.worker.shards.pop(shard.key, None)
            raise
        self._targets.append(target)
        ids = [sandbox_id for shard in shards for sandbox_id in shard.sandbox_ids]
        if isinstance(target, SupervisedSandbox):
            target.id = target.name = ids[0]
        self._front._announce(target, ids)

    async def _make_shard(self, shard: _Shard) -> None:
        worker = shard.worker
        worker.shards[shard.key] = shard
        reply = await self._request(worker, Create(shard.key, shard.spec), (Created, shard.key))
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
        for shard in _shards(target):
            self._callables[shard.key] = {**self._callables.get(shard.key, {}), (name,): function}
            self._send(shard.worker, Register(shard.key, name))

    def sandbox_ids(self, target: Target) -> list[str]:
        return [sandbox_id for shard in _shards(target) for sandbox_id in shard.sandbox_ids]

    def nodes_of(self, target: Target) -> dict[str, str | None]:
        """The Ray node of each of the target's sandboxes (hlasync.ray)."""
        return {
            sandbox_id: shard.worker.node
            for shard in _shards(target)
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
        while self._waiting.get(target) or any(shard.inflight for shard in _shards(target)):
            await anyio.sleep(0.005)
        target._closed = True
        if target in self._targets:
            self._targets.remove(target)
        with anyio.CancelScope(shield=True):
            for shard in _shards(target):
                worker = shard.worker
                worker.shards.pop(shard.key, None)
                if worker.alive:
                    await self._request(worker, Close(shard.key), (Closed, shard.key))
                self._callables.pop(shard.key, None)
                self._outputs.pop(shard.key, None)
                for sandbox_id in shard.sandbox_ids:
                    self._front._hub.publish(ev.SandboxClosed, sandbox_id=sandbox_id)
        self._answer_awaiting(target, SupervisorClosed(f"{target.name} is closed"))

    async def generate_crashdump(
        self, target: SupervisedSandbox, directory: str | os.PathLike[str] | None
    ) -> Path:
        (shard,) = _shards(target)
        await self._sandbox_up(shard)
        reply_id = next(self._reply_ids)
        where = None if directory is None else os.fspath(directory)
        reply = await self._request(
            shard.worker, Dump(reply_id, shard.key, where), (DumpDone, reply_id)
        )
        match reply:
            case DumpDone(error=None, path=str(path)):
                return Path(path)
            case DumpDone(error=BaseException() as error):
                raise error
            case _:
                raise SupervisorError(f"{reply!r} does not answer a dump of {shard.key}")

    async def _sandbox_up(self, shard: _Shard) -> None:
        """Return once ``shard``'s sandboxes can be asked for something. While its
        worker is being replaced this waits as a queued call does: until the
        shard is made again, or it fails with the error its queued calls get
        when it cannot be (or the supervisor shuts down)."""
        target = shard.target
        while True:
            if target._closed:
                raise SupervisorClosed(f"{target.name} is closed")
            if self._closing:
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

    def _answer_awaiting(self, target: Target, error: BaseException | None = None) -> None:
        """Wake the requests waiting for ``target``'s sandbox (they look again),
        or fail them with ``error``."""
        for event, outcome in self._awaiting_sandbox.pop(target, []):
            if error is not None:
                outcome.append(error)
            event.set()

    # ----------------------------------------------------------------- calls
    def submit(self, job: Job) -> None:
        target = job.target
        queue = self._waiting.get(target)
        if not queue:
            shard = _pick(target)
            if shard is not None:
                self._send_call(shard, job)
                return
            if queue is None:
                queue = self._waiting[target] = deque()
        queue.append(job)

    def _dispatch(self, target: Target | None = None) -> None:
        """Send waiting calls, oldest first, to shards with a free sandbox (of
        ``target``, or of every target)."""
        targets = [target] if target is not None else list(self._waiting)
        for each in targets:
            queue = self._waiting.get(each)
            while queue:
                shard = _pick(each)
                if shard is None:
                    break
                self._send_call(shard, queue.popleft())
            if queue is not None and not queue:
                del self._waiting[each]

    def _send_call(self, shard: _Shard, job: Job) -> None:
        shard.inflight += 1
        worker = shard.worker
        worker.inflight[job.call_id] = (job, shard)
        job.started_at = time.monotonic()
        self._send(
            worker, Call(job.call_id, shard.key, job.name, job.args, job.timeout, job.cpu_timeout)
        )

    def abandon(self, job: Job, dump_on_cancel: bool) -> None:
        queue = self._waiting.get(job.target)
        if queue is not None and job in queue:
            queue.remove(job)
            job.abandoned = True
            error = GuestCancelled(
                "call cancelled while queued", sandbox_id=job.target.name, function=job.name
            )
            self._finish(job, None, error)
            return
        job.abandoned = True
        for worker in self._workers:
            if job.call_id in worker.inflight:
                self._send(worker, Abandon(job.call_id, dump_on_cancel))
                for scope in self._host_scopes.get(job.call_id, []):
                    scope.cancel()

    def _call_done(self, job: Job, result: Any, error: BaseException | None) -> None:
        """A worker's outcome of ``job`` (its sandbox is free again)."""
        self._finish(job, result, error)

    def _finish(self, job: Job, result: Any, error: BaseException | None) -> None:
        self._raised.pop(job.call_id, None)
        if job.finished:
            return
        job.finished = True
        job.result, job.error = result, error
        self._front._job_done(job)

    async def _host_call(self, worker: _Worker, generation: int, request: HostCall) -> None:
        """Run a host function for a worker's guest and send the answer back to
        the launch of the worker that asked (``generation``), or to nobody: the
        host calls of its replacement are numbered anew."""
        reply_id, call_id, key = request.reply_id, request.call_id, request.key
        host_key, args = request.host_key, request.args
        function = self._callables.get(key, {}).get(host_key)
        try:
            if function is None:
                raise LookupError(f"no host function {'.'.join(host_key)}")
            if _is_async(function):
                with anyio.CancelScope() as scope:
                    self._host_scopes.setdefault(call_id, []).append(scope)
                    try:
                        value = await function(*args)
                    finally:
                        scopes = self._host_scopes.get(call_id, [])
                        if scope in scopes:
                            scopes.remove(scope)
                        if not scopes:
                            self._host_scopes.pop(call_id, None)
                if scope.cancel_called:
                    raise TimeoutError("host function cancelled by the watchdog")
            else:
                value = await self._run_sync(function, args)
            reply = HostReply(reply_id, True, value)
        except Exception as exc:  # noqa: BLE001 - the guest's host call fails with it
            # Never the exception itself: the worker may not be able to unpickle
            # its class (one of the application's __main__, say).
            if call_id in worker.inflight:
                self._raised.setdefault(call_id, {})[reply_id] = exc
            reply = HostReply(reply_id, False, describe(exc, reply_id))
        if worker.serves(generation):
            self._send(worker, reply)

    def _restore_cause(self, call_id: int, error: BaseException) -> None:
        """Give ``error`` (a call's, from its worker) the exception a host function
        raised here as its cause, in place of the description the worker had."""
        cause = error.__cause__
        if isinstance(cause, DescribedError) and cause.token is not None:
            original = self._raised.get(call_id, {}).get(cause.token)
            if original is not None:
                error.__cause__ = original

    async def _run_sync(self, function: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        """A plain host function on one of this supervisor's ``hlasync-host-N``
        threads (never on the loop: it may block). A cancelled wait leaves it to
        finish on its own."""
        done = anyio.Event()
        box: list[tuple[bool, Any]] = []
        on_loop = self._outbox.on_loop if self._outbox is not None else None

        def work() -> None:
            try:
                box.append((True, function(*args)))
            except BaseException as exc:  # noqa: BLE001 - re-raised on the loop
                box.append((False, exc))
            if on_loop is not None:
                on_loop(done.set)

        self._host_threads.submit(work)
        await done.wait()
        ok, value = box[0]
        if not ok:
            raise value
        return value

    # -------------------------------------------------------- worker deaths
    async def _worker_died(self, worker: _Worker) -> None:
        """An unexpected end: fail its calls, say so, start a new one, remake its shards."""
        status: int | None = None
        if worker.process is not None:
            status = await _reaped(worker.process, 5.0)
            if status is None:
                self._kill(worker)
        if worker.sock is not None:
            worker.sock.close()
            worker.sock = None
        lost = WorkerLost(
            f"worker process {worker.index} (pid {worker.pid}{worker.where}) ended "
            f"({_describe(status)}) while the call ran (or waited) there",
            worker=worker.index,
            exit_status=status,
        )
        lost.node = worker.node
        inflight = list(worker.inflight.values())
        worker.inflight.clear()
        for job, shard in inflight:
            shard.inflight -= 1
            self._finish(job, None, lost)
        for event, outcome in worker.waiting.values():
            outcome.append(lost)
            event.set()
        worker.waiting.clear()
        shards = list(worker.shards.values())
        for shard in shards:
            shard.ready = False
            shard.inflight = 0
        _logger.error("%s", lost)
        self._front._hub.publish(
            ev.WorkerDied,
            sandbox_id=None,
            node=worker.node,
            worker=worker.index,
            pid=worker.pid,
            exit_status=status,
            lost_calls=len(inflight),
        )
        self.counters["workers_lost"] += 1
        if self._closing:
            return
        try:
            generation = await self._launch(worker)
        except HlasyncError as exc:
            self._front._report(exc)
            self._fail_targets_of(shards, exc)
            return
        if generation is None:
            return  # it ended before its hello: that death makes the shards again

        def over() -> bool:
            """The new process died in turn (its death makes the shards again),
            or the supervisor is shutting down."""
            return self._closing or not worker.serves(generation)

        self._front._hub.publish(
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
                self._front._report(exc)
                self._fail_targets_of([shard], exc)
                continue
            for sandbox_id in shard.sandbox_ids:
                self._front._hub.publish(
                    ev.SandboxCreated,
                    sandbox_id=sandbox_id,
                    node=worker.node,
                    guest=str(shard.target.image.path),
                    pool=None if isinstance(shard.target, SupervisedSandbox) else shard.target.name,
                )
            if isinstance(shard.target, SupervisedSandbox):
                shard.target.id = shard.target.name = shard.sandbox_ids[0]
            self._answer_awaiting(shard.target)
        self._dispatch()

    def _fail_targets_of(self, shards: list[_Shard], error: BaseException) -> None:
        """Targets left with no shard at all fail their waiting calls."""
        for target in {id(s.target): s.target for s in shards}.values():
            if any(s.ready or s.worker.alive for s in _shards(target) if s not in shards):
                continue
            target._closed = True
            lost = SupervisorClosed(f"{target.name} lost its sandboxes: {error}")
            queue = self._waiting.pop(target, deque())
            while queue:
                self._finish(queue.popleft(), None, lost)
            self._answer_awaiting(target, lost)

    # ------------------------------------------------------------ reporting
    def _interest_changed(self) -> None:
        names = self._front._hub.interest_names()
        for worker in self._workers:
            if worker.alive:
                self._send(worker, Interest(names))

    def counts(self) -> dict[str, int]:
        return {
            "pending": sum(len(queue) for queue in self._waiting.values()),
            "running": sum(len(w.inflight) for w in self._workers),
            "sandboxes": sum(s.spec.size for t in self._targets for s in _shards(t) if s.ready),
        }

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


def _shards(target: Target) -> list[_Shard]:
    return getattr(target, "_shards", [])


def _pick(target: Target) -> _Shard | None:
    best: _Shard | None = None
    for shard in _shards(target):
        if not (shard.ready and shard.worker.alive and shard.inflight < shard.capacity):
            continue
        if best is None or shard.inflight * best.capacity < best.inflight * shard.capacity:
            best = shard
    return best


async def _reaped(process: subprocess.Popen[bytes], timeout: float) -> int | None:
    """``process``'s exit status once it has ended (None after ``timeout``);
    polled, so no thread waits."""
    deadline = time.monotonic() + timeout
    while True:
        status = process.poll()
        if status is not None or time.monotonic() >= deadline:
            return status
        await anyio.sleep(0.005)


def _is_async(function: Callable[..., Any]) -> bool:
    import inspect

    return inspect.iscoroutinefunction(function)


def _replace(spec: TargetSpec, **changes: Any) -> TargetSpec:
    import dataclasses

    return dataclasses.replace(spec, **changes)


def _describe(status: int | None) -> str:
    if status is None:
        return "exit status unknown"
    if status < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exit status {status}"
