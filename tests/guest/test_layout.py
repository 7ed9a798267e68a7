"""Guest memory layout: image segments become page-granular regions, and no
page is ever writable and executable at once (W^X).

The images are minimal ELF64 executables written here with ``struct``: just
enough for ``GuestImage`` to accept them (PT_LOAD segments, an entry point
and an ``.hl_functions`` table), so each test controls every segment.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hlasync import GuestImage, GuestImageError, Sandbox, SandboxConfig, abi
from hlasync.guest import layout as lay
from hlasync.guest.image import PF_R, PF_W, PF_X
from hlasync.guest.layout import PAGE, MemoryLayout
from hlasync.kvm import Kvm
from tests.conftest import fuzz_examples

R, RW, RX = PF_R, PF_R | PF_W, PF_R | PF_X
BASE = abi.IMAGE_BASE

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_RECORD = struct.Struct("<40sBB8s6sQ")


def _elf(segments: list[tuple[int, int, int]]) -> bytes:
    """A static x86-64 guest with PT_LOAD ``segments`` (vaddr, memsz, flags), no
    file data (all zero-filled), entering and exporting ``f`` at the start of the
    first executable segment."""
    entry = next(vaddr for vaddr, _, flags in segments if flags & PF_X)
    phoff = _EHDR.size
    table_offset = phoff + _PHDR.size * len(segments)
    table = _RECORD.pack(b"f", abi.ValueType.INT, 0, bytes(8), bytes(6), entry)
    names = b"\0.hl_functions\0.shstrtab\0"
    names_offset = table_offset + len(table)
    shoff = (names_offset + len(names) + 7) & ~7
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    data = bytearray(
        _EHDR.pack(ident, 2, 62, 1, entry, phoff, shoff, 0, 64, 56, len(segments), 64, 3, 2)
    )
    for vaddr, memsz, flags in segments:
        data += _PHDR.pack(1, flags, 0, vaddr, vaddr, 0, memsz, PAGE)
    data += table + names
    data += bytes(shoff - len(data))
    data += bytes(_SHDR.size)  # the null section
    data += _SHDR.pack(1, 1, 2, 0, table_offset, len(table), 0, 0, 8, 0)  # .hl_functions
    data += _SHDR.pack(15, 3, 0, 0, names_offset, len(names), 0, 0, 1, 0)  # .shstrtab
    return bytes(data)


def _image(tmp_path: Path, segments: list[tuple[int, int, int]]) -> GuestImage:
    path = tmp_path / "crafted.elf"
    data = _elf(segments)
    path.write_bytes(data)
    return GuestImage(path, data)  # not GuestImage.load: its cache keys on the file's version


def _image_regions(layout: MemoryLayout) -> list[tuple[int, int, int]]:
    return [(r.start, r.end, r.flags) for r in layout.regions if r.name.startswith("image")]


def test_crafted_image_is_a_valid_guest(tmp_path: Path) -> None:
    image = _image(tmp_path, [(BASE, 0x800, RX), (BASE + PAGE, 0x100, RW)])
    assert image.entry == BASE and image.function("f") is not None
    layout = MemoryLayout.compute(SandboxConfig(), image)
    assert _image_regions(layout) == [(BASE, BASE + PAGE, RX), (BASE + PAGE, BASE + 2 * PAGE, RW)]


@pytest.mark.parametrize(
    ("segments", "shared", "named"),
    [
        # data after code, on the code's last page
        (
            [(BASE, 0x1100, RX), (BASE + 0x1800, 0x100, RW)],
            BASE + PAGE,
            "RX and [0x101800, 0x101900) RW",
        ),
        # code after data, on the data's page
        ([(BASE, 0x100, RW), (BASE + 0x200, 0x1000, RX)], BASE, "RW and [0x100200, 0x101200) RX"),
    ],
    ids=["rx-then-rw", "rw-then-rx"],
)
def test_code_and_data_sharing_a_page_are_refused(
    tmp_path: Path, segments: list[tuple[int, int, int]], shared: int, named: str
) -> None:
    image = _image(tmp_path, segments)
    with pytest.raises(GuestImageError) as info:
        MemoryLayout.compute(SandboxConfig(), image)
    message = str(info.value)
    assert f"{named} share the page at {shared:#x}" in message
    assert "writable and executable at once (W^X)" in message
    assert "separate pages" in message and "guest.ld" in message
    assert info.value.path == image.path


def test_writable_and_executable_segment_is_refused(tmp_path: Path) -> None:
    image = _image(tmp_path, [(BASE, 0x3000, PF_R | PF_W | PF_X)])
    with pytest.raises(GuestImageError, match=r"\[0x100000, 0x103000\) RWX is writable and exec"):
        MemoryLayout.compute(SandboxConfig(), image)


def test_three_segments_on_one_page_with_code_and_data_are_refused(tmp_path: Path) -> None:
    image = _image(
        tmp_path, [(BASE, 0x100, RX), (BASE + 0x200, 0x100, R), (BASE + 0x400, 0x100, RW)]
    )
    with pytest.raises(GuestImageError, match=r"RX and .* R and .* RW share the page at 0x100000"):
        MemoryLayout.compute(SandboxConfig(), image)


def test_rights_of_a_shared_page_do_not_spread_to_other_pages(tmp_path: Path) -> None:
    # Code on pages 0-1, read-only data on pages 1-2, writable data on page 2. Before,
    # the three became one region with the union of their rights: all RWX.
    image = _image(
        tmp_path,
        [(BASE, 0x1800, RX), (BASE + 0x1800, 0x1000, R), (BASE + 0x2800, 0x400, RW)],
    )
    layout = MemoryLayout.compute(SandboxConfig(), image)
    assert _image_regions(layout) == [
        (BASE, BASE + 2 * PAGE, RX),  # the page code shares with rodata is RX
        (BASE + 2 * PAGE, BASE + 3 * PAGE, RW),  # the page rodata shares with data is RW
    ]


def test_read_only_data_may_share_a_page_with_code_or_data(tmp_path: Path) -> None:
    image = _image(
        tmp_path,
        [
            (BASE, 0x2100, RX),
            (BASE + 0x2200, 0x1000, R),  # shares page 2 with code
            (BASE + 0x5000, 0x100, R),
            (BASE + 0x5100, 0x2000, RW),  # shares page 5 with rodata
        ],
    )
    layout = MemoryLayout.compute(SandboxConfig(), image)
    assert _image_regions(layout) == [
        (BASE, BASE + 3 * PAGE, RX),
        (BASE + 3 * PAGE, BASE + 4 * PAGE, R),
        (BASE + 5 * PAGE, BASE + 8 * PAGE, RW),
    ]


def _user_pages(memory: bytes, layout: MemoryLayout) -> dict[int, int]:
    """Guest page number -> page table entry, for every present user page."""
    count = layout.memory_size // PAGE
    entries = struct.unpack_from(f"<{count}Q", memory, lay.PAGE_TABLES)
    return {
        page: entry
        for page, entry in enumerate(entries)
        if entry & lay.PTE_PRESENT and entry & lay.PTE_USER
    }


def test_bundled_guest_maps_no_page_writable_and_executable(simpleguest: Path) -> None:
    image = GuestImage.load(simpleguest)
    layout = MemoryLayout.compute(SandboxConfig(), image)
    assert _image_regions(layout) == [
        (s.vaddr & ~(PAGE - 1), (s.end + PAGE - 1) & ~(PAGE - 1), s.flags) for s in image.segments
    ]
    memory = bytearray(layout.memory_size)
    lay.build_boot_image(memoryview(memory), layout, image)
    pages = _user_pages(bytes(memory), layout)
    executable = {p for p, e in pages.items() if not e & lay.PTE_NX}
    writable = {p for p, e in pages.items() if e & lay.PTE_WRITE}
    assert executable and writable and not executable & writable
    text = next(s for s in image.segments if s.flags & PF_X)
    assert executable == set(range(text.vaddr // PAGE, (text.end + PAGE - 1) // PAGE))


def test_sandbox_refuses_a_writable_code_page(kvm: Kvm, tmp_path: Path) -> None:
    path = tmp_path / "wx.elf"
    path.write_bytes(_elf([(BASE, 0x1100, RX), (BASE + 0x1800, 0x100, RW)]))
    with pytest.raises(GuestImageError, match="W\\^X"):
        Sandbox(path)


@st.composite
def _segment_lists(draw: st.DrawFn) -> list[tuple[int, int, int]]:
    """Sorted, non-overlapping segments of a few pages, each R, RW or RX."""
    segments = []
    address = BASE + draw(st.integers(0, 0x1800))
    for _ in range(draw(st.integers(1, 6))):
        size = draw(st.integers(1, 0x2400))
        segments.append((address, size, draw(st.sampled_from([R, RW, RX]))))
        address += size + draw(st.integers(0, 0x1800))
    if not any(flags & PF_X for _, _, flags in segments):
        segments[0] = (segments[0][0], segments[0][1], RX)
    return segments


@settings(max_examples=fuzz_examples(200), deadline=None)
@given(_segment_lists())
def test_every_page_gets_exactly_the_rights_of_its_segments(
    tmp_path_factory: pytest.TempPathFactory, segments: list[tuple[int, int, int]]
) -> None:
    image = _image(tmp_path_factory.mktemp("layout"), segments)
    rights: dict[int, int] = {}  # the model: page -> union of the rights of the segments on it
    for vaddr, memsz, flags in segments:
        for page in range(vaddr // PAGE, (vaddr + memsz + PAGE - 1) // PAGE):
            rights[page] = rights.get(page, 0) | flags
    try:
        layout = MemoryLayout.compute(SandboxConfig(), image)
    except GuestImageError as exc:
        assert "W^X" in str(exc)
        assert any(r & PF_W and r & PF_X for r in rights.values())
        return
    mapped: dict[int, int] = {}
    for start, end, flags in _image_regions(layout):
        assert start % PAGE == 0 and end % PAGE == 0
        assert not (flags & PF_W and flags & PF_X)
        for page in range(start // PAGE, end // PAGE):
            assert page not in mapped  # regions are disjoint
            mapped[page] = flags
    assert mapped == rights
