"""Guest virtual addresses as the debugger sees them: through the guest's own
page tables, and with its software breakpoints hidden.

hlasync's guests map virtual to physical one to one, but the debugger does
not rely on that: every address is translated by walking the four-level
page tables at ``CR3`` (4 KiB, 2 MiB and 1 GiB pages), so an address the
guest cannot reach (the null page, a guard page, beyond its memory) is an
error reply, never a read of something else.
"""

from __future__ import annotations

import struct
from typing import Protocol

__all__ = ["Breakpoints", "GuestBytes", "Unmapped", "read_virtual", "translate", "write_virtual"]

PAGE = 0x1000
_PRESENT, _LARGE = 1, 0x80
_ADDRESS = 0x000F_FFFF_FFFF_F000
#: The byte a software breakpoint puts over an instruction (``int3``).
INT3 = b"\xcc"


class Unmapped(ValueError):
    """An address the guest's page tables do not map."""


class GuestBytes(Protocol):
    """Guest physical memory: what :class:`~hlasync.guest.memory.GuestMemory` offers."""

    size: int

    def read(self, address: int, size: int) -> bytes: ...


def translate(memory: GuestBytes, cr3: int, address: int) -> int:
    """The guest physical address of virtual ``address`` (:class:`Unmapped`
    when a level of the walk is not present or points outside memory)."""
    if not 0 <= address < 1 << 48:
        raise Unmapped(f"{address:#x} is not a canonical lower-half address")
    table = cr3 & _ADDRESS
    physical = 0
    for level, shift in enumerate((39, 30, 21, 12)):
        index = (address >> shift) & 0x1FF
        slot = table + 8 * index
        if slot + 8 > memory.size:
            raise Unmapped(f"{address:#x}: page table at {table:#x} is outside guest memory")
        (entry,) = struct.unpack("<Q", memory.read(slot, 8))
        if not entry & _PRESENT:
            raise Unmapped(f"{address:#x} is not mapped")
        if shift in (30, 21) and entry & _LARGE:
            size = 1 << shift
            physical = (entry & _ADDRESS & ~(size - 1)) | (address & (size - 1))
            break
        table = entry & _ADDRESS
        if level == 3:
            physical = table | (address & (PAGE - 1))
    if physical >= memory.size:
        raise Unmapped(f"{address:#x} maps to {physical:#x}, outside guest memory")
    return physical


def _pieces(memory: GuestBytes, cr3: int, address: int, length: int) -> list[tuple[int, int]]:
    """(physical address, length) of each page-sized piece of the range."""
    pieces = []
    while length > 0:
        step = min(length, PAGE - (address & (PAGE - 1)))
        pieces.append((translate(memory, cr3, address), step))
        address += step
        length -= step
    return pieces


def read_virtual(memory: GuestBytes, cr3: int, address: int, length: int) -> bytes:
    """``length`` bytes at virtual ``address`` (:class:`Unmapped` if any is not mapped)."""
    return b"".join(memory.read(p, n) for p, n in _pieces(memory, cr3, address, length))


class Writer(Protocol):
    def __call__(self, address: int, data: bytes) -> None: ...


def write_virtual(memory: GuestBytes, write: Writer, cr3: int, address: int, data: bytes) -> None:
    """Write ``data`` at virtual ``address`` through ``write`` (physical); every
    page is translated before anything is written."""
    offset = 0
    for physical, length in _pieces(memory, cr3, address, len(data)):
        write(physical, data[offset : offset + length])
        offset += length


class Breakpoints:
    """Software breakpoints: virtual address -> the byte the ``int3`` covers.

    They are in guest memory only while the guest runs (:meth:`insert` before
    each ``KVM_RUN`` of a call, :meth:`remove` after it), so whatever reads
    memory while the vCPU is out of ``KVM_RUN`` (a stop, a dump, a snapshot,
    a restore) never sees them; reads through :meth:`hide` show the original
    bytes even while they are in.
    """

    def __init__(self) -> None:
        self.wanted: set[int] = set()
        #: A breakpoint of the stub's own (the entry of a call that is to stop there).
        self.entry: int | None = None
        self._saved: dict[int, bytes] = {}  # inserted now: address -> original byte
        self._last: set[int] = set()  # inserted during the run that just ended

    def insert(self, memory: GuestBytes, write: Writer, cr3: int) -> None:
        self._last = set()
        wanted = self.wanted if self.entry is None else self.wanted | {self.entry}
        # Physical byte -> its original, for addresses that map the same byte:
        # the second must not take the first one's int3 for the original.
        originals: dict[int, bytes] = {}
        for address, original in self._saved.items():
            try:
                originals.setdefault(translate(memory, cr3, address), original)
            except Unmapped:
                continue
        for address in sorted(wanted - self._saved.keys()):
            try:
                physical = translate(memory, cr3, address)
            except Unmapped:
                continue  # refused when it was set; unmapped since: it cannot fire
            original = originals.setdefault(physical, memory.read(physical, 1))
            write(physical, INT3)
            self._saved[address] = original

    def remove(self, memory: GuestBytes, write: Writer, cr3: int) -> None:
        saved, self._saved = self._saved, {}
        self._last |= saved.keys()
        for address, original in reversed(saved.items()):  # the last in, first out
            try:
                write_virtual(memory, write, cr3, address, original)
            except Unmapped:
                continue

    def inserted(self, address: int) -> bool:
        """Whether an ``int3`` of ours is at ``address`` now."""
        return address in self._saved

    def hit(self, address: int) -> bool:
        """Whether an ``int3`` of ours is at ``address``, or was during the run
        that just ended: a ``#BP`` reported from there is a breakpoint's."""
        return address in self._saved or address in self._last

    def hide_physical(self, memory: GuestBytes, cr3: int, address: int, data: bytes) -> bytes:
        """``data`` read at guest-physical ``address`` with inserted breakpoints'
        bytes put back (a host-side read of memory while the guest runs)."""
        if not self._saved:
            return data
        out = bytearray(data)
        for where, original in self._saved.items():
            try:
                physical = translate(memory, cr3, where)
            except Unmapped:
                continue
            if address <= physical < address + len(out):
                out[physical - address] = original[0]
        return bytes(out)

    def hide(self, address: int, data: bytes) -> bytes:
        """``data`` read at ``address`` with inserted breakpoints' bytes put back."""
        if not self._saved:
            return data
        out = bytearray(data)
        for where, original in self._saved.items():
            if address <= where < address + len(out):
                out[where - address] = original[0]
        return bytes(out)
