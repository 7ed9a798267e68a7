"""Bounded reads of an ELF core's structure from a file descriptor.

The reader (:class:`~.reader.CoreDump`) and retention's identification
(:func:`~.placement.is_hlasync_dump`) share these. Nothing here reads more
than a caller asks for within the limits of :mod:`._format`: note segments
are walked header by header, never read whole, so a file that claims
gigabytes (a sparse file, a planted one) costs the few bytes of its headers.
Every problem raises :class:`InvalidCoreDump` with a message that does not
name the file (callers add it).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import InvalidCoreDump
from . import _format as fmt

__all__ = [
    "NoteHeader",
    "ProgramHeader",
    "has_hole",
    "iter_note_headers",
    "read_exact",
    "read_header",
    "read_program_headers",
]


@dataclass(frozen=True, slots=True)
class ProgramHeader:
    """One ``Elf64_Phdr`` (the fields a core reader uses)."""

    type: int
    flags: int
    offset: int
    vaddr: int
    filesz: int


@dataclass(frozen=True, slots=True)
class NoteHeader:
    """One note of a ``PT_NOTE``: its name and type, and where its description is."""

    name: bytes
    type: int
    offset: int  # file offset of the description
    size: int


#: The largest file offset (off_t): a header naming one past it names nothing.
_MAX_OFFSET = (1 << 63) - 1


def _pread(fd: int, size: int, offset: int) -> bytes:
    if offset > _MAX_OFFSET:
        raise InvalidCoreDump(f"offset {offset:#x} is past any file's end")
    return os.pread(fd, size, offset)


def read_exact(fd: int, size: int, offset: int) -> bytes:
    """``size`` bytes at ``offset`` (InvalidCoreDump if the file ends first)."""
    data = _pread(fd, size, offset)
    if len(data) != size:
        raise InvalidCoreDump(f"truncated at offset {offset + len(data)}")
    return data


def read_header(fd: int) -> tuple[int, int]:
    """``(e_phoff, e_phnum)`` of an x86-64 ELF core, checked against the limits."""
    header = _pread(fd, fmt.EHDR.size, 0)
    if len(header) < fmt.EHDR.size:
        raise InvalidCoreDump("not an x86-64 ELF core file (too short)")
    ident, e_type, machine, _, _, phoff, _, _, _, phentsize, phnum, _, _, _ = fmt.EHDR.unpack(
        header
    )
    if (
        ident[:4] != fmt.ELFMAG
        or ident[4:6] != bytes([fmt.ELFCLASS64, fmt.ELFDATA2LSB])
        or e_type != fmt.ET_CORE
        or machine != fmt.EM_X86_64
    ):
        raise InvalidCoreDump("not an x86-64 ELF core file")
    if phentsize != fmt.PHDR.size:
        raise InvalidCoreDump(f"program headers of {phentsize} bytes, not {fmt.PHDR.size}")
    if not 0 < phnum <= fmt.MAX_PROGRAM_HEADERS:
        raise InvalidCoreDump(
            f"{phnum} program headers (hlasync reads 1 to {fmt.MAX_PROGRAM_HEADERS}: the limit)"
        )
    return phoff, phnum


def read_program_headers(fd: int, phoff: int, count: int) -> list[ProgramHeader]:
    """The first ``count`` program headers (``count`` within the limit)."""
    table = read_exact(fd, count * fmt.PHDR.size, phoff)
    headers = []
    for index in range(count):
        kind, flags, offset, vaddr, _, filesz, _, _ = fmt.PHDR.unpack_from(
            table, index * fmt.PHDR.size
        )
        headers.append(ProgramHeader(kind, flags, offset, vaddr, filesz))
    return headers


def iter_note_headers(fd: int, offset: int, size: int, limit: int) -> Iterator[NoteHeader]:
    """The notes of the ``size`` bytes at ``offset``, header by header; more
    than ``limit`` notes, a name over the limit or a note that runs past the
    segment raise InvalidCoreDump. Reads the headers and names only."""
    end = offset + size
    at = offset
    count = 0
    while at + fmt.NHDR.size <= end:
        if count == limit:
            raise InvalidCoreDump(f"more than {limit} notes (the limit)")
        count += 1
        head = _pread(fd, fmt.NHDR.size + fmt.MAX_NOTE_NAME_BYTES, at)
        if len(head) < fmt.NHDR.size:
            raise InvalidCoreDump(f"truncated at offset {at + len(head)}")
        namesz, descsz, kind = fmt.NHDR.unpack_from(head)
        if namesz > fmt.MAX_NOTE_NAME_BYTES:
            raise InvalidCoreDump(
                f"a note name of {namesz} bytes (the limit is {fmt.MAX_NOTE_NAME_BYTES})"
            )
        if len(head) < fmt.NHDR.size + namesz:
            raise InvalidCoreDump(f"truncated at offset {at + len(head)}")
        desc_start = at + fmt.NHDR.size + ((namesz + 3) & ~3)
        desc_end = desc_start + descsz
        if desc_end > end:
            raise InvalidCoreDump("a note extends past the end of its PT_NOTE segment")
        name = head[fmt.NHDR.size : fmt.NHDR.size + namesz].rstrip(b"\0")
        yield NoteHeader(name, kind, desc_start, descsz)
        at = (desc_end + 3) & ~3


def has_hole(fd: int, offset: int, size: int) -> bool:
    """Whether part of the ``size`` bytes at ``offset`` is a hole of a sparse
    file (False where the file system cannot tell)."""
    if size <= 0 or offset > _MAX_OFFSET:
        return False
    try:
        return os.lseek(fd, offset, os.SEEK_HOLE) < offset + size
    except OSError:  # ENXIO: offset at or past the end; EINVAL: not supported
        return False
