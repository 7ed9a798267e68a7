"""Guest memory layout and the boot image: page tables, GDT, TSS, IDT,
exception stubs, the PEB and the guest's segments.

Guest physical addresses equal guest virtual addresses (identity map, 4 KiB
pages). Everything the guest may touch is a user page; page tables,
descriptor tables, exception stubs and the exception stack are supervisor
pages, so code at CPL3 cannot read or change them::

    0x000000  null page (not present)
    0x001000  PML4, PDPT, PD                       supervisor
    0x004000  GDT, TSS, IDT                        supervisor
    0x007000  exception stubs                      supervisor, read-only, exec
    0x008000  guard (not present)
    0x009000  exception stack (12 KiB)             supervisor
    0x010000  page tables (one per 2 MiB)          supervisor
    0x0F0000  PEB                                  user, read-only
    0x0F1000  doorbell (calls without an exit)     user RW
    0x100000  guest image: ELF headers, scratch     user, per segment flags
              page (0x101000), text, rodata, data
    ...       guard page (not present)
              stack                                user RW
              input buffer                         user RW
              output buffer                        user RW
              heap (to memory_size by default)     user RW
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from .. import abi
from ..errors import GuestImageError
from .image import PF_R, PF_W, PF_X, GuestImage, Segment

if TYPE_CHECKING:
    from ..config import SandboxConfig

__all__ = ["MemoryLayout", "Region", "build_boot_image"]

PAGE = 0x1000
PML4, PDPT, PD = 0x1000, 0x2000, 0x3000
GDT, TSS, IDT, STUBS = 0x4000, 0x5000, 0x6000, 0x7000
KERNEL_STACK_BASE, KERNEL_STACK_TOP = 0x9000, 0xC000
PAGE_TABLES = 0x10000
PEB = abi.PEB_ADDR

KERNEL_CS, KERNEL_DS, USER_CS, USER_DS, TSS_SELECTOR = 0x08, 0x10, 0x1B, 0x23, 0x28
EXCEPTION_VECTORS = 32
IDT_ENTRIES = 256

PTE_PRESENT, PTE_WRITE, PTE_USER = 1, 2, 4
PTE_NX = 1 << 63

CR0 = 0x80050033  # PG | AM | WP | NE | ET | MP | PE
CR4 = 0x620  # OSXMMEXCPT | OSFXSR | PAE
EFER = 0xD00  # NXE | LMA | LME
RFLAGS = 0x0002  # IOPL=0: the TSS I/O bitmap alone decides which ports CPL3 may use
#: I/O permission bitmap after the 104-byte TSS: ports 0-255, a clear bit allows the
#: port. PVM ignores IOPL=3 at CPL3 (#GP) but honours the bitmap.
IO_BITMAP_OFFSET = 104
IO_BITMAP_PORTS = 256
TSS_LIMIT = IO_BITMAP_OFFSET + IO_BITMAP_PORTS // 8  # + the all-ones terminator byte

#: The only ports guest code may use; any other `in`/`out` at CPL3 raises #GP.
GUEST_PORTS = (
    abi.PORT_RETURN,
    abi.PORT_HOSTCALL,
    abi.PORT_PRINT,
    abi.PORT_ABORT,
    abi.PORT_WAIT,
    abi.PORT_PARKED,
)
#: Vectors whose exception frame starts with an error code.
ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})
#: Vectors a CPL3 `int n` may raise directly (others become #GP).
USER_GATES = frozenset({3, 4})


@dataclass(frozen=True, slots=True)
class Region:
    """A named range of guest memory and how the guest may use it."""

    name: str
    start: int
    size: int
    flags: int  # PF_R | PF_W | PF_X as the guest sees it
    user: bool

    @property
    def end(self) -> int:
        return self.start + self.size


def _align_up(value: int) -> int:
    return (value + PAGE - 1) & ~(PAGE - 1)


@dataclass(frozen=True, slots=True)
class MemoryLayout:
    memory_size: int
    stack_base: int
    stack_top: int
    input_addr: int
    input_size: int
    output_addr: int
    output_size: int
    heap_addr: int
    heap_size: int
    regions: tuple[Region, ...]

    @classmethod
    def compute(cls, config: SandboxConfig, image: GuestImage) -> MemoryLayout:
        image_end = _align_up(image.end)
        stack_base = image_end + PAGE  # one guard page below the stack
        stack_top = stack_base + config.stack_size
        input_addr = stack_top
        output_addr = input_addr + config.input_buffer_size
        heap_addr = output_addr + config.output_buffer_size
        heap_size = config.memory_size - heap_addr if config.heap_size is None else config.heap_size
        if heap_size < 0 or heap_addr + heap_size > config.memory_size:
            need = heap_addr + max(heap_size, 0)
            raise GuestImageError(
                f"image ({image_end - abi.IMAGE_BASE} bytes from {abi.IMAGE_BASE:#x}), stack, "
                f"buffers and heap need {need} bytes, more than memory_size "
                f"{config.memory_size}",
                path=image.path,
            )
        page_tables = (config.memory_size // PAGE + 511) // 512
        regions = [
            Region("page tables", PML4, 3 * PAGE, PF_R | PF_W, False),
            Region("descriptor tables", GDT, 3 * PAGE, PF_R | PF_W, False),
            Region("exception stubs", STUBS, PAGE, PF_R | PF_X, False),
            Region(
                "exception stack",
                KERNEL_STACK_BASE,
                KERNEL_STACK_TOP - KERNEL_STACK_BASE,
                PF_R | PF_W,
                False,
            ),
            Region("page tables", PAGE_TABLES, page_tables * PAGE, PF_R | PF_W, False),
            Region("peb", PEB, PAGE, PF_R, True),
            Region("doorbell", abi.DOORBELL_ADDR, PAGE, PF_R | PF_W, True),
        ]
        regions += _image_regions(image)
        regions += [
            Region("stack", stack_base, config.stack_size, PF_R | PF_W, True),
            Region("input buffer", input_addr, config.input_buffer_size, PF_R | PF_W, True),
            Region("output buffer", output_addr, config.output_buffer_size, PF_R | PF_W, True),
        ]
        if heap_size:
            regions.append(Region("heap", heap_addr, heap_size, PF_R | PF_W, True))
        return cls(
            memory_size=config.memory_size,
            stack_base=stack_base,
            stack_top=stack_top,
            input_addr=input_addr,
            input_size=config.input_buffer_size,
            output_addr=output_addr,
            output_size=config.output_buffer_size,
            heap_addr=heap_addr,
            heap_size=heap_size,
            regions=tuple(regions),
        )


@dataclass(slots=True)
class _Pages:
    """Whole pages of the image with one set of rights, and the segments on them."""

    start: int
    end: int
    flags: int
    segments: list[Segment]
    group: int  # pieces of one group are linked by shared pages: they form one region


def _image_regions(image: GuestImage) -> list[Region]:
    """The image's segments as page-granular regions, refusing W+X pages.

    A page two segments share gets the union of their rights, and only that
    page: rights never spread to the other pages of either segment. A page
    that would be writable and executable at once (W^X) is refused, so a
    guest that writes code cannot run it. Segments are sorted and do not
    overlap (``GuestImage`` checks), so a segment can share only its first
    page with the segments before it.
    """
    pieces: list[_Pages] = []
    for seg in image.segments:
        if seg.flags & PF_W and seg.flags & PF_X:
            raise GuestImageError(
                f"segment {_describe(seg)} is writable and executable: guest pages are never "
                "both (W^X); give code and data their own segments",
                path=image.path,
            )
        start, end = seg.vaddr & ~(PAGE - 1), _align_up(seg.end)
        if pieces and start < pieces[-1].end:
            last = pieces[-1]
            if last.start < start:  # keep last's own pages apart from the shared one
                last.end = start
                last = _Pages(start, start + PAGE, last.flags, list(last.segments), last.group)
                pieces.append(last)
            last.flags |= seg.flags
            last.segments.append(seg)
            if last.flags & PF_W and last.flags & PF_X:
                raise GuestImageError(
                    f"segments {' and '.join(_describe(s) for s in last.segments)} share the "
                    f"page at {start:#x}, which would be writable and executable at once (W^X): "
                    "link them on separate pages, as the SDK's guest.ld does with "
                    "`. = ALIGN(0x1000)` between segments",
                    path=image.path,
                )
            if start + PAGE < end:
                pieces.append(_Pages(start + PAGE, end, seg.flags, [seg], last.group))
        else:
            pieces.append(_Pages(start, end, seg.flags, [seg], len(pieces)))
    regions: list[Region] = []
    for i, piece in enumerate(pieces):
        before = pieces[i - 1] if i else None
        if before is not None and (before.group, before.flags) == (piece.group, piece.flags):
            regions[-1] = replace(regions[-1], size=piece.end - regions[-1].start)
        else:
            size = piece.end - piece.start
            regions.append(Region(f"image {piece.start:#x}", piece.start, size, piece.flags, True))
    return regions


def _describe(seg: Segment) -> str:
    rights = "".join(c for bit, c in ((PF_R, "R"), (PF_W, "W"), (PF_X, "X")) if seg.flags & bit)
    return f"[{seg.vaddr:#x}, {seg.end:#x}) {rights or '-'}"


def _descriptor(base: int, limit: int, access: int, flags: int) -> bytes:
    return struct.pack(
        "<HHBBBB",
        limit & 0xFFFF,
        base & 0xFFFF,
        (base >> 16) & 0xFF,
        access,
        ((limit >> 16) & 0xF) | (flags << 4),
        (base >> 24) & 0xFF,
    )


def gdt_bytes() -> bytes:
    # Access bytes have the "accessed" bit set so the CPU never writes the GDT.
    return (
        b"\0" * 8
        + _descriptor(0, 0xFFFFF, 0x9B, 0xA)  # 0x08 kernel code, 64-bit
        + _descriptor(0, 0xFFFFF, 0x93, 0xC)  # 0x10 kernel data
        + _descriptor(0, 0xFFFFF, 0xFB, 0xA)  # 0x18 user code, 64-bit, DPL3
        + _descriptor(0, 0xFFFFF, 0xF3, 0xC)  # 0x20 user data, DPL3
        + _descriptor(TSS, TSS_LIMIT, 0x8B, 0)  # 0x28 TSS (busy), 16 bytes in long mode
        + b"\0" * 8
    )


def build_boot_image(memory: memoryview, layout: MemoryLayout, image: GuestImage) -> None:
    """Write page tables, descriptor tables, stubs, PEB and segments into a
    zero-filled ``memory`` of ``layout.memory_size`` bytes."""
    pages = layout.memory_size // PAGE
    flags = [0] * pages

    def mark(start: int, size: int, value: int) -> None:
        for page in range(start // PAGE, _align_up(start + size) // PAGE):
            flags[page] = value

    supervisor_data = PTE_PRESENT | PTE_WRITE | PTE_NX
    mark(PML4, 3 * PAGE, supervisor_data)
    mark(GDT, 3 * PAGE, supervisor_data)
    mark(STUBS, PAGE, PTE_PRESENT)
    mark(KERNEL_STACK_BASE, KERNEL_STACK_TOP - KERNEL_STACK_BASE, supervisor_data)
    page_tables = (pages + 511) // 512
    mark(PAGE_TABLES, page_tables * PAGE, supervisor_data)
    for region in layout.regions:
        if region.user:  # user regions are page-aligned and disjoint (MemoryLayout.compute)
            mark(region.start, region.size, _user_pte(region.flags))

    entries = [((i * PAGE) | f) if f else 0 for i, f in enumerate(flags)]
    struct.pack_into(f"<{pages}Q", memory, PAGE_TABLES, *entries)
    for i in range(page_tables):
        struct.pack_into("<Q", memory, PD + 8 * i, (PAGE_TABLES + i * PAGE) | 7)
    struct.pack_into("<Q", memory, PDPT, PD | 7)
    struct.pack_into("<Q", memory, PML4, PDPT | 7)

    gdt = gdt_bytes()
    memory[GDT : GDT + len(gdt)] = gdt
    tss = bytearray(TSS_LIMIT + 1)
    struct.pack_into("<Q", tss, 4, KERNEL_STACK_TOP)  # RSP0
    struct.pack_into("<H", tss, 102, IO_BITMAP_OFFSET)
    bitmap = bytearray(b"\xff" * (IO_BITMAP_PORTS // 8 + 1))
    for port in GUEST_PORTS:
        bitmap[port // 8] &= ~(1 << (port % 8))
    tss[IO_BITMAP_OFFSET:] = bitmap
    memory[TSS : TSS + len(tss)] = tss
    for vector in range(EXCEPTION_VECTORS):
        stub = STUBS + 4 * vector
        # out (0xE0 + vector), al ; hlt
        memory[stub : stub + 4] = bytes([0xE6, abi.PORT_EXCEPTION_BASE + vector, 0xF4, 0x90])
        gate_type = 0xEE if vector in USER_GATES else 0x8E
        gate = struct.pack("<HHBBHII", stub & 0xFFFF, KERNEL_CS, 0, gate_type, stub >> 16, 0, 0)
        memory[IDT + 16 * vector : IDT + 16 * vector + 16] = gate

    abi.PEB.pack_into(
        memory,
        PEB,
        abi.MAGIC_PEB,
        abi.ABI_VERSION,
        layout.input_addr,
        layout.input_size,
        layout.output_addr,
        layout.output_size,
        layout.heap_addr,
        layout.heap_size,
        layout.stack_top,
        layout.stack_top - layout.stack_base,
        layout.memory_size,
        0,  # xsave_mask, fsgsbase and segments: the host writes them once the
        0,  # guest has said what its code can set
        0,
    )
    for seg in image.segments:
        memory[seg.vaddr : seg.vaddr + len(seg.data)] = seg.data


def _user_pte(rights: int) -> int:
    value = PTE_PRESENT | PTE_USER
    if rights & PF_W:
        value |= PTE_WRITE
    if not rights & PF_X:
        value |= PTE_NX
    return value
