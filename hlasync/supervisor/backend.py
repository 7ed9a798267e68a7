"""The two sides of the boundary between the supervisor's front
(``core.py``) and its worker host:

- :class:`Backend`: what the front asks of a backend; the thread backend
  (``threads.py``), the worker-process backend (``processes.py``) and the Ray
  backend (``hlasync/ray/backend.py``) implement it. The front knows its
  backend through this protocol alone.
- :class:`Front`: what a backend may ask of the front; the front hands its
  backend one when it makes it (``Supervisor._make_backend``). Backends know
  the front through this protocol alone (never its private members)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    import anyio.abc

    from .. import events as ev
    from ..guest.image import GuestImage
    from .hub import Publisher
    from .jobs import Job
    from .loop import Outbox
    from .specs import HostKey, TargetSpec
    from .targets import SupervisedSandbox, Target

__all__ = ["Backend", "Front"]

_T = TypeVar("_T")


class Front(Protocol):
    """What a backend may use of the supervisor's front (``core.Supervisor``
    hands each backend one)."""

    @property
    def events(self) -> Publisher:
        """Where events go, from any thread (``wants``, ``publish``, ``post``):
        the front's event hub."""

    @property
    def token(self) -> Any:
        """The event loop's anyio token (host functions called from threads run
        on the loop with it); set once the supervisor has been entered."""

    def deliver(self, event: ev.Event) -> None:
        """Hand ``event``, built elsewhere (by a worker process), to the
        subscribers that take it (on the loop)."""

    def interest(self) -> list[str]:
        """The names of the event classes some subscriber takes."""

    def on_interest_change(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on the loop) whenever the subscribers change."""

    def report(self, error: BaseException) -> None:
        """A failure the supervisor survives: logged, counted and published
        (unless the backend's own :meth:`Backend.report` took it)."""

    def announce(self, target: Target, sandbox_ids: list[str]) -> None:
        """Publish ``SandboxCreated`` for ``target``'s new sandboxes."""

    def job_done(self, job: Job) -> None:
        """``job``'s outcome is in ``job.result``/``job.error``: count it, free
        its place in the queue and wake its caller (on the loop, once per job)."""

    async def in_thread(
        self, function: Callable[[], _T], *, discard: Callable[[_T], object] | None = None
    ) -> _T:
        """Run blocking ``function`` on an operation thread of its own and await
        it; ``discard`` takes a result that arrives after the wait was cancelled."""


class Backend(Protocol):
    #: vCPU threads in all (per worker times workers, for worker processes).
    workers: int
    #: Whether :meth:`start` runs tasks of its own in the front's task group
    #: (the front then makes one; else ``group`` is None).
    uses_tasks: bool

    @property
    def counters(self) -> Any:
        """The counters the front's statistics read (a mapping of ints)."""

    async def start(self, outbox: Outbox, group: anyio.abc.TaskGroup | None) -> None:
        """Start serving: results and events go through ``outbox``."""

    async def shutdown(self) -> None:
        """Fail what waits, stop what runs, join (bounded) and close everything."""

    def stop_tasks(self) -> None:
        """End the tasks :meth:`start` and later work ran in the front's group
        (shielded from the scopes around the supervisor: only this ends them)."""

    async def create(
        self,
        target: Target,
        spec: TargetSpec,
        image: GuestImage,
        callables: dict[HostKey, Callable[..., Any]],
        output: Callable[..., None] | None,
    ) -> None:
        """Make the sandboxes of a new target (announced through the front)."""

    def register_host_function(
        self, target: Target, name: str, function: Callable[..., Any]
    ) -> None: ...

    def sandbox_ids(self, target: Target) -> list[str]: ...

    def nodes_of(self, target: Target) -> dict[str, str | None]:
        """The Ray node of each of the target's sandboxes (empty off Ray)."""

    async def close_target(self, target: Target) -> None: ...

    async def generate_crashdump(
        self, target: SupervisedSandbox, directory: str | os.PathLike[str] | None
    ) -> Path: ...

    def submit(self, job: Job) -> None: ...

    def abandon(self, job: Job, dump_on_cancel: bool) -> None: ...

    def spawn_operation(self, work: Callable[[], None]) -> None:
        """Run ``work`` (a slow operation of the front) on a thread of its own."""

    def report(self, error: BaseException) -> bool:
        """A failure the supervisor survives: True if the backend reported it
        itself (logged, counted, published), False to leave it to the front."""

    def counts(self) -> dict[str, int]:
        """pending, running and sandboxes now."""

    def pool_loads(self) -> list[tuple[str, int, int]]:
        """(name, sandboxes, sandboxes running a call) of every open pool (any thread)."""

    def remote_sandboxes(self) -> int:
        """Sandboxes open in other processes (worker processes, Ray actors)."""

    def worker_counters(self) -> dict[str, int]:
        """Counters kept where the sandboxes run (worker processes), to add in."""
