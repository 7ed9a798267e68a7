"""Event subscriptions: who wants which events, and delivery to their
streams on the loop. Threads ask :meth:`EventHub.wants` before building an
event, so nobody pays for events nobody reads."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from .. import events as ev

__all__ = ["EventHub", "Publisher"]


class Publisher(Protocol):
    """What the worker host and sandbox construction need of event delivery
    (the supervisor's :class:`EventHub`, or a worker process's channel)."""

    def wants(self, kind: type[ev.Event]) -> bool: ...

    def publish(self, event_type: type[ev.Event], /, **fields: Any) -> None: ...

    def post(self, event: ev.Event) -> None: ...


class EventHub:
    def __init__(self) -> None:
        self._streams: list[ev.EventStream] = []
        self._interest: dict[type[ev.Event], bool] = {}
        self._post: Callable[[object], None] | None = None
        self._closed = False
        self.published = 0
        self._dropped_by_gone = 0  # drops counted by streams that were unsubscribed
        #: Called (on the loop) when the set of subscribers changes.
        self.on_change: Callable[[], None] | None = None

    def attach(self, post: Callable[[object], None]) -> None:
        """Where events go from any thread (the supervisor's outbox)."""
        self._post = post

    def subscribe(
        self,
        event_types: tuple[type[ev.Event], ...],
        buffer: int,
        overflow: ev.Overflow | str,
        max_bytes: int,
    ) -> ev.Subscription:
        stream = ev.EventStream(event_types, buffer, ev.Overflow(overflow), max_bytes)
        if self._closed:
            stream._close()
        else:
            self._streams.append(stream)
            self._changed()
        return ev.Subscription(stream, self._unsubscribe)

    def _unsubscribe(self, stream: ev.EventStream) -> None:
        if stream in self._streams:
            self._streams.remove(stream)
            self._changed()
        self._dropped_by_gone += stream.statistics().dropped

    def _changed(self) -> None:
        self._interest = {}  # threads may hold the old map: replace it, never clear it
        if self.on_change is not None:
            self.on_change()

    def interest_names(self) -> list[str]:
        """The names of the event classes some subscriber takes (for worker processes)."""
        return sorted({t.__name__ for s in self._streams for t in (s.types or (ev.Event,))})

    def wants(self, kind: type[ev.Event]) -> bool:
        """Whether any subscriber takes ``kind`` (any thread; cached per subscriber set)."""
        interest = self._interest
        wanted = interest.get(kind)
        if wanted is None:
            wanted = any(issubclass(kind, t) for s in list(self._streams) for t in s.types)
            interest[kind] = wanted
        return wanted

    def publish(self, event_type: type[ev.Event], /, **fields: Any) -> None:
        """Build and send an event if anyone wants it (any thread)."""
        if self.wants(event_type):
            self.post(event_type(**fields))

    def post(self, event: ev.Event) -> None:
        """Send a built event (any thread)."""
        if self._post is not None:
            self._post(event)

    def deliver(self, event: ev.Event) -> None:
        """Push ``event`` into every stream that takes it (on the loop)."""
        self.published += 1
        for stream in self._streams:
            if stream.wants(event):
                stream._push(event)

    def close(self) -> None:
        """End every stream (their readers' ``async for`` finishes)."""
        self._closed = True
        for stream in self._streams:
            stream._close()
        self._streams.clear()

    @property
    def subscribers(self) -> int:
        return len(self._streams)

    @property
    def dropped(self) -> int:
        return self._dropped_by_gone + sum(s.statistics().dropped for s in self._streams)
