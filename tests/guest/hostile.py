"""Hostile guest ELFs for the tests (issue 18): a real guest whose sections,
program headers, symbols, notes, function table or call-frame information
are replaced by as much as a file of :data:`~hlasync.guest.image.MAX_IMAGE_FILE`
holds, or by entries that loop, nest or lie.

The file builders take the bytes of a real guest and return new bytes; the
``cfi_*`` and ``fde*`` builders return the contents of an ``.eh_frame`` for
:func:`call_frames`. They are written with :mod:`struct` from the ELF and
DWARF layouts and nothing else, so a loader bug cannot hide a builder bug.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, replace

__all__ = [
    "Section",
    "call_frames",
    "cfi_long_program",
    "cfi_many_registers",
    "cfi_restore_without_remember",
    "cfi_self_referencing",
    "compressed",
    "fde",
    "fde_pairs",
    "long_symbol_names",
    "many_functions",
    "many_notes",
    "many_program_headers",
    "many_sections",
    "many_symbols",
    "nameless_strings",
    "overlapping_segments",
    "rebuild",
    "sections",
    "zlib_zeros",
]

EHDR = struct.Struct("<16sHHIQQQIHHHHHH")  # Elf64_Ehdr
EHDR_FIELDS = (
    "ident", "type", "machine", "version", "entry", "phoff", "shoff", "flags", "ehsize",
    "phentsize", "phnum", "shentsize", "shnum", "shstrndx",
)  # fmt: skip
PHDR = struct.Struct("<IIQQQQQQ")  # Elf64_Phdr
SHDR = struct.Struct("<IIQQQQIIQQ")  # Elf64_Shdr
SYM = struct.Struct("<IBBHQQ")  # Elf64_Sym
NHDR = struct.Struct("<III")  # namesz, descsz, type
CHDR = struct.Struct("<IIQQ")  # Elf64_Chdr: type, reserved, size, addralign
RECORD = struct.Struct("<40sBB8s6sQ")  # one .hl_functions entry (hlasync/abi.py)

PT_LOAD, PT_NOTE, PT_NULL = 1, 4, 0
PF_R = 4
SHT_PROGBITS, SHT_SYMTAB, SHT_STRTAB, SHT_NOBITS = 1, 2, 3, 8
SHF_ALLOC, SHF_COMPRESSED = 0x2, 0x800
STT_FUNC = 2
#: One PT_LOAD may end here at most (hlasync.guest.image.IMAGE_LIMIT).
IMAGE_LIMIT = 256 << 20
#: The x86-64 DWARF register of the stack pointer, the CFA's register in the CIE here.
RSP = 7


@dataclass(frozen=True, slots=True)
class Section:
    """One section header and the bytes it names (``offset`` None: append them)."""

    name: bytes
    type: int
    flags: int = 0
    addr: int = 0
    data: bytes = b""
    link: int = 0
    info: int = 0
    align: int = 1
    entsize: int = 0
    offset: int | None = None
    size: int | None = None  # None: len(data)
    name_offset: int | None = None  # None: where rebuild() puts the name


def _header(data: bytes) -> list[int | bytes]:
    return list(EHDR.unpack_from(data))


def _set_header(data: bytearray, **fields: int) -> None:
    values = _header(bytes(data))
    for name, value in fields.items():
        values[EHDR_FIELDS.index(name)] = value
    data[: EHDR.size] = EHDR.pack(*values)


def sections(elf: bytes) -> list[Section]:
    """The sections of ``elf`` but the null section 0 and .shstrtab (the
    last section in linker output, so the others keep their indices)."""
    fields = _header(elf)
    shoff, shnum, shstrndx = int(fields[6]), int(fields[12]), int(fields[13])
    raw = [SHDR.unpack_from(elf, shoff + i * SHDR.size) for i in range(shnum)]
    names = elf[raw[shstrndx][4] : raw[shstrndx][4] + raw[shstrndx][5]]
    out = []
    for i, (name, kind, flags, addr, offset, size, link, info, align, entsize) in enumerate(raw):
        if i in (0, shstrndx):
            continue
        out.append(
            Section(
                names[name : names.index(b"\0", name)], kind, flags, addr,
                b"" if kind == SHT_NOBITS else elf[offset : offset + size],
                link, info, align, entsize, offset, size,
            )
        )  # fmt: skip
    return out


def rebuild(elf: bytes, new: list[Section], *, shstrtab: bytes = b"") -> bytes:
    """``elf`` with its section headers replaced by the null section, ``new``
    and .shstrtab, and the data of sections without an offset appended. Names
    go after ``shstrtab`` (a prefix: bytes without a NUL, say). Links between
    sections stay right while the order of :func:`sections` is kept."""
    out = bytearray(elf)
    names = bytearray(shstrtab)
    headers = [SHDR.pack(*[0] * 10)]
    for section in new:
        offset = section.offset
        if offset is None:
            out += bytes(-len(out) % 8)
            offset = len(out)
            out += section.data
        name = section.name_offset
        if name is None:
            name = len(names)
            names += section.name + b"\0"
        size = len(section.data) if section.size is None else section.size
        headers.append(
            SHDR.pack(
                name, section.type, section.flags, section.addr, offset, size,
                section.link, section.info, section.align, section.entsize,
            )
        )  # fmt: skip
    name = len(names)
    names += b".shstrtab\0"
    out += bytes(-len(out) % 8)
    headers.append(SHDR.pack(name, SHT_STRTAB, 0, 0, len(out), len(names), 0, 0, 1, 0))
    out += names
    out += bytes(-len(out) % 8)
    shoff = len(out)
    out += b"".join(headers)
    _set_header(out, shoff=shoff, shnum=len(headers), shstrndx=len(headers) - 1)
    return bytes(out)


def _index(found: list[Section], name: bytes) -> int:
    return next(i for i, s in enumerate(found) if s.name == name)


def _with(elf: bytes, name: bytes, **changes: object) -> bytes:
    """``elf`` with section ``name`` changed (its data appended)."""
    found = sections(elf)
    i = _index(found, name)
    found[i] = replace(found[i], offset=None, size=None, **changes)  # type: ignore[arg-type]
    return rebuild(elf, found)


# ---------------------------------------------------------------- headers
def many_sections(elf: bytes, count: int) -> bytes:
    """``count`` section headers: the real ones, then copies of a 64-byte one."""
    found = sections(elf)
    junk = Section(b".junk", SHT_PROGBITS, offset=0, size=64)
    return rebuild(elf, found + [junk] * (count - len(found) - 2))


def nameless_strings(elf: bytes, size: int, count: int) -> bytes:
    """A section-name table of ``size`` bytes without a NUL, then the real
    names; ``count`` extra sections are named by its first byte."""
    found = sections(elf)
    junk = Section(b"", SHT_PROGBITS, offset=0, size=64, name_offset=0)
    return rebuild(elf, found + [junk] * count, shstrtab=b"A" * size)


def many_program_headers(elf: bytes, count: int) -> bytes:
    """``count`` program headers: the real ones, then PT_NULL."""
    fields = _header(elf)
    phoff, phnum = int(fields[5]), int(fields[10])
    table = elf[phoff : phoff + phnum * PHDR.size]
    table += PHDR.pack(PT_NULL, 0, 0, 0, 0, 0, 0, 0) * (count - phnum)
    out = bytearray(elf) + bytes(-len(elf) % 8)
    offset = len(out)
    out += table
    _set_header(out, phoff=offset, phnum=count)
    return bytes(out)


def overlapping_segments(elf: bytes, copies: int, size: int) -> bytes:
    """``copies`` more PT_LOAD segments, at separate addresses, all loading the
    same ``size`` bytes of the file."""
    fields = _header(elf)
    phoff, phnum = int(fields[5]), int(fields[10])
    table = [PHDR.unpack_from(elf, phoff + i * PHDR.size) for i in range(phnum)]
    out = bytearray(elf) + bytes(-len(elf) % 0x1000)
    data = len(out)
    out += bytes(size)
    vaddr = max(h[3] + h[6] for h in table if h[0] == PT_LOAD)
    for _ in range(copies):
        vaddr = (vaddr + 0xFFF) & ~0xFFF
        table.append((PT_LOAD, PF_R, data, vaddr, vaddr, size, size, 0x1000))
        vaddr += size
    assert vaddr <= IMAGE_LIMIT, "segments past the guest image area"
    offset = len(out)
    out += b"".join(PHDR.pack(*h) for h in table)
    _set_header(out, phoff=offset, phnum=len(table))
    return bytes(out)


def many_notes(elf: bytes, count: int) -> bytes:
    """The PT_NOTE segment: ``count`` empty notes before the build-id note."""
    fields = _header(elf)
    phoff, phnum = int(fields[5]), int(fields[10])
    out = bytearray(elf)
    for i in range(phnum):
        header = list(PHDR.unpack_from(elf, phoff + i * PHDR.size))
        if header[0] != PT_NOTE:
            continue
        notes = NHDR.pack(0, 0, 0) * count + elf[header[2] : header[2] + header[5]]
        out += bytes(-len(out) % 8)
        header[2], header[5] = len(out), len(notes)
        out += notes
        PHDR.pack_into(out, phoff + i * PHDR.size, *header)
    return bytes(out)


# ---------------------------------------------------------------- contents
def many_symbols(elf: bytes, count: int) -> bytes:
    """A symbol table of ``count`` function symbols with their own names and addresses."""
    found = sections(elf)
    strings = b"\0" + b"\0".join(b"f%x" % i for i in range(count)) + b"\0"
    offsets = [1]
    for i in range(count - 1):
        offsets.append(offsets[-1] + len(b"f%x" % i) + 1)
    table = SYM.pack(0, 0, 0, 0, 0, 0) + b"".join(
        SYM.pack(offsets[i], STT_FUNC, 0, 1, 0x102000 + i, 1) for i in range(count)
    )
    return _symbol_table(elf, found, table, strings)


def long_symbol_names(elf: bytes, count: int, size: int) -> bytes:
    """``count`` function symbols at their own addresses, symbol ``i`` named
    from byte ``i % size`` of a string table of ``size`` bytes without a NUL."""
    found = sections(elf)
    table = SYM.pack(0, 0, 0, 0, 0, 0) + b"".join(
        SYM.pack(i % size, STT_FUNC, 0, 1, 0x102000 + i, 1) for i in range(count)
    )
    return _symbol_table(elf, found, table, b"A" * size)


def _symbol_table(elf: bytes, found: list[Section], table: bytes, strings: bytes) -> bytes:
    symtab, strtab = _index(found, b".symtab"), _index(found, b".strtab")
    found[strtab] = replace(found[strtab], data=strings, offset=None, size=None)
    found[symtab] = replace(found[symtab], data=table, offset=None, size=None, link=strtab + 1)
    return rebuild(elf, found)


def many_functions(elf: bytes, count: int, address: int) -> bytes:
    """An exported-function table of ``count`` entries (``int fN(void)`` at ``address``)."""
    table = b"".join(RECORD.pack(b"f%d" % i, 1, 0, b"", b"", address) for i in range(count))
    return _with(elf, b".hl_functions", data=table)


def compressed(elf: bytes, name: bytes, size: int) -> bytes:
    """Section ``name`` SHF_COMPRESSED: a zlib stream of ``size`` zero bytes
    (a multiple of 1 MiB), about a thousandth of that in the file."""
    found = sections(elf)
    i = _index(found, name)
    data = CHDR.pack(1, 0, size, 8) + zlib_zeros(size)
    flags = found[i].flags | SHF_COMPRESSED
    found[i] = replace(found[i], data=data, offset=None, size=None, flags=flags)
    return rebuild(elf, found)


def zlib_zeros(size: int) -> bytes:
    """A zlib stream of ``size`` zero bytes (a multiple of 1 MiB), built from
    one compressed MiB repeated: a full flush makes each copy stand alone."""
    assert size % (1 << 20) == 0
    compressor = zlib.compressobj(9)
    block = compressor.compress(bytes(1 << 20)) + compressor.flush(zlib.Z_FULL_FLUSH)
    adler = (size % 65521) << 16 | 1  # Adler-32 of zeros: a stays 1, b adds 1 per byte
    final = b"\x03\x00"  # an empty last block
    return block[:2] + block[2:] * (size >> 20) + final + adler.to_bytes(4, "big")


# ---------------------------------------------------------------- call frames
def _pad(entry: bytes) -> bytes:
    """A CFI entry with its length, padded with DW_CFA_nop to 4 bytes."""
    entry += bytes(-(len(entry) + 4) % 4)
    return struct.pack("<I", len(entry)) + entry


#: A CIE like GCC's: "zR", code 1, data -8, return address in r16, FDE
#: addresses udata4 absolute; CFA = rsp + 8, return address at CFA - 8.
CIE = _pad(b"\0\0\0\0\x01zR\0\x01\x78\x10\x01\x03" + b"\x0c\x07\x08\x90\x01")


def fde(at: int, cie: int, start: int, length: int, instructions: bytes = b"") -> bytes:
    """An FDE at section offset ``at`` for [start, start + length), its CIE at ``cie``."""
    body = struct.pack("<IIIB", at + 4 - cie, start, length, 0) + instructions
    return _pad(body)


def call_frames(elf: bytes, frames: bytes) -> bytes:
    """``elf`` whose .eh_frame holds ``frames`` (its address stays)."""
    return _with(elf, b".eh_frame", data=frames)


def fde_pairs(count: int, start: int, length: int) -> bytes:
    """``count`` copies of a CIE and an FDE for [start, start + length): the
    FDE points back at the CIE just before it, so the copies are alike."""
    return (CIE + fde(len(CIE), 0, start, length)) * count


def cfi_many_registers(start: int, length: int, registers: int, rows: int) -> bytes:
    """One FDE whose rules cover ``registers`` registers, then ``rows`` rows,
    each one remembered (``DW_CFA_remember_state``)."""
    body = b"".join(b"\x05" + _uleb(32 + r) + b"\x01" for r in range(registers))
    body += b"\x0a\x41" * rows  # remember_state; advance_loc 1
    return CIE + fde(len(CIE), 0, start, length, body)


def cfi_long_program(start: int, length: int, instructions: int) -> bytes:
    """One FDE of ``instructions`` DW_CFA_nop, then a rule for rbp."""
    return CIE + fde(len(CIE), 0, start, length, bytes(instructions) + b"\x86\x02")


def cfi_self_referencing(start: int, length: int) -> bytes:
    """An FDE whose CIE pointer names the FDE itself."""
    return CIE + fde(len(CIE), len(CIE), start, length)


def cfi_restore_without_remember(start: int, length: int) -> bytes:
    """An FDE that restores a state it never remembered."""
    return CIE + fde(len(CIE), 0, start, length, b"\x0b")


def _uleb(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)
