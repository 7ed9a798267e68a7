"""Dump every live sandbox of a process on a signal (hang capture without gdb).

``install_dump_signal(signal.SIGUSR2)`` in the process; ``hlasync dump-all
PID`` from outside sends the signal and lists what was written. The handler
only starts a thread: dumps of running calls pause each vCPU briefly and let
it go on, so the process keeps working.

The list of dumps (the manifest) is written to a private directory of the
process's user, ``hlasync-<uid>`` in its temp directory: created mode 0700,
and used by either side only while it is a real directory (not a symlink),
owned by that user, with mode 0700.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import stat
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from ..errors import CrashdumpError, HlasyncError
from ._format import signal_name

__all__ = [
    "check_private_directory",
    "dump_all_sandboxes",
    "install_dump_signal",
    "manifest_path",
    "read_manifest",
]

logger = logging.getLogger("hlasync.crashdump")

_installed: dict[int, str | os.PathLike[str] | None] = {}


def manifest_path(pid: int, temp_dir: str | None = None, uid: int | None = None) -> Path:
    """Where process ``pid``, running as ``uid`` (default: this process's user) with
    temp directory ``temp_dir``, records the dumps of its last dump-all."""
    base = Path(temp_dir or tempfile.gettempdir())
    return base / f"hlasync-{os.geteuid() if uid is None else uid}" / f"dump-all-{pid}.json"


def check_private_directory(directory: Path, uid: int) -> None:
    """Raise :class:`CrashdumpError` unless ``directory`` is a directory (not a
    symlink) owned by ``uid`` with mode 0700."""
    try:
        st = os.lstat(directory)
    except OSError as exc:
        raise CrashdumpError(f"cannot use {directory}: {exc.strerror or exc}") from exc
    if not stat.S_ISDIR(st.st_mode):
        problem = "is a symlink" if stat.S_ISLNK(st.st_mode) else "is not a directory"
    elif st.st_uid != uid:
        problem = f"is owned by uid {st.st_uid}, not {uid}"
    elif stat.S_IMODE(st.st_mode) != 0o700:
        problem = f"has mode {stat.S_IMODE(st.st_mode):04o}, not 0700"
    else:
        return
    raise CrashdumpError(
        f"{directory} {problem}: hlasync keeps dump-all lists only in a private directory; "
        "remove it (it is created again as needed)"
    )


def read_manifest(pid: int, temp_dir: str | None, uid: int) -> dict[str, Any] | None:
    """The manifest process ``pid`` wrote, or None while there is none.

    Raises :class:`CrashdumpError` if its directory is not private.
    """
    path = manifest_path(pid, temp_dir, uid)
    if not os.path.lexists(path.parent):
        return None
    check_private_directory(path.parent, uid)
    try:
        result = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None  # not written yet
    except OSError as exc:
        raise CrashdumpError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return result if isinstance(result, dict) else None


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
    try:
        os.mkdir(target.parent, 0o700)
    except FileExistsError:
        pass
    else:
        os.chmod(target.parent, 0o700)  # whatever the umask
    check_private_directory(target.parent, os.geteuid())
    fd, temp = tempfile.mkstemp(prefix=".dump-all-", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(result, f)
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def _handle(signum: int, frame: FrameType | None) -> None:
    directory = _installed.get(signum)

    def work() -> None:
        try:
            _write_manifest(dump_all_sandboxes(directory))
        except (OSError, HlasyncError) as exc:
            logger.error("dump-all: could not write the list of dumps: %s", exc)

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
        raise ValueError(f"{signal_name(signum)} is reserved for vCPU kicks")
    signal.signal(signum, _handle)
    _installed[signum] = directory
