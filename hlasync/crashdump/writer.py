"""Serialise a paused guest into an ELF core file.

The file is laid out as: ELF header, program headers (one ``PT_NOTE``, then
one ``PT_LOAD`` per guest memory region at its guest virtual address), the
notes, then the region contents at page-aligned offsets. Pages that read as
zero are left as holes, so the file is sparse.
"""

from __future__ import annotations

import json
import os
import signal
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..guest.image import GuestImage
from ..guest.layout import Region
from ..guest.memory import GuestMemory
from ..kvm import kvm_fpu, kvm_regs, kvm_sregs
from . import _format as fmt

__all__ = ["CrashContext", "build_metadata", "pwrite_all", "write_core"]

PAGE = 0x1000
_ZERO_PAGE = bytes(PAGE)


@dataclass(frozen=True, slots=True)
class CrashContext:
    """What a dump reports: the guest context and why it was taken."""

    reason: str  # fault, abort, protocol-error, unexpected-exit, timeout, ... on-demand
    regs: kvm_regs  # the context to show (for a fault: the faulting guest context)
    sregs: kvm_sregs
    fpu: kvm_fpu | None = None
    xsave: bytes | None = None
    signo: int = signal.SIGQUIT
    si_code: int = 0
    si_addr: int = 0
    user_mode: bool = True  # regs describe CPL3 code (segment selectors are the user ones)
    metadata: dict[str, Any] = field(default_factory=dict)


def _user_regs(context: CrashContext, user_cs: int, user_ss: int) -> list[int]:
    regs, sregs = context.regs, context.sregs
    values = {spec[0]: getattr(regs, spec[0]) for spec in regs._fields_}
    values["eflags"] = regs.rflags
    values["orig_rax"] = 0xFFFF_FFFF_FFFF_FFFF
    values["cs"] = user_cs if context.user_mode else sregs.cs.selector
    values["ss"] = user_ss if context.user_mode else sregs.ss.selector
    for seg in ("ds", "es", "fs", "gs"):
        values[seg] = getattr(sregs, seg).selector
    values["fs_base"] = sregs.fs.base
    values["gs_base"] = sregs.gs.base
    return [values[name] for name in fmt.USER_REGS]


def _fxsave(context: CrashContext) -> bytes | None:
    """The NT_FPREGSET payload: the legacy (FXSAVE) area of the XSAVE state, which
    holds what KVM_GET_FPU leaves out (mxcsr, mxcsr_mask); else built from ``fpu``."""
    if context.xsave is not None:
        return bytes(context.xsave[: fmt.FXSAVE_SIZE])
    fpu = context.fpu
    if fpu is None:
        return None
    area = bytearray(fmt.FXSAVE_SIZE)
    # mxcsr_mask 0: unknown, which means the architectural default (Intel SDM 10.5.1.2).
    fmt.FXSAVE_HEAD.pack_into(
        area, 0, fpu.fcw, fpu.fsw, fpu.ftwx, fpu.last_opcode, fpu.last_ip, fpu.last_dp, fpu.mxcsr, 0
    )
    area[32:160] = bytes(fpu.fpr)
    area[160:416] = bytes(fpu.xmm)
    return bytes(area)


def _xstate(xsave: bytes) -> bytes | None:
    """The XSAVE area as Linux puts it in NT_X86_XSTATE, or None when its
    components go beyond what debuggers size reliably (x87, SSE, AVX)."""
    area = bytearray(xsave)
    xstate_bv = struct.unpack_from("<Q", area, fmt.XSAVE_HEADER_OFFSET)[0]
    xcr0 = xstate_bv | 0x3  # guests run without CR4.OSXSAVE: x87 and SSE state only
    size = fmt.XSAVE_SIZES.get(xcr0)
    if size is None:
        return None
    # KVM leaves the software-reserved XCR0 slot empty; debuggers size the state from it.
    struct.pack_into("<Q", area, fmt.XSAVE_XCR0_OFFSET, xcr0)
    return bytes(area[:size])


def build_notes(
    context: CrashContext, image: GuestImage, user_cs: int, user_ss: int, pid: int
) -> bytes:
    regs = _user_regs(context, user_cs, user_ss)
    fpregs = _fxsave(context)
    prstatus = fmt.PRSTATUS.pack(
        context.signo,
        context.si_code,
        0,
        context.signo,
        0,
        0,
        pid,
        pid,
        pid,
        pid,
        *regs,
        1 if fpregs is not None else 0,
    )
    path = str(image.path.resolve())
    prpsinfo = fmt.PRPSINFO.pack(
        0,
        b"R",
        0,
        0,
        0,
        0,
        0,
        pid,
        pid,
        pid,
        pid,
        image.path.name.encode()[:15],
        path.encode()[:79],
    )
    siginfo = bytearray(fmt.SIGINFO_SIZE)
    fmt.SIGINFO.pack_into(siginfo, 0, context.signo, 0, context.si_code, 0, context.si_addr)
    auxv = struct.pack(
        "<12Q",
        fmt.AT_PHDR,
        image.phdr_address or 0,
        fmt.AT_PHENT,
        fmt.PHDR.size,
        fmt.AT_PHNUM,
        image.phnum,
        fmt.AT_PAGESZ,
        PAGE,
        fmt.AT_ENTRY,
        image.entry,
        fmt.AT_NULL,
        0,
    )
    files = [(s.vaddr & ~(PAGE - 1), s.end, s.offset // PAGE) for s in image.segments if s.data]
    nt_file = struct.pack("<QQ", len(files), PAGE)
    nt_file += b"".join(struct.pack("<QQQ", *entry) for entry in files)
    nt_file += (path.encode() + b"\0") * len(files)
    metadata = build_metadata({**context.metadata, "build_id": image.build_id})
    parts = [
        fmt.note(fmt.NOTE_NAME_CORE, fmt.NT_PRSTATUS, prstatus),
        fmt.note(fmt.NOTE_NAME_CORE, fmt.NT_PRPSINFO, prpsinfo),
        fmt.note(fmt.NOTE_NAME_CORE, fmt.NT_SIGINFO, bytes(siginfo)),
        fmt.note(fmt.NOTE_NAME_CORE, fmt.NT_AUXV, auxv),
        fmt.note(fmt.NOTE_NAME_CORE, fmt.NT_FILE, nt_file),
    ]
    if fpregs is not None:
        parts.append(fmt.note(fmt.NOTE_NAME_CORE, fmt.NT_FPREGSET, fpregs))
    xstate = _xstate(context.xsave) if context.xsave is not None else None
    if xstate is not None:
        parts.append(fmt.note(fmt.NOTE_NAME_LINUX, fmt.NT_X86_XSTATE, xstate))
    parts.append(fmt.note(fmt.NOTE_NAME_HLASYNC, fmt.NT_HLASYNC, metadata))
    return b"".join(parts)


#: The longest string the metadata keeps whole when it would not fit the reader's limit.
_LONGEST_STRING = 256 << 10


def build_metadata(metadata: Mapping[str, Any]) -> bytes:
    """The hlasync note's JSON, within the reader's ``MAX_METADATA_BYTES``.

    A guest's text (an abort message, a JS stack) can be as long as its output
    buffer. When the note would not fit, every string longer than a limit
    (256 Ki characters, halved until the note fits) keeps its start and ends
    with ``"... [N characters cut]"``; the error the caller gets keeps it whole.
    """
    payload = _json(metadata)
    limit = _LONGEST_STRING
    while len(payload) > fmt.MAX_METADATA_BYTES:
        if limit < 64:
            raise ValueError(f"the dump's metadata does not fit in {fmt.MAX_METADATA_BYTES} bytes")
        payload = _json(_cut_strings(metadata, limit))
        limit //= 2
    return payload


def _json(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, default=str).encode()


def _cut_strings(value: Any, limit: int) -> Any:
    if isinstance(value, str):
        if len(value) <= limit:
            return value
        return f"{value[:limit]}... [{len(value) - limit} characters cut]"
    if isinstance(value, Mapping):
        return {key: _cut_strings(item, limit) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_cut_strings(item, limit) for item in value]
    return value


def _segment_flags(region: Region) -> int:
    flags = 0
    if region.flags & 4:
        flags |= fmt.PF_R
    if region.flags & 2:
        flags |= fmt.PF_W
    if region.flags & 1:
        flags |= fmt.PF_X
    return flags


def write_core(
    fd: int,
    *,
    memory: GuestMemory,
    regions: Sequence[Region],
    image: GuestImage,
    context: CrashContext,
    user_cs: int,
    user_ss: int,
    runs: Sequence[tuple[int, int]],
) -> int:
    """Write the core to ``fd`` (an empty regular file); returns the file size.

    ``runs`` are the byte ranges of guest memory that may hold data (everything
    else reads as zero and becomes a hole).
    """
    notes = build_notes(context, image, user_cs, user_ss, os.getpid())
    phnum = 1 + len(regions)
    notes_offset = fmt.EHDR.size + phnum * fmt.PHDR.size
    data_offset = (notes_offset + len(notes) + PAGE - 1) & ~(PAGE - 1)
    headers = [fmt.PHDR.pack(fmt.PT_NOTE, 0, notes_offset, 0, 0, len(notes), 0, 4)]
    placements = []
    offset = data_offset
    for region in regions:
        headers.append(
            fmt.PHDR.pack(
                fmt.PT_LOAD,
                _segment_flags(region),
                offset,
                region.start,
                region.start,
                region.size,
                region.size,
                PAGE,
            )
        )
        placements.append((region, offset))
        offset += (region.size + PAGE - 1) & ~(PAGE - 1)
    ident = (
        fmt.ELFMAG
        + bytes([fmt.ELFCLASS64, fmt.ELFDATA2LSB, fmt.EV_CURRENT, fmt.ELFOSABI_NONE])
        + bytes(8)
    )
    ehdr = fmt.EHDR.pack(
        ident,
        fmt.ET_CORE,
        fmt.EM_X86_64,
        fmt.EV_CURRENT,
        0,
        fmt.EHDR.size,
        0,
        0,
        fmt.EHDR.size,
        fmt.PHDR.size,
        phnum,
        0,
        0,
        0,
    )
    os.ftruncate(fd, offset)
    pwrite_all(fd, ehdr + b"".join(headers) + notes, 0)

    view = memory.view
    for region, file_offset in placements:
        for start, end in runs:
            lo, hi = max(start, region.start), min(end, region.end)
            page = lo
            while page < hi:
                # Gather a run of non-zero pages and write it in one call.
                if view[page : page + PAGE].tobytes() == _ZERO_PAGE:
                    page += PAGE
                    continue
                run_end = page + PAGE
                while run_end < hi and view[run_end : run_end + PAGE].tobytes() != _ZERO_PAGE:
                    run_end += PAGE
                pwrite_all(fd, view[page:run_end], file_offset + page - region.start)
                page = run_end
    return offset


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written
