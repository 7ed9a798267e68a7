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
import threading
from pathlib import Path
from typing import Any

__all__ = ["DUMP_NAME", "NodeWorker"]

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
        """The bytes of a core dump this node wrote (refused for any other file)."""
        file = Path(path)
        if not DUMP_NAME.fullmatch(file.name) or not file.is_absolute():
            raise PermissionError(f"{path!r} is not a core dump of this worker")
        if not file.is_file() or file.is_symlink():
            raise FileNotFoundError(f"no core dump at {path} on this node")
        size = file.stat().st_size
        if size > MAX_DUMP_BYTES:
            raise ValueError(f"the core dump {path} is {size} bytes, over {MAX_DUMP_BYTES}")
        return file.read_bytes()
