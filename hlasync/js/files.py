"""ES modules read from a directory: the files a handler's imports may name.

``hlasync js run handler.js`` registers the ``.js`` and ``.mjs`` files under
the handler's directory as modules named by their path relative to it
(``math.js``, ``galaxy/index.js``), so that ``import { add } from "./math"``
finds ``math.js`` as it does in hyperlight-js, whose loader reads the files
next to a script (``Script::from_file``). Reading is bounded, because the
directory may hold anything:

- regular files only, opened without following a symbolic link (at any
  level: each directory is opened with ``O_NOFOLLOW`` and its entries read
  relative to it), so nothing outside the directory is read;
- hidden entries (a name starting with ``.``) and ``node_modules`` are
  skipped, and so are files whose relative path is no module name
  (:func:`hlasync.js.protocol.check_name`);
- directories and files that cannot be opened are skipped;
- at most :data:`MAX_FILES` files, :data:`MAX_FILE_SIZE` bytes each (a module
  crosses the sandbox's input buffer) and :data:`MAX_TOTAL_SIZE` in all,
  :data:`MAX_DEPTH` directories deep and :data:`MAX_ENTRIES` directory
  entries looked at: beyond any of these, ValueError.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from ..config import MiB
from ..guest.image import open_regular_file
from . import protocol

__all__ = [
    "MAX_DEPTH",
    "MAX_ENTRIES",
    "MAX_FILES",
    "MAX_FILE_SIZE",
    "MAX_TOTAL_SIZE",
    "imports_modules",
    "read_handler",
    "read_modules",
]

MAX_FILES = 256
#: Directory entries looked at, modules or not.
MAX_ENTRIES = 4096
MAX_FILE_SIZE = 1 * MiB
MAX_TOTAL_SIZE = 8 * MiB
MAX_DEPTH = 8
SUFFIXES = (".js", ".mjs")
_SKIPPED_DIRECTORIES = frozenset({"node_modules"})


def read_modules(
    directory: str | os.PathLike[str], *, exclude: str | None = None
) -> dict[str, str]:
    """Module name -> source for the module files under ``directory`` (see the
    module docstring); ``exclude``: a relative path to leave out (the handler's
    own file). ValueError when a bound is passed or a file is not UTF-8, OSError
    when ``directory`` cannot be read."""
    reader = _Reader(Path(directory), exclude)
    # The directory the user named may be reached through a symbolic link;
    # nothing below it is.
    root = os.open(os.path.realpath(directory), _DIRECTORY)
    try:
        reader.directory(root, "", 0)
    finally:
        os.close(root)
    return reader.modules


_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: O_NONBLOCK: a FIFO swapped in for a file since it was listed does not block open().
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class _Reader:
    """One walk of :func:`read_modules`: every directory and file is opened
    relative to its parent's descriptor, never through a symbolic link."""

    def __init__(self, root: Path, exclude: str | None) -> None:
        self.root = root
        self.exclude = exclude
        self.modules: dict[str, str] = {}
        self.total = 0
        self.entries = 0

    def directory(self, fd: int, prefix: str, depth: int) -> None:
        entries = []
        with os.scandir(fd) as listing:
            for entry in listing:  # counted as listed: a huge directory is never all in memory
                self.entries += 1
                if self.entries > MAX_ENTRIES:
                    raise ValueError(
                        f"{self.root}: more than {MAX_ENTRIES} files and directories to look "
                        "through for modules (keep a handler in a directory of its own)"
                    )
                entries.append(entry)
        entries.sort(key=lambda entry: entry.name)
        for entry in entries:
            relative = prefix + entry.name
            if entry.name.startswith(".") or relative == self.exclude:
                continue
            if entry.is_dir(follow_symlinks=False):
                if entry.name not in _SKIPPED_DIRECTORIES:
                    self.subdirectory(fd, entry.name, relative, depth + 1)
            elif (
                relative.endswith(SUFFIXES)
                and entry.is_file(follow_symlinks=False)
                and _is_module_name(relative)
            ):
                self.file(fd, entry.name, relative)

    def subdirectory(self, fd: int, name: str, relative: str, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise ValueError(f"{self.root / relative}: modules nest deeper than {MAX_DEPTH}")
        child = _open_at(fd, name, _DIRECTORY)
        if child is None:
            return
        try:
            self.directory(child, relative + "/", depth)
        finally:
            os.close(child)

    def file(self, fd: int, name: str, relative: str) -> None:
        path = self.root / relative
        file = _open_at(fd, name, _FILE)
        if file is None:
            return
        try:
            info = os.fstat(file)
            if not stat.S_ISREG(info.st_mode):
                return
            data = _read_at_most(file, MAX_FILE_SIZE + 1)
        finally:
            os.close(file)
        if len(data) > MAX_FILE_SIZE:
            raise ValueError(f"{path}: a module file may have at most {MAX_FILE_SIZE} bytes")
        self.total += len(data)
        if self.total > MAX_TOTAL_SIZE:
            raise ValueError(
                f"{self.root}: module files may have at most {MAX_TOTAL_SIZE} bytes in all"
            )
        try:
            source = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
        if not source.strip():
            return  # nothing to import (and add_module() refuses an empty source)
        if len(self.modules) == MAX_FILES:
            raise ValueError(f"{self.root}: more than {MAX_FILES} module files")
        self.modules[relative] = source


def _open_at(fd: int, name: str, flags: int) -> int | None:
    """``name`` in directory ``fd``; None if it cannot be opened or changed since
    it was listed (gone, or now a symbolic link or something else)."""
    try:
        return os.open(name, flags, dir_fd=fd)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None
        raise


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = os.read(fd, limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _is_module_name(name: str) -> bool:
    try:
        protocol.check_name("module", name)
    except ValueError:
        return False
    return True


def read_handler(path: str | os.PathLike[str]) -> str:
    """The UTF-8 source of the handler file at ``path`` (the path may be a
    symbolic link: the user named it): a regular file of at most
    :data:`MAX_FILE_SIZE` bytes, opened without blocking on a FIFO. ValueError
    past the bound or for a file that is not UTF-8, OSError when unreadable."""
    try:
        file = open_regular_file(path)
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # "not a regular file (a FIFO)"
            raise ValueError(f"{path}: {exc.strerror}") from None
        raise
    with file:
        data = file.read(MAX_FILE_SIZE + 1)
    if len(data) > MAX_FILE_SIZE:
        raise ValueError(f"{path}: a handler file may have at most {MAX_FILE_SIZE} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start})") from None


def imports_modules(source: str) -> bool:
    """Whether a handler's source may load other modules: a line that starts
    with an ``import`` statement (the guest's own test for a module), or a
    ``require(`` call anywhere. A word like "important" in a string does not count."""
    if "require(" in source:
        return True
    for line in source.splitlines():
        text = line.lstrip()
        if text.startswith("import") and text[6:7] in (" ", "\t", "{", "*", "'", '"', "("):
            return True
    return False
