"""Where calls go: pools (fresh state per call), JavaScript pools and
dedicated sandboxes, and the handle of a call queued without waiting. A
target knows the supervisor that made it through :class:`Owner` (so this
module imports neither the front nor the calls)."""

from __future__ import annotations

import functools
import os
from collections.abc import Awaitable, Callable, Generator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import anyio

from .. import _telemetry as telemetry
from ..abi import Arg, FunctionSignature, Value
from ..guest.image import GuestImage
from ..sandbox import Sandbox, SandboxState
from .settings import DEFAULT

if TYPE_CHECKING:
    from .front import InThread

__all__ = [
    "JSPool",
    "Owner",
    "PendingCall",
    "Pool",
    "QueuedCall",
    "SupervisedSandbox",
    "Target",
    "decode_js_reply",
]

_T = TypeVar("_T")


class Owner(Protocol):
    """What a target asks of the supervisor that made it (:class:`~.core.Supervisor`
    implements it): the front's calls, plus its entry points for targets."""

    async def call(
        self,
        target: Target,
        name: str,
        *args: Arg,
        timeout: float | None = ...,
        cpu_timeout: float | None = ...,
    ) -> Value: ...

    def call_nowait(
        self,
        target: Target,
        name: str,
        *args: Arg,
        timeout: float | None = ...,
        cpu_timeout: float | None = ...,
    ) -> PendingCall: ...

    async def generate_crashdump(
        self, target: SupervisedSandbox, directory: str | os.PathLike[str] | None = ...
    ) -> Path: ...

    async def _close_target(self, target: Target) -> None:
        """Close ``target`` once its calls are done."""

    def _register_host_function(
        self, target: Target, name: str, function: Callable[..., Any]
    ) -> None:
        """Give every sandbox of ``target`` the host function ``name``."""

    def _sandbox_ids(self, target: Target) -> list[str]:
        """The ids of ``target``'s sandboxes (in worker processes too)."""

    async def _in_thread(
        self, function: Callable[[], _T], *, discard: Callable[[_T], object] | None = ...
    ) -> _T:
        """Run blocking ``function`` on an operation thread of its own and await it."""


class QueuedCall(Protocol):
    """A queued call as its :class:`PendingCall` sees it (a :class:`~.jobs.Job`)."""

    @property
    def call_id(self) -> int: ...

    @property
    def delivered(self) -> bool: ...


class Target:
    """Where calls go: a pool or a dedicated sandbox. Capacity is guarded by
    the worker host's scheduler lock."""

    fresh_state: bool  # restore after every call
    #: Fields to record before a hung call of this target is dumped and stopped
    #: (taken while the guest still runs; JS pools ask the engine for its stack).
    _stop_annotations: Callable[[Sandbox], Mapping[str, object]] | None = None

    def __init__(self, supervisor: Owner, name: str, image: GuestImage) -> None:
        self._supervisor = supervisor
        self.name = name
        self.image = image
        #: Guest functions by name, with signatures read from the ELF.
        self.functions: Mapping[str, FunctionSignature] = {f.name: f for f in image.functions}
        self._free: list[Sandbox] = []
        self._members: list[Sandbox] = []
        #: Members of a hot pool being restored in place now: a call that comes
        #: meanwhile waits for one of them (a few µs, and it is still hot)
        #: rather than waking a worker for a member that went cold.
        self._restoring = 0
        #: A hot pool (restored in place), and the running average time of its
        #: calls (seconds; see WorkerHost._keep_on_busy_locked).
        self._hot = False
        self._call_time = 0.0
        self._closed = False
        #: Host functions as registered on every member (wrapped for the supervisor).
        self._host_functions: dict[str, Callable[..., Any]] = {}
        #: Makes a replacement member (pools); None: members are not replaced.
        self._factory: Callable[[], Sandbox] | None = None

    def _take_locked(self, worker: int) -> Sandbox | None:
        """A free sandbox, preferably one this worker ran last (a vCPU that stays on
        one thread avoids KVM reloading it elsewhere)."""
        free = self._free
        if not free:
            return None
        for position in range(len(free) - 1, -1, -1):
            if free[position]._last_worker == worker:
                return free.pop(position)
        return free.pop()

    def _give_locked(self, sandbox: Sandbox) -> None:
        if not self._closed and sandbox.state is not SandboxState.CLOSED:
            self._free.append(sandbox)

    def register_host_function(self, name: str, function: Callable[..., Any]) -> None:
        """Make ``function`` callable by the guest as ``name`` in every sandbox of
        this target (``async def`` functions run on the supervisor's loop)."""
        if not callable(function):
            raise TypeError("host function must be callable")
        self._supervisor._register_host_function(self, name, function)

    async def call(
        self,
        name: str,
        *args: Arg,
        timeout: float | None = DEFAULT,
        cpu_timeout: float | None = DEFAULT,
    ) -> Value:
        """Run guest function ``name``; see :meth:`Supervisor.call`."""
        return await self._supervisor.call(
            self, name, *args, timeout=timeout, cpu_timeout=cpu_timeout
        )

    def call_nowait(
        self,
        name: str,
        *args: Arg,
        timeout: float | None = DEFAULT,
        cpu_timeout: float | None = DEFAULT,
    ) -> PendingCall:
        """Queue a call without waiting for room; see :meth:`Supervisor.call_nowait`."""
        return self._supervisor.call_nowait(
            self, name, *args, timeout=timeout, cpu_timeout=cpu_timeout
        )

    async def aclose(self) -> None:
        """Close this target's sandboxes once their calls are done."""
        await self._supervisor._close_target(self)


class Pool(Target):
    """``size`` identical sandboxes; each call gets a fresh one (restored to
    its initial snapshot after every call)."""

    fresh_state = True

    def __init__(self, supervisor: Owner, name: str, image: GuestImage, size: int) -> None:
        super().__init__(supervisor, name, image)
        self.size = size

    @property
    def sandbox_ids(self) -> list[str]:
        """The ids of this pool's sandboxes (in worker processes too)."""
        return self._supervisor._sandbox_ids(self)

    def __repr__(self) -> str:
        return f"<Pool {self.name} of {self.size} x {self.image.path.name}>"


class JSPool(Pool):
    """``size`` JS sandboxes with the same handlers, modules and host functions;
    every call starts from the state right after they were loaded."""

    def __init__(
        self,
        supervisor: Owner,
        name: str,
        image: GuestImage,
        size: int,
        handlers: Mapping[str, str],
    ) -> None:
        super().__init__(supervisor, name, image, size)
        self.handlers: Mapping[str, str] = dict(handlers)

    @staticmethod
    def _stop_annotations(sandbox: Sandbox) -> Mapping[str, object]:
        from ..js.stack import capture_stack

        return capture_stack(sandbox).annotations()

    async def call_handler(
        self,
        name: str,
        event: object = None,
        *,
        timeout: float | None = DEFAULT,
        cpu_timeout: float | None = DEFAULT,
    ) -> Any:
        """Call handler ``name`` with ``event`` (a JSON value); see :meth:`JSSandbox.call_handler`.

        ``timeout``/``cpu_timeout`` as for :meth:`Supervisor.call`; a
        :class:`~hlasync.GuestTimeout` carries the handler's JavaScript stack
        (``js_stack``), and so do its dump and the ``CallTimedOut`` event.
        """
        from ..js import runtime

        arguments = runtime.call_arguments(self.name, name, event)
        handler = telemetry.HandlerCall(name)  # its span names the handler, ends here
        token = telemetry.handler_call.set(handler)
        try:
            try:
                reply = await self.call(
                    "js_call", *arguments, timeout=timeout, cpu_timeout=cpu_timeout
                )
            except anyio.get_cancelled_exc_class():
                if handler.span is not None:  # the guest call's own outcome ends it
                    handler.span.unhold()
                    handler.span = None
                raise
            finally:
                telemetry.handler_call.reset(token)
            result = await decode_js_reply(
                self._supervisor._in_thread, reply, sandbox_id=self.name, handler=name
            )
        except BaseException as exc:
            if handler.span is not None:
                cancelled = isinstance(exc, anyio.get_cancelled_exc_class())
                handler.span.release(exc, cancelled=cancelled)
            raise
        if handler.span is not None:
            handler.span.release(None)
        return result

    def __repr__(self) -> str:
        return f"<JSPool {self.name} of {self.size} x {len(self.handlers)} handlers>"


async def decode_js_reply(
    in_thread: InThread, reply: object, *, sandbox_id: str, handler: str
) -> Any:
    """The result of a JS handler's ``reply`` (:func:`hlasync.js.protocol.decode_reply`),
    read without holding up the event loop.

    A reply up to :data:`~hlasync.js.protocol.INLINE_REPLY` bytes is read here
    (at most a few milliseconds); a larger one, up to the 2 MiB of the output
    buffer and written by a guest that may want to stall the supervisor, is
    read on an operation thread (``in_thread``) in a way that lets the loop run
    meanwhile. The awaiting task may be cancelled: the thread finishes
    reading, nobody receives the result.
    """
    from ..js import protocol

    if not isinstance(reply, bytes) or len(reply) <= protocol.INLINE_REPLY:
        return protocol.decode_reply(reply, sandbox_id=sandbox_id, handler=handler)
    decode = functools.partial(
        protocol.decode_reply, reply, sandbox_id=sandbox_id, handler=handler, share_gil=True
    )
    return await in_thread(decode)


class SupervisedSandbox(Target):
    """A dedicated sandbox: calls run one at a time and guest state persists
    between them. After a fault, timeout or cancellation it is restored to
    its initial state."""

    fresh_state = False

    def __init__(self, supervisor: Owner, name: str, image: GuestImage) -> None:
        super().__init__(supervisor, name, image)
        #: The sandbox (the thread mode; None when it lives in a worker process).
        self.sandbox: Sandbox | None = None
        self.id = name  # the sandbox's id once it exists

    async def generate_crashdump(self, directory: str | os.PathLike[str] | None = None) -> Path:
        """Dump this sandbox now, also while a call runs; see :meth:`Sandbox.generate_crashdump`.

        With ``processes=N``, while the sandbox is being made again in the
        replacement of its dead worker process, this waits for it as a queued
        call does (and fails as the queued calls do if it cannot be made)."""
        return await self._supervisor.generate_crashdump(self, directory)

    def __repr__(self) -> str:
        return f"<SupervisedSandbox {self.id} {self.image.path.name}>"


class PendingCall:
    """A call queued by ``call_nowait``: ``await`` it for the result."""

    def __init__(self, job: QueuedCall, outcome: Callable[[], Awaitable[Value]]) -> None:
        self._job = job
        #: Awaits the call's outcome (the front's wait, cancellable as any).
        self._outcome = outcome

    @property
    def call_id(self) -> int:
        return self._job.call_id

    def done(self) -> bool:
        return self._job.delivered

    def __await__(self) -> Generator[Any, None, Value]:
        return self._outcome().__await__()
