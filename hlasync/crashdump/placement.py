"""Where core dumps go, what they are called, and how they appear on disk.

Directory: the explicit argument, else ``SandboxConfig.crashdump_dir``, else
``HYPERLIGHT_CORE_DUMP_DIR``, else the system temp directory. A named
directory that does not exist gives a warning and the temp directory.

Files are named ``hl_core_<YYYYMMDD>_T<HHMMSS.mmm>_<pid>-<n>-<random>.elf``,
written to a hidden temporary file first (mode 0600), flushed to disk and
linked into place only when complete, so no reader ever sees a partial dump
and no two dumps share a name. Other programs (Hyperlight) use the same name
pattern and directory variable: retention only ever deletes files that carry
the hlasync note where hlasync's writer puts it (:func:`is_hlasync_dump`,
which reads a few KiB of each file at most).

Every failure raises :class:`CrashdumpError`; a failure after the dump is in
place (retention, the announcement) is logged and does not fail the dump.
"""

from __future__ import annotations

import contextlib
import datetime
import fnmatch
import itertools
import logging
import os
import secrets
import stat
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .._telemetry import ATTR_CORE_PATH
from ..errors import CrashdumpError, InvalidCoreDump
from . import _format as fmt
from . import _scan

__all__ = [
    "DUMP_DIR_ENV",
    "DUMP_GLOB",
    "RetentionPolicy",
    "dump_directories",
    "dump_file_name",
    "is_hlasync_dump",
    "resolve_directory",
    "write_atomically",
]

logger = logging.getLogger("hlasync.crashdump")

DUMP_DIR_ENV = "HYPERLIGHT_CORE_DUMP_DIR"
DUMP_GLOB = "hl_core_*.elf"
_sequence = itertools.count(1)
#: The directories dumps were written to (an ordered set), for dump_directories().
_written: dict[Path, None] = {}
_written_lock = threading.Lock()
_REMEMBERED = 256


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """Bounds on the hlasync dumps kept in one directory; the oldest go first.

    ``max_bytes`` counts disk space actually allocated (dumps are sparse).
    """

    max_files: int | None = None
    max_bytes: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_files", "max_bytes"):
            value = getattr(self, name)
            if value is not None and (type(value) is not int or value < 1):
                raise ValueError(f"{name} must be a positive int or None")

    def apply(self, directory: Path, keep: Path) -> list[Path]:
        """Delete the oldest hlasync dumps beyond the limits (never ``keep``); returns them.

        Only regular files named ``hl_core_*.elf`` that carry the hlasync note
        count; symlinks are never followed. Problems are logged, not raised.
        """
        try:
            with os.scandir(directory) as entries:
                names = [e.name for e in entries if fnmatch.fnmatchcase(e.name, DUMP_GLOB)]
        except OSError as exc:
            logger.warning("core dump retention skipped: cannot list %s: %s", directory, exc)
            return []
        dumps = []
        for name in names:
            found = _hlasync_dump_stat(directory / name)
            if found is not None:
                dumps.append((found.st_mtime_ns, name, found))
        dumps.sort()
        count = len(dumps)
        total = sum(st.st_blocks * 512 for _, _, st in dumps)
        removed = []
        for _, name, st in dumps:
            over_files = self.max_files is not None and count > self.max_files
            over_bytes = self.max_bytes is not None and total > self.max_bytes
            if not (over_files or over_bytes):
                break
            path = directory / name
            if name == keep.name or not _remove_if_same(path, st):
                continue
            count -= 1
            total -= st.st_blocks * 512
            removed.append(path)
        return removed


def _hlasync_dump_stat(path: Path) -> os.stat_result | None:
    """The stat of ``path`` if it is a regular file (not a symlink) holding an hlasync dump."""
    try:
        before = os.lstat(path)
        if not stat.S_ISREG(before.st_mode):
            return None
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None  # gone, or not ours to read
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino):
            return None  # replaced meanwhile
        return st if is_hlasync_dump(fd) else None
    except OSError as exc:
        logger.warning("core dump retention skipped %s: %s", path, exc)
        return None
    finally:
        os.close(fd)


def _remove_if_same(path: Path, expected: os.stat_result) -> bool:
    """Unlink ``path`` unless it is no longer the file examined; False if it stays."""
    try:
        now = os.lstat(path)
        if (now.st_dev, now.st_ino) != (expected.st_dev, expected.st_ino):
            return False
        path.unlink()
    except FileNotFoundError:
        return True
    except OSError as exc:
        logger.warning("could not remove old core dump %s: %s", path, exc)
        return False
    return True


def is_hlasync_dump(fd: int) -> bool:
    """Whether the open file is a core dump hlasync wrote.

    Identifies the writer's layout (:mod:`.writer`): an x86-64 ELF core whose
    first program header is the ``PT_NOTE`` that holds the hlasync note among
    its first ``IDENTIFY_NOTES`` notes. Reads the ELF header, that program
    header and the note headers: a few KiB at most, whatever the file claims
    (a planted file cannot make retention or ``dump list`` slow).
    """
    try:
        phoff, _ = _scan.read_header(fd)
        (first,) = _scan.read_program_headers(fd, phoff, 1)
        if first.type != fmt.PT_NOTE:
            return False
        for note in _scan.iter_note_headers(fd, first.offset, first.filesz, fmt.IDENTIFY_NOTES):
            if note.name == fmt.NOTE_NAME_HLASYNC and note.type == fmt.NT_HLASYNC:
                return True
    except InvalidCoreDump:
        pass
    return False


def dump_directories() -> list[Path]:
    """The directories this process's dumps go to by default and went to.

    ``$HYPERLIGHT_CORE_DUMP_DIR`` (else the temp directory), then every
    directory :func:`write_atomically` put a dump in, latest last (the last
    ``_REMEMBERED`` of them). A Ray node hands out dumps from these only.
    """
    default = os.environ.get(DUMP_DIR_ENV) or None
    try:
        first = Path(default) if default is not None else Path(tempfile.gettempdir())
    except OSError:
        first = None
    with _written_lock:
        written = list(_written)
    return ([first] if first is not None else []) + written


def _remember(directory: Path) -> None:
    with _written_lock:
        _written.pop(directory, None)
        _written[directory] = None
        while len(_written) > _REMEMBERED:
            del _written[next(iter(_written))]


def resolve_directory(
    explicit: str | os.PathLike[str] | None = None,
    configured: str | os.PathLike[str] | None = None,
) -> Path:
    """The directory a dump goes to (see the module docstring).

    Raises :class:`CrashdumpError` for a directory that cannot be examined
    (no permission, a symlink loop, a name too long).
    """
    candidates = (
        (explicit, "the directory argument"),
        (configured, "SandboxConfig.crashdump_dir"),
        (os.environ.get(DUMP_DIR_ENV) or None, DUMP_DIR_ENV),
    )
    for candidate, source in candidates:
        if candidate is None or os.fspath(candidate) == "":
            continue
        path = Path(candidate)
        try:
            if stat.S_ISDIR(os.stat(path).st_mode):
                return path
        except (FileNotFoundError, NotADirectoryError, ValueError):  # ValueError: NUL in the name
            pass
        except OSError as exc:
            raise CrashdumpError(
                f"cannot use core dump directory {str(path)!r} (from {source}): "
                f"{exc.strerror or exc}; name another directory"
            ) from exc
        fallback = _temp_directory()
        message = (
            f"core dump directory {str(path)!r} (from {source}) does not exist or is not a "
            f"directory; writing to {fallback} instead"
        )
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        logger.warning(message)
        return fallback
    return _temp_directory()


def _temp_directory() -> Path:
    try:
        return Path(tempfile.gettempdir())
    except OSError as exc:  # no usable temp directory at all
        raise CrashdumpError(
            f"no usable temporary directory for core dumps ({exc}); set {DUMP_DIR_ENV}"
        ) from exc


def dump_file_name(now: datetime.datetime | None = None) -> str:
    now = now or datetime.datetime.now()
    stamp = f"{now:%Y%m%d}_T{now:%H%M%S}.{now.microsecond // 1000:03d}"
    return f"hl_core_{stamp}_{os.getpid()}-{next(_sequence)}-{secrets.token_hex(2)}.elf"


def write_atomically(
    directory: Path,
    write: Callable[[int], int],
    retention: RetentionPolicy | None = None,
    name: str | None = None,
    extra: Mapping[str, object] | None = None,
) -> tuple[Path, int]:
    """Create a dump in ``directory`` with ``write(fd) -> size``; returns (path, size).
    It is named ``name`` when given and free, else a new unique dump name.
    ``extra``: fields for its "Core dump created" log record (its path is added).

    Raises :class:`CrashdumpError` on any failure, leaving no file behind.
    """
    try:
        fd, temp = tempfile.mkstemp(prefix=".hl_core_", suffix=".tmp", dir=directory)
    except (OSError, ValueError) as exc:  # ValueError: NUL in the name
        raise CrashdumpError(
            f"cannot create a core dump in {directory}: {getattr(exc, 'strerror', None) or exc}"
        ) from exc
    try:
        try:
            size = write(fd)
            os.fsync(fd)  # on disk before it has its name: a crash never leaves a hollow dump
        finally:
            os.close(fd)
        final = _link_unique(Path(temp), directory, name)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        if isinstance(exc, OSError):
            raise CrashdumpError(
                f"writing a core dump in {directory} failed: {exc.strerror or exc}"
            ) from exc
        raise
    try:
        os.unlink(temp)
    except FileNotFoundError:
        pass  # renamed into place
    except OSError as exc:
        logger.warning("could not remove the temporary name %s of %s: %s", temp, final, exc)
    _remember(directory)
    if retention is not None:
        retention.apply(directory, final)
    _announce(final, extra)
    return final, size


def _announce(path: Path, extra: Mapping[str, object] | None) -> None:
    if sys.stderr is not None:
        with contextlib.suppress(OSError, ValueError):  # a closed or broken stderr
            sys.stderr.write(f"Core dump created: {path}\n")
    logger.error("Core dump created: %s", path, extra={**(extra or {}), ATTR_CORE_PATH: str(path)})


def _link_unique(temp: Path, directory: Path, name: str | None = None) -> Path:
    for attempt in range(100):
        final = directory / (name if name and not attempt else dump_file_name())
        try:
            os.link(temp, final)  # fails instead of replacing an existing name
            return final
        except FileExistsError:
            continue
        except OSError:
            # No hard links on this file system: rename; the name is unique anyway.
            if os.path.lexists(final):
                continue
            os.rename(temp, final)
            return final
    raise OSError("could not find an unused core dump file name")
