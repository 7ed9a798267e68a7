"""The thread mode: sandboxes live in the supervisor's own process, on its
worker host's vCPU threads. It knows the front through its
:class:`~.backend.Front` alone."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

from ..errors import SupervisorClosed
from ..guest.image import GuestImage
from .backend import Front
from .creation import Builder
from .host import STOP_TIMEOUT, WorkerHost
from .hostcalls import wrap_host_function
from .jobs import Job
from .loop import Outbox
from .specs import HostKey, TargetSpec
from .targets import Pool, SupervisedSandbox, Target

__all__ = ["ThreadBackend"]


class ThreadBackend:
    """Sandboxes on vCPU threads of this process (a :class:`.backend.Backend`)."""

    uses_tasks = False

    def __init__(self, front: Front, workers: int, pin_cpus: tuple[int, ...] | None) -> None:
        self._front = front
        self.host = WorkerHost(workers, pin_cpus, front.events)
        self.workers = workers

    async def start(self, outbox: Outbox, group: anyio.abc.TaskGroup | None) -> None:
        del group  # its threads are its own
        self.host.start(outbox.post, outbox.on_loop)

    def spawn_operation(self, work: Callable[[], None]) -> None:
        self.host.spawn_operation(work)

    def report(self, error: BaseException) -> bool:
        self.host.thread_failed(error)
        return True

    def worker_counters(self) -> dict[str, int]:
        return {}

    # -------------------------------------------------------------- targets
    async def create(
        self,
        target: Target,
        spec: TargetSpec,
        image: GuestImage,
        callables: dict[HostKey, Callable[..., Any]],
        output: Callable[..., None] | None,
    ) -> None:
        front = self._front
        token = front.token
        wrapped = {key: wrap_host_function(fn, token) for key, fn in callables.items()}
        builder = Builder(
            spec, image, wrapped.__getitem__, output, front.events, self.host.on_crashdump
        )
        sandboxes = await front.in_thread(builder.make_all, discard=self.host.close_sandboxes)
        target._factory = builder.another
        target._host_functions = dict(builder.sandbox_functions)
        if isinstance(target, SupervisedSandbox):
            target.sandbox = sandboxes[0]
            target.id = target.name = sandboxes[0].id
        self.host.add_target(target, sandboxes)
        front.announce(target, [sb.id for sb in sandboxes])

    def register_host_function(
        self, target: Target, name: str, function: Callable[..., Any]
    ) -> None:
        wrapped = wrap_host_function(function, self._front.token)
        target._host_functions[name] = wrapped
        for sandbox in list(target._members):
            sandbox.register_host_function(name, wrapped)

    def sandbox_ids(self, target: Target) -> list[str]:
        return [sb.id for sb in target._members]

    def nodes_of(self, target: Target) -> dict[str, str | None]:
        """The Ray node of each of the target's sandboxes: none here."""
        return {}

    async def close_target(self, target: Target) -> None:
        """Close a target once its calls are done (waiting is cancellable)."""
        while True:
            members = self.host.detach_if_idle(target)
            if members is not None:
                break
            await anyio.sleep(0.005)
        if members:
            await self._front.in_thread(lambda: self.host.close_sandboxes(members))

    async def generate_crashdump(
        self, target: SupervisedSandbox, directory: str | os.PathLike[str] | None
    ) -> Path:
        sandbox = target.sandbox
        if sandbox is None:
            raise SupervisorClosed(f"{target.name} is closed")
        return await self._front.in_thread(lambda: sandbox.generate_crashdump(directory))

    # ----------------------------------------------------------------- calls
    def submit(self, job: Job) -> None:
        self.host.submit(job)

    def abandon(self, job: Job, dump_on_cancel: bool) -> None:
        self.host.abandon(job, "cancelled" if dump_on_cancel else None)

    # ------------------------------------------------------------- shutdown
    def stop_tasks(self) -> None:
        """No tasks of its own (see :attr:`uses_tasks`)."""

    async def shutdown(self) -> None:
        """Fail what waits, stop what runs, join the threads (bounded) and close
        every sandbox."""
        host = self.host
        host.shutdown_begin()
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline and host.alive():
            await anyio.sleep(0.002)
        host.shutdown_end()

    # ------------------------------------------------------------ reporting
    def counts(self) -> dict[str, int]:
        host = self.host
        with host.lock:
            return {
                "pending": len(host.pending),
                "running": len(host.running),
                "sandboxes": sum(len(t._members) for t in host.targets),
            }

    def pool_loads(self) -> list[tuple[str, int, int]]:
        host = self.host
        with host.lock:
            return [
                (t.name, len(t._members), len(t._members) - len(t._free))
                for t in host.targets
                if isinstance(t, Pool)
            ]

    def remote_sandboxes(self) -> int:
        return 0  # they are this process's: counted as its own

    @property
    def counters(self) -> Any:
        return self.host.counters
