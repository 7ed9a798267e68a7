"""Where core dumps go, what they are called, and how they appear on disk.

Directory: the explicit argument, else ``SandboxConfig.crashdump_dir``, else
``HYPERLIGHT_CORE_DUMP_DIR``, else the system temp directory. A named
directory that does not exist gives a warning and the temp directory.

Files are named ``hl_core_<YYYYMMDD>_T<HHMMSS.mmm>_<pid>-<n>-<random>.elf``,
written to a hidden temporary file first (mode 0600) and linked into place
only when complete, so no reader ever sees a partial dump and no two dumps
share a name.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import logging
import os
import secrets
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import CrashdumpError

__all__ = [
    "DUMP_DIR_ENV",
    "DUMP_GLOB",
    "RetentionPolicy",
    "dump_file_name",
    "resolve_directory",
    "write_atomically",
]

logger = logging.getLogger("hlasync.crashdump")

DUMP_DIR_ENV = "HYPERLIGHT_CORE_DUMP_DIR"
DUMP_GLOB = "hl_core_*.elf"
_sequence = itertools.count(1)


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
        """Delete the oldest dumps beyond the limits (never ``keep``); returns them."""
        entries = []
        for path in directory.glob(DUMP_GLOB):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            entries.append((st.st_mtime_ns, path.name, path, st.st_blocks * 512))
        entries.sort()
        count = len(entries)
        total = sum(e[3] for e in entries)
        removed = []
        for _, _, path, size in entries:
            over_files = self.max_files is not None and count > self.max_files
            over_bytes = self.max_bytes is not None and total > self.max_bytes
            if not (over_files or over_bytes):
                break
            if path == keep:
                continue
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                logger.warning("could not remove old core dump %s: %s", path, exc)
                continue
            count -= 1
            total -= size
            removed.append(path)
        return removed


def resolve_directory(
    explicit: str | os.PathLike[str] | None = None,
    configured: str | os.PathLike[str] | None = None,
) -> Path:
    """The directory a dump goes to (see the module docstring)."""
    fallback = Path(tempfile.gettempdir())
    candidates = (
        (explicit, "the directory argument"),
        (configured, "SandboxConfig.crashdump_dir"),
        (os.environ.get(DUMP_DIR_ENV) or None, DUMP_DIR_ENV),
    )
    for candidate, source in candidates:
        if candidate is None or str(candidate) == "":
            continue
        path = Path(candidate)
        if path.is_dir():
            return path
        message = (
            f"core dump directory {str(path)!r} (from {source}) does not exist or is not a "
            f"directory; writing to {fallback} instead"
        )
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        logger.warning(message)
        return fallback
    return fallback


def dump_file_name(now: datetime.datetime | None = None) -> str:
    now = now or datetime.datetime.now()
    stamp = f"{now:%Y%m%d}_T{now:%H%M%S}.{now.microsecond // 1000:03d}"
    return f"hl_core_{stamp}_{os.getpid()}-{next(_sequence)}-{secrets.token_hex(2)}.elf"


def write_atomically(
    directory: Path,
    write: Callable[[int], int],
    retention: RetentionPolicy | None = None,
) -> tuple[Path, int]:
    """Create a dump in ``directory`` with ``write(fd) -> size``; returns (path, size).

    Raises :class:`CrashdumpError` on any failure, leaving no file behind.
    """
    try:
        fd, temp = tempfile.mkstemp(prefix=".hl_core_", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise CrashdumpError(
            f"cannot create a core dump in {directory}: {exc.strerror or exc}"
        ) from exc
    try:
        try:
            size = write(fd)
        finally:
            os.close(fd)
        final = _link_unique(Path(temp), directory)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        if isinstance(exc, OSError):
            raise CrashdumpError(
                f"writing a core dump in {directory} failed: {exc.strerror or exc}"
            ) from exc
        raise
    with contextlib.suppress(FileNotFoundError):  # gone already if it was renamed
        os.unlink(temp)
    if retention is not None:
        retention.apply(directory, final)
    sys.stderr.write(f"Core dump created: {final}\n")
    logger.error("Core dump created: %s", final)
    return final, size


def _link_unique(temp: Path, directory: Path) -> Path:
    for _ in range(100):
        final = directory / dump_file_name()
        try:
            os.link(temp, final)  # fails instead of replacing an existing name
            return final
        except FileExistsError:
            continue
        except OSError:
            # No hard links on this file system: rename; the name is unique anyway.
            if final.exists():
                continue
            os.rename(temp, final)
            return final
    raise OSError("could not find an unused core dump file name")
