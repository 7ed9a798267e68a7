"""Guest images: static x86-64 ELF executables built with the hlasync SDK.

:class:`GuestImage` reads and validates one before any VM exists: loadable
segments, entry point, the exported function table (section
``.hl_functions``), the symbol table used to name addresses, the GNU build-id
that identifies this build, and the call-frame information that
:mod:`hlasync.crashdump.unwind` reads (``.eh_frame``, else ``.debug_frame``).

The file may be someone else's: a core dump names its guest ELF, and a dump
planted in a shared directory can name any file up to
:data:`MAX_IMAGE_FILE`. So the ELF is read here with :mod:`struct`, and every
count or size the file states is checked against a cap (``MAX_*`` below)
before anything is read for it: a load reads the file once and does work in
proportion to its size and to what the caps allow, whatever the headers
claim. Damage is refused with
:class:`GuestImageError`; a valid file with more symbols, notes or call
frames than a cap allows is read up to the cap, and :attr:`GuestImage.truncated`
says what was left out.
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import itertools
import os
import stat
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

from .. import abi
from ..abi import FunctionSignature, ValueType
from ..errors import GuestImageError

__all__ = ["CallFrames", "GuestImage", "Segment", "Symbol", "open_regular_file"]

PAGE = 0x1000
MAX_IMAGE_FILE = 64 << 20
#: Guest images must load below this address (the top of the largest memory).
IMAGE_LIMIT = 256 << 20
PF_X, PF_W, PF_R = 1, 2, 4
_RECORD = struct.Struct("<40sBB8s6sQ")

# Caps on the work one guest ELF can ask of the loader (issue 18). Each
# leaves the bundled guests ten times their needs or more: jsruntime.elf, the
# larger, has 6 program headers, 21 sections, 1,862 symbols (the longest name
# 54 bytes), one note, 6 functions (simpleguest: 23) and 74 KiB of .eh_frame.
#: Program headers (linkers write about ten); more is refused.
MAX_PROGRAM_HEADERS = 256
#: Section headers (a linked executable has tens); more is refused.
MAX_SECTIONS = 1024
#: ``.symtab`` entries read; the rest are left out (:attr:`GuestImage.truncated`).
MAX_SYMBOLS = 1 << 15
#: Bytes of a symbol name kept; a longer name is cut. With MAX_SYMBOLS this
#: keeps the names under 16 MiB, however the string table is shared out.
MAX_SYMBOL_NAME = 512
#: Notes read in the PT_NOTE segments looking for the build-id; after them
#: the guest has none.
MAX_NOTES = 64
#: Bytes of the GNU build-id (``--build-id=sha1``: 20); a larger one is refused.
MAX_BUILD_ID = 64
#: Exported functions; more is refused.
MAX_FUNCTIONS = 4096
#: Bytes of call-frame information kept for the unwinder; the rest is left out.
MAX_CALL_FRAME_BYTES = 4 << 20
#: Images :meth:`GuestImage.load` keeps, and their bytes in all: a long-lived
#: reader of dumps that name many large files holds no more.
_CACHE_IMAGES = 64
_CACHE_BYTES = 512 << 20

# ELF layouts and values (<elf.h>), the part of the format the loader reads.
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")  # Elf64_Ehdr
_PHDR = struct.Struct("<IIQQQQQQ")  # Elf64_Phdr
_SHDR = struct.Struct("<IIQQQQIIQQ")  # Elf64_Shdr
_SYM = struct.Struct("<IBBHQQ")  # Elf64_Sym
_NHDR = struct.Struct("<III")  # Elf64_Nhdr: namesz, descsz, type
_ELFCLASS64, _ELFDATA2LSB = 2, 1
_ET_EXEC, _EM_X86_64 = 2, 62
_PT_LOAD, _PT_DYNAMIC, _PT_INTERP, _PT_NOTE = 1, 2, 3, 4
_SHT_SYMTAB, _SHT_STRTAB, _SHT_NOBITS, _SHT_DYNSYM = 2, 3, 8, 11
_SHF_COMPRESSED = 0x800
_SHN_XINDEX = 0xFFFF
_STT_OBJECT, _STT_FUNC = 1, 2
_NT_GNU_BUILD_ID = 3
_TYPES = {0: "ET_NONE", 1: "ET_REL", 2: "ET_EXEC", 3: "ET_DYN", 4: "ET_CORE"}
_MACHINES = {3: "EM_386", 40: "EM_ARM", 62: "EM_X86_64", 183: "EM_AARCH64", 243: "EM_RISCV"}
#: The sections the loader looks up by name.
_NAMES = (b".symtab", b".hl_functions", b".eh_frame", b".debug_frame")
_LONGEST_NAME = max(map(len, _NAMES))


@dataclass(frozen=True, slots=True)
class Segment:
    """One ``PT_LOAD`` segment."""

    vaddr: int
    memsz: int
    data: bytes  # p_filesz bytes; the rest up to memsz is zero
    flags: int  # PF_R | PF_W | PF_X
    offset: int  # p_offset in the file

    @property
    def end(self) -> int:
        return self.vaddr + self.memsz


@dataclass(frozen=True, slots=True)
class Symbol:
    name: str
    address: int
    size: int


@dataclass(frozen=True, slots=True)
class CallFrames:
    """The guest's DWARF call-frame section, for the dump unwinder."""

    data: bytes  # at most MAX_CALL_FRAME_BYTES
    address: int  # where the section loads: the base of pc-relative pointers
    eh: bool  # .eh_frame (entries differ slightly from .debug_frame's)


_FILE_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFDIR: "a directory",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def open_regular_file(path: str | os.PathLike[str], *, follow_symlinks: bool = True) -> BinaryIO:
    """``path`` opened for reading, if it is a regular file.

    For paths that others chose (the guest a core dump names, a dump in a
    shared directory): opened with ``O_NONBLOCK``, so a FIFO or a device
    cannot block the ``open()``, then refused unless ``fstat`` says regular
    file (OSError ``EINVAL``, "not a regular file (a FIFO)"). The flag stays
    set; reads of a regular file ignore it. ``follow_symlinks=False`` refuses
    a symlink in the last component (``O_NOFOLLOW``, OSError ``ELOOP``).
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = _FILE_KINDS.get(stat.S_IFMT(mode), "a special file")
            raise OSError(errno.EINVAL, f"not a regular file ({kind})", os.fspath(path))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _read_at_most(file: BinaryIO, limit: int, size: int) -> bytes:
    """What ``file`` holds, up to ``limit`` + 1 bytes (``size``: what fstat
    says it holds), or only its first four bytes when they are not an ELF
    header. Memory follows what is read, not what ``limit`` allows: what the
    file holds beyond ``size`` (``/proc`` files say 0 bytes) is read 64 KiB at
    a time, so the read that finds the end allocates no more than that."""
    head = os.pread(file.fileno(), 4, 0)
    if head != b"\x7fELF":
        return head
    parts = []
    total = 0
    want = min(size, limit) + 1
    while total <= limit:
        part = file.read(min(want, limit + 1 - total))
        if not part:
            break
        parts.append(part)
        total += len(part)
        want = 64 << 10
    return b"".join(parts)


class _Phdr(NamedTuple):
    """One program header (``Elf64_Phdr``)."""

    type: int
    flags: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int
    align: int


class _Shdr(NamedTuple):
    """One section header (``Elf64_Shdr``)."""

    name: int
    type: int
    flags: int
    addr: int
    offset: int
    size: int
    link: int
    info: int
    addralign: int
    entsize: int


def _table(
    data: bytes, what: str, offset: int, count: int, entsize: int, layout: struct.Struct
) -> list[tuple[int, ...]]:
    """``count`` header entries of ``layout`` at ``offset``, if within their
    cap (:data:`MAX_PROGRAM_HEADERS`, :data:`MAX_SECTIONS`) and the file."""
    cap = MAX_PROGRAM_HEADERS if layout is _PHDR else MAX_SECTIONS
    if count > cap:
        raise GuestImageError(f"{count} {what} headers (at most {cap})")
    if count and entsize != layout.size:
        raise GuestImageError(f"{what} headers of {entsize} bytes, not {layout.size}")
    if offset + count * layout.size > len(data):
        raise GuestImageError(f"{what} headers extend past the end of the file")
    return [layout.unpack_from(data, offset + i * layout.size) for i in range(count)]


class _Headers:
    """The ELF header, program headers and section headers of ``data``,
    checked against the caps; the sections the loader uses found by name."""

    def __init__(self, data: bytes) -> None:
        if len(data) < _EHDR.size:
            raise GuestImageError("truncated ELF header")
        (ident, kind, machine, _, self.entry, self.phoff, shoff, _, _, phentsize, self.phnum,
         shentsize, shnum, shstrndx) = _EHDR.unpack_from(data)  # fmt: skip
        if ident[:4] != b"\x7fELF":
            raise GuestImageError("not an ELF file")
        if ident[4] != _ELFCLASS64 or ident[5] != _ELFDATA2LSB:
            raise GuestImageError("not a 64-bit little-endian ELF")
        if machine != _EM_X86_64:
            raise GuestImageError(f"machine is {_MACHINES.get(machine, machine)}, not EM_X86_64")
        if kind != _ET_EXEC:
            raise GuestImageError(
                f"type is {_TYPES.get(kind, kind)}, not ET_EXEC (build a static, non-PIE "
                "executable with `hlasync guest build`)"
            )
        self._size = len(data)
        rows = _table(data, "program", self.phoff, self.phnum, phentsize, _PHDR)
        self.program = [_Phdr._make(row) for row in rows]
        if shoff and (shnum == 0 or shstrndx == _SHN_XINDEX):
            # Extended numbering: section 0 holds the count and the names' index.
            first = _Shdr._make(_table(data, "section", shoff, 1, shentsize, _SHDR)[0])
            shnum = shnum or first.size
            shstrndx = first.link if shstrndx == _SHN_XINDEX else shstrndx
        rows = _table(data, "section", shoff, shnum, shentsize, _SHDR)
        self.sections = [_Shdr._make(row) for row in rows]
        #: The sections of :data:`_NAMES` (the last of a name, as pyelftools finds them).
        self.named: dict[bytes, _Shdr] = {}
        if 0 < shstrndx < len(self.sections):
            start, end = self.extent(self.sections[shstrndx], "section names")
            for section in self.sections:
                at = start + section.name
                name = data[at : min(at + _LONGEST_NAME + 1, end)].split(b"\0", 1)
                if len(name) == 2 and name[0] in _NAMES:
                    self.named[name[0]] = section

    def extent(self, section: _Shdr, what: str) -> tuple[int, int]:
        """Where ``section``'s bytes lie in the file (none for SHT_NOBITS)."""
        if section.type == _SHT_NOBITS:
            return section.offset, section.offset
        if section.flags & _SHF_COMPRESSED:
            raise GuestImageError(f"{what} section is compressed")
        if section.offset + section.size > self._size:
            raise GuestImageError(f"{what} section extends past the end of the file")
        return section.offset, section.offset + section.size


class GuestImage:
    """A validated guest binary. Use :meth:`load` (cached per file version)."""

    _cache: dict[tuple[str, int, int, int], GuestImage] = {}
    _cache_lock = threading.Lock()

    def __init__(self, path: Path, data: bytes) -> None:
        self.path = path
        self.size = len(data)
        #: SHA-256 of the file: what makes two images the same guest.
        self.digest = hashlib.sha256(data).hexdigest()
        truncated: list[str] = []
        try:
            headers = _Headers(data)
            self.entry: int = headers.entry
            self.segments: tuple[Segment, ...] = self._load_segments(headers, data)
            self.symbols: tuple[Symbol, ...] = self._load_symbols(headers, data, truncated)
            self.functions: tuple[FunctionSignature, ...] = self._load_functions(headers, data)
            #: The GNU build-id (hex), when the guest was linked with one.
            self.build_id: str | None = self._load_build_id(headers, data, truncated)
            #: ``.eh_frame`` (else ``.debug_frame``), for the dump unwinder.
            self.call_frames: CallFrames | None = self._load_call_frames(headers, data, truncated)
        except GuestImageError as exc:
            raise GuestImageError(str(exc).removeprefix(f"{path}: "), path=path) from None
        #: What a cap left out ("symbols: the first 65536 of 1398101 read"), if anything.
        self.truncated: tuple[str, ...] = tuple(truncated)
        self.end = max(s.end for s in self.segments)
        self.phnum: int = headers.phnum
        #: Guest address of the program headers, when a segment loads them.
        self.phdr_address: int | None = None
        phoff = headers.phoff
        for seg in self.segments:
            if seg.offset <= phoff and phoff + self.phnum * 56 <= seg.offset + len(seg.data):
                self.phdr_address = seg.vaddr + phoff - seg.offset
        self._symbol_starts = [s.address for s in self.symbols]
        if not any(s.vaddr <= self.entry < s.end and s.flags & PF_X for s in self.segments):
            raise GuestImageError(
                f"entry point {self.entry:#x} is not in executable code", path=path
            )

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> GuestImage:
        """Read and validate the guest at ``path`` (GuestImageError if unusable)."""
        path = Path(path)
        try:
            with open_regular_file(path) as f:
                st = os.fstat(f.fileno())
                key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
                with cls._cache_lock:
                    cached = cls._cache.get(key)
                if cached is not None:
                    return cached
                if st.st_size > MAX_IMAGE_FILE:
                    raise GuestImageError(
                        f"file is {st.st_size} bytes, larger than {MAX_IMAGE_FILE}", path=path
                    )
                data = _read_at_most(f, MAX_IMAGE_FILE, st.st_size)
        except (OSError, ValueError) as exc:  # ValueError: NUL in the name
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise GuestImageError(f"cannot read guest binary: {reason}", path=path) from None
        if len(data) > MAX_IMAGE_FILE:
            raise GuestImageError(f"file is larger than {MAX_IMAGE_FILE} bytes", path=path)
        if not data.startswith(b"\x7fELF"):
            raise GuestImageError("not an ELF file", path=path)
        image = cls(path, data)
        with cls._cache_lock:
            held = sum(cached.size for cached in cls._cache.values())
            if len(cls._cache) >= _CACHE_IMAGES or held + image.size > _CACHE_BYTES:
                cls._cache.clear()
            cls._cache[key] = image
        return image

    @staticmethod
    def _load_segments(headers: _Headers, data: bytes) -> tuple[Segment, ...]:
        loads = []
        for seg in headers.program:
            if seg.type in (_PT_INTERP, _PT_DYNAMIC):
                raise GuestImageError("dynamically linked: guests must be static")
            if seg.type != _PT_LOAD or seg.memsz == 0:
                continue
            vaddr, memsz = seg.vaddr, seg.memsz
            if seg.filesz > memsz:
                raise GuestImageError(f"segment at {vaddr:#x} has p_filesz > p_memsz")
            if seg.offset + seg.filesz > len(data):
                raise GuestImageError(f"segment at {vaddr:#x} extends past the end of the file")
            if vaddr < abi.IMAGE_BASE or vaddr + memsz > IMAGE_LIMIT:
                raise GuestImageError(
                    f"segment [{vaddr:#x}, {vaddr + memsz:#x}) is outside the guest image area "
                    f"[{abi.IMAGE_BASE:#x}, {IMAGE_LIMIT:#x})"
                )
            loads.append(seg)
        if not loads:
            raise GuestImageError("no loadable segments")
        # Each segment keeps a copy of its bytes: segments that all load the
        # same bytes would multiply the file in memory.
        held = sum(seg.filesz for seg in loads)
        if held > len(data):
            raise GuestImageError(
                f"the loadable segments hold {held} bytes of a file of {len(data)}: they overlap "
                "in the file"
            )
        segments = sorted(
            (
                Segment(
                    s.vaddr, s.memsz, data[s.offset : s.offset + s.filesz], s.flags & 7, s.offset
                )
                for s in loads
            ),
            key=lambda s: s.vaddr,
        )
        for a, b in itertools.pairwise(segments):
            if b.vaddr < a.end:
                raise GuestImageError(
                    f"segments [{a.vaddr:#x}, {a.end:#x}) and [{b.vaddr:#x}, {b.end:#x}) overlap"
                )
        return tuple(segments)

    @staticmethod
    def _load_symbols(headers: _Headers, data: bytes, truncated: list[str]) -> tuple[Symbol, ...]:
        table = headers.named.get(b".symtab")
        if table is None or table.type not in (_SHT_SYMTAB, _SHT_DYNSYM):
            return ()
        if table.entsize != _SYM.size:
            raise GuestImageError(f".symtab entries of {table.entsize} bytes, not {_SYM.size}")
        start, end = headers.extent(table, ".symtab")
        if not 0 < table.link < len(headers.sections):
            raise GuestImageError(f".symtab names section {table.link}, which does not exist")
        strings = headers.sections[table.link]
        if strings.type != _SHT_STRTAB:
            raise GuestImageError(f".symtab names section {table.link}, not a string table")
        names_start, names_end = headers.extent(strings, ".symtab's string")
        count = (end - start) // _SYM.size
        if count > MAX_SYMBOLS:
            truncated.append(f"symbols: the first {MAX_SYMBOLS} of {count} read")
            count = MAX_SYMBOLS
        symbols = {}
        with memoryview(data) as view:
            entries = _SYM.iter_unpack(view[start : start + count * _SYM.size])
            for name_offset, info, _, _, value, size in entries:
                if info & 0xF not in (_STT_FUNC, _STT_OBJECT) or not value:
                    continue
                # A name ends at its NUL, the end of the table or the cap: the
                # search never reads further, whatever the table holds.
                at = names_start + name_offset
                stop = at + MAX_SYMBOL_NAME
                if stop > names_end:
                    stop = names_end
                if at >= stop:
                    continue
                nul = data.find(b"\0", at, stop)
                name = data[at : stop if nul < 0 else nul].decode("utf-8", errors="replace")
                if name:
                    symbols[value, name] = Symbol(name, value, size)
        return tuple(sorted(symbols.values(), key=lambda s: (s.address, s.name)))

    @staticmethod
    def _load_build_id(headers: _Headers, data: bytes, truncated: list[str]) -> str | None:
        notes = 0
        for segment in headers.program:
            if segment.type != _PT_NOTE:
                continue
            offset, end = segment.offset, min(segment.offset + segment.filesz, len(data))
            while offset + _NHDR.size < end:
                if notes == MAX_NOTES:
                    truncated.append(f"notes: the first {MAX_NOTES} read, no build-id among them")
                    return None
                notes += 1
                namesz, descsz, kind = _NHDR.unpack_from(data, offset)
                name = offset + _NHDR.size
                desc = name + ((namesz + 3) & ~3)
                offset = desc + ((descsz + 3) & ~3)
                if kind != _NT_GNU_BUILD_ID or namesz == 0:
                    continue
                if data[name : name + min(namesz, 8)].split(b"\0", 1)[0] != b"GNU":
                    continue
                if descsz > MAX_BUILD_ID:
                    raise GuestImageError(
                        f"GNU build-id of {descsz} bytes (at most {MAX_BUILD_ID})"
                    )
                return data[desc : desc + descsz].hex()
        return None

    @staticmethod
    def _load_call_frames(
        headers: _Headers, data: bytes, truncated: list[str]
    ) -> CallFrames | None:
        """``.eh_frame``, else ``.debug_frame``. A section the unwinder cannot
        use leaves the guest without call-frame information, not unloadable."""
        for name, eh in ((b".eh_frame", True), (b".debug_frame", False)):
            section = headers.named.get(name)
            if section is None:
                continue
            what = name.decode()
            try:
                start, end = headers.extent(section, what)
            except GuestImageError as exc:
                truncated.append(f"call frames: none read ({exc})")
                return None
            if end - start > MAX_CALL_FRAME_BYTES:
                truncated.append(
                    f"call frames: the first {MAX_CALL_FRAME_BYTES} of {end - start} bytes of "
                    f"{what} read"
                )
                end = start + MAX_CALL_FRAME_BYTES
            return CallFrames(data[start:end], section.addr, eh)
        return None

    def _load_functions(self, headers: _Headers, data: bytes) -> tuple[FunctionSignature, ...]:
        section = headers.named.get(b".hl_functions")
        if section is None:
            raise GuestImageError(
                "no .hl_functions section: not built with the hlasync SDK, or it exports no "
                "function (use HL_EXPORT)"
            )
        start, end = headers.extent(section, ".hl_functions")
        if (end - start) % abi.FUNCTION_RECORD_SIZE:
            raise GuestImageError(".hl_functions size is not a multiple of 64")
        count = (end - start) // abi.FUNCTION_RECORD_SIZE
        if count > MAX_FUNCTIONS:
            raise GuestImageError(f"exports {count} functions (at most {MAX_FUNCTIONS})")
        code = [s for s in self.segments if s.flags & PF_X]
        functions: list[FunctionSignature] = []
        names: set[str] = set()
        for index in range(count):
            raw_name, ret, argc, raw_args, _, address = _RECORD.unpack_from(
                data, start + index * abi.FUNCTION_RECORD_SIZE
            )
            try:
                name = raw_name.split(b"\0", 1)[0].decode("utf-8", errors="strict")
            except UnicodeDecodeError:
                raise GuestImageError(f"function #{index}: name is not UTF-8") from None
            where = f"function #{index} ({name!r})"
            if not name or b"\0" not in raw_name:
                raise GuestImageError(f"{where}: empty or unterminated name")
            if name in names:
                raise GuestImageError(f"{where}: exported twice")
            if ret > ValueType.BYTES:
                raise GuestImageError(f"{where}: unknown return type {ret}")
            if argc > abi.MAX_ARGS:
                raise GuestImageError(f"{where}: {argc} parameters (at most {abi.MAX_ARGS})")
            params = []
            for kind in raw_args[:argc]:
                if kind == ValueType.VOID or kind > ValueType.BYTES:
                    raise GuestImageError(f"{where}: bad parameter type {kind}")
                params.append(ValueType(kind))
            ints = sum(
                2 if p is ValueType.BYTES else 0 if p is ValueType.FLOAT else 1 for p in params
            )
            floats = sum(p is ValueType.FLOAT for p in params)
            if ints > abi.INT_REGISTERS or floats > abi.FLOAT_REGISTERS:
                raise GuestImageError(f"{where}: parameters do not fit in registers")
            if not any(s.vaddr <= address < s.end for s in code):
                raise GuestImageError(f"{where}: address {address:#x} is not in executable code")
            names.add(name)
            functions.append(FunctionSignature(name, index, tuple(params), ValueType(ret), address))
        if not functions:
            raise GuestImageError("exports no function")
        return tuple(functions)

    # -------------------------------------------------------------- queries
    def symbol(self, name: str) -> Symbol | None:
        """The function or object symbol called ``name``, if the ELF has one."""
        for symbol in self.symbols:
            if symbol.name == name:
                return symbol
        return None

    def symbolize(self, address: int) -> str | None:
        """``"name+0xoffset"`` for the symbol containing ``address``, or None."""
        symbol = self.symbol_at(address)
        if symbol is None:
            return None
        offset = address - symbol.address
        return symbol.name if offset == 0 else f"{symbol.name}+{offset:#x}"

    def symbol_at(self, address: int) -> Symbol | None:
        """The function or object symbol whose range contains ``address``."""
        i = bisect.bisect_right(self._symbol_starts, address) - 1
        if i < 0:
            return None
        start = self.symbols[i].address
        while i >= 0 and self.symbols[i].address == start:
            symbol = self.symbols[i]
            if address < symbol.address + symbol.size:
                return symbol
            i -= 1
        return None

    def function(self, name: str) -> FunctionSignature | None:
        for fn in self.functions:
            if fn.name == name:
                return fn
        return None

    def __repr__(self) -> str:
        return f"GuestImage({str(self.path)!r}, {len(self.functions)} functions)"
