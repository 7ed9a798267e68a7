"""The register file a debugger sees and its target description
(hlasync.debug.registers), without KVM; and gdb's own reading of the description."""

from __future__ import annotations

import random
import re
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from hlasync.debug.registers import (
    EFLAGS,
    G_SIZE,
    NUMBERS,
    REGISTERS,
    RIP,
    TARGET_XML,
    RegisterFile,
)
from hlasync.kvm import kvm_regs, kvm_sregs
from tests.conftest import require_tool

GPRS = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp"] + [f"r{i}" for i in range(8, 16)]
#: gdb's amd64 register order (features core, sse, segments).
ORDER = [
    *GPRS,
    "rip",
    "eflags",
    "cs",
    "ss",
    "ds",
    "es",
    "fs",
    "gs",
    *(f"st{i}" for i in range(8)),
    "fctrl",
    "fstat",
    "ftag",
    "fiseg",
    "fioff",
    "foseg",
    "fooff",
    "fop",
    *(f"xmm{i}" for i in range(16)),
    "mxcsr",
    "fs_base",
    "gs_base",
]
XSAVE_SIZE = 4096
TF, IF = 0x100, 0x200


def make_file(seed: int = 7) -> RegisterFile:
    rng = random.Random(seed)
    regs = kvm_regs()
    for name in [*GPRS, "rip"]:
        setattr(regs, name, rng.getrandbits(64))
    regs.rflags = 0x202  # IF and the always-one bit
    sregs = kvm_sregs()
    for i, name in enumerate(("cs", "ss", "ds", "es", "fs", "gs")):
        getattr(sregs, name).selector = 0x10 + 8 * i | 3
    sregs.fs.base, sregs.gs.base = 0x1234_5678_9ABC, 0xFEDC_BA98_7654
    xsave = bytearray(rng.randbytes(XSAVE_SIZE))
    return RegisterFile.of(regs, sregs, bytes(xsave))


def offset_of(name: str) -> int:
    number = NUMBERS[name]
    return sum(r.bits // 8 for r in REGISTERS[:number])


# ------------------------------------------------------------------ the file
def test_order_and_size() -> None:
    assert [r.name for r in REGISTERS] == ORDER
    assert G_SIZE == 16 * 8 + 8 + 4 + 6 * 4 + 8 * 10 + 8 * 4 + 16 * 16 + 4 + 2 * 8 == 552
    assert RIP == 16 and EFLAGS == 17
    assert {name: i for i, name in enumerate(ORDER)} == NUMBERS


def test_of_copies() -> None:
    regs, sregs, xsave = kvm_regs(), kvm_sregs(), bytearray(XSAVE_SIZE)
    rf = RegisterFile.of(regs, sregs, bytes(xsave))
    rf.write(NUMBERS["rax"], (5).to_bytes(8, "little"))
    rf.write(NUMBERS["fs_base"], (6).to_bytes(8, "little"))
    rf.write(NUMBERS["xmm0"], b"\x07" * 16)
    assert regs.rax == 0 and sregs.fs.base == 0 and not any(xsave)
    assert rf.changed == {"regs", "sregs", "xsave"}


def test_read_all_is_the_registers_in_order() -> None:
    rf = make_file()
    data = rf.read_all()
    assert len(data) == G_SIZE
    assert data[:8] == int(rf.regs.rax).to_bytes(8, "little")
    assert data[offset_of("rip") : offset_of("rip") + 8] == int(rf.regs.rip).to_bytes(8, "little")
    assert data[offset_of("cs") : offset_of("cs") + 4] == (0x13).to_bytes(4, "little")
    assert data[offset_of("st0") : offset_of("st0") + 10] == bytes(rf.xsave[32:42])
    assert data[offset_of("xmm15") : offset_of("xmm15") + 16] == bytes(rf.xsave[400:416])
    assert data[offset_of("fs_base") :][:8] == (0x1234_5678_9ABC).to_bytes(8, "little")
    assert data[-8:] == (0xFEDC_BA98_7654).to_bytes(8, "little")
    for number, register in enumerate(REGISTERS):
        at = offset_of(register.name)
        assert rf.read(number) == data[at : at + register.bits // 8]


def test_write_all_read_all_round_trip() -> None:
    source = make_file(1)
    target = make_file(2)
    target.write_all(source.read_all())
    assert target.read_all() == source.read_all()
    assert target.changed == {"regs", "sregs", "xsave"}
    assert target.regs.rip == source.regs.rip and target.regs.r15 == source.regs.r15


def test_write_all_of_random_bytes_round_trips_what_is_writable() -> None:
    rng = random.Random(3)
    rf = make_file()
    data = bytearray(rng.randbytes(G_SIZE))
    rf.write_all(bytes(data))
    back = rf.read_all()
    for number, register in enumerate(REGISTERS):
        at, size = offset_of(register.name), register.bits // 8
        got, sent = back[at : at + size], bytes(data[at : at + size])
        if register.name in ("cs", "ss", "ds", "es", "fs", "gs"):
            assert got == rf.read(number)  # selectors are the host's: unchanged
        elif register.name == "eflags":
            user = 0x0004_0CD5
            assert int.from_bytes(got, "little") & user == int.from_bytes(sent, "little") & user
        elif register.name in ("fctrl", "fstat", "fiseg", "foseg"):
            assert got == sent[:2] + b"\0\0"  # 16-bit fields shown as 32 bits
        elif register.name == "fop":
            assert int.from_bytes(got, "little") == int.from_bytes(sent, "little") & 0x7FF
        elif register.name == "ftag":
            pass  # 2 bits per register shown from 1: test_ftag
        else:
            assert got == sent, register.name


@pytest.mark.parametrize("size", [0, 1, G_SIZE - 1, G_SIZE + 1, 2 * G_SIZE])
def test_write_all_of_the_wrong_size(size: int) -> None:
    rf = make_file()
    before = rf.read_all()
    with pytest.raises(ValueError):
        rf.write_all(b"\x11" * size)
    assert rf.read_all() == before and rf.changed == set()


# ------------------------------------------------------------ one register
def test_gpr_by_number() -> None:
    rf = make_file()
    number = NUMBERS["r12"]
    rf.write(number, (0x0102030405060708).to_bytes(8, "little"))
    assert rf.regs.r12 == 0x0102030405060708
    assert rf.read(number) == bytes.fromhex("0807060504030201")
    assert rf.changed == {"regs"}


def test_rip() -> None:
    rf = make_file()
    rf.write(RIP, (0x102345).to_bytes(8, "little"))
    assert rf.regs.rip == 0x102345 and rf.pc == 0x102345
    assert rf.read(RIP) == (0x102345).to_bytes(8, "little")


@pytest.mark.parametrize("size", [0, 4, 7, 9, 16])
def test_wrong_size_for_one_register(size: int) -> None:
    rf = make_file()
    with pytest.raises(ValueError):
        rf.write(NUMBERS["rax"], b"\x01" * size)
    assert rf.changed == set()


@pytest.mark.parametrize("number", [len(REGISTERS), len(REGISTERS) + 100, -1, -len(REGISTERS)])
def test_register_number_out_of_range(number: int) -> None:
    # A 'p'/'P' with a number past the file (or "-1", which int(..., 16) reads)
    # names no register: never the last one by Python's negative indexing.
    rf = make_file()
    before = rf.read_all()
    with pytest.raises(IndexError):
        rf.read(number)
    with pytest.raises(IndexError):
        rf.write(number, b"\0" * 8)
    assert rf.read_all() == before


def test_eflags_only_user_flags_are_writable() -> None:
    rf = make_file()
    rf.regs.rflags = 0x202 | (1 << 21)  # IF, bit 1, ID
    # Ask for CF ZF SF OF DF AC, and TF, IF cleared, IOPL 3, NT, RF, VM.
    asked = (
        0x1 | 0x40 | 0x80 | 0x800 | 0x400 | 0x40000 | TF | (3 << 12) | 0x4000 | 0x10000 | 0x20000
    )
    rf.write(EFLAGS, asked.to_bytes(4, "little"))
    flags = int(rf.regs.rflags)
    assert flags & 0x1 and flags & 0x40 and flags & 0x80 and flags & 0x800 and flags & 0x400
    assert flags & 0x40000  # AC
    assert not flags & TF  # the debugger's flag: not through eflags
    assert flags & IF  # stays as the host set it
    assert flags & (3 << 12) == 0 and not flags & 0x4000 and not flags & 0x30000
    assert flags & (1 << 21) and flags & 0x2  # ID and the fixed bit untouched
    assert rf.read(EFLAGS) == (flags & 0xFFFF_FFFF).to_bytes(4, "little")
    # Setting TF, clearing IF: both ignored.
    rf.write(EFLAGS, TF.to_bytes(4, "little"))
    assert int(rf.regs.rflags) & (TF | IF) == IF
    assert int(rf.regs.rflags) & 0x0004_0CD5 == 0  # the user flags were cleared


def test_segment_selectors_are_read_only() -> None:
    rf = make_file()
    cs = NUMBERS["cs"]
    before = rf.read(cs)
    rf.write(cs, (0x8).to_bytes(4, "little"))
    assert rf.read(cs) == before and rf.sregs.cs.selector == 0x13
    assert "sregs" not in rf.changed


def test_fs_base() -> None:
    rf = make_file()
    number = NUMBERS["fs_base"]
    rf.write(number, (0x7000_1000).to_bytes(8, "little"))
    assert rf.sregs.fs.base == 0x7000_1000
    assert rf.sregs.gs.base == 0xFEDC_BA98_7654
    assert rf.changed == {"sregs"}
    assert rf.read(NUMBERS["gs_base"]) == (0xFEDC_BA98_7654).to_bytes(8, "little")


def test_st_register() -> None:
    rf = make_file()
    number = NUMBERS["st3"]
    value = bytes(range(1, 11))  # 80 bits
    padding = bytes(rf.xsave[32 + 48 + 10 : 32 + 64])
    rf.write(number, value)
    assert bytes(rf.xsave[32 + 48 : 32 + 58]) == value
    assert bytes(rf.xsave[32 + 58 : 32 + 64]) == padding  # FXSAVE's 6 bytes after it kept
    assert rf.read(number) == value
    assert rf.changed == {"xsave"}


def test_xmm() -> None:
    rf = make_file()
    number = NUMBERS["xmm7"]
    value = bytes(range(0xA0, 0xB0))
    rf.write(number, value)
    assert bytes(rf.xsave[160 + 7 * 16 : 160 + 8 * 16]) == value
    assert rf.read(number) == value
    assert rf.read(NUMBERS["xmm8"]) == bytes(rf.xsave[160 + 8 * 16 : 160 + 9 * 16])


def test_mxcsr() -> None:
    rf = make_file()
    rf.write(NUMBERS["mxcsr"], (0x1F80).to_bytes(4, "little"))
    assert bytes(rf.xsave[24:28]) == (0x1F80).to_bytes(4, "little")
    assert rf.read(NUMBERS["mxcsr"]) == (0x1F80).to_bytes(4, "little")


def test_x87_control_words() -> None:
    rf = make_file()
    rf.write(NUMBERS["fctrl"], (0x1_037F).to_bytes(4, "little"))
    assert bytes(rf.xsave[0:2]) == (0x037F).to_bytes(2, "little")
    assert rf.read(NUMBERS["fctrl"]) == (0x037F).to_bytes(4, "little")
    rf.write(NUMBERS["fop"], (0xFFFF).to_bytes(4, "little"))
    assert rf.read(NUMBERS["fop"]) == (0x7FF).to_bytes(4, "little")
    rf.write(NUMBERS["fioff"], (0xDEADBEEF).to_bytes(4, "little"))
    assert bytes(rf.xsave[8:12]) == (0xDEADBEEF).to_bytes(4, "little")


@pytest.mark.parametrize(
    ("abridged", "full"),
    [
        (0x00, 0xFFFF),  # all empty
        (0xFF, 0x0000),  # all valid
        (0x01, 0xFFFC),  # st(0) physical register 0 valid
        (0x80, 0x3FFF),
        (0xA5, 0x33CC),  # 0, 2, 5, 7 valid; 1, 3, 4, 6 empty
    ],
)
def test_ftag_conversion(abridged: int, full: int) -> None:
    rf = make_file()
    rf.xsave[4] = abridged
    assert rf.read(NUMBERS["ftag"]) == full.to_bytes(4, "little")
    # Written back: valid (0), zero (1) and special (2) are all "not empty".
    rf.xsave[4] = 0x5A
    rf.write(NUMBERS["ftag"], full.to_bytes(4, "little"))
    assert rf.xsave[4] == abridged
    assert rf.changed == {"xsave"}


def test_ftag_zero_and_special_tags_are_not_empty() -> None:
    rf = make_file()
    rf.write(NUMBERS["ftag"], (0b11_10_01_00 | 0xFF00).to_bytes(4, "little"))
    assert rf.xsave[4] == 0b0111


# -------------------------------------------------------- target description
def test_target_xml_parses_and_matches_the_registers() -> None:
    root = ET.fromstring(TARGET_XML.split("\n", 2)[2])  # past the XML and DOCTYPE lines
    assert root.tag == "target"
    assert root.findtext("architecture") == "i386:x86-64"
    features = [f.get("name") for f in root.findall("feature")]
    assert features == [
        "org.gnu.gdb.i386.core",
        "org.gnu.gdb.i386.sse",
        "org.gnu.gdb.i386.segments",
    ]
    regs = root.findall("feature/reg")
    assert [r.get("name") for r in regs] == [r.name for r in REGISTERS] == ORDER
    assert [int(r.get("regnum", "-1")) for r in regs] == list(range(len(REGISTERS)))
    assert [int(r.get("bitsize", "0")) for r in regs] == [r.bits for r in REGISTERS]
    # Every type is gdb's own or defined in the description.
    defined = {e.get("id") for e in root.iter() if e.tag in ("flags", "vector", "union")}
    builtin = {"int", "int32", "int64", "code_ptr", "data_ptr", "i387_ext", "uint128"}
    for r in regs:
        assert r.get("type") in defined | builtin, r.get("name")


def test_target_xml_is_well_formed_with_its_prolog() -> None:
    ET.fromstring(TARGET_XML.replace('<!DOCTYPE target SYSTEM "gdb-target.dtd">', ""))
    assert TARGET_XML.startswith('<?xml version="1.0"?>\n<!DOCTYPE target SYSTEM "gdb-target.dtd">')


def test_gdb_accepts_the_target_description(tmp_path: Path) -> None:
    gdb = require_tool("gdb")
    xml_file = tmp_path / "target.xml"
    xml_file.write_text(TARGET_XML)
    result = subprocess.run(
        [
            gdb,
            "-nx",
            "-batch",
            "-ex",
            f"set tdesc filename {xml_file}",
            "-ex",
            "maint print registers",
            "-ex",
            "maint print remote-registers",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr.lower() and "error" not in result.stderr.lower(), (
        result.stderr
    )
    out = result.stdout
    # First table (maint print registers): the named registers, in our order.
    first, _, second = out.partition(" Name ")[2].partition(" Name ")
    names = [m.group(1) for m in re.finditer(r"^ (\w+)\s+\d+\s+\d+\s+\d+\s+\d+ ", first, re.M)]
    assert names[: len(ORDER)] == ORDER
    # Second table: remote number and g/G offset of each, as the stub numbers and lays them out.
    rows = {}
    for line in second.splitlines():
        fields = line.split()
        if len(fields) == 8 and fields[0] in NUMBERS:
            rows[fields[0]] = (int(fields[6]), int(fields[7]))
    assert set(rows) == set(ORDER)
    for name in ORDER:
        assert rows[name] == (NUMBERS[name], offset_of(name)), name
    # The sizes gdb gives agree with G_SIZE.
    last = REGISTERS[-1]
    assert offset_of(last.name) + last.bits // 8 == G_SIZE
