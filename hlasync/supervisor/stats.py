"""What :meth:`Supervisor.statistics() <.core.Supervisor.statistics>` returns,
:class:`SupervisorStatistics`, and how it is gathered: the backend's counts and
counters (with those kept in worker processes) and the event hub's."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from .backend import Backend
    from .hub import EventHub

__all__ = ["SupervisorStatistics", "gather"]


class SupervisorStatistics(NamedTuple):
    workers: int
    sandboxes: int
    pending: int  # calls waiting for a vCPU
    running: int
    started: int
    completed: int
    failed: int
    timed_out: int
    cancelled: int
    dumps_written: int
    dumps_failed: int
    subscribers: int
    events_published: int
    events_dropped: int
    internal_errors: int  # SupervisorError events: failures the supervisor survived
    processes: int = 0  # worker processes (0: the thread mode)
    workers_lost: int = 0  # worker processes that died and were replaced
    #: Frames read from worker processes' channels, and the messages in them
    #: (messages per frame: how many outcomes and events one wake-up of the
    #: event loop took; 0 in the thread mode).
    channel_frames: int = 0
    channel_messages: int = 0


def gather(workers: int, processes: int, backend: Backend, hub: EventHub) -> SupervisorStatistics:
    """The statistics now of a supervisor of ``workers`` vCPU threads in
    ``processes`` worker processes (0: its own threads)."""
    counts = backend.counts()
    c = backend.counters.copy()
    c.update(backend.worker_counters())
    return SupervisorStatistics(
        workers=workers,
        sandboxes=counts["sandboxes"],
        pending=counts["pending"],
        running=counts["running"],
        started=c["started"],
        completed=c["completed"],
        failed=c["failed"],
        timed_out=c["timed_out"],
        cancelled=c["cancelled"],
        dumps_written=c["dumps_written"],
        dumps_failed=c["dumps_failed"],
        subscribers=hub.subscribers,
        events_published=hub.published,
        events_dropped=hub.dropped,
        internal_errors=c["internal_errors"],
        processes=processes,
        workers_lost=c["workers_lost"],
        channel_frames=c["channel_frames"],
        channel_messages=c["channel_messages"],
    )
