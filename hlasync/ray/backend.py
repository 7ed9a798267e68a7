"""The supervisor's side of workers that run as Ray actors.

It is the process backend (``hlasync/supervisor/processes.py`` and its
``proc_*`` modules: shards, queues, host calls, events, worker deaths and
relaunches) with another way to start a worker: a
:class:`~hlasync.ray.actor.NodeWorker` actor, placed by Ray on a node that
offers the KVM resource, instead of a child process. The channel's bytes go
through a local ``socketpair`` whose far end two bridge threads per worker
carry over Ray method calls (``deliver`` and a long-polled ``receive``); when
the actor or its node dies, ``receive`` fails, the bridge closes the socket,
and the process backend sees the end of a worker as it does for a process.
Like every backend it knows the supervisor's front through its
:class:`~hlasync.supervisor.backend.Front` alone.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import anyio

from ..errors import HlasyncError, SupervisorError
from ..supervisor.backend import Front
from ..supervisor.jobs import Job
from ..supervisor.proc_handle import WorkerHandle
from ..supervisor.processes import ProcessBackend

__all__ = ["RayBackend"]

_logger = logging.getLogger("hlasync.ray")


#: Copies the core dump of an error from its node into a directory here.
Fetcher = Callable[[HlasyncError, Path], Awaitable[Path]]

#: Seconds one long-polled ``receive`` waits on the node before it answers b"".
RECEIVE_WAIT = 0.5
#: Seconds shutdown waits for a worker's bridge threads to end.
BRIDGE_JOIN = 5.0


class RayBackend(ProcessBackend):
    #: A Ray call takes ~0.6 ms each way: calls queue on the node (8 per
    #: sandbox, hot pools' too) so that results and new calls travel in
    #: batches; a shard may get them while it answered within 50 ms.
    queue_depth = 8
    hot_queue_depth = 8
    queue_ahead_window = 0.05
    holds = False  # an actor's worker has no start marks: it sends every outcome at once

    def __init__(
        self,
        front: Front,
        actors: int,
        workers: int,
        resources: Mapping[str, float],
        num_cpus: float,
        options: Mapping[str, Any],
        start_timeout: float,
        fetch: tuple[Fetcher, Path] | None,
    ) -> None:
        super().__init__(front, actors, workers, None)
        self._start_timeout = start_timeout
        self._fetch = fetch
        self._resources = dict(resources)
        self._num_cpus = num_cpus
        self._options = dict(options)
        self._actors: dict[int, Any] = {}
        self._bridges: dict[int, list[threading.Thread]] = {}

    async def _start_worker(self, worker: WorkerHandle) -> socket.socket:
        import ray

        from .actor import NodeWorker

        # Ray's own annotations vary between versions: its handles are Any here.
        remote: Any = ray.remote(NodeWorker)
        remote = remote.options(
            resources=self._resources,
            num_cpus=self._num_cpus,  # 0 by default: the kvm resource alone places it
            max_concurrency=4,  # deliver, receive and read_dump at once
            max_restarts=0,  # a dead worker is relaunched (and its shards remade) here
            name=None,
            **self._options,
        )
        actor: Any = remote.remote()
        try:
            info: dict[str, Any] = await anyio.to_thread.run_sync(
                lambda: ray.get(actor.describe.remote(), timeout=self._start_timeout)
            )
        except Exception as exc:  # noqa: BLE001 - GetTimeoutError, RayActorError, ...
            ray.kill(actor, no_restart=True)
            raise SupervisorError(
                f"cannot start worker {worker.index} on the Ray cluster (resources "
                f"{self._resources}, num_cpus {self._num_cpus:g}): {type(exc).__name__}: {exc}"
            ) from None
        if not info["kvm"]:
            ray.kill(actor, no_restart=True)
            raise SupervisorError(
                f"Ray node {info['node']} ({info['host']}) offers {self._resources} "
                "but has no usable /dev/kvm"
            )
        worker.process = None
        worker.pid = int(info["pid"])
        worker.node = str(info["node"])
        worker.where = f" on Ray node {worker.node[:12]} ({info['host']})"
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        up = threading.Thread(
            target=_uplink,
            args=(theirs, actor),
            name=f"hlasync-ray-up-{worker.index}",
            daemon=True,
        )
        down = threading.Thread(
            target=_downlink,
            args=(theirs, actor, up),
            name=f"hlasync-ray-down-{worker.index}",
            daemon=True,
        )
        up.start()
        down.start()
        self._actors[worker.index] = actor
        self._bridges[worker.index] = [up, down]
        return mine

    def _kill(self, worker: WorkerHandle) -> None:
        import ray

        actor = self._actors.pop(worker.index, None)
        if actor is not None:
            with contextlib.suppress(Exception):  # already gone with its node
                ray.kill(actor, no_restart=True)

    async def shutdown(self) -> None:
        await super().shutdown()
        bridges = [thread for threads in self._bridges.values() for thread in threads]
        self._bridges.clear()
        await anyio.to_thread.run_sync(_join_all, bridges, BRIDGE_JOIN)

    def _call_done(self, job: Job, result: Any, error: BaseException | None) -> None:
        """With ``fetch_dumps``, the core dump of a call that failed with one is
        copied here before its caller hears of it."""
        fetch = self._fetch is not None and isinstance(error, HlasyncError) and error.node
        if fetch and getattr(error, "core_path", None):
            assert isinstance(error, HlasyncError)
            self._spawn(self._fetch_then_finish, job, result, error)
            return
        self._finish(job, result, error)

    async def _fetch_then_finish(self, job: Job, result: Any, error: HlasyncError) -> None:
        assert self._fetch is not None
        fetch, directory = self._fetch
        remote = getattr(error, "core_path", None)
        try:
            local = await fetch(error, directory)
        except HlasyncError as exc:  # the node's copy stays: say why it is not here
            _logger.warning("core dump %s stays on node %s: %s", remote, error.node, exc)
        else:
            error.core_path = local  # type: ignore[attr-defined]
        self._finish(job, result, error)

    def actor_on(self, node: str) -> Any | None:
        """A live worker's actor on Ray node ``node``, if any."""
        for worker in self._workers:
            if worker.node == node and worker.alive:
                actor = self._actors.get(worker.index)
                if actor is not None:
                    return actor
        return None

    def nodes(self) -> dict[int, str | None]:
        """The Ray node of each worker, by index."""
        return {worker.index: worker.node for worker in self._workers}


def _uplink(sock: socket.socket, actor: Any) -> None:
    """Supervisor -> worker: what the process backend wrote, in order."""
    import ray

    try:
        while True:
            data = sock.recv(1 << 20)
            if not data:
                return  # the supervisor closed its end
            ray.get(actor.deliver.remote(data))
    except Exception:  # noqa: BLE001 - the actor is gone: the downlink reports it
        pass
    finally:
        _shut(sock)


def _downlink(sock: socket.socket, actor: Any, up: threading.Thread) -> None:
    """Worker -> supervisor; when the worker ends (or its actor or node dies)
    the supervisor's end reads EOF."""
    import ray

    try:
        while True:
            data = ray.get(actor.receive.remote(RECEIVE_WAIT))
            if data is None:
                return  # the worker ended (it was asked to, or it failed)
            if data:
                sock.sendall(data)
    except Exception:  # noqa: BLE001 - RayActorError: the actor or its node died
        pass
    finally:
        _shut(sock)
        up.join(BRIDGE_JOIN)
        sock.close()


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _join_all(threads: list[threading.Thread], timeout: float) -> None:
    for thread in threads:
        thread.join(timeout)
