"""Host functions and output of the process mode's guests, on the
supervisor's side.

Host functions run here: ``async def`` ones on the loop (cancellable by the
worker's watchdog), plain ones on ``hlasync-host-N`` threads (the loop must
not block on them). What a host function raises stays here: the worker gets
a description of it (:func:`~.channel.describe`), and the call's error, when
it comes back, has the original as its ``__cause__`` again. What guests print
goes to their target's output callback, or to this process's stdout.
:class:`HostCalls` holds all this per shard (by its key) and per call.
"""

from __future__ import annotations

import contextvars
import inspect
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import anyio

from .. import _telemetry as telemetry
from .. import events as ev
from .channel import DescribedError, describe
from .hub import Publisher
from .loop import Outbox
from .messages import HostCall, HostReply
from .proc_handle import WorkerHandle
from .specs import HostKey

if TYPE_CHECKING:
    from .._telemetry import CallSpan

__all__ = ["HOST_THREADS", "HostCalls"]

#: At most this many plain host functions run at once (each on its own thread).
HOST_THREADS = 64


class HostCalls:
    """The host functions and output callbacks of the shards of worker
    processes, and the host calls in flight. ``events``: the front's (whether
    anyone subscribes to guest output)."""

    def __init__(self, events: Publisher) -> None:
        self._events = events
        #: Set once the backend starts: wakes the loop when a plain host function returns.
        self.outbox: Outbox | None = None
        self._callables: dict[str, dict[HostKey, Callable[..., Any]]] = {}  # shard key -> ...
        self._outputs: dict[str, Callable[..., None] | None] = {}
        self._scopes: dict[int, list[anyio.CancelScope]] = {}
        #: What host functions raised, per call in flight, by host call (the
        #: worker got descriptions; the call's error gets the original back).
        self._raised: dict[int, dict[int, BaseException]] = {}
        #: Plain host functions run here (the loop must not block on them).
        self._threads = ThreadPoolExecutor(
            max_workers=HOST_THREADS, thread_name_prefix="hlasync-host"
        )

    # ---------------------------------------------------------------- shards
    def add(
        self,
        key: str,
        callables: dict[HostKey, Callable[..., Any]],
        output: Callable[..., None] | None,
    ) -> None:
        """Shard ``key``'s host functions and output callback."""
        self._callables[key] = callables
        self._outputs[key] = output

    def register(self, key: str, name: str, function: Callable[..., Any]) -> None:
        """One more host function of shard ``key``."""
        self._callables[key] = {**self._callables.get(key, {}), (name,): function}

    def remove(self, key: str) -> None:
        """Shard ``key`` is closed."""
        self._callables.pop(key, None)
        self._outputs.pop(key, None)

    # ----------------------------------------------------------------- calls
    async def run(
        self,
        worker: WorkerHandle,
        generation: int,
        request: HostCall,
        span: CallSpan | None = None,
    ) -> None:
        """Run a host function for a worker's guest and send the answer back to
        the launch of the worker that asked (``generation``), or to nobody: the
        host calls of its replacement are numbered anew. It runs inside the
        call's span (``span``), so that its own spans nest under it."""
        if span is None:  # not in whatever span the task that spawned this was in
            with telemetry.no_span():
                await self._run(worker, generation, request)
            return
        with span.current():
            await self._run(worker, generation, request)

    async def _run(self, worker: WorkerHandle, generation: int, request: HostCall) -> None:
        reply_id, call_id, key = request.reply_id, request.call_id, request.key
        host_key, args = request.host_key, request.args
        function = self._callables.get(key, {}).get(host_key)
        try:
            if function is None:
                raise LookupError(f"no host function {'.'.join(host_key)}")
            if inspect.iscoroutinefunction(function):
                with anyio.CancelScope() as scope:
                    self._scopes.setdefault(call_id, []).append(scope)
                    try:
                        value = await function(*args)
                    finally:
                        scopes = self._scopes.get(call_id, [])
                        if scope in scopes:
                            scopes.remove(scope)
                        if not scopes:
                            self._scopes.pop(call_id, None)
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
            worker.send(reply)

    def cancel(self, call_id: int) -> None:
        """Cancel the ``async def`` host functions running for call ``call_id``."""
        for scope in self._scopes.get(call_id, []):
            scope.cancel()

    def forget(self, call_id: int) -> None:
        """Call ``call_id`` is over: drop what its host functions raised."""
        self._raised.pop(call_id, None)

    def restore_cause(self, call_id: int, error: BaseException) -> None:
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
        on_loop = self.outbox.on_loop if self.outbox is not None else None

        def work() -> None:
            try:
                box.append((True, function(*args)))
            except BaseException as exc:  # noqa: BLE001 - re-raised on the loop
                box.append((False, exc))
            if on_loop is not None:
                on_loop(done.set)

        # In the caller's context (the call's span): the executor does not copy it.
        self._threads.submit(contextvars.copy_context().run, work)
        await done.wait()
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def shutdown(self) -> None:
        """Idle host threads end now; one stuck in a host function is left behind."""
        self._threads.shutdown(wait=False, cancel_futures=True)

    # ---------------------------------------------------------------- output
    def output(self, key: str, level: str | None, text: str) -> None:
        """What a guest of shard ``key`` printed: to its target's output callback,
        else (when no subscriber takes GuestOutput) to this process's stdout."""
        output = self._outputs.get(key)
        if output is not None:
            if level is None:
                output(text)
            else:
                output(level, text)
        elif not self._events.wants(ev.GuestOutput):
            if level is None:
                sys.stdout.write(text)
                sys.stdout.flush()
            else:
                from ..js.host import default_output

                default_output(level, text)
