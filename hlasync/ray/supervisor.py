"""``RaySupervisor``: the supervisor's API over workers spread across a Ray
cluster (see docs/cluster.md)."""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio

from ..crashdump.placement import resolve_directory, write_atomically
from ..crashdump.writer import pwrite_all
from ..errors import CrashdumpError, HlasyncError, SupervisorClosed, SupervisorError
from ..supervisor.backend import Backend, Front
from ..supervisor.core import Supervisor
from ..supervisor.targets import SupervisedSandbox, Target
from .backend import RayBackend

__all__ = ["KVM_RESOURCE", "RaySupervisor"]

#: The custom resource that marks a Ray node with a usable ``/dev/kvm``
#: (``ray start --resources '{"kvm": N}'``: up to N workers there).
KVM_RESOURCE = "kvm"

#: ``.options()`` of the actors that RaySupervisor sets itself: not in
#: ``actor_options`` (what to pass instead).
_OWN_OPTIONS = {
    "num_cpus": "pass RaySupervisor(num_cpus=...)",
    "resources": "pass RaySupervisor(resources=...)",
    "max_concurrency": "RaySupervisor sets it",
    "max_restarts": "RaySupervisor starts a dead actor again itself",
    "name": "RaySupervisor's actors have no names",
}


class RaySupervisor(Supervisor):
    """A :class:`~hlasync.Supervisor` whose workers are Ray actors.

    ``actors`` workers, each a Ray actor holding ``workers`` vCPU threads and
    its sandboxes, are placed by Ray on nodes that offer ``resources``
    (default ``{"kvm": 1}`` per actor: a node started with ``kvm: N`` takes
    N actors). ``num_cpus``: the CPUs each actor asks Ray for on top of
    ``resources`` (default 0: the ``kvm`` resource alone decides where the
    actors go; Ray's own default for an actor, 1 CPU, would also cap each
    node at its CPU count). Pools are spread over the actors, a
    dedicated sandbox lives in one; calls, ``timeout``/``cpu_timeout``,
    cancellation, ``generate_crashdump()`` and events work as with
    ``Supervisor(processes=N)``. Events and errors name the node they come
    from (``node``); a core dump is written on its node, and
    :meth:`fetch_crashdump` brings its bytes here. An actor (or node) that
    dies fails its running calls with :class:`~hlasync.WorkerLost`, emits
    ``WorkerDied`` naming the node, and is started again wherever the
    cluster has room, its pools and sandboxes made anew there.

    ``address``: the Ray cluster to connect to when this process has not
    called ``ray.init()`` yet. None: ``ray.init()``'s own default, that is
    ``RAY_ADDRESS``, else the cluster ``ray start --head`` runs on this
    machine (its token, if it uses token authentication, found by Ray in
    ``~/.ray/auth_token``), else a new one-node Ray instance here offering
    the actors' ``resources``. ``actor_options``: more ``.options()`` for
    the actors (e.g. a ``runtime_env``); not ``num_cpus`` nor ``resources``
    (a ValueError: pass them to RaySupervisor) nor the options RaySupervisor
    sets itself (``max_concurrency``, ``max_restarts``, ``name``).
    ``start_timeout``: seconds an actor may take to be
    placed and to start (a cluster with no room fails then). ``fetch_dumps``:
    a directory here into which the core dump of every call that fails with
    one (``GuestTimeout``, ``GuestCrashed``, ...) is copied before the
    caller hears of it; the error's ``core_path`` is then the local copy.
    Other arguments as for :class:`~hlasync.Supervisor`.
    """

    def __init__(
        self,
        *,
        actors: int = 2,
        workers: int = 2,
        resources: Mapping[str, float] | None = None,
        num_cpus: float = 0,
        address: str | None = None,
        actor_options: Mapping[str, Any] | None = None,
        start_timeout: float = 30.0,
        fetch_dumps: str | os.PathLike[str] | None = None,
        max_pending: int = 10_000,
        timeout: float | None = None,
        cpu_timeout: float | None = None,
        dump_on_cancel: bool = False,
        shutdown_grace: float = 5.0,
    ) -> None:
        if type(actors) is not int or actors < 1:
            raise ValueError("actors must be a positive int")
        if isinstance(start_timeout, bool) or not isinstance(start_timeout, (int, float)):
            raise ValueError("start_timeout must be a number of seconds")
        if not start_timeout > 0:
            raise ValueError("start_timeout must be a positive number of seconds")
        resources = dict(resources) if resources is not None else {KVM_RESOURCE: 1.0}
        for name, amount in resources.items():
            if not isinstance(name, str) or not isinstance(amount, (int, float)) or amount <= 0:
                raise ValueError(f"resources must map names to positive amounts, got {resources!r}")
        for name, instead in (("CPU", "num_cpus=..."), ("GPU", "actor_options={'num_gpus': ...}")):
            if name in resources:
                raise ValueError(f"resources cannot name {name!r} (Ray refuses it): pass {instead}")
        if (
            isinstance(num_cpus, bool)
            or not isinstance(num_cpus, (int, float))
            or not math.isfinite(num_cpus)
            or num_cpus < 0
        ):
            raise ValueError(
                f"num_cpus must be a non-negative number (the CPUs each actor asks Ray "
                f"for; 0: the {KVM_RESOURCE!r} resource alone places them), got {num_cpus!r}"
            )
        options = dict(actor_options or {})
        for key, instead in _OWN_OPTIONS.items():
            if key in options:
                raise ValueError(f"actor_options cannot set {key!r}: {instead}")
        self.address = address
        self.resources = resources
        self.num_cpus = num_cpus
        self.fetch_dumps = Path(fetch_dumps) if fetch_dumps is not None else None
        self._actor_options = options
        self._start_timeout = float(start_timeout)
        super().__init__(
            workers=workers,
            processes=actors,
            max_pending=max_pending,
            timeout=timeout,
            cpu_timeout=cpu_timeout,
            dump_on_cancel=dump_on_cancel,
            shutdown_grace=shutdown_grace,
        )

    def _make_backend(self, front: Front, processes: int, workers: int) -> Backend:
        """Workers that are Ray actors (``processes`` of them)."""
        fetch = (self._fetch_into, self.fetch_dumps) if self.fetch_dumps is not None else None
        self._ray_backend = RayBackend(
            front,
            processes,
            workers,
            self.resources,
            self.num_cpus,
            self._actor_options,
            self._start_timeout,
            fetch,
        )
        return self._ray_backend

    async def __aenter__(self) -> RaySupervisor:
        try:
            import ray
        except ImportError:
            raise SupervisorError(
                "hlasync.ray needs Ray on this machine and on every node: "
                "python -m pip install -e '.[ray]' in a checkout of hlasync"
            ) from None

        if not ray.is_initialized():
            options: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
            if self.address is None and _cluster_to_join() is None:
                # No cluster to join: a new one-node Ray instance on this machine,
                # offering what the actors ask for (this machine's /dev/kvm is
                # checked as they start). Ray refuses resources for a cluster
                # that is joined: it has its own.
                options["resources"] = {
                    name: amount * self.processes
                    for name, amount in self.resources.items()
                    if name not in ("CPU", "GPU", "memory")
                }
                options["include_dashboard"] = False
            # address=None even where a cluster was found: ray.init() then finds
            # it again itself, and sends the token of a local cluster that uses
            # token authentication (it does not for an address it is given).
            # On this thread (Ray's driver wants the main thread): a one-time
            # start that blocks the loop for as long as Ray takes to come up.
            ray.init(address=self.address, **options)
        await super().__aenter__()
        return self

    async def _fetch_into(self, error: HlasyncError, directory: Path) -> Path:
        return await self.fetch_crashdump(error, directory=directory)

    def nodes(self) -> dict[int, str | None]:
        """The Ray node of each worker, by worker index."""
        return self._ray_backend.nodes()

    def node_of(self, target: Target) -> str | None:
        """The Ray node a dedicated sandbox lives on (for a pool: one of them)."""
        nodes = [node for node in self._ray_backend.nodes_of(target).values() if node]
        return nodes[0] if nodes else None

    async def generate_crashdump(
        self, target: SupervisedSandbox, directory: str | os.PathLike[str] | None = None
    ) -> Path:
        """Dump a dedicated sandbox now, on its node (``directory`` is a
        directory there). The node's path, or with ``fetch_dumps`` the local
        copy."""
        path = await super().generate_crashdump(target, directory)
        node = self.node_of(target)
        if self.fetch_dumps is not None and node is not None:
            return await self.fetch_crashdump(path, node=node, directory=self.fetch_dumps)
        return path

    async def fetch_crashdump(
        self,
        source: HlasyncError | str | os.PathLike[str],
        node: str | None = None,
        directory: str | os.PathLike[str] | None = None,
    ) -> Path:
        """Copy a core dump written on a node of the cluster to this machine,
        atomically, and return the local path. ``source`` is an error that
        carries ``core_path`` and ``node`` (a ``GuestTimeout``,
        ``GuestCrashed``, ...), or the dump's path on ``node`` (a
        ``CrashDumpWritten`` event's ``path`` and ``node``). ``directory``:
        where it goes (default ``$HYPERLIGHT_CORE_DUMP_DIR``, else the temp
        directory); the file keeps its name unless one of that name is there."""
        import ray

        if isinstance(source, HlasyncError):
            remote_path = getattr(source, "core_path", None)
            node = node or source.node
            if remote_path is None:
                raise CrashdumpError(f"{type(source).__name__} carries no core dump")
        else:
            remote_path = source
        if node is None:
            raise ValueError("which Ray node wrote the dump? (pass node=..., or the error)")
        actor = self._ray_backend.actor_on(node)
        if actor is None:
            raise SupervisorClosed(f"no live worker on Ray node {node} to read the dump from")
        try:
            data: bytes = await anyio.to_thread.run_sync(
                lambda: ray.get(actor.read_dump.remote(str(remote_path)))
            )
        except Exception as exc:  # noqa: BLE001 - RayTaskError wrapping the node's refusal
            raise CrashdumpError(f"cannot fetch {remote_path} from node {node}: {exc}") from None
        if directory is None:
            target = resolve_directory()  # $HYPERLIGHT_CORE_DUMP_DIR, else the temp directory
        else:
            target = Path(directory)
            target.mkdir(parents=True, exist_ok=True)
        name = Path(str(remote_path)).name
        path, _ = await anyio.to_thread.run_sync(
            lambda: write_atomically(target, lambda fd: _write_sparse(fd, data), name=name)
        )
        return path


def _cluster_to_join() -> str | None:
    """The cluster ``ray.init()`` joins when given no address: ``RAY_ADDRESS``,
    else the one ``ray start`` last started on this machine (the address it
    recorded in ``ray_current_cluster`` of Ray's temp directory:
    ``$RAY_TMPDIR/ray``, else ``$TMPDIR/ray``, else ``/tmp/ray``). None where
    ``ray.init()`` would start a new instance."""
    try:  # Ray's own lookup, as ray.init() makes it (Any: Ray annotates addr as str)
        services: Any = importlib.import_module("ray._private.services")
        lookup = services.canonicalize_bootstrap_address
    except (ImportError, AttributeError):  # moved in a later Ray: RAY_ADDRESS at least
        return os.environ.get("RAY_ADDRESS") or None
    address: str | None = lookup(None)
    return address


#: Runs of zero bytes at least this long are left as holes in a fetched dump.
_HOLE = 1 << 16


def _write_sparse(fd: int, data: bytes) -> int:
    """``data`` into ``fd``, leaving runs of zeros as holes (guest memory that
    reads as zero takes no disk, as in the original); its size."""
    view, zero = memoryview(data), bytes(_HOLE)
    for offset in range(0, len(data), _HOLE):
        chunk = view[offset : offset + _HOLE]
        if chunk != zero[: len(chunk)]:
            pwrite_all(fd, chunk, offset)
    os.ftruncate(fd, len(data))
    return len(data)
