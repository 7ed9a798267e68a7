"""Dump every live sandbox of a process on a signal (hang capture without gdb).

``install_dump_signal(signal.SIGUSR2)`` in the process; ``hlasync dump-all
PID`` from outside sends the signal and lists what was written. The handler
only starts a thread: dumps of running calls pause each vCPU briefly and let
it go on, so the process keeps working.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from ..errors import HlasyncError

__all__ = ["dump_all_sandboxes", "install_dump_signal", "manifest_path"]

_installed: dict[int, str | os.PathLike[str] | None] = {}


def manifest_path(pid: int, temp_dir: str | None = None) -> Path:
    """Where process ``pid`` records the dumps of its last dump-all."""
    return Path(temp_dir or tempfile.gettempdir()) / f"hlasync-dump-all-{pid}.json"


def dump_all_sandboxes(directory: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Dump every live sandbox now; returns ``{"paths": [...], "errors": [...]}``."""
    from ..sandbox import live_sandboxes

    paths: list[str] = []
    errors: list[str] = []
    for sandbox in live_sandboxes():
        if not sandbox.config.crashdump_enabled:
            errors.append(f"{sandbox.id}: crash dumps are disabled")
            continue
        try:
            paths.append(str(sandbox._dump_now(directory, "signal")))
        except HlasyncError as exc:
            errors.append(f"{sandbox.id}: {exc}")
    return {"pid": os.getpid(), "time": time.time(), "paths": paths, "errors": errors}


def _write_manifest(result: dict[str, Any]) -> None:
    target = manifest_path(os.getpid())
    fd, temp = tempfile.mkstemp(prefix=".hlasync-dump-all-", dir=target.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(result, f)
    os.replace(temp, target)


def _handle(signum: int, frame: FrameType | None) -> None:
    directory = _installed.get(signum)

    def work() -> None:
        _write_manifest(dump_all_sandboxes(directory))

    threading.Thread(target=work, name="hlasync-dump-all", daemon=True).start()


def install_dump_signal(
    signum: int = signal.SIGUSR2, *, directory: str | os.PathLike[str] | None = None
) -> None:
    """Make signal ``signum`` dump every live sandbox of this process.

    Call it from the main thread (Python runs signal handlers there). Each
    dump goes to ``directory`` (else the usual placement rules); the list of
    files is written to :func:`manifest_path` for ``hlasync dump-all``.
    """
    if threading.current_thread() is not threading.main_thread():
        raise ValueError("install_dump_signal() must be called from the main thread")
    from ..kvm import KICK_SIGNAL

    if signum == KICK_SIGNAL:
        raise ValueError(f"signal {signum} is reserved for vCPU kicks")
    signal.signal(signum, _handle)
    _installed[signum] = directory
