"""A worker process of ``Supervisor(processes=N)``: a worker host (the same
as the thread mode's) that owns its sandboxes, driven over the channel.

Started by the supervisor as ``python -m hlasync.supervisor.worker FD`` (a
fresh interpreter: a process that holds VMs is never forked). When the
supervisor's end of the channel closes, for whatever reason, the worker stops
its calls, closes its sandboxes and exits: it never outlives its supervisor.
A message it cannot handle ends it with exit status 1, its calls' outcomes
unsent: the supervisor sees a worker death (never a quiet end that leaves a
call waiting).

The messages are the records of :mod:`.messages`: it receives
:data:`~.messages.ToWorker` (and :class:`~.messages.Undecodable` in place of
one this process cannot unpickle, see :mod:`.channel`) and sends
:data:`~.messages.ToSupervisor`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import logging
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any, assert_never

from .. import _telemetry as telemetry
from .. import events as ev
from ..errors import SupervisorClosed, SupervisorError, portable_error
from ..sandbox import Sandbox
from .channel import Decoder, Reader, SocketSender
from .creation import Builder, load_image
from .host import STOP_TIMEOUT, WorkerHost
from .jobs import Job, current_job
from .marks import RECEIVED, STARTED, StartMarks
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
    Log,
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
from .outcomes import publish_outcome
from .specs import HostKey, TargetSpec
from .spinboard import SpinBoard
from .targets import Target

__all__ = ["main"]


class RemoteHub:
    """The worker's side of event delivery: events the supervisor's
    subscribers want (it says which) are sent over the channel."""

    def __init__(self, send: Callable[[ToSupervisor], None]) -> None:
        self._send = send
        self._wanted: frozenset[str] = frozenset()
        self._interest: dict[type[ev.Event], bool] = {}

    def set_interest(self, names: Iterable[str]) -> None:
        self._wanted = frozenset(names)
        self._interest = {}

    def wants(self, kind: type[ev.Event]) -> bool:
        interest = self._interest
        wanted = interest.get(kind)
        if wanted is None:
            wanted = any(cls.__name__ in self._wanted for cls in kind.__mro__)
            interest[kind] = wanted
        return wanted

    def publish(self, event_type: type[ev.Event], /, **fields: Any) -> None:
        if self.wants(event_type):
            self.post(event_type(**fields))

    def post(self, event: ev.Event) -> None:
        self._send(self.message(event))

    @staticmethod
    def message(event: ev.Event) -> Published:
        """``event`` as the message that carries it (its error made portable)."""
        error = getattr(event, "error", None)
        if isinstance(error, BaseException):
            event = dataclasses.replace(event, error=portable_error(error))  # type: ignore[call-arg]
        return Published(event)


class _Gathered:
    """A publisher that gathers what ``hub`` would send, as messages."""

    def __init__(self, hub: RemoteHub, messages: list[ToSupervisor]) -> None:
        self._hub = hub
        self._messages = messages

    def wants(self, kind: type[ev.Event]) -> bool:
        return self._hub.wants(kind)

    def publish(self, event_type: type[ev.Event], /, **fields: Any) -> None:
        if self._hub.wants(event_type):
            self.post(event_type(**fields))

    def post(self, event: ev.Event) -> None:
        self._messages.append(self._hub.message(event))


class _ForwardedStream(io.TextIOBase):
    """The worker's ``sys.stderr``: what is written there (dump paths, log
    warnings) is printed by the supervisor's process, where a user looks."""

    def __init__(self, send: Callable[[ToSupervisor], None]) -> None:
        self._send = send

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if text:
            self._send(Stderr(text))
        return len(text)


class _ForwardedLogs(logging.Handler):
    """The worker's ``hlasync`` logger: its records (with their ``hlasync.*``
    fields) go to the supervisor's process, which logs them again there."""

    def __init__(self, send: Callable[[ToSupervisor], None]) -> None:
        super().__init__()
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + "".join(traceback.format_exception(*record.exc_info))
            fields = {
                key: value if isinstance(value, str | int | float | bool | None) else str(value)
                for key, value in record.__dict__.items()
                if key.startswith("hlasync.")
            }
            self._send(Log(record.name, record.levelno, message, fields, record.created))
        except Exception:  # noqa: BLE001 - logging never breaks the worker
            self.handleError(record)


class _Reply:
    """A host call waiting for the supervisor's answer."""

    __slots__ = ("event", "outcome")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.outcome: tuple[bool, Any] = (False, SupervisorClosed("no answer"))


class HostedTarget(Target):
    """A target's shard as this worker holds it."""

    def __init__(self, spec: TargetSpec, builder: Builder) -> None:
        super().__init__(None, spec.name.partition("#")[0], builder.image)  # type: ignore[arg-type]
        self.fresh_state = spec.kind != "sandbox"
        if spec.kind == "js":
            from ..js.stack import capture_stack

            self._stop_annotations = lambda sb: capture_stack(sb).annotations()
        self.spec = spec


class Worker:
    """``marks``: the start marks the supervisor reads if this process dies
    (:mod:`.marks`); only a worker with marks holds outcomes back to batch them."""

    def __init__(
        self, sock: socket.socket, marks: StartMarks | None = None, hold_limit: float = 0.0
    ) -> None:
        self.sock = sock
        self.marks = marks
        #: The start-mark slot of each call received and not started yet.
        self.slots: dict[int, int] = {}
        self.sender = SocketSender[ToSupervisor](sock, hold_limit)
        #: Whether it holds outcomes back to send several at once.
        self.holding = marks is not None and hold_limit > 0
        self.send = self.sender.post
        self.hub = RemoteHub(self.send)
        self.host: WorkerHost | None = None
        self.targets: dict[str, HostedTarget] = {}
        self.jobs: dict[int, Job] = {}
        self.replies: dict[int, _Reply] = {}
        self.reply_ids = itertools.count(1)
        self.lock = threading.Lock()

    # ------------------------------------------------------------- serving
    def serve(self) -> int:
        """Serve the supervisor until it asks the worker to stop or its end
        closes (0), or until a message cannot be handled (1: the worker may
        have lost a request, so it ends as a failure and the supervisor reports
        the death). Everything is stopped either way; the exit status."""
        status = 0
        try:
            self._serve()
        except Exception:  # noqa: BLE001 - told to the supervisor, which sees a death
            status = 1
            if self.marks is not None:  # a call it did not read may be why
                self.marks.unreadable()
            traceback.print_exc()  # on the supervisor's stderr once init has run
            print(
                f"hlasync worker process {os.getpid()}: cannot handle what the supervisor "
                "sent; it exits, and its calls fail with WorkerLost",
                file=sys.stderr,
            )
            self.sender.close()  # the calls it stops are lost: no outcome goes out
        finally:
            self.stop()
        return status

    def _serve(self) -> None:
        decoder = Decoder[ToWorker]()
        reader = Reader(self.sock)
        while True:
            try:
                data = reader.read()
            except OSError:
                return  # the supervisor's end closed: it shut down or died
            if not data:
                return  # the supervisor's end closed: it shut down or died
            for batch in decoder.feed(data):
                for message in batch:
                    if self.handle(message):
                        return

    def handle(self, message: ToWorker | Undecodable) -> bool:
        """One message; True when it tells the worker to exit."""
        match message:
            case Call():
                self.on_call(message)
            case HostReply(reply_id=reply_id, ok=ok, value=value):
                self.answer(reply_id, ok, value)
            case Abandon(call_id=call_id, dump=dump):
                job = self.jobs.get(call_id)
                if job is not None and self.host is not None:
                    self.host.abandon(job, "cancelled" if dump else None)
            case Interest(names=names):
                self.hub.set_interest(names)
            case Create(key=key, spec=spec):
                self.operation(lambda: self.on_create(key, spec))
            case Register(key=key, name=name):
                self.on_register(key, name)
            case Close(key=key):
                self.operation(lambda: self.on_close(key))
            case Dump(reply_id=reply_id, key=key, directory=directory):
                self.operation(lambda: self.on_dump(reply_id, key, directory))
            case Init():
                self.on_init(message)
            case Undecodable(kind=kind, ident=ident, reason=reason):
                self.on_undecodable(kind, ident, reason)
            case Shutdown():
                return True
            case _:
                assert_never(message)
        return False

    def on_undecodable(self, kind: type[Message], ident: Any, reason: str) -> None:
        """A message this process cannot unpickle (it holds an object of a class
        only the supervisor's process has): the request fails, saying why. One
        that has no answer to fail raises: the worker cannot go on."""
        if kind is Call:
            error = SupervisorError(
                f"the worker process cannot unpickle the call's arguments: {reason}"
            )
            self.send(Done(ident, None, error, None, self.counters()))
        elif kind is HostReply:
            what = f"the worker process cannot unpickle the host function's result: {reason}"
            self.answer(ident, False, TypeError(what))
        elif kind is Create:
            error = SupervisorError(
                f"the worker process cannot unpickle the target's description: {reason}"
            )
            self.send(CreateFailed(ident, error))
        else:
            raise SupervisorError(f"a {kind.__name__} message cannot be unpickled here: {reason}")

    def answer(self, reply_id: int, ok: bool, value: Any) -> None:
        """The supervisor's answer to a host call: the guest waiting for it goes on."""
        with self.lock:
            reply = self.replies.pop(reply_id, None)
        if reply is not None:
            reply.outcome = (ok, value)
            reply.event.set()

    def counters(self) -> dict[str, int]:
        return dict(self.host.counters) if self.host is not None else {}

    def operation(self, work: Callable[[], None]) -> None:
        assert self.host is not None
        self.host.spawn_operation(work)

    # ---------------------------------------------------------------- set-up
    def on_init(self, init: Init) -> None:
        sys.stderr = _ForwardedStream(self.send)
        logs = logging.getLogger("hlasync")
        logs.addHandler(_ForwardedLogs(self.send))
        logs.propagate = False  # not also as text on the forwarded stderr
        for entry in reversed(init.sys_path):
            if entry not in sys.path:
                sys.path.insert(0, entry)
        self.hub.set_interest(init.interest)
        host = WorkerHost(init.workers, init.pin_cpus, self.hub)
        host.cancel_host_calls = lambda job: self.send(CancelHost(job.call_id))
        host.publishes_outcomes = False  # on_complete sends them with the outcome
        marks = self.marks
        if marks is not None:
            slots = self.slots
            host.on_start = lambda job: marks.mark(slots.pop(job.call_id, -1), STARTED)
        host.start(self.on_complete, lambda function: function())
        self.host = host
        self.send(Hello(os.getpid()))

    def on_create(self, key: str, spec: TargetSpec) -> None:
        host = self.host
        assert host is not None
        try:
            image = load_image(spec.guest)
            # Output always goes to the supervisor: to the caller's callback, or to
            # its sys.stdout when nobody subscribes (as in the thread mode).
            output: Callable[..., None]
            if spec.kind == "js":
                output = lambda level, text: self.send(Output(key, level, text))  # noqa: E731
            else:
                output = lambda text: self.send(Output(key, None, text))  # noqa: E731
            builder = Builder(
                spec,
                image,
                lambda k: self.proxy(key, k),
                output,
                self.hub,
                host.on_crashdump,
            )
            sandboxes = builder.make_all()
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            error = portable_error(exc)
            assert error is not None
            self.send(CreateFailed(key, error))
            return
        target = HostedTarget(spec, builder)
        target._factory = builder.another
        target._host_functions = dict(builder.sandbox_functions)
        host.add_target(target, sandboxes)
        self.targets[key] = target
        self.send(Created(key, tuple(sb.id for sb in sandboxes)))

    def on_register(self, key: str, name: str) -> None:
        target = self.targets.get(key)
        if target is None:
            return
        proxy = self.proxy(key, (name,))
        target._host_functions[name] = proxy
        for sandbox in list(target._members):
            sandbox.register_host_function(name, proxy)

    def proxy(self, key: str, host_key: HostKey) -> Callable[..., Any]:
        """A host function that runs in the supervisor's process: one round trip."""

        def call_supervisor(*args: Any) -> Any:
            job = current_job()
            reply = _Reply()
            with self.lock:
                reply_id = next(self.reply_ids)
                self.replies[reply_id] = reply
            self.send(HostCall(reply_id, job.call_id if job else 0, key, host_key, args))
            reply.event.wait()
            ok, value = reply.outcome
            if ok:
                return value
            raise value

        return call_supervisor

    # ----------------------------------------------------------------- calls
    def on_call(self, call: Call) -> None:
        host = self.host
        target = self.targets.get(call.key)
        if host is None or target is None or target._closed:
            closed = SupervisorClosed(f"{call.key} is not open in this worker")
            self.send(Done(call.call_id, None, closed, None, self.counters()))
            return
        function = target.functions[call.function]
        job = Job(call.call_id, target, function, call.args, call.timeout, call.cpu_timeout)
        if call.trace:  # host functions run here inside the caller's span
            job.span = telemetry.remote_span(call.trace, function.name)
        self.jobs[call.call_id] = job
        if self.marks is not None:
            self.slots[call.call_id] = call.slot
            self.marks.mark(call.slot, RECEIVED)
        host.submit(job)

    def on_complete(self, job: Job) -> None:
        """A call's outcome, to the supervisor, in one frame with its events
        (``CallCompleted``...: they arrive with it or, if this process dies
        first, not at all). While this worker has another call to start, it is
        held (see :class:`~.channel.SocketSender`) so that the outcomes of a run
        of calls reach the supervisor's loop in one frame, one wake-up for all
        of them; the last of the run, or ``hold_limit`` after the first (a call
        behind it may be long), sends them."""
        self.jobs.pop(job.call_id, None)
        self.slots.pop(job.call_id, None)  # one that never started
        messages: list[ToSupervisor] = []
        publish_outcome(_Gathered(self.hub, messages), job, job.error)
        sandbox_id = job.sandbox.id if job.sandbox is not None else None
        error = portable_error(job.error)
        messages.append(Done(job.call_id, job.result, error, sandbox_id, self.counters(), job.path))
        host = self.host
        hold = self.holding and host is not None and host.startable()
        self.sender.post_many(messages, hold=hold)

    def on_close(self, key: str) -> None:
        host = self.host
        target = self.targets.get(key)
        if host is not None and target is not None:
            deadline = time.monotonic() + 60
            while True:
                members = host.detach_if_idle(target)
                if members is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.005)
            host.close_sandboxes(members or [])
            self.targets.pop(key, None)
        self.send(Closed(key))

    def on_dump(self, reply_id: int, key: str, directory: str | None) -> None:
        target = self.targets.get(key)
        try:
            if target is None or not target._members:
                raise SupervisorClosed(f"{key} has no sandbox in this worker")
            sandbox: Sandbox = target._members[0]
            path = sandbox.generate_crashdump(directory)
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            self.send(DumpDone(reply_id, None, portable_error(exc)))
            return
        assert self.host is not None
        self.send(DumpDone(reply_id, str(path), None))

    # ------------------------------------------------------------- shutdown
    def stop(self) -> None:
        """Stop everything (the supervisor asked, or is gone), then exit."""
        host = self.host
        if host is not None:
            # Running calls are marked stopped first, so that one waiting for a host
            # call's answer ends as GuestCancelled, not with the "no answer" below.
            host.shutdown_begin()
        with self.lock:
            waiting, self.replies = list(self.replies.values()), {}
        for reply in waiting:  # host calls that will get no answer now
            reply.event.set()
        if host is not None:
            deadline = time.monotonic() + STOP_TIMEOUT
            while time.monotonic() < deadline and host.alive():
                time.sleep(0.002)
            host.shutdown_end()
        self.sender.close()


#: This process's spin board (kept: the helper library counts in its mapping).
_board: SpinBoard | None = None


def main(argv: list[str] | None = None) -> None:
    arguments = sys.argv[1:] if argv is None else argv
    sock = socket.socket(fileno=int(arguments[0]))
    marks = StartMarks.attach(int(arguments[1])) if len(arguments) > 1 else None
    hold = float(arguments[2]) if len(arguments) > 2 else 0.0
    if len(arguments) > 5 and arguments[5] == "batch":
        # Before any thread is made (they inherit it): woken by the supervisor's
        # write, this process does not take the CPU from the loop that wrote.
        # Only from the normal policy: one chosen on purpose (SCHED_IDLE, a
        # real-time one) is inherited as it is.
        with contextlib.suppress(OSError):
            if os.sched_getscheduler(0) == os.SCHED_OTHER:
                os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    if len(arguments) > 4:  # the spin slots it shares with the supervisor's other workers
        global _board
        _board = SpinBoard(int(arguments[3]))
        _board.attach(int(arguments[4]))
    status = Worker(sock, marks, hold).serve()
    # Threads blocked in host functions must not keep a finished worker alive.
    os._exit(status)


if __name__ == "__main__":
    main()
