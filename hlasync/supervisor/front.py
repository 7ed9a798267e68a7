"""The front as its backend sees it: :class:`FrontLink`, the
:class:`~.backend.Front` that a :class:`~.core.Supervisor` hands the backend
it makes. It is made of the supervisor's parts (its event hub and the
callables below), so a backend reaches nothing else of the front."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from .. import events as ev
    from .hub import EventHub, Publisher
    from .jobs import Job
    from .targets import Target

__all__ = ["FrontLink", "InThread"]

_T = TypeVar("_T")


class InThread(Protocol):
    """The front's ``_in_thread``: run a blocking function on an operation
    thread of its own and await it."""

    def __call__(
        self, function: Callable[[], _T], *, discard: Callable[[_T], object] | None = ...
    ) -> Awaitable[_T]: ...


class FrontLink:
    """A :class:`~.backend.Front`: the hub's delivery and interest, and what the
    supervisor does for its backend (reports, announcements, finished jobs,
    operation threads), each given as a callable."""

    __slots__ = ("_announce", "_hub", "_in_thread", "_job_done", "_report", "_token")

    def __init__(
        self,
        hub: EventHub,
        *,
        token: Callable[[], Any],
        report: Callable[[BaseException], None],
        announce: Callable[[Target, list[str]], None],
        job_done: Callable[[Job], None],
        in_thread: InThread,
    ) -> None:
        self._hub = hub
        self._token = token
        self._report = report
        self._announce = announce
        self._job_done = job_done
        self._in_thread = in_thread

    @property
    def events(self) -> Publisher:
        return self._hub

    @property
    def token(self) -> Any:
        return self._token()

    def deliver(self, event: ev.Event) -> None:
        self._hub.deliver(event)

    def interest(self) -> list[str]:
        return self._hub.interest_names()

    def on_interest_change(self, callback: Callable[[], None]) -> None:
        self._hub.on_change = callback

    def report(self, error: BaseException) -> None:
        self._report(error)

    def announce(self, target: Target, sandbox_ids: list[str]) -> None:
        self._announce(target, sandbox_ids)

    def job_done(self, job: Job) -> None:
        self._job_done(job)

    async def in_thread(
        self, function: Callable[[], _T], *, discard: Callable[[_T], object] | None = None
    ) -> _T:
        return await self._in_thread(function, discard=discard)
