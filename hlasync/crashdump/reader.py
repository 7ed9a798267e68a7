"""Reading hlasync core dumps back: registers, memory, metadata, backtraces.

The ELF header, program headers and notes are read with :mod:`._scan`,
within the limits of :mod:`._format` (``MAX_PROGRAM_HEADERS``,
``MAX_NOTE_SEGMENT_BYTES``, ``MAX_NOTES``, ``MAX_METADATA_BYTES``...): opening
a file reads its headers and the few notes it uses, never a whole segment,
so what a file claims (a sparse file's gigabyte note) costs nothing. Guest
memory is read only when asked for. Anything malformed or beyond a limit
raises :class:`InvalidCoreDump`; :meth:`CoreDump.read` raises ValueError
(which InvalidCoreDump also is) for memory the dump does not hold.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

from ..errors import GuestImageError, InvalidCoreDump, printable
from ..guest.image import GuestImage, open_regular_file
from . import _format as fmt
from . import _scan
from .unwind import CallFrameTable, unwind

__all__ = ["CoreDump", "DumpRegion", "Frame"]

MAX_FRAMES = 64


@dataclass(frozen=True, slots=True)
class DumpRegion:
    """A ``PT_LOAD`` of the dump: guest memory at ``start``."""

    start: int
    size: int
    flags: int  # PF_R | PF_W | PF_X
    file_offset: int

    @property
    def end(self) -> int:
        return self.start + self.size

    @property
    def permissions(self) -> str:
        return (
            ("r" if self.flags & fmt.PF_R else "-")
            + ("w" if self.flags & fmt.PF_W else "-")
            + ("x" if self.flags & fmt.PF_X else "-")
        )


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame of a backtrace: ``pc`` and its symbol (``name+0xoff``) if known."""

    index: int
    pc: int
    symbol: str | None

    def __str__(self) -> str:
        return f"#{self.index:<2} {self.pc:#018x} {self.symbol or '??'}"


class CoreDump:
    """An hlasync ELF core dump opened for reading. Use :meth:`open`."""

    def __init__(self, path: Path, file: BinaryIO) -> None:
        self.path = path
        self._file = file
        self._size = os.fstat(file.fileno()).st_size
        try:
            regions, notes, metadata, has_metadata = self._scan(file.fileno())
        except InvalidCoreDump as exc:
            raise InvalidCoreDump(f"{path}: {exc}") from None
        if fmt.NT_PRSTATUS not in notes:
            raise InvalidCoreDump(f"{path}: no NT_PRSTATUS note (not a process core dump)")
        if not has_metadata:
            raise InvalidCoreDump(f"{path}: no hlasync metadata note (not written by hlasync)")
        problem = _check_metadata(metadata)
        if problem is not None:
            raise InvalidCoreDump(f"{path}: malformed hlasync metadata note: {problem}")
        if len(notes[fmt.NT_PRSTATUS]) < fmt.PRSTATUS.size:
            raise InvalidCoreDump(f"{path}: NT_PRSTATUS note is too short")
        fields = fmt.PRSTATUS.unpack_from(notes[fmt.NT_PRSTATUS])
        self.signal: int = fields[0]
        self.registers: dict[str, int] = dict(zip(fmt.USER_REGS, fields[10:37], strict=True))
        self.registers["rflags"] = self.registers["eflags"]
        self.regions: tuple[DumpRegion, ...] = tuple(sorted(regions, key=lambda r: r.start))
        self.metadata: dict[str, Any] = metadata
        self.auxv: dict[int, int] = {}
        auxv = notes.get(fmt.NT_AUXV, b"")
        for i in range(0, len(auxv) - 15, 16):
            key, value = struct.unpack_from("<QQ", auxv, i)
            if key == fmt.AT_NULL:
                break
            self.auxv[key] = value
        self.program_path: str | None = None
        if fmt.NT_PRPSINFO in notes and len(notes[fmt.NT_PRPSINFO]) >= fmt.PRPSINFO.size:
            psargs = fmt.PRPSINFO.unpack_from(notes[fmt.NT_PRPSINFO])[-1]
            self.program_path = psargs.split(b"\0", 1)[0].decode(errors="replace") or None
        self._tables: dict[str, CallFrameTable] = {}

    def _scan(self, fd: int) -> tuple[list[DumpRegion], dict[int, bytes], Any, bool]:
        """The regions, the notes this reader uses, the decoded metadata and
        whether there was any, read within the limits of :mod:`._format`
        (InvalidCoreDump beyond them)."""
        phoff, phnum = _scan.read_header(fd)
        regions: list[DumpRegion] = []
        notes: dict[int, bytes] = {}
        metadata: Any = None
        has_metadata = False
        note_segments, notes_left = 0, fmt.MAX_NOTES
        for header in _scan.read_program_headers(fd, phoff, phnum):
            if header.offset + header.filesz > self._size:
                kind = {fmt.PT_LOAD: "PT_LOAD", fmt.PT_NOTE: "PT_NOTE"}.get(header.type, "segment")
                raise InvalidCoreDump(
                    f"truncated ({kind} needs bytes up to {header.offset + header.filesz}, the "
                    f"file has {self._size})"
                )
            if header.type == fmt.PT_LOAD:
                regions.append(
                    DumpRegion(header.vaddr, header.filesz, header.flags & 7, header.offset)
                )
                continue
            if header.type != fmt.PT_NOTE:
                continue
            note_segments += 1
            if note_segments > fmt.MAX_NOTE_SEGMENTS:
                raise InvalidCoreDump(
                    f"more than {fmt.MAX_NOTE_SEGMENTS} PT_NOTE segments (the limit)"
                )
            if header.filesz > fmt.MAX_NOTE_SEGMENT_BYTES:
                raise InvalidCoreDump(
                    f"a PT_NOTE of {header.filesz} bytes (the limit is "
                    f"{fmt.MAX_NOTE_SEGMENT_BYTES})"
                )
            # The first note of each kind counts (a process core has one NT_PRSTATUS
            # per thread, the first is the one that stopped): each is read once.
            for note in _scan.iter_note_headers(fd, header.offset, header.filesz, notes_left):
                notes_left -= 1
                if note.name == fmt.NOTE_NAME_HLASYNC and note.type == fmt.NT_HLASYNC:
                    if not has_metadata:
                        metadata, has_metadata = _read_metadata(fd, note), True
                elif (
                    note.name in (fmt.NOTE_NAME_CORE, fmt.NOTE_NAME_LINUX)
                    and note.type in (fmt.NT_PRSTATUS, fmt.NT_PRPSINFO, fmt.NT_AUXV)
                    and note.type not in notes
                ):
                    if note.size > fmt.MAX_NOTE_BYTES:
                        raise InvalidCoreDump(
                            f"a note of type {note.type} of {note.size} bytes (the limit is "
                            f"{fmt.MAX_NOTE_BYTES})"
                        )
                    notes[note.type] = _scan.read_exact(fd, note.size, note.offset)
        return regions, notes, metadata, has_metadata

    # ---------------------------------------------------------------- open
    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> CoreDump:
        """Open the dump at ``path``: a regular file (a FIFO or device is
        refused without blocking). InvalidCoreDump if it is not a readable dump."""
        path = Path(path)
        try:
            file = open_regular_file(path)
        except (OSError, ValueError) as exc:  # ValueError: NUL in the name
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise InvalidCoreDump(f"{path}: cannot open: {reason}") from None
        try:
            return cls(path, file)
        except BaseException:
            file.close()
            raise

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> CoreDump:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --------------------------------------------------------------- memory
    def _read_at(self, offset: int, size: int) -> bytes:
        try:
            return _scan.read_exact(self._file.fileno(), size, offset)
        except InvalidCoreDump as exc:
            raise InvalidCoreDump(f"{self.path}: {exc}") from None

    def read(self, address: int, size: int) -> bytes:
        """``size`` bytes of guest memory at ``address`` (ValueError if not all in the dump)."""
        out = bytearray()
        while len(out) < size:
            at = address + len(out)
            region = self.region_at(at)
            if region is None:
                raise ValueError(f"address {at:#x} is not in the dump")
            chunk = min(size - len(out), region.end - at)
            out += self._read_at(region.file_offset + at - region.start, chunk)
        return bytes(out)

    def region_at(self, address: int) -> DumpRegion | None:
        for region in self.regions:
            if region.start <= address < region.end:
                return region
        return None

    def read_string(self, address: int, limit: int = 4096) -> str:
        """The NUL-terminated string at ``address`` (at most ``limit`` bytes)."""
        region = self.region_at(address)
        if region is None:
            raise ValueError(f"address {address:#x} is not in the dump")
        data = self.read(address, min(limit, region.end - address))
        return data.split(b"\0", 1)[0].decode(errors="replace")

    # ------------------------------------------------------------- symbols
    @property
    def guest_path(self) -> Path | None:
        """The guest binary the dump was taken from, as recorded in the dump."""
        recorded = self.metadata.get("guest") or self.program_path
        return Path(recorded) if recorded else None

    @property
    def build_id(self) -> str | None:
        """The GNU build-id of the guest the dump was taken from (None: not recorded)."""
        value = self.metadata.get("build_id")
        return value if isinstance(value, str) else None

    def guest_image(self, guest: str | os.PathLike[str] | None = None) -> GuestImage | None:
        """The guest ELF for symbols: ``guest`` if given, else the recorded path.

        None when the recorded ELF is missing or unreadable (:meth:`guest_problem`
        says why). Raises :class:`GuestImageError` when ``guest`` cannot be
        loaded, or when the ELF is not the build the dump was taken from.
        """
        return self._guest(guest)[0]

    def guest_problem(self, guest: str | os.PathLike[str] | None = None) -> str | None:
        """Why there are no symbols (the recorded guest ELF is missing...), or None."""
        return self._guest(guest)[1]

    def _guest(self, guest: str | os.PathLike[str] | None) -> tuple[GuestImage | None, str | None]:
        if guest is not None:
            image = GuestImage.load(guest)
        elif self.guest_path is None:
            return None, "the dump does not name its guest ELF"
        else:
            try:
                image = GuestImage.load(self.guest_path)
            except GuestImageError as exc:
                if not self.guest_path.exists():
                    return None, f"the recorded guest ELF {self.guest_path} is missing"
                return None, f"the recorded guest ELF cannot be loaded: {exc}"
        if self.build_id is not None and image.build_id != self.build_id:
            raise GuestImageError(
                f"not the guest this dump was taken from: its build-id is "
                f"{image.build_id or 'missing'}, the dump's is {self.build_id} (rebuilt since?). "
                "Pass the guest ELF the dump was taken from: hlasync dump show --guest PATH "
                "(CoreDump: guest=PATH)",
                path=image.path,
            )
        return image, None

    def backtrace(
        self, guest: str | os.PathLike[str] | None = None, max_frames: int = MAX_FRAMES
    ) -> list[Frame]:
        """The call stack at the dumped rip, unwound with the guest's DWARF CFI
        (frame pointers where it has none), symbolized from the guest ELF.

        Without the guest ELF (see :meth:`guest_problem`) frames have no symbols.
        """
        return self._backtrace(self.guest_image(guest), max_frames)

    def _backtrace(self, image: GuestImage | None, max_frames: int = MAX_FRAMES) -> list[Frame]:
        def symbol(pc: int, lookup: int) -> str | None:
            found = image.symbol_at(lookup) if image is not None else None
            if found is None:
                return None
            return found.name if pc == found.address else f"{found.name}+{pc - found.address:#x}"

        table = None
        if image is not None:
            table = self._tables.get(image.digest)
            if table is None:
                table = self._tables[image.digest] = CallFrameTable(image)
        regs = self.registers
        pcs = unwind(self.read, regs["rip"], regs["rsp"], regs["rbp"], table, max_frames)
        # Caller frames name the call site: look up the byte before the return address.
        return [Frame(i, pc, symbol(pc, pc if i == 0 else pc - 1)) for i, pc in enumerate(pcs)]

    # -------------------------------------------------------------- report
    def summary(self, guest: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        """Everything in the dump as plain data (what ``hlasync dump show --json`` prints)."""
        image, problem = self._guest(guest)
        return {
            "path": str(self.path),
            "guest": str(image.path if image is not None else self.guest_path),
            "guest_problem": problem,
            "metadata": self.metadata,
            "signal": self.signal,
            "registers": self.registers,
            "auxv": {str(k): v for k, v in self.auxv.items()},
            "regions": [
                {"start": r.start, "size": r.size, "permissions": r.permissions}
                for r in self.regions
            ],
            "backtrace": [
                {"index": f.index, "pc": f.pc, "symbol": f.symbol} for f in self._backtrace(image)
            ],
        }

    def report(self, guest: str | os.PathLike[str] | None = None) -> str:
        """A human-readable account of the dump.

        Safe to print: every text the guest or the file chose (metadata,
        symbol names, paths) is shown through :func:`~hlasync.errors.printable`,
        one line each, so no escape sequence reaches the terminal.
        """
        meta = self.metadata
        image, problem = self._guest(guest)
        lines = [f"hlasync core dump {_one_line(self.path)}"]
        lines.append(
            f"  reason:   {_one_line(meta.get('reason'))} ({fmt.signal_name(self.signal)})"
            f"    sandbox: {_one_line(meta.get('sandbox_id'))}"
            f"    function: {_one_line(meta.get('function'))}"
        )
        lines.append(f"  time:     {_one_line(meta.get('timestamp'))}    pid: {meta.get('pid')}")
        lines.append(
            f"  guest:    {_one_line(image.path if image is not None else self.guest_path)}"
            f"    build-id: {_one_line(self.build_id or 'not recorded')}"
        )
        if problem is not None:
            lines.append(
                f"  symbols:  none: {_one_line(problem)}; pass --guest PATH to name the guest ELF"
            )
        if meta.get("vector") is not None:
            extra = ""
            if meta.get("error_code") is not None:
                extra += f", error code {meta['error_code']:#x}"
            if meta.get("cr2") is not None:
                extra += f", cr2 {meta['cr2']:#x}"
            lines.append(
                f"  exception: {_one_line(meta.get('vector_name'))} (vector {meta['vector']})"
                f"{extra}"
            )
        if meta.get("message"):
            lines.append(f"  message:  {_one_line(meta['message'])}")
        lines += _javascript_stack(meta)
        lines.append("backtrace:")
        lines += [f"  {_one_line(frame)}" for frame in self._backtrace(image)]
        lines.append("registers:")
        names = [
            "rip",
            "rsp",
            "rbp",
            "rflags",
            "rax",
            "rbx",
            "rcx",
            "rdx",
            "rsi",
            "rdi",
            "r8",
            "r9",
            "r10",
            "r11",
            "r12",
            "r13",
            "r14",
            "r15",
            "cs",
            "ss",
        ]
        for i in range(0, len(names), 4):
            lines.append(
                "  " + "  ".join(f"{n:>6} {self.registers[n]:#018x}" for n in names[i : i + 4])
            )
        lines.append("regions:")
        named = {r["start"]: r["name"] for r in meta["regions"]}
        for region in self.regions:
            lines.append(
                f"  {region.start:#010x}-{region.end:#010x} {region.permissions} "
                f"{_one_line(named.get(region.start, ''))}"
            )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"CoreDump({str(self.path)!r}, reason={self.metadata.get('reason')!r})"


def _read_metadata(fd: int, note: _scan.NoteHeader) -> Any:
    """The decoded JSON of the hlasync note (InvalidCoreDump if it is not JSON)."""
    if note.size > fmt.MAX_METADATA_BYTES:
        raise InvalidCoreDump(
            f"an hlasync metadata note of {note.size} bytes (the limit is {fmt.MAX_METADATA_BYTES})"
        )
    # JSON holds no zero bytes, so no part of it can lie in a hole: a note that
    # claims a sparse file's zeros is refused before they are read.
    if _scan.has_hole(fd, note.offset, note.size):
        raise InvalidCoreDump("the hlasync metadata note lies in a hole (zeros, not JSON)")
    try:
        return json.loads(_scan.read_exact(fd, note.size, note.offset))
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
        raise InvalidCoreDump(f"the hlasync metadata note is not JSON ({exc})") from None


def _javascript_stack(meta: dict[str, Any]) -> list[str]:
    """The JavaScript stack a JS runtime guest reported before the dump, if any."""
    if "js_stack" not in meta:
        return []
    stack = meta.get("js_stack")
    if isinstance(stack, str) and stack.strip():
        lines = [f"  {_one_line(line.strip())}" for line in stack.splitlines() if line]
        return ["javascript stack:", *lines]
    reason = meta.get("js_stack_unavailable") or "the engine reported none"
    return [f"javascript stack: unavailable ({_one_line(reason)})"]


def _one_line(value: object) -> str:
    """``value`` as text fit for one line of a terminal (control characters escaped)."""
    return printable(str(value), keep_newlines=False)


_OPTIONAL_INT = (int, type(None))
_OPTIONAL_STR = (str, type(None))
_METADATA_FIELDS: dict[str, tuple[type, ...]] = {
    "format": (int,),
    "sandbox_id": (str,),
    "reason": (str,),
    "timestamp": (str,),
    "regions": (list,),
    "function": _OPTIONAL_STR,
    "message": _OPTIONAL_STR,
    "guest": _OPTIONAL_STR,
    "build_id": _OPTIONAL_STR,
    "vector": _OPTIONAL_INT,
    "vector_name": _OPTIONAL_STR,
    "error_code": _OPTIONAL_INT,
    "cr2": _OPTIONAL_INT,
    "pid": _OPTIONAL_INT,
    "signal": _OPTIONAL_INT,
    "special_registers": (dict, type(None)),
}
_REGION_FIELDS = {"name": str, "start": int, "size": int, "flags": int}


def _check_metadata(metadata: object) -> str | None:
    """Why ``metadata`` is not what hlasync writes, or None."""
    if not isinstance(metadata, dict):
        return "not a JSON object"
    for key, types in _METADATA_FIELDS.items():
        if key not in metadata and type(None) in types:
            continue
        if not isinstance(metadata.get(key), types) or isinstance(metadata.get(key), bool):
            return f"field {key!r} is missing or has the wrong type"
    for region in metadata["regions"]:
        if not isinstance(region, dict) or any(
            not isinstance(region.get(k), t) for k, t in _REGION_FIELDS.items()
        ):
            return "bad entry in 'regions'"
    return None
