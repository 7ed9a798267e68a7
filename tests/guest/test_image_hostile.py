"""Hostile guest ELFs (issue 18). A core dump names its guest ELF, and a dump
planted in a shared directory can name any file of up to 64 MiB; showing the
dump loads it (:meth:`GuestImage.load`) and unwinds with its call-frame
information (:class:`CallFrameTable`). Each file here once made that take
seconds to hours, hundreds of MiB to GiBs, or raise RecursionError or
IndexError; now each is loaded or refused, as the caps say, within the fuzz
budget of time and a memory budget of the file's size twice over plus what
the caps allow.

Each hostile file is loaded in a child process with a deadline, so a
regression fails instead of hanging the suite. The last test checks that the
bounded readers read the real guests as pyelftools does.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from elftools.dwarf.callframe import FDE
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection
from elftools.elf.segments import NoteSegment

from hlasync import CoreDump, GuestCrashed, Sandbox, SandboxConfig, guests
from hlasync.crashdump.unwind import MAX_CALL_FRAME_ENTRIES, MAX_CFI_INSTRUCTIONS, CallFrameTable
from hlasync.guest.image import (
    MAX_CALL_FRAME_BYTES,
    MAX_FUNCTIONS,
    MAX_NOTES,
    MAX_PROGRAM_HEADERS,
    MAX_SECTIONS,
    MAX_SYMBOL_NAME,
    MAX_SYMBOLS,
    PF_X,
    GuestImage,
)
from hlasync.kvm import Kvm
from tests.crashdump import hostile as hostile_core
from tests.fuzz.budget import SECONDS
from tests.guest import hostile

ROOT = Path(__file__).resolve().parents[2]
#: Seconds a child may take before the load counts as hung (the old loader
#: took from seconds to hours on these files; the new one takes milliseconds).
DEADLINE = 60


def load_memory(size: int) -> int:
    """Peak bytes loading a file of ``size`` bytes may take: the file, the
    copies its segments keep (at most the file again), and what the caps allow
    (symbols and their names, call frames and their index)."""
    return 2 * size + (48 << 20)


#: Loads the file, builds its call-frame table, looks up the pcs; prints what
#: it found and the time and peak memory that took (tests/fuzz/budget.py).
#: Its address space is capped so that a regression fails, not the machine.
_CHILD = """
import json, resource, sys
from pathlib import Path
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
from hlasync.crashdump.unwind import CallFrameTable
from hlasync.errors import GuestImageError
from hlasync.guest.image import GuestImage
from tests.fuzz.budget import measure

path, pcs = Path(sys.argv[1]), [int(pc, 0) for pc in sys.argv[2:]]

def work():
    GuestImage._cache.clear()  # measure() runs this twice: both runs parse
    try:
        image = GuestImage.load(path)
    except GuestImageError as exc:
        return {"refused": str(exc)}
    table = CallFrameTable(path)
    return {
        "symbols": len(image.symbols),
        "longest": max((len(s.name.encode()) for s in image.symbols), default=0),
        "build_id": image.build_id,
        "truncated": list(getattr(image, "truncated", ())),
        "rows": [table.row(pc) is not None for pc in pcs],
    }

measured = measure(work)
outcome = measured.outcome
if not isinstance(outcome, dict):
    outcome = {"raised": repr(outcome)[:300]}
print(json.dumps({"outcome": outcome, "seconds": measured.seconds, "peak": measured.peak}))
"""


#: Prints the backtrace of the dump it is given, as CoreDump shows it.
_BACKTRACE_CHILD = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
from hlasync import CoreDump

with CoreDump.open(sys.argv[1]) as dump:
    print(json.dumps([frame.symbol for frame in dump.backtrace()]))
"""


def in_child(script: str, *args: str) -> object:
    """What ``script`` printed (JSON), run in a child process with a deadline."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", script, *args],
            capture_output=True,
            text=True,
            timeout=DEADLINE,
            cwd=ROOT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{args[0]}: still at it after {DEADLINE} s")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def load_in_child(path: Path, pcs: tuple[int, ...] = ()) -> dict[str, Any]:
    """What :data:`_CHILD` found, after checking its time and memory."""
    result = in_child(_CHILD, str(path), *map(hex, pcs))
    assert isinstance(result, dict)
    outcome: dict[str, Any] = result["outcome"]
    assert "raised" not in outcome, outcome
    assert result["seconds"] < SECONDS, f"{path.name}: {result['seconds']:.2f} s"
    peak, budget = result["peak"], load_memory(path.stat().st_size)
    assert peak < budget, f"{path.name}: {peak >> 20} MiB at the peak"
    return outcome


@pytest.fixture(scope="module")
def guest(simpleguest: Path) -> bytes:
    return simpleguest.read_bytes()


@pytest.fixture(scope="module")
def text(simpleguest: Path) -> tuple[int, int]:
    """Start and size of the guest's code."""
    code = next(s for s in GuestImage.load(simpleguest).segments if s.flags & PF_X)
    return code.vaddr, code.memsz


@pytest.fixture
def write(tmp_path: Path) -> Iterator[Path]:
    """Where a test writes its hostile ELF (removed after: some are 60 MiB)."""
    path = tmp_path / "hostile.elf"
    yield path
    path.unlink(missing_ok=True)


# ---------------------------------------------------------------- headers
def test_65535_section_headers_are_refused(guest: bytes, write: Path) -> None:
    write.write_bytes(hostile.many_sections(guest, 0xFFFF))
    outcome = load_in_child(write)
    assert outcome.get("refused") == f"{write}: 65535 section headers (at most {MAX_SECTIONS})"


def test_65534_program_headers_are_refused(guest: bytes, write: Path) -> None:
    write.write_bytes(hostile.many_program_headers(guest, 0xFFFE))
    refused = str(load_in_child(write).get("refused"))
    assert f"65534 program headers (at most {MAX_PROGRAM_HEADERS})" in refused


def test_section_names_without_nul_are_read_a_few_bytes_each(guest: bytes, write: Path) -> None:
    """16 MiB of section-name table without a NUL, naming 1,000 sections:
    pyelftools read it to the end for each (minutes)."""
    write.write_bytes(hostile.nameless_strings(guest, 16 << 20, 1000))
    outcome = load_in_child(write)
    assert outcome["symbols"] == len(GuestImage(write, guest).symbols)


# ---------------------------------------------------------------- contents
def test_symbols_past_the_cap_are_left_out(guest: bytes, write: Path) -> None:
    write.write_bytes(hostile.many_symbols(guest, 200_000))
    outcome = load_in_child(write)
    assert outcome["truncated"] == [f"symbols: the first {MAX_SYMBOLS} of 200001 read"]
    assert outcome["symbols"] == MAX_SYMBOLS - 1  # entry 0 is the null symbol


def test_names_in_a_string_table_without_nul_are_cut(guest: bytes, write: Path) -> None:
    """Every symbol named from its own byte of a table without a NUL: each
    name is read up to the cap, not to the end of the table."""
    write.write_bytes(hostile.long_symbol_names(guest, MAX_SYMBOLS, MAX_SYMBOLS + 2048))
    outcome = load_in_child(write)
    assert outcome["symbols"] == MAX_SYMBOLS - 1
    assert outcome["longest"] == MAX_SYMBOL_NAME


def test_functions_past_the_cap_are_refused(
    guest: bytes, text: tuple[int, int], write: Path
) -> None:
    write.write_bytes(hostile.many_functions(guest, 100_000, text[0]))
    outcome = load_in_child(write)
    assert f"exports 100000 functions (at most {MAX_FUNCTIONS})" in str(outcome.get("refused"))


def test_notes_before_the_build_id_are_read_up_to_the_cap(guest: bytes, write: Path) -> None:
    write.write_bytes(hostile.many_notes(guest, 1_000_000))
    outcome = load_in_child(write)
    assert outcome["build_id"] is None
    assert outcome["truncated"] == [f"notes: the first {MAX_NOTES} read, no build-id among them"]


def test_segments_loading_the_same_bytes_are_refused(guest: bytes, write: Path) -> None:
    """Four segments of the same 32 MiB: each would keep a copy."""
    write.write_bytes(hostile.overlapping_segments(guest, 4, 32 << 20))
    assert "they overlap in the file" in str(load_in_child(write).get("refused"))


@pytest.mark.parametrize("name", [b".hl_functions", b".debug_info"])
def test_compressed_sections_are_not_inflated(guest: bytes, write: Path, name: bytes) -> None:
    """256 MiB of zeros in 256 KiB: the loader refuses a compressed function
    table and reads no debug information (pyelftools inflated both)."""
    write.write_bytes(hostile.compressed(guest, name, 256 << 20))
    outcome = load_in_child(write)
    if name == b".hl_functions":
        assert ".hl_functions section is compressed" in str(outcome.get("refused"))
    else:
        assert outcome["symbols"] and not outcome["truncated"]


# ---------------------------------------------------------------- call frames
def test_call_frame_entries_past_the_cap_are_left_out(
    guest: bytes, text: tuple[int, int], write: Path
) -> None:
    """An FDE, then CIEs and FDEs past :data:`MAX_CALL_FRAME_ENTRIES` (in
    less than MAX_CALL_FRAME_BYTES), then an FDE for other code: it has no row."""
    start = text[0]
    pairs = MAX_CALL_FRAME_ENTRIES // 2 + 4_000
    frames = hostile.fde_pairs(1, start, 16) + hostile.fde_pairs(pairs, start + 0x100, 16)
    frames += hostile.fde_pairs(1, start + 0x200, 16)
    write.write_bytes(hostile.call_frames(guest, frames))
    outcome = load_in_child(write, (start, start + 0x100, start + 0x200))
    assert outcome["rows"] == [True, True, False]


def test_call_frames_past_the_byte_cap_are_left_out(
    guest: bytes, text: tuple[int, int], write: Path
) -> None:
    """One FDE of 8 Mi instructions: the section is cut at the cap, and the
    FDE, cut with it, gives no row."""
    start, size = text
    frames = hostile.cfi_long_program(start, size, 8 << 20)
    write.write_bytes(hostile.call_frames(guest, frames))
    outcome = load_in_child(write, (start,))
    assert outcome["rows"] == [False]
    assert outcome["truncated"] == [
        f"call frames: the first {MAX_CALL_FRAME_BYTES} of {len(frames)} bytes of .eh_frame read"
    ]


def test_rules_for_many_registers_cost_one_pass(
    guest: bytes, text: tuple[int, int], write: Path
) -> None:
    """Rules for 1,000 registers, then 1,000 remembered rows: pyelftools
    copied every rule into every row (seconds, hundreds of MiB); a lookup
    runs the instructions up to its pc, at most MAX_CFI_INSTRUCTIONS."""
    start, size = text
    frames = hostile.cfi_many_registers(start, size, 1000, 1000)
    write.write_bytes(hostile.call_frames(guest, frames))
    assert load_in_child(write, (start, start + 500, start + 999))["rows"] == [True, True, False]


@pytest.mark.parametrize("kind", ["self-referencing", "restore-without-remember"])
def test_broken_call_frames_give_no_row(
    guest: bytes, text: tuple[int, int], write: Path, kind: str
) -> None:
    """An FDE that is its own CIE (RecursionError in pyelftools), one that
    restores a state it never saved (IndexError)."""
    start, size = text
    build = {
        "self-referencing": hostile.cfi_self_referencing,
        "restore-without-remember": hostile.cfi_restore_without_remember,
    }[kind]
    write.write_bytes(hostile.call_frames(guest, build(start, size)))
    assert load_in_child(write, (start,))["rows"] == [False]


def test_instructions_past_the_cap_give_no_row(
    guest: bytes, text: tuple[int, int], tmp_path: Path
) -> None:
    """Within MAX_CFI_INSTRUCTIONS (the CIE's and the FDE's together) a
    lookup runs them all; past it the FDE gives no row."""
    start, size = text
    rows = []
    for nops in (MAX_CFI_INSTRUCTIONS - 16, MAX_CFI_INSTRUCTIONS):
        frames = hostile.cfi_long_program(start, size, nops)
        image = GuestImage(tmp_path / "g.elf", hostile.call_frames(guest, frames))
        rows.append(CallFrameTable(image).row(start))
    assert rows[0] is not None and rows[0].cfa == (hostile.RSP, 8) and rows[0].rbp == -16
    assert rows[1] is None


# ---------------------------------------------------------------- dumps
@pytest.fixture(scope="module")
def real_core(tmp_path_factory: pytest.TempPathFactory, kvm: Kvm, simpleguest: Path) -> Path:
    directory = tmp_path_factory.mktemp("hostile-guest-core")
    with (
        Sandbox(simpleguest, SandboxConfig(crashdump_dir=directory)) as sb,
        pytest.raises(GuestCrashed) as info,
    ):
        sb.call("divide_by_zero")
    assert info.value.core_path is not None
    return info.value.core_path


def test_a_dump_naming_a_hostile_guest_unwinds(
    real_core: Path, guest: bytes, text: tuple[int, int], tmp_path: Path
) -> None:
    """A real dump whose metadata names the guest rebuilt with a section-name
    table of 16 MiB without a NUL (same build-id, same code) unwinds as with
    the real guest; named with a self-referencing FDE, it unwinds with frame
    pointers instead of raising RecursionError."""
    with CoreDump.open(real_core) as dump:
        expected = [frame.symbol for frame in dump.backtrace()]
    assert expected[0] is not None and expected[0].startswith("divide_by_zero")
    for name, data in (
        ("names.elf", hostile.nameless_strings(guest, 16 << 20, 1000)),
        ("cfi.elf", hostile.call_frames(guest, hostile.cfi_self_referencing(*text))),
    ):
        elf = tmp_path / name
        elf.write_bytes(data)

        def name_guest(meta: dict[str, Any], elf: Path = elf) -> None:
            meta["guest"] = str(elf)

        core = hostile_core.with_metadata(real_core, tmp_path / f"core-{name}", name_guest)
        frames = in_child(_BACKTRACE_CHILD, str(core))
        assert isinstance(frames, list) and frames[0] == expected[0], (name, frames)
        assert frames[-1] == expected[-1], (name, frames)
        if name == "names.elf":
            assert frames == expected


# ---------------------------------------------------------------- agreement
def _pyelftools_rows(path: Path) -> list[tuple[int, tuple[object, ...] | None]]:
    """(pc, (CFA, return address offset, rbp offset)) at each row boundary of
    each FDE, and just before it, as pyelftools decodes them."""
    with path.open("rb") as f:
        dwarf = ELFFile(f).get_dwarf_info()
        entries = dwarf.EH_CFI_entries() if dwarf.has_EH_CFI() else dwarf.CFI_entries()
        fdes = [
            (e.header["initial_location"], e.header["address_range"], e.get_decoded().table)
            for e in entries
            if isinstance(e, FDE)
        ]
    out: list[tuple[int, tuple[object, ...] | None]] = []
    for start, length, table in fdes:
        for pc in sorted({start, start + length - 1, *(row["pc"] for row in table)}):
            for at in (pc - 1, pc):
                if not start <= at < start + length:
                    continue
                row = None
                for candidate in table:
                    if candidate["pc"] > at:
                        break
                    row = candidate
                out.append((at, None if row is None else _rules(row)))
    return out


def _rules(row: dict[Any, Any]) -> tuple[object, ...]:
    cfa = row["cfa"]
    kept = (cfa.reg, cfa.offset) if cfa.expr is None and cfa.reg is not None else None
    rules = [row.get(register) for register in (16, 6)]
    return (kept, *(r.arg if r is not None and r.type == "OFFSET" else None for r in rules))


@pytest.fixture(scope="module")
def debug_frame_guest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """simpleguest built without unwind tables: only .debug_frame."""
    from hlasync._build import build_guest

    source = ROOT / "guest" / "guests" / "simpleguest.c"
    out = tmp_path_factory.mktemp("debug-frame") / "simpleguest.elf"
    return build_guest(
        [source], out, extra_flags=["-fno-asynchronous-unwind-tables", "-fno-unwind-tables"]
    )


@pytest.mark.parametrize("name", ["simpleguest", "jsruntime", "debug_frame"])
def test_the_bounded_readers_agree_with_pyelftools(
    name: str, request: pytest.FixtureRequest
) -> None:
    """Symbols, build-id, segments and every unwind row boundary of the real
    guests read as pyelftools reads them (.eh_frame, and .debug_frame)."""
    from elftools.elf.elffile import ELFFile

    path = (
        request.getfixturevalue("debug_frame_guest") if name == "debug_frame" else guests.path(name)
    )
    image = GuestImage(path, path.read_bytes())
    assert not image.truncated and image.call_frames is not None
    assert image.call_frames.eh is (name != "debug_frame")
    with path.open("rb") as f:
        elf = ELFFile(f)
        table = elf.get_section_by_name(".symtab")
        assert isinstance(table, SymbolTableSection)
        symbols = {
            (s.name, s["st_value"], s["st_size"])
            for s in table.iter_symbols()
            if s["st_info"]["type"] in ("STT_FUNC", "STT_OBJECT") and s["st_value"] and s.name
        }
        loads = [
            (s["p_vaddr"], s["p_memsz"], s.data())
            for s in elf.iter_segments()
            if s["p_type"] == "PT_LOAD" and s["p_memsz"]
        ]
        notes = [
            n for s in elf.iter_segments() if isinstance(s, NoteSegment) for n in s.iter_notes()
        ]
    assert {(s.name, s.address, s.size) for s in image.symbols} == symbols
    assert [(s.vaddr, s.memsz, s.data) for s in image.segments] == sorted(loads)
    assert image.build_id == next(n["n_desc"] for n in notes if n["n_type"] == "NT_GNU_BUILD_ID")
    cfi = CallFrameTable(image)
    expected = _pyelftools_rows(path)
    assert len(expected) > 100
    for pc, rules in expected:
        row = cfi.row(pc)
        assert (None if row is None else (row.cfa, row.return_address, row.rbp)) == rules, hex(pc)
