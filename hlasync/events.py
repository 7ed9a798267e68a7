"""Typed supervisor events and per-subscriber bounded streams.

Every event is a frozen dataclass with ``timestamp`` (``time.time()``) and
``sandbox_id`` (None for supervisor-wide events). Subscribe with
:meth:`hlasync.Supervisor.subscribe`; each subscriber has its own bounded
buffer and overflow policy, so a slow subscriber never stalls anything else.
The buffer is bounded in events and in bytes (:func:`event_size`), so a
subscriber that stops reading holds a bounded amount of memory however much
the guests print. Dropped events are counted and announced with
:class:`EventsDropped`; :class:`CrashDumpWritten`,
:class:`CrashDumpFailed` and :class:`WorkerDied` are never dropped: they are
kept even beyond both bounds.
"""

from __future__ import annotations

import collections
import enum
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import anyio

__all__ = [
    "CRITICAL_EVENTS",
    "DEFAULT_MAX_BYTES",
    "GUEST_OUTPUT_LIMIT",
    "CallCompleted",
    "CallFailed",
    "CallStarted",
    "CallTimedOut",
    "CrashDumpFailed",
    "CrashDumpWritten",
    "Event",
    "EventStream",
    "EventsDropped",
    "GuestCrashed",
    "GuestOutput",
    "Overflow",
    "SandboxClosed",
    "SandboxCreated",
    "StreamStatistics",
    "SupervisorError",
    "WorkerDied",
    "WorkerStarted",
    "event_size",
]


def _now() -> float:
    return time.time()


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Base of all supervisor events."""

    sandbox_id: str | None
    timestamp: float = field(default_factory=_now)
    #: The Ray node the event comes from (``hlasync.ray``), None for this machine.
    node: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SandboxCreated(Event):
    guest: str
    pool: str | None  # the pool's name, or None for a dedicated sandbox


@dataclass(frozen=True, slots=True, kw_only=True)
class SandboxClosed(Event):
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class CallStarted(Event):
    function: str
    call_id: int
    queued: float  # seconds spent waiting for a vCPU


@dataclass(frozen=True, slots=True, kw_only=True)
class CallCompleted(Event):
    function: str
    call_id: int
    duration: float


@dataclass(frozen=True, slots=True, kw_only=True)
class CallFailed(Event):
    function: str
    call_id: int
    duration: float
    error: BaseException


@dataclass(frozen=True, slots=True, kw_only=True)
class CallTimedOut(Event):
    function: str
    call_id: int
    kind: str  # "wall" or "cpu"
    elapsed: float
    core_path: Path | None
    js_stack: str | None = None  # a JavaScript handler's stack at the expiry


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestCrashed(Event):
    function: str
    call_id: int
    vector: int
    vector_name: str
    rip: int
    symbol: str | None
    core_path: Path | None


@dataclass(frozen=True, slots=True, kw_only=True)
class CrashDumpWritten(Event):
    path: Path
    reason: str
    function: str | None
    size: int
    seconds: float


@dataclass(frozen=True, slots=True, kw_only=True)
class CrashDumpFailed(Event):
    reason: str
    function: str | None
    error: BaseException


#: Characters of one print a :class:`GuestOutput` keeps (see :meth:`GuestOutput.from_text`).
GUEST_OUTPUT_LIMIT = 64 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestOutput(Event):
    """One print of a guest. ``truncated`` counts the bytes (UTF-8) of the
    print that were cut after ``text``; 0 when ``text`` is all of it.
    ``level`` is ``"print"`` for ``hl_print`` and JavaScript's ``print()``
    (text with no newline implied), and the console method for JavaScript's
    console (``"log"``, ``"info"``, ``"warn"``, ``"error"``, ``"debug"``)."""

    text: str
    truncated: int = 0
    level: str = "print"

    @classmethod
    def from_text(
        cls,
        sandbox_id: str | None,
        text: str,
        limit: int = GUEST_OUTPUT_LIMIT,
        level: str = "print",
    ) -> GuestOutput:
        """The event for a print of ``text``, keeping at most ``limit`` characters.

        A guest may print as much as its output buffer holds (MiBs) in one
        exit; one event per subscriber of that size is what made event memory
        grow without bound. The cut is visible: ``truncated`` says how much
        is missing.
        """
        if type(limit) is not int or limit < 0:
            raise ValueError(f"limit must be a non-negative int, got {limit!r}")
        if len(text) <= limit:
            return cls(sandbox_id=sandbox_id, text=text, level=level)
        cut = text[limit:]
        # ASCII is one byte a character; only other text needs encoding to count.
        lost = len(cut) if cut.isascii() else len(cut.encode("utf-8", "surrogatepass"))
        return cls(sandbox_id=sandbox_id, text=text[:limit], truncated=lost, level=level)


@dataclass(frozen=True, slots=True, kw_only=True)
class SupervisorError(Event):
    """A failure inside the supervisor (one of its threads, or a sandbox that
    could not be restored and was retired); the supervisor goes on."""

    thread: str  # the thread that hit it
    error: BaseException


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerStarted(Event):
    """A worker process (``Supervisor(processes=N)``) is up and serving."""

    worker: int  # its index, 0 .. processes - 1 (a replacement keeps the index)
    pid: int


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerDied(Event):
    """A worker process ended without being asked to (killed, crashed, out of
    memory). Its running calls failed with :class:`~hlasync.WorkerLost`; its
    pools and sandboxes are being made again in a new worker process."""

    worker: int
    pid: int
    exit_status: int | None  # waitpid's: negative for the signal that ended it
    lost_calls: int  # calls that were running (or sent) there


@dataclass(frozen=True, slots=True, kw_only=True)
class EventsDropped(Event):
    count: int  # events this subscriber lost since the last EventsDropped


#: Events a subscriber is never made to lose (kept even beyond its buffer size).
CRITICAL_EVENTS: tuple[type[Event], ...] = (CrashDumpWritten, CrashDumpFailed, WorkerDied)


#: Default bound, in bytes (:func:`event_size`), of one subscriber's buffered events.
DEFAULT_MAX_BYTES = 8 * 1024 * 1024
#: What an event counts for against ``max_bytes``, on top of its text.
EVENT_OVERHEAD = 256


def event_size(event: Event) -> int:
    """Estimated memory one buffered event holds, in bytes.

    An event is a small object plus, for :class:`GuestOutput`, its text: that
    text is the only part that grows with what the guest does, so it is
    counted exactly (``sys.getsizeof``, O(1)) and every event adds a constant.
    """
    if isinstance(event, GuestOutput):
        return EVENT_OVERHEAD + sys.getsizeof(event.text)
    return EVENT_OVERHEAD


class Overflow(enum.Enum):
    """What a full subscriber buffer does with one more event."""

    DROP_OLDEST = "drop_oldest"
    DROP_NEWEST = "drop_newest"


class StreamStatistics(NamedTuple):
    buffered: int
    buffer_size: int
    delivered: int
    dropped: int
    buffered_bytes: int  # event_size() of the droppable events buffered now
    max_bytes: int


class EventStream:
    """The receiving end of one subscription: ``async for event in stream``.

    It buffers at most ``buffer`` ordinary events and at most ``max_bytes``
    of them (by :func:`event_size`); ``overflow`` decides which event goes
    when one more would exceed either bound. Iteration ends when the
    supervisor closes (or the subscription ends).
    """

    def __init__(
        self,
        types: tuple[type[Event], ...],
        buffer: int,
        overflow: Overflow,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        if type(buffer) is not int or buffer < 1:
            raise ValueError("buffer must be a positive int")
        if type(max_bytes) is not int or max_bytes < 1:
            raise ValueError(f"max_bytes must be a positive int, got {max_bytes!r}")
        for kind in types:
            if not (isinstance(kind, type) and issubclass(kind, Event)):
                raise TypeError(f"{kind!r} is not an event type")
        self.types = types or (Event,)
        self.buffer_size = buffer
        self.max_bytes = max_bytes
        self.overflow = Overflow(overflow)
        self._queue: collections.deque[Event] = collections.deque()
        self._ordinary = 0  # events in the queue that may be dropped
        self._ordinary_bytes = 0  # their event_size() total
        self._wakeup = anyio.Event()
        self._closed = False
        self._delivered = 0
        self._dropped = 0
        self._unannounced = 0

    def wants(self, event: Event) -> bool:
        return isinstance(event, self.types)

    # Called on the event loop thread only.
    def _push(self, event: Event) -> None:
        if self._closed:
            return
        if isinstance(event, CRITICAL_EVENTS):
            self._queue.append(event)
            self._wakeup.set()
            return
        size = event_size(event)
        if size > self.max_bytes:
            self._count_drop()  # could never fit: keep what is buffered
            return
        while self._ordinary and (
            self._ordinary >= self.buffer_size or self._ordinary_bytes + size > self.max_bytes
        ):
            self._count_drop()
            if self.overflow is Overflow.DROP_NEWEST:
                return
            self._drop_oldest_ordinary()
        self._queue.append(event)
        self._ordinary += 1
        self._ordinary_bytes += size
        self._wakeup.set()

    def _count_drop(self) -> None:
        # Counted now, announced by one EventsDropped when the subscriber next
        # reads, so announcements never fill the buffer themselves.
        self._dropped += 1
        self._unannounced += 1

    def _drop_oldest_ordinary(self) -> None:
        if len(self._queue) == self._ordinary:  # no critical event to step over
            self._forget(self._queue.popleft())
            return
        for index, queued in enumerate(self._queue):
            if not isinstance(queued, CRITICAL_EVENTS):
                del self._queue[index]
                self._forget(queued)
                return

    def _forget(self, event: Event) -> None:
        """Account for an ordinary event leaving the queue."""
        self._ordinary -= 1
        self._ordinary_bytes -= event_size(event)

    def _close(self) -> None:
        self._closed = True
        self._wakeup.set()

    def receive_nowait(self) -> Event:
        """The next buffered event (anyio.WouldBlock if none, EndOfStream when closed).

        After a loss, the next event received is an :class:`EventsDropped`
        with the number of events lost since the previous one.
        """
        if self._unannounced:
            count, self._unannounced = self._unannounced, 0
            self._delivered += 1
            return EventsDropped(sandbox_id=None, count=count)
        if self._queue:
            event = self._queue.popleft()
            if not isinstance(event, CRITICAL_EVENTS):
                self._forget(event)
            self._delivered += 1
            return event
        if self._closed:
            raise anyio.EndOfStream
        raise anyio.WouldBlock

    async def receive(self) -> Event:
        while True:
            try:
                return self.receive_nowait()
            except anyio.WouldBlock:
                # Several tasks may wait: all wait on one event; only a fired event
                # is replaced, so no waiter is left on a stale one.
                if self._wakeup.is_set():
                    self._wakeup = anyio.Event()
                await self._wakeup.wait()

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    def statistics(self) -> StreamStatistics:
        buffered = len(self._queue) + (1 if self._unannounced else 0)
        return StreamStatistics(
            buffered,
            self.buffer_size,
            self._delivered,
            self._dropped,
            self._ordinary_bytes,
            self.max_bytes,
        )


class Subscription:
    """``async with supervisor.subscribe(...) as stream``: unsubscribes on exit."""

    def __init__(self, stream: EventStream, detach: Any) -> None:
        self._stream = stream
        self._detach = detach

    async def __aenter__(self) -> EventStream:
        return self._stream

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._detach(self._stream)
        self._stream._close()
