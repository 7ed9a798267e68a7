"""Guest images: static x86-64 ELF executables built with the hlasync SDK.

:class:`GuestImage` reads and validates one with pyelftools, before any VM
exists: loadable segments, entry point, the exported function table
(section ``.hl_functions``), the symbol table used to name addresses and
the GNU build-id that identifies this build.
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import io
import itertools
import os
import stat
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection
from elftools.elf.segments import NoteSegment

from .. import abi
from ..abi import FunctionSignature, ValueType
from ..errors import GuestImageError

__all__ = ["GuestImage", "Segment", "Symbol", "open_regular_file"]

PAGE = 0x1000
MAX_IMAGE_FILE = 64 << 20
#: Guest images must load below this address (the top of the largest memory).
IMAGE_LIMIT = 256 << 20
PF_X, PF_W, PF_R = 1, 2, 4
_RECORD = struct.Struct("<40sBB8s6sQ")


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
    header. Memory follows what is read, not what ``limit`` allows: a file
    that says 0 bytes (``/proc`` files) is read a MiB at a time."""
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
        want = 1 << 20
    return b"".join(parts)


class GuestImage:
    """A validated guest binary. Use :meth:`load` (cached per file version)."""

    _cache: dict[tuple[str, int, int, int], GuestImage] = {}
    _cache_lock = threading.Lock()

    def __init__(self, path: Path, data: bytes) -> None:
        self.path = path
        self.size = len(data)
        #: SHA-256 of the file: what makes two images the same guest.
        self.digest = hashlib.sha256(data).hexdigest()
        try:
            elf = ELFFile(io.BytesIO(data))
            self._check_header(elf)
            self.entry: int = elf.header["e_entry"]
            self.segments: tuple[Segment, ...] = self._load_segments(elf, data)
            self.symbols: tuple[Symbol, ...] = self._load_symbols(elf)
            self.functions: tuple[FunctionSignature, ...] = self._load_functions(elf)
            #: The GNU build-id (hex), when the guest was linked with one.
            self.build_id: str | None = self._load_build_id(elf)
        except GuestImageError as exc:
            raise GuestImageError(str(exc).removeprefix(f"{path}: "), path=path) from None
        except Exception as exc:  # noqa: BLE001 - untrusted input: pyelftools may raise anything
            raise GuestImageError(
                f"malformed ELF file ({type(exc).__name__}: {exc})", path=path
            ) from None
        self.end = max(s.end for s in self.segments)
        self.phnum: int = elf.header["e_phnum"]
        #: Guest address of the program headers, when a segment loads them.
        self.phdr_address: int | None = None
        phoff = elf.header["e_phoff"]
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
            if len(cls._cache) > 64:
                cls._cache.clear()
            cls._cache[key] = image
        return image

    @staticmethod
    def _check_header(elf: ELFFile) -> None:
        if elf.elfclass != 64 or not elf.little_endian:
            raise GuestImageError("not a 64-bit little-endian ELF")
        if elf.header["e_machine"] != "EM_X86_64":
            raise GuestImageError(f"machine is {elf.header['e_machine']}, not EM_X86_64")
        if elf.header["e_type"] != "ET_EXEC":
            raise GuestImageError(
                f"type is {elf.header['e_type']}, not ET_EXEC (build a static, non-PIE executable "
                "with `hlasync guest build`)"
            )

    @staticmethod
    def _load_segments(elf: ELFFile, data: bytes) -> tuple[Segment, ...]:
        segments = []
        for seg in elf.iter_segments():
            kind = seg["p_type"]
            if kind in ("PT_INTERP", "PT_DYNAMIC"):
                raise GuestImageError("dynamically linked: guests must be static")
            if kind != "PT_LOAD" or seg["p_memsz"] == 0:
                continue
            vaddr, memsz = seg["p_vaddr"], seg["p_memsz"]
            offset, filesz = seg["p_offset"], seg["p_filesz"]
            if filesz > memsz:
                raise GuestImageError(f"segment at {vaddr:#x} has p_filesz > p_memsz")
            if offset + filesz > len(data):
                raise GuestImageError(f"segment at {vaddr:#x} extends past the end of the file")
            if vaddr < abi.IMAGE_BASE or vaddr + memsz > IMAGE_LIMIT:
                raise GuestImageError(
                    f"segment [{vaddr:#x}, {vaddr + memsz:#x}) is outside the guest image area "
                    f"[{abi.IMAGE_BASE:#x}, {IMAGE_LIMIT:#x})"
                )
            segments.append(
                Segment(vaddr, memsz, data[offset : offset + filesz], seg["p_flags"] & 7, offset)
            )
        if not segments:
            raise GuestImageError("no loadable segments")
        segments.sort(key=lambda s: s.vaddr)
        for a, b in itertools.pairwise(segments):
            if b.vaddr < a.end:
                raise GuestImageError(
                    f"segments [{a.vaddr:#x}, {a.end:#x}) and [{b.vaddr:#x}, {b.end:#x}) overlap"
                )
        return tuple(segments)

    @staticmethod
    def _load_symbols(elf: ELFFile) -> tuple[Symbol, ...]:
        table = elf.get_section_by_name(".symtab")
        if not isinstance(table, SymbolTableSection):
            return ()
        symbols = {}
        for sym in table.iter_symbols():
            if (
                sym["st_info"]["type"] in ("STT_FUNC", "STT_OBJECT")
                and sym["st_value"]
                and sym.name
            ):
                symbols[sym["st_value"], sym.name] = Symbol(
                    sym.name, sym["st_value"], sym["st_size"]
                )
        return tuple(sorted(symbols.values(), key=lambda s: (s.address, s.name)))

    @staticmethod
    def _load_build_id(elf: ELFFile) -> str | None:
        for segment in elf.iter_segments():
            if not isinstance(segment, NoteSegment):
                continue
            for note in segment.iter_notes():
                if note["n_name"] == "GNU" and note["n_type"] == "NT_GNU_BUILD_ID":
                    return str(note["n_desc"])
        return None

    def _load_functions(self, elf: ELFFile) -> tuple[FunctionSignature, ...]:
        section = elf.get_section_by_name(".hl_functions")
        if section is None:
            raise GuestImageError(
                "no .hl_functions section: not built with the hlasync SDK, or it exports no "
                "function (use HL_EXPORT)"
            )
        table = section.data()
        if len(table) % abi.FUNCTION_RECORD_SIZE:
            raise GuestImageError(".hl_functions size is not a multiple of 64")
        functions: list[FunctionSignature] = []
        names: set[str] = set()
        for index in range(len(table) // abi.FUNCTION_RECORD_SIZE):
            raw_name, ret, argc, raw_args, _, address = _RECORD.unpack_from(
                table, index * abi.FUNCTION_RECORD_SIZE
            )
            name = raw_name.split(b"\0", 1)[0].decode("utf-8", errors="strict")
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
            for code in raw_args[:argc]:
                if code == ValueType.VOID or code > ValueType.BYTES:
                    raise GuestImageError(f"{where}: bad parameter type {code}")
                params.append(ValueType(code))
            ints = sum(
                2 if p is ValueType.BYTES else 0 if p is ValueType.FLOAT else 1 for p in params
            )
            floats = sum(p is ValueType.FLOAT for p in params)
            if ints > abi.INT_REGISTERS or floats > abi.FLOAT_REGISTERS:
                raise GuestImageError(f"{where}: parameters do not fit in registers")
            if not any(s.vaddr <= address < s.end and s.flags & PF_X for s in self.segments):
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
