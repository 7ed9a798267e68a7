"""The Ray actor that hosts one hlasync worker on a node with ``/dev/kvm``.

It runs the worker process's own code (:class:`hlasync.supervisor.worker.Worker`:
sandboxes, vCPU threads, watchdog, dump writing) on one end of a local
``socketpair`` and carries the channel's bytes over Ray method calls:
:meth:`NodeWorker.deliver` writes what the supervisor sent, and
:meth:`NodeWorker.receive` returns what the worker wrote (waiting a moment
when there is nothing yet). The frames are those of the worker-process
channel, so the supervisor's side is the process backend's, unchanged.
"""

from __future__ import annotations

import os
import re
import select
import socket
import stat
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..crashdump.placement import dump_directories, is_hlasync_dump

__all__ = ["DUMP_NAME", "NodeWorker", "read_node_dump"]

#: The names of the core dumps a worker writes (``hl_core_<time>_<ids>.elf``):
#: the only files :meth:`NodeWorker.read_dump` hands out.
DUMP_NAME = re.compile(r"hl_core_[0-9A-Za-z_.-]+\.elf")
#: The largest dump :meth:`NodeWorker.read_dump` sends through the object store.
MAX_DUMP_BYTES = 1 << 30


class NodeWorker:
    """One worker (its sandboxes and vCPU threads) in this Ray actor's process."""

    def __init__(self) -> None:
        from ..supervisor.worker import Worker

        self._mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._worker = Worker(theirs)
        self._send_lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._serve, args=(theirs,), name="hlasync-ray-worker", daemon=True
        )
        self._thread.start()

    def _serve(self, theirs: socket.socket) -> None:
        try:
            self._worker.serve()
        finally:
            theirs.close()  # receive() sees the end

    def describe(self) -> dict[str, Any]:
        """Where this worker runs: the Ray node, host name and process."""
        import ray

        return {
            "node": ray.get_runtime_context().get_node_id(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "kvm": os.access("/dev/kvm", os.R_OK | os.W_OK),
        }

    def deliver(self, data: bytes) -> None:
        """Bytes of the channel from the supervisor to the worker."""
        with self._send_lock:
            self._mine.sendall(data)

    def receive(self, wait: float) -> bytes | None:
        """Bytes of the channel from the worker (b"" when none came within
        ``wait`` seconds; None once the worker has ended)."""
        readable, _, _ = select.select([self._mine], [], [], wait)
        if not readable:
            return b""
        data = self._mine.recv(1 << 20)
        return data if data else None

    def read_dump(self, path: str) -> bytes:
        """The bytes of a core dump this node wrote (refused for any other
        file: see :func:`read_node_dump`)."""
        return read_node_dump(path, dump_directories())


def read_node_dump(
    path: str, directories: Iterable[str | os.PathLike[str]], limit: int = MAX_DUMP_BYTES
) -> bytes:
    """The bytes of the hlasync core dump at ``path``, if it lies in one of
    ``directories`` (a node's: :func:`~hlasync.crashdump.placement.dump_directories`).

    ``path`` must be absolute and named like a dump. It is resolved (symlinks,
    ``..``) and the directory it really lies in must be one of ``directories``
    (compared as files: device and inode, so a symlinked spelling of a dump
    directory is fine and a symlink out of it is not); the file is opened
    there without following a symlink or blocking on a FIFO, and must be a
    regular file of at most ``limit`` bytes that carries the hlasync note.
    Raises PermissionError (not a dump of this node), FileNotFoundError
    (none there) or ValueError (over ``limit``), each naming ``path``.
    """
    requested = Path(path)
    if not requested.is_absolute() or not DUMP_NAME.fullmatch(requested.name):
        raise PermissionError(f"{path!r} is not a core dump of this worker")
    try:
        real = requested.resolve(strict=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"no core dump at {path} on this node") from None
    except (OSError, RuntimeError, ValueError) as exc:  # RuntimeError: a symlink loop
        raise PermissionError(f"{path!r} is not a core dump of this worker ({exc})") from None
    if not DUMP_NAME.fullmatch(real.name):
        raise PermissionError(f"{path!r} is not a core dump of this worker (it is {real})")
    allowed = set()
    for directory in directories:
        try:
            known = os.stat(directory)
        except (OSError, ValueError):
            continue
        allowed.add((known.st_dev, known.st_ino))
    try:
        parent = os.open(real.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise PermissionError(f"{path!r}: cannot open its directory: {exc.strerror}") from None
    try:
        where = os.fstat(parent)
        if (where.st_dev, where.st_ino) not in allowed:
            raise PermissionError(
                f"{path!r} is not a core dump of this worker: {real.parent} is not one of this "
                "node's core dump directories"
            )
        fd = _open_in(parent, real.name, path)
    finally:
        os.close(parent)
    try:
        found = os.fstat(fd)
        if not stat.S_ISREG(found.st_mode):
            raise PermissionError(f"{path!r} is not a core dump of this worker: not a regular file")
        if found.st_size > limit:
            raise ValueError(f"the core dump {path} is {found.st_size} bytes, over {limit}")
        if not is_hlasync_dump(fd):
            raise PermissionError(f"{path!r} is not a core dump of this worker: no hlasync note")
        with open(fd, "rb", closefd=False) as file:
            return file.read(found.st_size)
    finally:
        os.close(fd)


def _open_in(directory: int, name: str, path: str) -> int:
    """``name`` opened in the open ``directory``: never through a symlink, never
    blocking on a FIFO. Opening it in the directory just checked means no
    rename of a path component in between can lead elsewhere."""
    try:
        return os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=directory
        )
    except FileNotFoundError:
        raise FileNotFoundError(f"no core dump at {path} on this node") from None
    except OSError as exc:  # ELOOP: a symlink swapped in since the path was resolved
        raise PermissionError(
            f"{path!r} is not a core dump of this worker: {exc.strerror}"
        ) from None
