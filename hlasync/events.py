"""Typed supervisor events and per-subscriber bounded streams.

Every event is a frozen dataclass with ``timestamp`` (``time.time()``) and
``sandbox_id`` (None for supervisor-wide events). Subscribe with
:meth:`hlasync.Supervisor.subscribe`; each subscriber has its own bounded
buffer and overflow policy, so a slow subscriber never stalls anything else.
Dropped events are counted and announced with :class:`EventsDropped`;
:class:`CrashDumpWritten` and :class:`CrashDumpFailed` are never dropped:
they are kept even beyond the buffer size.
"""

from __future__ import annotations

import collections
import enum
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import anyio

__all__ = [
    "CRITICAL_EVENTS",
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
]


def _now() -> float:
    return time.time()


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Base of all supervisor events."""

    sandbox_id: str | None
    timestamp: float = field(default_factory=_now)


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


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestOutput(Event):
    text: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SupervisorError(Event):
    """A failure inside the supervisor (one of its threads, or a sandbox that
    could not be restored and was retired); the supervisor goes on."""

    thread: str  # the thread that hit it
    error: BaseException


@dataclass(frozen=True, slots=True, kw_only=True)
class EventsDropped(Event):
    count: int  # events this subscriber lost since the last EventsDropped


#: Events a subscriber is never made to lose (kept even beyond its buffer size).
CRITICAL_EVENTS: tuple[type[Event], ...] = (CrashDumpWritten, CrashDumpFailed)


class Overflow(enum.Enum):
    """What a full subscriber buffer does with one more event."""

    DROP_OLDEST = "drop_oldest"
    DROP_NEWEST = "drop_newest"


class StreamStatistics(NamedTuple):
    buffered: int
    buffer_size: int
    delivered: int
    dropped: int


class EventStream:
    """The receiving end of one subscription: ``async for event in stream``.

    Iteration ends when the supervisor closes (or the subscription ends).
    """

    def __init__(self, types: tuple[type[Event], ...], buffer: int, overflow: Overflow) -> None:
        if type(buffer) is not int or buffer < 1:
            raise ValueError("buffer must be a positive int")
        for kind in types:
            if not (isinstance(kind, type) and issubclass(kind, Event)):
                raise TypeError(f"{kind!r} is not an event type")
        self.types = types or (Event,)
        self.buffer_size = buffer
        self.overflow = Overflow(overflow)
        self._queue: collections.deque[Event] = collections.deque()
        self._ordinary = 0  # events in the queue that may be dropped
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
        critical = isinstance(event, CRITICAL_EVENTS)
        if not critical and self._ordinary >= self.buffer_size:
            # Counted now, announced by one EventsDropped when the subscriber next
            # reads, so announcements never fill the buffer themselves.
            self._dropped += 1
            self._unannounced += 1
            if self.overflow is Overflow.DROP_NEWEST:
                return
            self._drop_oldest_ordinary()
        self._queue.append(event)
        if not critical:
            self._ordinary += 1
        self._wakeup.set()

    def _drop_oldest_ordinary(self) -> None:
        for index, queued in enumerate(self._queue):
            if not isinstance(queued, CRITICAL_EVENTS):
                del self._queue[index]
                self._ordinary -= 1
                return

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
                self._ordinary -= 1
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
        return StreamStatistics(buffered, self.buffer_size, self._delivered, self._dropped)


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
