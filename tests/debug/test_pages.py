"""Guest virtual addresses through the guest's page tables (hlasync.debug.pages),
against a fake guest memory whose page tables each test builds."""

from __future__ import annotations

import struct

import pytest

from hlasync.debug.pages import (
    INT3,
    PAGE,
    Breakpoints,
    Unmapped,
    read_virtual,
    translate,
    write_virtual,
)

P, RW, US, PS = 0x1, 0x2, 0x4, 0x80
NX = 1 << 63
PAT_LARGE = 0x1000  # bit 12 of a 2 MiB / 1 GiB entry: PAT, not an address bit
MIB, GIB = 1 << 20, 1 << 30
SIZE = 4 * MIB

PML4, PDPT, PD, PT = 0x1000, 0x2000, 0x3000, 0x4000
CR3 = PML4 | 0x18  # PWT/PCD bits in CR3 are not part of the address


class FakeMemory:
    """A bytearray as guest physical memory, reads and writes bounds-checked
    as GuestMemory's are."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.buf = bytearray(size)
        self.writes: list[tuple[int, bytes]] = []

    def read(self, address: int, size: int) -> bytes:
        if address < 0 or size < 0 or address + size > self.size:
            raise ValueError(f"[{address:#x}, +{size:#x}) is outside guest memory")
        return bytes(self.buf[address : address + size])

    def write(self, address: int, data: bytes) -> None:
        if address < 0 or address + len(data) > self.size:
            raise ValueError(f"write at {address:#x} is outside guest memory")
        self.writes.append((address, bytes(data)))
        self.buf[address : address + len(data)] = data

    def entry(self, table: int, index: int, value: int) -> None:
        struct.pack_into("<Q", self.buf, table + 8 * index, value)


@pytest.fixture
def memory() -> FakeMemory:
    """4 MiB of memory mapped as:

    - 0x0: not present (null page); 0x1000-0x7fff identity (4 KiB pages);
      0x8000 not present (guard); 0x9000-0xffff identity;
      0x10000 -> physical 0x5000 (not identity); 0x11000 not present;
      0x1ff000 identity;
      0x12000 -> physical 0x7f000000 (outside memory); 0x13000 -> 0x6000 with NX;
    - 0x200000-0x3fffff: one 2 MiB page, identity;
    - 0x400000-0x5fffff: a 2 MiB page at physical 0x200000 (an alias), PAT bit set;
    - 0x600000-0x7fffff: a 2 MiB page at physical 0x600000 (outside memory);
    - 0x40000000-0x7fffffff: a 1 GiB page at physical 0 (only its first 4 MiB exist);
    - 0x80000000-0xbfffffff: a PD said to be at 0x80000000 (outside memory);
    - 0xc0000000-: not present; PML4 entries past 0 not present.
    """
    mem = FakeMemory(SIZE)
    mem.entry(PML4, 0, PDPT | P | RW | US)
    mem.entry(PDPT, 0, PD | P | RW | US)
    mem.entry(PDPT, 1, 0 | P | RW | US | PS)
    mem.entry(PDPT, 2, 0x8000_0000 | P | RW | US)
    mem.entry(PD, 0, PT | P | RW | US)
    mem.entry(PD, 1, 0x200000 | P | RW | US | PS)
    mem.entry(PD, 2, 0x200000 | P | RW | US | PS | PAT_LARGE)
    mem.entry(PD, 3, 0x600000 | P | RW | US | PS)
    for page in range(1, 16):
        if page != 8:
            mem.entry(PT, page, page * PAGE | P | RW | US)
    mem.entry(PT, 0x1FF, 0x1FF000 | P | RW | US)
    mem.entry(PT, 0x10, 0x5000 | P | RW | US)
    mem.entry(PT, 0x12, 0x7F00_0000 | P | RW | US)
    mem.entry(PT, 0x13, 0x6000 | P | US | NX)
    # Recognisable contents.
    for address in range(0x5000, 0x7000):
        mem.buf[address] = address & 0xFF
    mem.buf[0x200000:0x200010] = bytes(range(0x10, 0x20))
    mem.buf[SIZE - 16 :] = b"the last bytes!!"
    return mem


# ---------------------------------------------------------------- translate
@pytest.mark.parametrize(
    ("virtual", "physical"),
    [
        (0x1000, 0x1000),
        (0x5ABC, 0x5ABC),
        (0xFFFF, 0xFFFF),
        (0x10000, 0x5000),
        (0x10FFF, 0x5FFF),
        (0x13008, 0x6008),  # NX does not leak into the address
        (0x200000, 0x200000),
        (0x3FFFFF, 0x3FFFFF),
        (0x400000, 0x200000),
        (0x412345, 0x212345),  # the PAT bit is not an address bit
        (0x4000_0000, 0),
        (0x4000_0000 + SIZE - 1, SIZE - 1),
    ],
)
def test_translate(memory: FakeMemory, virtual: int, physical: int) -> None:
    assert translate(memory, CR3, virtual) == physical


@pytest.mark.parametrize(
    "virtual",
    [
        0,  # null page
        0xFFF,
        0x8000,  # guard page
        0x8FFF,
        0x11000,  # not present in the PT
        0x20000,  # PT entry 0x20: empty
        0x12000,  # PT entry pointing outside memory
        0x600000,  # 2 MiB page outside memory
        0x4000_0000 + SIZE,  # inside a 1 GiB page, beyond memory
        0x7FFF_FFFF,
        0x8000_0000,  # a PD outside memory
        0xC000_0000,  # PDPT entry not present
        1 << 39,  # PML4 entry not present
        (1 << 48) - 1,
    ],
)
def test_unmapped(memory: FakeMemory, virtual: int) -> None:
    with pytest.raises(Unmapped):
        translate(memory, CR3, virtual)


@pytest.mark.parametrize(
    "virtual", [1 << 48, 0xFFFF_8000_0000_0000, 0xFFFF_FFFF_FFFF_FFFF, -1, 1 << 64]
)
def test_non_canonical(memory: FakeMemory, virtual: int) -> None:
    with pytest.raises(Unmapped, match="canonical"):
        translate(memory, CR3, virtual)


def test_cr3_outside_memory(memory: FakeMemory) -> None:
    with pytest.raises(Unmapped, match="outside"):
        translate(memory, 0x1000_0000, 0x1000)
    with pytest.raises(Unmapped):
        translate(memory, SIZE - 8, 8 << 39)  # the PML4 slot itself ends past memory


def test_unmapped_is_a_value_error() -> None:
    assert issubclass(Unmapped, ValueError)


# ------------------------------------------------------------- read_virtual
def test_read_within_a_page(memory: FakeMemory) -> None:
    assert read_virtual(memory, CR3, 0x10010, 4) == bytes([0x10, 0x11, 0x12, 0x13])


def test_read_across_pages_follows_each_translation(memory: FakeMemory) -> None:
    # 0xfffe-0xffff are identity (physical 0xfffe), 0x10000- is physical 0x5000.
    memory.buf[0xFFFE:0x10000] = b"AB"
    assert read_virtual(memory, CR3, 0xFFFE, 4) == b"AB\x00\x01"


def test_read_through_large_pages(memory: FakeMemory) -> None:
    assert read_virtual(memory, CR3, 0x400000, 16) == bytes(range(0x10, 0x20))
    assert read_virtual(memory, CR3, 0x4000_0000 + SIZE - 16, 16) == b"the last bytes!!"
    whole = read_virtual(memory, CR3, 0x200000 - PAGE, 3 * PAGE)  # 4 KiB into 2 MiB pages
    assert len(whole) == 3 * PAGE


def test_read_of_nothing(memory: FakeMemory) -> None:
    assert read_virtual(memory, CR3, 0x1000, 0) == b""
    assert read_virtual(memory, CR3, 0, 0) == b""  # nothing is read, nothing translated


def test_read_into_an_unmapped_page_fails_whole(memory: FakeMemory) -> None:
    with pytest.raises(Unmapped):
        read_virtual(memory, CR3, 0x7FF0, 0x20)  # runs into the guard page
    with pytest.raises(Unmapped):
        read_virtual(memory, CR3, 0x10FF0, 0x20)  # runs into 0x11000
    with pytest.raises(Unmapped):
        read_virtual(memory, CR3, 0x4000_0000 + SIZE - 4, 8)  # runs past memory


def test_read_of_the_last_byte_of_memory(memory: FakeMemory) -> None:
    assert read_virtual(memory, CR3, 0x4000_0000 + SIZE - 1, 1) == b"!"


# ------------------------------------------------------------ write_virtual
def test_write_across_pages(memory: FakeMemory) -> None:
    write_virtual(memory, memory.write, CR3, 0xFFFE, b"wxyz")
    assert memory.buf[0xFFFE:0x10000] == b"wx"
    assert memory.buf[0x5000:0x5002] == b"yz"
    assert read_virtual(memory, CR3, 0xFFFE, 4) == b"wxyz"


def test_write_through_an_alias(memory: FakeMemory) -> None:
    write_virtual(memory, memory.write, CR3, 0x400004, b"\xaa")
    assert memory.buf[0x200004] == 0xAA
    assert read_virtual(memory, CR3, 0x200004, 1) == b"\xaa"


@pytest.mark.parametrize(
    ("virtual", "length"),
    [(0x10FF0, 0x20), (0x7FFF, 2), (0, 1), (0x4000_0000 + SIZE - 1, 2), (1 << 48, 1)],
)
def test_write_into_an_unmapped_page_writes_nothing(
    memory: FakeMemory, virtual: int, length: int
) -> None:
    before = bytes(memory.buf)
    with pytest.raises(Unmapped):
        write_virtual(memory, memory.write, CR3, virtual, b"\x55" * length)
    assert memory.writes == []
    assert bytes(memory.buf) == before


def test_write_of_nothing(memory: FakeMemory) -> None:
    write_virtual(memory, memory.write, CR3, 0, b"")
    assert memory.writes == []


# -------------------------------------------------------------- breakpoints
CODE = 0x5100  # physical 0x5100 holds 0x00, 0x5101 holds 0x01, ... (virtual 0x10100)


def code(memory: FakeMemory, virtual: int) -> int:
    return memory.buf[translate(memory, CR3, virtual)]


def test_insert_and_remove_restore_the_bytes(memory: FakeMemory) -> None:
    bp = Breakpoints()
    bp.wanted = {0x10100, 0x10105, 0x1234}
    before = bytes(memory.buf)
    bp.insert(memory, memory.write, CR3)
    for address in bp.wanted:
        assert code(memory, address) == INT3[0]
        assert bp.inserted(address)
    assert memory.buf[0x1234] == 0xCC
    assert not bp.inserted(0x10101)
    bp.remove(memory, memory.write, CR3)
    assert bytes(memory.buf) == before
    assert not any(bp.inserted(address) for address in bp.wanted)
    assert bp.wanted == {0x10100, 0x10105, 0x1234}  # still wanted for the next run


def test_insert_twice_keeps_the_original_bytes(memory: FakeMemory) -> None:
    bp = Breakpoints()
    bp.wanted = {0x10100}
    before = bytes(memory.buf)
    bp.insert(memory, memory.write, CR3)
    bp.insert(memory, memory.write, CR3)  # already in: not read back as 0xcc
    bp.remove(memory, memory.write, CR3)
    assert bytes(memory.buf) == before
    bp.remove(memory, memory.write, CR3)  # nothing left to remove
    assert bytes(memory.buf) == before


def test_unmapped_breakpoints_are_skipped(memory: FakeMemory) -> None:
    bp = Breakpoints()
    bp.wanted = {0, 0x8000, 0x12000, 1 << 48, 0x10100}
    before = bytes(memory.buf)
    bp.insert(memory, memory.write, CR3)
    assert [bp.inserted(a) for a in (0, 0x8000, 0x12000, 1 << 48)] == [False] * 4
    assert bp.inserted(0x10100)
    bp.remove(memory, memory.write, CR3)
    assert bytes(memory.buf) == before


def test_hide_shows_the_original_bytes(memory: FakeMemory) -> None:
    bp = Breakpoints()
    assert bp.hide(0x10100, b"\xcc\xcc") == b"\xcc\xcc"  # nothing inserted: as read
    bp.wanted = {0x10100, 0x10102, 0x10200}
    bp.insert(memory, memory.write, CR3)
    raw = read_virtual(memory, CR3, 0x100FE, 8)
    assert raw == bytes([0xFE, 0xFF, 0xCC, 0x01, 0xCC, 0x03, 0x04, 0x05])
    assert bp.hide(0x100FE, raw) == bytes([0xFE, 0xFF, 0x00, 0x01, 0x02, 0x03, 0x04, 0x05])
    # Ranges that start or end on a breakpoint, or miss them all.
    assert bp.hide(0x10100, b"\xcc") == b"\x00"
    assert bp.hide(0x10102, b"\xcc\x03") == b"\x02\x03"
    assert bp.hide(0x100F0, b"\xf0\xf1") == b"\xf0\xf1"
    assert bp.hide(0x10100, b"") == b""
    bp.remove(memory, memory.write, CR3)
    assert read_virtual(memory, CR3, 0x100FE, 8) == bytes([0xFE, 0xFF, 0, 1, 2, 3, 4, 5])


def test_entry_breakpoint(memory: FakeMemory) -> None:
    bp = Breakpoints()
    bp.wanted = {0x10105}
    bp.entry = 0x10100
    before = bytes(memory.buf)
    bp.insert(memory, memory.write, CR3)
    assert bp.inserted(0x10100) and bp.inserted(0x10105)
    assert code(memory, 0x10100) == 0xCC
    assert bp.hide(0x10100, b"\xcc") == b"\x00"
    assert bp.wanted == {0x10105}  # the entry is the stub's own, not the debugger's
    bp.remove(memory, memory.write, CR3)
    assert bytes(memory.buf) == before
    bp.entry = None
    bp.insert(memory, memory.write, CR3)
    assert not bp.inserted(0x10100) and bp.inserted(0x10105)
    bp.remove(memory, memory.write, CR3)
    assert bytes(memory.buf) == before


def test_entry_that_is_also_wanted(memory: FakeMemory) -> None:
    bp = Breakpoints()
    bp.wanted = {0x10100}
    bp.entry = 0x10100
    before = bytes(memory.buf)
    bp.insert(memory, memory.write, CR3)
    assert code(memory, 0x10100) == 0xCC
    bp.remove(memory, memory.write, CR3)
    assert bytes(memory.buf) == before


def test_breakpoints_on_two_aliases_of_one_byte(memory: FakeMemory) -> None:
    # 0x200004 and 0x400004 are the same physical byte: whatever order they go
    # in, taking them out must leave the original, never an int3.
    memory.buf[0x200004] = 0x90
    for wanted in ({0x200004, 0x400004}, {0x400004, 0x200004}):
        bp = Breakpoints()
        bp.wanted = set(wanted)
        bp.insert(memory, memory.write, CR3)
        assert memory.buf[0x200004] == 0xCC
        assert bp.hide(0x400004, b"\xcc") == b"\x90"
        assert bp.hide(0x200004, b"\xcc") == b"\x90"
        bp.remove(memory, memory.write, CR3)
        assert memory.buf[0x200004] == 0x90


def test_remove_skips_a_breakpoint_unmapped_since(memory: FakeMemory) -> None:
    bp = Breakpoints()
    bp.wanted = {0x10100, 0x1234}
    bp.insert(memory, memory.write, CR3)
    memory.entry(PT, 0x10, 0)  # 0x10000's page is gone
    bp.remove(memory, memory.write, CR3)
    assert memory.buf[0x1234] == 0x00  # the one still mapped is restored
    assert memory.buf[0x5100] == 0xCC  # the other cannot be reached any more
    assert not bp.inserted(0x10100)
