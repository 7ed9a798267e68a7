"""Hostile core files for the tests: a real dump with changed metadata, a sparse
file whose note claims far more than it holds, and a planted file whose
program headers all point at the same megabyte of zeros.

Each builder writes the file and returns its path. They parse with the
layouts of :mod:`hlasync.crashdump._format` and nothing else, so a reader bug
cannot hide a builder bug.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

from hlasync.crashdump import _format as fmt
from hlasync.crashdump import _scan

PAGE = 0x1000
#: The planted file of issue 18: placement.py's old limits, exactly.
PLANTED_HEADERS = 4096
PLANTED_ZEROS = 1 << 20


def program_headers(data: bytes) -> list[list[int]]:
    """The program headers of an ELF image, each as the list of its fields."""
    fields = fmt.EHDR.unpack_from(data)
    phoff, phnum = fields[5], fields[10]
    return [list(fmt.PHDR.unpack_from(data, phoff + i * fmt.PHDR.size)) for i in range(phnum)]


def iter_notes(data: bytes) -> Iterator[tuple[bytes, int, bytes]]:
    """(name, type, description) of each note in a ``PT_NOTE`` segment's bytes."""
    offset = 0
    while offset + fmt.NHDR.size <= len(data):
        namesz, descsz, kind = fmt.NHDR.unpack_from(data, offset)
        offset += fmt.NHDR.size
        desc_start = offset + ((namesz + 3) & ~3)
        yield (
            data[offset : offset + namesz].rstrip(b"\0"),
            kind,
            data[desc_start : desc_start + descsz],
        )
        offset = (desc_start + descsz + 3) & ~3


def notes_of(data: bytes) -> list[tuple[bytes, int, bytes]]:
    """(name, type, description) of each note in the first ``PT_NOTE``."""
    note = program_headers(data)[0]
    assert note[0] == fmt.PT_NOTE
    return list(iter_notes(data[note[2] : note[2] + note[5]]))


def with_metadata(core: Path, out: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    """A copy of ``core`` at ``out`` whose hlasync note is ``change``d, laid
    out as the writer lays out its files (guest memory moved by whole pages)."""
    data = core.read_bytes()
    headers = program_headers(data)
    parts = []
    for name, kind, desc in notes_of(data):
        if name == fmt.NOTE_NAME_HLASYNC and kind == fmt.NT_HLASYNC:
            metadata = json.loads(desc)
            change(metadata)
            desc = json.dumps(metadata).encode()
        parts.append(fmt.note(name, kind, desc))
    notes = b"".join(parts)
    notes_offset = fmt.EHDR.size + len(headers) * fmt.PHDR.size
    data_offset = (notes_offset + len(notes) + PAGE - 1) & ~(PAGE - 1)
    shift = data_offset - min(h[2] for h in headers[1:])
    headers[0][2], headers[0][5] = notes_offset, len(notes)
    with open(out, "wb") as f:
        for header in headers[1:]:
            start, size = header[2], header[5]
            header[2] += shift
            for page in range(0, size, PAGE):  # only the pages that hold data: stays sparse
                chunk = data[start + page : start + min(page + PAGE, size)]
                if chunk.count(0) != len(chunk):
                    f.seek(header[2] + page)
                    f.write(chunk)
        f.truncate(max(h[2] + h[5] for h in headers[1:]))
        f.seek(0)
        f.write(data[: fmt.EHDR.size])
        f.write(b"".join(fmt.PHDR.pack(*h) for h in headers))
        f.write(notes)
    return out


def sparse_note(core: Path, out: Path, claimed: int) -> Path:
    """``core``'s headers and notes (8 KiB on disk) with its one ``PT_NOTE``
    claiming ``claimed`` bytes: the file is truncated up to that size, so all
    but its first pages are a hole that reads as zeros."""
    data = core.read_bytes()
    note = program_headers(data)[0]
    note[5] = claimed
    header = bytearray(data[: fmt.EHDR.size])
    fields = list(fmt.EHDR.unpack_from(header))
    fields[10] = 1  # the note alone
    header[:] = fmt.EHDR.pack(*fields)
    kept = data[: 2 * PAGE]
    with open(out, "wb") as f:
        f.write(bytes(header) + fmt.PHDR.pack(*note) + kept[fmt.EHDR.size + fmt.PHDR.size :])
    os.truncate(out, note[2] + claimed)
    return out


def planted(out: Path, count: int = PLANTED_HEADERS, zeros: int = PLANTED_ZEROS) -> Path:
    """An ELF core whose ``count`` program headers are all ``PT_NOTE`` of the
    same ``zeros`` bytes (a hole): ~``count * 56`` bytes on disk."""
    ident = fmt.ELFMAG + bytes([fmt.ELFCLASS64, fmt.ELFDATA2LSB, fmt.EV_CURRENT]) + bytes(9)
    table = fmt.EHDR.size + count * fmt.PHDR.size
    ehdr = fmt.EHDR.pack(
        ident, fmt.ET_CORE, fmt.EM_X86_64, fmt.EV_CURRENT, 0, fmt.EHDR.size, 0, 0,
        fmt.EHDR.size, fmt.PHDR.size, count, 0, 0, 0,
    )  # fmt: skip
    note = fmt.PHDR.pack(fmt.PT_NOTE, 0, table, 0, 0, zeros, 0, 4)
    with open(out, "wb") as f:
        f.write(ehdr + note * count)
    os.truncate(out, table + zeros)
    return out


def minimal(out: Path, metadata: dict[str, Any] | None = None) -> Path:
    """A small core laid out as the writer lays out its files (the note
    segment first): an all-zero ``NT_PRSTATUS`` and the hlasync note, no memory."""
    meta = {"format": 1, "sandbox_id": "sb-0", "reason": "on-demand", "timestamp": "2026"}
    meta["regions"] = []
    meta.update(metadata or {})
    notes = fmt.note(fmt.NOTE_NAME_CORE, fmt.NT_PRSTATUS, bytes(fmt.PRSTATUS.size))
    notes += fmt.note(fmt.NOTE_NAME_HLASYNC, fmt.NT_HLASYNC, json.dumps(meta).encode())
    ident = fmt.ELFMAG + bytes([fmt.ELFCLASS64, fmt.ELFDATA2LSB, fmt.EV_CURRENT]) + bytes(9)
    offset = fmt.EHDR.size + fmt.PHDR.size
    ehdr = fmt.EHDR.pack(
        ident, fmt.ET_CORE, fmt.EM_X86_64, fmt.EV_CURRENT, 0, fmt.EHDR.size, 0, 0,
        fmt.EHDR.size, fmt.PHDR.size, 1, 0, 0, 0,
    )  # fmt: skip
    out.write_bytes(ehdr + fmt.PHDR.pack(fmt.PT_NOTE, 0, offset, 0, 0, len(notes), 0, 4) + notes)
    return out


class CountingOs:
    """``os`` for :mod:`hlasync.crashdump._scan`, counting the bytes ``pread`` returns."""

    def __init__(self) -> None:
        self.read = 0

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        data = os.pread(fd, size, offset)
        self.read += len(data)
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


@contextlib.contextmanager
def counting_reads() -> Iterator[CountingOs]:
    """Count the bytes the bounded reader (:mod:`hlasync.crashdump._scan`) reads."""
    counter = CountingOs()
    with mock.patch.object(_scan, "os", counter):
        yield counter


def real_dump(directory: Path, guest: Path) -> Path:
    """A real core dump (needs /dev/kvm): the divide_by_zero fault of
    ``guest`` (simpleguest), written into ``directory``."""
    from hlasync import GuestCrashed, Sandbox, SandboxConfig

    with Sandbox(guest, SandboxConfig(crashdump_dir=directory)) as sb:
        try:
            sb.call("divide_by_zero")
        except GuestCrashed as exc:
            assert exc.core_path is not None, "the fault wrote no dump"
            return exc.core_path
    raise AssertionError("divide_by_zero returned")
