"""Guest ELFs fuzzed (issue 18): the guest a core dump names may be anyone's
file. A real guest with its headers, sections, symbols, notes, function table
or call-frame information changed (boundary values, garbage, cut short), and
arbitrary bytes after an x86-64 executable's ELF header, give a
:class:`GuestImage` or :class:`GuestImageError`, never another exception;
the unwinder built on what loaded gives a row or none for any pc, and unwinds
any stack; all within a time and memory budget per input.

(tests/guest/test_image.py flips bytes of the first 16 KiB of a guest and
checks the error tree alone; this adds the structure, the unwinder and the
budgets.)"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hlasync import GuestImage, GuestImageError
from hlasync.crashdump.unwind import CallFrameTable, Row, unwind
from tests.conftest import fuzz_examples
from tests.fuzz.budget import SECONDS, Measured, measure, memory_budget
from tests.guest import hostile

_SETTINGS = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
_U8 = st.one_of(st.sampled_from([0, 1, 2, 0x7F, 0x80, 0xFF]), st.integers(0, 0xFF))
_U16 = st.one_of(st.sampled_from([0, 1, 56, 64, 0xFEFF, 0xFF00, 0xFFFF]), st.integers(0, 0xFFFF))
_U32 = st.one_of(
    st.sampled_from([0, 1, 3, 4, 24, 0x7FFF_FFFF, 0xFFFF_FFF0, 0xFFFF_FFFF]),
    st.integers(0, 0xFFFF_FFFF),
)
_U64 = st.one_of(
    _U32,
    st.sampled_from([64 << 20, 2**63, 2**64 - 1, 0x10_0000, 0x1000_0000]),
    st.integers(0, 2**64 - 1),
)
#: Where fields lie in each table, and their layout.
_EHDR_FIELDS = [(16, "<H"), (18, "<H"), (24, "<Q"), (32, "<Q"), (40, "<Q"), (54, "<H"),
                (56, "<H"), (58, "<H"), (60, "<H"), (62, "<H")]  # fmt: skip
_PHDR_FIELDS = [(0, "<I"), (4, "<I"), (8, "<Q"), (16, "<Q"), (32, "<Q"), (40, "<Q")]
_SHDR_FIELDS = [(0, "<I"), (4, "<I"), (8, "<Q"), (16, "<Q"), (24, "<Q"), (32, "<Q"),
                (40, "<I"), (56, "<Q")]  # fmt: skip
_SYM_FIELDS = [(0, "<I"), (4, "<B"), (8, "<Q"), (16, "<Q")]
_VALUES = {"<B": _U8, "<H": _U16, "<I": _U32, "<Q": _U64}
#: Call-frame opcodes, the ones that nest, jump or take blocks among them.
_OPCODES = st.one_of(
    st.sampled_from([0x01, 0x02, 0x04, 0x05, 0x06, 0x0A, 0x0B, 0x0C, 0x0F, 0x10, 0x12, 0x16, 0x2F]),
    _U8,
)

#: Mutations, the ones that reach deeper parsers more often.
_KINDS = ["flip"] * 2 + ["ehdr", "phdr", "shdr", "symbol", "function", "note"] + ["cfi"] * 3


class _Layout:
    """Where a real guest keeps what the mutations aim at."""

    def __init__(self, elf: bytes) -> None:
        header = hostile.EHDR.unpack_from(elf)
        phoff, phnum, shoff, shnum = header[5], header[10], header[6], header[12]
        self.phdrs = [phoff + i * hostile.PHDR.size for i in range(phnum)]
        self.shdrs = [shoff + i * hostile.SHDR.size for i in range(shnum)]
        found = {s.name: s for s in hostile.sections(elf)}
        symtab, functions, frames = found[b".symtab"], found[b".hl_functions"], found[b".eh_frame"]
        assert symtab.offset is not None and functions.offset is not None
        assert frames.offset is not None
        self.symbols = [symtab.offset + i for i in range(0, len(symtab.data), hostile.SYM.size)]
        self.functions = (functions.offset, len(functions.data))
        self.notes = [
            h[2] for h in (hostile.PHDR.unpack_from(elf, at) for at in self.phdrs) if h[0] == 4
        ]
        self.frames = (frames.offset, len(frames.data))
        self.entries = []  # where each CIE and FDE of .eh_frame begins
        at = 0
        while at + 4 <= len(frames.data):
            self.entries.append(frames.offset + at)
            at += 4 + struct.unpack_from("<I", frames.data, at)[0]


@pytest.fixture(scope="module")
def guest(simpleguest: Path) -> bytes:
    return simpleguest.read_bytes()


@pytest.fixture(scope="module")
def layout(guest: bytes) -> _Layout:
    return _Layout(guest)


@st.composite
def _mutants(draw: st.DrawFn, elf: bytes, layout: _Layout) -> bytes:
    """``elf`` with one to four of its fields or bytes changed, sometimes cut short."""
    data = bytearray(elf)

    def field(base: int, fields: list[tuple[int, str]]) -> None:
        offset, form = draw(st.sampled_from(fields))
        struct.pack_into(form, data, base + offset, draw(_VALUES[form]))

    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(_KINDS))
        event(kind)
        if kind == "flip":
            data[draw(st.integers(0, len(data) - 1))] = draw(_U8)
        elif kind == "ehdr":
            field(0, _EHDR_FIELDS)
        elif kind == "phdr":
            field(draw(st.sampled_from(layout.phdrs)), _PHDR_FIELDS)
        elif kind == "shdr":
            field(draw(st.sampled_from(layout.shdrs)), _SHDR_FIELDS)
        elif kind == "symbol":
            field(draw(st.sampled_from(layout.symbols)), _SYM_FIELDS)
        elif kind == "function":
            start, size = layout.functions
            data[start + draw(st.integers(0, size - 1))] = draw(_U8)
        elif kind == "note":
            at = draw(st.sampled_from(layout.notes)) + draw(st.sampled_from([0, 4, 8]))
            struct.pack_into("<I", data, at, draw(_U32))
        else:  # cfi: an entry's length or CIE pointer, or an instruction byte
            start, size = layout.frames
            if draw(st.booleans()):
                at = draw(st.sampled_from(layout.entries)) + draw(st.sampled_from([0, 4]))
                struct.pack_into("<I", data, at, draw(_U32))
            else:
                data[start + draw(st.integers(0, size - 1))] = draw(_OPCODES)
    if draw(st.integers(0, 9)) == 0:
        event("cut")
        del data[draw(st.integers(0, len(data))) :]
    return bytes(data)


@st.composite
def _arbitrary(draw: st.DrawFn) -> bytes:
    """Any bytes, or any bytes after an x86-64 executable's ELF header whose
    counts and offsets are drawn."""
    tail = draw(st.binary(max_size=4096))
    if draw(st.booleans()):
        return tail
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header = hostile.EHDR.pack(
        ident, 2, 62, 1, draw(_U64), draw(st.sampled_from([64, 0]) | _U64),
        draw(st.sampled_from([64, 0]) | _U64), 0, 64, 56, draw(_U16), 64, draw(_U16), draw(_U16),
    )  # fmt: skip
    return header + tail


# ---------------------------------------------------------------- checks
def _exercise(path: Path) -> object:
    """Load the guest as a dump's reader does, then look up and unwind."""
    GuestImage._cache.clear()  # measure() runs this twice: both runs parse
    try:
        image = GuestImage.load(path)
    except GuestImageError as exc:
        return exc
    table = CallFrameTable(image)
    pcs = [image.entry, *(fn.address for fn in image.functions)]
    pcs += [symbol.address for symbol in image.symbols[:64]]
    for pc in pcs:
        for at in (pc - 1, pc, pc + 1, pc + 7):
            row = table.row(at)
            assert row is None or isinstance(row, Row)
    # A stack of 4 KiB that points into itself: the unwinder stops at the end.
    stack = 0x20_0000
    memory = struct.pack("<512Q", *(stack + 8 * i for i in range(1, 513)))

    def read(address: int, size: int) -> bytes:
        if not stack <= address <= stack + len(memory) - size:
            raise ValueError(f"address {address:#x} is not in the dump")
        return memory[address - stack : address - stack + size]

    for pc in pcs[:8]:
        frames = unwind(read, pc, stack, stack + 64, table, 64)
        assert 1 <= len(frames) <= 64
    return image


def _check(measured: Measured, size: int, label: str) -> None:
    outcome = measured.outcome
    event(f"outcome: {type(outcome).__name__}")
    assert isinstance(outcome, GuestImage | GuestImageError), (label, repr(outcome))
    assert measured.seconds < SECONDS, f"{label}: {measured.seconds:.3f} s"
    assert measured.peak < memory_budget(size), f"{label}: {measured.peak} bytes at the peak"


@settings(_SETTINGS, max_examples=fuzz_examples(200))
@given(data=st.data())
def test_mutated_guests_load_or_are_refused_in_budget(
    guest: bytes, layout: _Layout, tmp_path: Path, data: st.DataObject
) -> None:
    mutant = data.draw(_mutants(guest, layout))
    path = tmp_path / "mutant.elf"
    path.write_bytes(mutant)
    _check(measure(lambda: _exercise(path)), len(mutant), f"{len(mutant)} bytes")


@settings(_SETTINGS, max_examples=fuzz_examples(150))
@given(blob=_arbitrary())
def test_arbitrary_bytes_are_refused_in_budget(tmp_path: Path, blob: bytes) -> None:
    path = tmp_path / "bytes.elf"
    path.write_bytes(blob)
    measured = measure(lambda: _exercise(path))
    _check(measured, len(blob), f"{len(blob)} bytes")
    assert isinstance(measured.outcome, GuestImageError)


@settings(_SETTINGS, max_examples=fuzz_examples(100))
@given(
    program=st.lists(
        st.one_of(_OPCODES.map(lambda op: bytes([op])), st.binary(min_size=1, max_size=12)),
        max_size=64,
    ).map(b"".join),
    cie=st.binary(max_size=24),
)
def test_arbitrary_call_frame_programs_give_a_row_or_none(
    guest: bytes, tmp_path: Path, program: bytes, cie: bytes
) -> None:
    """Any instructions in an FDE over the guest's code, after the usual CIE
    or any CIE body: a row or none for each pc, in budget."""
    base = GuestImage(tmp_path / "real.elf", guest)
    code = next(s for s in base.segments if s.flags & 1)
    frames = hostile.fde_pairs(1, code.vaddr, code.memsz)
    if cie:
        frames = struct.pack("<I", len(cie) + 4) + bytes(4) + cie
    frames += hostile.fde(len(frames), 0, code.vaddr, code.memsz, program)
    path = tmp_path / "cfi.elf"
    path.write_bytes(hostile.call_frames(guest, frames))
    measured = measure(lambda: _exercise(path))
    _check(measured, path.stat().st_size, program.hex())
    assert isinstance(measured.outcome, GuestImage)
