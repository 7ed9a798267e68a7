"""The register file a debugger sees, and the target description that names it.

The registers are those of gdb's x86-64 features (``org.gnu.gdb.i386.core``,
``.sse`` and ``.segments``), numbered as gdb numbers them, so the ``g``
packet, ``p``/``P`` and the ``qXfer:features:read:target.xml`` description
agree for gdb and lldb alike. Guests run without ``CR4.OSXSAVE``: x87 and SSE
state is all there is (no AVX), as in the core dumps.

A :class:`RegisterFile` holds copies of the vCPU state taken at a stop: the
general registers, the segment registers and bases, and the XSAVE area. The
debugger reads and writes those copies; :attr:`RegisterFile.changed` says
which parts to write back to the vCPU before the guest runs again.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from ..kvm import kvm_regs, kvm_sregs
from ..sandbox.faults import copy_struct

__all__ = ["REGISTERS", "TARGET_XML", "Register", "RegisterFile"]

_GPRS = (
    "rax",
    "rbx",
    "rcx",
    "rdx",
    "rsi",
    "rdi",
    "rbp",
    "rsp",
    "r8",
    "r9",
    "r10",
    "r11",
    "r12",
    "r13",
    "r14",
    "r15",
)
_SEGMENTS = ("cs", "ss", "ds", "es", "fs", "gs")
# The FXSAVE (legacy XSAVE) area: control word, status, abridged tag, opcode,
# instruction and operand pointers, MXCSR, then ST0-7 (16 bytes apart) and XMM0-15.
_FCW, _FSW, _FTW, _FOP, _FIP, _FDP, _MXCSR = 0, 2, 4, 6, 8, 16, 24
_ST, _XMM = 32, 160
#: The XSAVE header's XSTATE_BV: a component whose bit is clear is loaded in
#: its initial state, whatever the area holds. Bit 0: x87, bit 1: SSE.
_XSTATE_BV, _X87, _SSE = 512, 1, 2


def _in_use(rf: RegisterFile, component: int) -> None:
    """Mark an XSAVE component edited: loaded as written, not as initial state."""
    if len(rf.xsave) >= _XSTATE_BV + 8:
        (bits,) = struct.unpack_from("<Q", rf.xsave, _XSTATE_BV)
        struct.pack_into("<Q", rf.xsave, _XSTATE_BV, bits | component)
    rf.changed.add("xsave")


@dataclass
class RegisterFile:
    """The registers of a stopped guest, as copies (``regs``, ``sregs``,
    ``xsave``); ``changed`` names the parts the debugger wrote."""

    regs: kvm_regs
    sregs: kvm_sregs
    xsave: bytearray
    changed: set[str] = field(default_factory=set)

    @classmethod
    def of(cls, regs: kvm_regs, sregs: kvm_sregs, xsave: bytes) -> RegisterFile:
        return cls(copy_struct(regs), copy_struct(sregs), bytearray(xsave))

    def read(self, number: int) -> bytes:
        return _register(number).get(self)

    def write(self, number: int, value: bytes) -> None:
        register = _register(number)
        if len(value) != register.bits // 8:
            raise ValueError(f"register {register.name} takes {register.bits // 8} bytes")
        register.set(self, value)

    def read_all(self) -> bytes:
        return b"".join(register.get(self) for register in REGISTERS)

    def write_all(self, data: bytes) -> None:
        if len(data) != G_SIZE:
            raise ValueError(f"the register file is {G_SIZE} bytes, got {len(data)}")
        offset = 0
        for register in REGISTERS:
            size = register.bits // 8
            register.set(self, data[offset : offset + size])
            offset += size

    @property
    def pc(self) -> int:
        return int(self.regs.rip)


def _register(number: int) -> Register:
    """Register ``number`` (IndexError past the file, also for a negative
    number, which would otherwise name one from the end)."""
    if not 0 <= number < len(REGISTERS):
        raise IndexError(f"no register {number}")
    return REGISTERS[number]


@dataclass(frozen=True, slots=True)
class Register:
    name: str
    bits: int
    type: str
    group: str
    get: Callable[[RegisterFile], bytes]
    set: Callable[[RegisterFile, bytes], None]


def _gpr(name: str) -> Register:
    def get(rf: RegisterFile) -> bytes:
        return int(getattr(rf.regs, name)).to_bytes(8, "little")

    def set_(rf: RegisterFile, value: bytes) -> None:
        setattr(rf.regs, name, int.from_bytes(value, "little"))
        rf.changed.add("regs")

    kind = {"rip": "code_ptr", "rsp": "data_ptr", "rbp": "data_ptr"}.get(name, "int64")
    return Register(name, 64, kind, "general", get, set_)


def _eflags() -> Register:
    def get(rf: RegisterFile) -> bytes:
        return (int(rf.regs.rflags) & 0xFFFF_FFFF).to_bytes(4, "little")

    def set_(rf: RegisterFile, value: bytes) -> None:
        # Only the flags user code may change: TF (single-step) is the debugger's,
        # and IOPL, IF and the system flags stay as the host set them.
        user = 0x0000_0CD5 | 0x0004_0000  # CF PF AF ZF SF DF OF, AC
        new = int.from_bytes(value, "little")
        rf.regs.rflags = (int(rf.regs.rflags) & ~user) | (new & user)
        rf.changed.add("regs")

    return Register("eflags", 32, "i386_eflags", "general", get, set_)


def _segment(name: str) -> Register:
    def get(rf: RegisterFile) -> bytes:
        return int(getattr(rf.sregs, name).selector).to_bytes(4, "little")

    def set_(rf: RegisterFile, value: bytes) -> None:
        pass  # selectors are the host's (flat CPL3 segments); a write is ignored

    return Register(name, 32, "int32", "general", get, set_)


def _base(name: str, segment: str) -> Register:
    def get(rf: RegisterFile) -> bytes:
        return int(getattr(rf.sregs, segment).base).to_bytes(8, "little")

    def set_(rf: RegisterFile, value: bytes) -> None:
        getattr(rf.sregs, segment).base = int.from_bytes(value, "little")
        rf.changed.add("sregs")

    return Register(name, 64, "int", "system", get, set_)


def _area(
    name: str, offset: int, size: int, bits: int, kind: str, group: str, component: int = _X87
) -> Register:
    """A register stored as ``size`` bytes at ``offset`` of the XSAVE area
    (in ``component``), shown as ``bits`` bits (zero-extended)."""
    width = bits // 8

    def get(rf: RegisterFile) -> bytes:
        return bytes(rf.xsave[offset : offset + size]).ljust(width, b"\0")

    def set_(rf: RegisterFile, value: bytes) -> None:
        rf.xsave[offset : offset + size] = value[:size]
        _in_use(rf, component)

    return Register(name, bits, kind, group, get, set_)


def _ftag() -> Register:
    """The full x87 tag word, from FXSAVE's abridged one (1 bit per register:
    valid or empty; gdb only tells those apart when it shows the stack)."""

    def get(rf: RegisterFile) -> bytes:
        abridged = rf.xsave[_FTW]
        full = 0
        for i in range(8):
            full |= (0 if abridged >> i & 1 else 3) << (2 * i)
        return full.to_bytes(4, "little")

    def set_(rf: RegisterFile, value: bytes) -> None:
        full = int.from_bytes(value, "little")
        rf.xsave[_FTW] = sum(1 << i for i in range(8) if (full >> (2 * i)) & 3 != 3)
        _in_use(rf, _X87)

    return Register("ftag", 32, "int", "float", get, set_)


def _fop() -> Register:
    def get(rf: RegisterFile) -> bytes:
        opcode: int = struct.unpack_from("<H", rf.xsave, _FOP)[0]
        return (opcode & 0x7FF).to_bytes(4, "little")

    def set_(rf: RegisterFile, value: bytes) -> None:
        struct.pack_into("<H", rf.xsave, _FOP, int.from_bytes(value, "little") & 0x7FF)
        _in_use(rf, _X87)

    return Register("fop", 32, "int", "float", get, set_)


REGISTERS: tuple[Register, ...] = (
    *(_gpr(name) for name in _GPRS),
    _gpr("rip"),
    _eflags(),
    *(_segment(name) for name in _SEGMENTS),
    *(_area(f"st{i}", _ST + 16 * i, 10, 80, "i387_ext", "float") for i in range(8)),
    _area("fctrl", _FCW, 2, 32, "int", "float"),
    _area("fstat", _FSW, 2, 32, "int", "float"),
    _ftag(),
    _area("fiseg", _FIP + 4, 2, 32, "int", "float"),
    _area("fioff", _FIP, 4, 32, "int", "float"),
    _area("foseg", _FDP + 4, 2, 32, "int", "float"),
    _area("fooff", _FDP, 4, 32, "int", "float"),
    _fop(),
    *(_area(f"xmm{i}", _XMM + 16 * i, 16, 128, "vec128", "vector", _SSE) for i in range(16)),
    _area("mxcsr", _MXCSR, 4, 32, "i386_mxcsr", "vector", _SSE),
    _base("fs_base", "fs"),
    _base("gs_base", "gs"),
)
#: Bytes in a ``g`` reply.
G_SIZE = sum(register.bits // 8 for register in REGISTERS)
#: Register numbers by name.
NUMBERS = {register.name: number for number, register in enumerate(REGISTERS)}
RIP, EFLAGS = NUMBERS["rip"], NUMBERS["eflags"]

_FEATURES = {
    "org.gnu.gdb.i386.core": (0, NUMBERS["xmm0"]),
    "org.gnu.gdb.i386.sse": (NUMBERS["xmm0"], NUMBERS["fs_base"]),
    "org.gnu.gdb.i386.segments": (NUMBERS["fs_base"], len(REGISTERS)),
}
_CORE_TYPES = """\
    <flags id="i386_eflags" size="4">
      <field name="CF" start="0" end="0"/><field name="" start="1" end="1"/>
      <field name="PF" start="2" end="2"/><field name="AF" start="4" end="4"/>
      <field name="ZF" start="6" end="6"/><field name="SF" start="7" end="7"/>
      <field name="TF" start="8" end="8"/><field name="IF" start="9" end="9"/>
      <field name="DF" start="10" end="10"/><field name="OF" start="11" end="11"/>
      <field name="NT" start="14" end="14"/><field name="RF" start="16" end="16"/>
      <field name="VM" start="17" end="17"/><field name="AC" start="18" end="18"/>
      <field name="VIF" start="19" end="19"/><field name="VIP" start="20" end="20"/>
      <field name="ID" start="21" end="21"/>
    </flags>
"""
_SSE_TYPES = """\
    <vector id="v4f" type="ieee_single" count="4"/>
    <vector id="v2d" type="ieee_double" count="2"/>
    <vector id="v16i8" type="int8" count="16"/>
    <vector id="v8i16" type="int16" count="8"/>
    <vector id="v4i32" type="int32" count="4"/>
    <vector id="v2i64" type="int64" count="2"/>
    <union id="vec128">
      <field name="v4_float" type="v4f"/><field name="v2_double" type="v2d"/>
      <field name="v16_int8" type="v16i8"/><field name="v8_int16" type="v8i16"/>
      <field name="v4_int32" type="v4i32"/><field name="v2_int64" type="v2i64"/>
      <field name="uint128" type="uint128"/>
    </union>
    <flags id="i386_mxcsr" size="4">
      <field name="IE" start="0" end="0"/><field name="DE" start="1" end="1"/>
      <field name="ZE" start="2" end="2"/><field name="OE" start="3" end="3"/>
      <field name="UE" start="4" end="4"/><field name="PE" start="5" end="5"/>
      <field name="DAZ" start="6" end="6"/><field name="IM" start="7" end="7"/>
      <field name="DM" start="8" end="8"/><field name="ZM" start="9" end="9"/>
      <field name="OM" start="10" end="10"/><field name="UM" start="11" end="11"/>
      <field name="PM" start="12" end="12"/><field name="FZ" start="15" end="15"/>
    </flags>
"""


def _target_xml() -> str:
    lines = [
        '<?xml version="1.0"?>',
        '<!DOCTYPE target SYSTEM "gdb-target.dtd">',
        '<target version="1.0">',
        "  <architecture>i386:x86-64</architecture>",
    ]
    for feature, (first, end) in _FEATURES.items():
        lines.append(f'  <feature name="{feature}">')
        if feature.endswith(".core"):
            lines.append(_CORE_TYPES.rstrip("\n"))
        elif feature.endswith(".sse"):
            lines.append(_SSE_TYPES.rstrip("\n"))
        for number in range(first, end):
            r = REGISTERS[number]
            lines.append(
                f'    <reg name="{r.name}" bitsize="{r.bits}" type="{r.type}" '
                f'regnum="{number}" group="{r.group}"/>'
            )
        lines.append("  </feature>")
    lines.append("</target>")
    return "\n".join(lines) + "\n"


#: The target description (``qXfer:features:read:target.xml``).
TARGET_XML = _target_xml()
