"""What the supervisor's front (``core.py``) asks of a worker host: the
protocol that the thread backend (``threads.py``), the worker-process backend
(``processes.py``) and the Ray backend (``hlasync/ray/backend.py``) implement.
The front knows its backend through this protocol alone."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import anyio.abc

    from ..guest.image import GuestImage
    from .jobs import Job
    from .loop import Outbox
    from .specs import HostKey, TargetSpec
    from .targets import SupervisedSandbox, Target

__all__ = ["Backend"]


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

    def worker_counters(self) -> dict[str, int]:
        """Counters kept where the sandboxes run (worker processes), to add in."""
