"""What the worker host tells about a call's end and about dumps: the events
of a call's outcome (``CallCompleted``, or ``CallTimedOut``/``GuestCrashed``
then ``CallFailed``), the :class:`~hlasync.GuestTimeout` of a call whose limit
expired, and the events of a dump written (or not) of one of its sandboxes.
Used by :class:`~.host.WorkerHost` on whichever thread decides the outcome."""

from __future__ import annotations

import time

from .. import events as ev
from ..errors import CrashdumpError, GuestCrashed, GuestTimeout
from ..sandbox import CrashdumpRecord
from .hub import Publisher
from .jobs import Job

__all__ = ["dump_written", "publish_dump", "publish_outcome", "timeout_error"]


def publish_outcome(hub: Publisher, job: Job, error: BaseException | None) -> None:
    """The events of ``job``'s outcome (decided: ``error`` None when it returned)."""
    sandbox_id = job.sandbox.id if job.sandbox is not None else None
    duration = time.monotonic() - (job.started_at or job.queued_at)
    if error is None:
        if hub.wants(ev.CallCompleted):
            hub.publish(
                ev.CallCompleted,
                sandbox_id=sandbox_id,
                function=job.name,
                call_id=job.call_id,
                duration=duration,
            )
    else:
        if isinstance(error, GuestTimeout):
            hub.publish(
                ev.CallTimedOut,
                sandbox_id=sandbox_id,
                function=job.name,
                call_id=job.call_id,
                kind=error.kind,
                elapsed=error.elapsed,
                core_path=error.core_path,
                js_stack=error.js_stack,
            )
        elif isinstance(error, GuestCrashed):
            hub.publish(
                ev.GuestCrashed,
                sandbox_id=sandbox_id,
                function=job.name,
                call_id=job.call_id,
                vector=error.vector,
                vector_name=error.vector_name,
                rip=error.rip,
                symbol=error.symbol,
                core_path=error.core_path,
            )
        hub.publish(
            ev.CallFailed,
            sandbox_id=sandbox_id,
            function=job.name,
            call_id=job.call_id,
            duration=duration,
            error=error,
        )


def timeout_error(job: Job) -> GuestTimeout:
    """The error of ``job``, whose limit expired (``job.expired``)."""
    assert job.sandbox is not None and job.expired is not None
    limit = job.timeout if job.expired == "wall" else job.cpu_timeout
    error = GuestTimeout(
        sandbox_id=job.sandbox.id,
        function=job.name,
        kind=job.expired,
        limit=limit or 0.0,
        elapsed=job.expired_at - job.started_at,
        core_path=job.core_path,
    )
    error.crashdump_error = job.dump_error
    error.js_stack = job.js_stack
    error.__dict__["_lateness"] = job.lateness  # for hlasync.watchdog.lateness, by the caller
    return error


def dump_written(record: CrashdumpRecord) -> bool:
    """Whether the dump of ``record`` was written (else it failed)."""
    return record.error is None and record.path is not None


def publish_dump(hub: Publisher, record: CrashdumpRecord) -> None:
    """``CrashDumpWritten`` or ``CrashDumpFailed`` for ``record``."""
    if dump_written(record):
        hub.publish(
            ev.CrashDumpWritten,
            sandbox_id=record.sandbox_id,
            path=record.path,
            reason=record.reason,
            function=record.function,
            size=record.size,
            seconds=record.seconds,
        )
    else:
        hub.publish(
            ev.CrashDumpFailed,
            sandbox_id=record.sandbox_id,
            reason=record.reason,
            function=record.function,
            error=record.error or CrashdumpError("unknown failure"),
        )
