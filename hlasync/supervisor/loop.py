"""The hand-over to the event loop: everything the supervisor's threads tell
the loop (finished calls, events) goes through one :class:`Outbox`, drained
with a single wake-up per batch (``call_soon_threadsafe`` on asyncio,
``run_sync_soon`` on trio), never one blocking cross-thread call per item."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass

import sniffio

__all__ = ["Outbox", "Wake", "loop_waker"]


@dataclass
class Wake:
    """Non-blocking "run this on the loop soon", from any thread.

    ``local``, when given, does the same from the loop's own thread without
    waking the loop through its wake-up pipe (asyncio's ``call_soon``: no
    system call); it falls back to ``soon`` on any other thread.
    """

    soon: Callable[[Callable[[], None]], object]
    local: Callable[[Callable[[], None]], object] | None = None


def loop_waker() -> Wake:
    """The running loop's thread-safe scheduling function (asyncio or trio)."""
    library = sniffio.current_async_library()
    if library == "asyncio":
        import asyncio

        loop = asyncio.get_running_loop()
        soon = loop.call_soon_threadsafe
        call_soon = loop.call_soon
        loop_thread = threading.get_ident()

        def local(function: Callable[[], None]) -> object:
            if threading.get_ident() == loop_thread:
                return call_soon(function)
            return soon(function)

        return Wake(soon, local)
    if library == "trio":
        import trio

        token = trio.lowlevel.current_trio_token()
        return Wake(token.run_sync_soon)
    raise RuntimeError(f"unsupported async library {library!r}")


class Outbox:
    """Items for the loop, delivered in batches: ``deliver(items)`` runs on the
    loop once per wake-up with everything posted since the last one."""

    def __init__(self, wake: Wake, deliver: Callable[[list[object]], None]) -> None:
        self._wake = wake
        self._deliver = deliver
        self._posted: list[object] = []
        self._lock = threading.Lock()
        self._scheduled = False

    def post(self, item: object) -> None:
        """Queue ``item`` for the loop (any thread); one wake-up per batch."""
        with self._lock:
            self._posted.append(item)
            if self._scheduled:
                return
            self._scheduled = True
        self.on_loop(self.drain)

    def on_loop(self, function: Callable[[], None]) -> None:
        """Run ``function`` on the loop soon (any thread; never blocks)."""
        with contextlib.suppress(RuntimeError):  # the loop is gone (process shutting down)
            self._wake.soon(function)

    def later_on_loop(self, function: Callable[[], None]) -> None:
        """:meth:`on_loop`, cheaper from the loop's own thread: ``function`` runs
        after what the loop has ready now, with no wake-up of the loop (asyncio;
        on trio, and from other threads, the same as :meth:`on_loop`)."""
        local = self._wake.local
        if local is None:
            self.on_loop(function)
            return
        with contextlib.suppress(RuntimeError):  # the loop is gone (process shutting down)
            local(function)

    def drain(self) -> None:
        """Deliver what is queued (on the loop; also called directly at shutdown)."""
        with self._lock:
            items, self._posted = self._posted, []
            self._scheduled = False
        if items:
            self._deliver(items)
