"""Stack unwinding for dumps: DWARF call-frame information (the guest's
``.eh_frame``, else ``.debug_frame``: :attr:`GuestImage.call_frames`),
falling back to the frame-pointer chain where a function has none (guests
keep frame pointers).

The section comes from a guest ELF that a dump names, which anyone who can
write to a dump directory chooses, so it is read here with :mod:`struct` and
bounded work. One pass over the headers of at most
:data:`MAX_CALL_FRAME_ENTRIES` entries indexes the FDEs by address (each CIE
read once); a lookup then runs the instructions of one FDE and its CIE, at
most :data:`MAX_CFI_INSTRUCTIONS`, keeping only the three rules the
unwinder uses (CFA, return address, rbp). An entry that is malformed,
unsupported or over a cap gives no row, and the frame-pointer chain takes
over.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import GuestImageError
from ..guest.image import CallFrames, GuestImage

__all__ = ["MAX_CALL_FRAME_ENTRIES", "MAX_CFI_INSTRUCTIONS", "CallFrameTable", "Row", "unwind"]

RBP, RSP, RA = 6, 7, 16  # DWARF register numbers on x86-64
_U8, _U16, _U32, _U64 = (struct.Struct(f"<{c}") for c in "BHIQ")

#: CIEs and FDEs indexed; later ones are left out (jsruntime.elf has 1,466:
#: one FDE per function). Indexing reads a few bytes of each, and of each CIE.
MAX_CALL_FRAME_ENTRIES = 1 << 14
#: Instructions one lookup runs, CIE and FDE together (jsruntime.elf's
#: longest FDE has 127); a longer program gives no row.
MAX_CFI_INSTRUCTIONS = 2048
#: Bytes of a CIE augmentation string ("zR" from GCC and clang, "zPLR" with
#: exception handlers); a longer one makes the CIE unusable.
_MAX_AUGMENTATION = 8
#: Bytes of a LEB128 number (ten hold 64 bits).
_MAX_LEB128 = 10
_MASK64 = (1 << 64) - 1

# DW_EH_PE_* pointer encodings (.eh_frame): the value's format in the low
# four bits, what it is relative to (and whether it is indirect) in the high four.
_DW_EH_PE_pcrel = 0x10
_FIXED = {
    0x0: _U64, 0x2: _U16, 0x3: _U32, 0x4: _U64,
    0xA: struct.Struct("<h"), 0xB: struct.Struct("<i"), 0xC: struct.Struct("<q"),
}  # fmt: skip
#: DW_CFA_advance_loc1, 2 and 4: the size of their operand.
_ADVANCES = {0x02: _U8, 0x03: _U16, 0x04: _U32}
_ULEB128, _SLEB128 = 0x1, 0x9


class _Unusable(Exception):
    """An entry the unwinder cannot use: malformed, unsupported or over a cap."""


@dataclass(frozen=True, slots=True)
class Row:
    """The rules at one pc that the unwinder uses."""

    #: (DWARF register, offset): CFA = register + offset; None for a DWARF
    #: expression or no rule.
    cfa: tuple[int, int] | None
    #: The return address is saved at CFA + this (None: any other rule).
    return_address: int | None
    #: rbp is saved at CFA + this (None: any other rule).
    rbp: int | None


@dataclass(frozen=True, slots=True)
class _Cie:
    code_align: int
    data_align: int
    encoding: int  # how FDEs encode their addresses (DW_EH_PE_*)
    augmented: bool  # "z": FDEs carry augmentation data after their addresses
    instructions: int  # section offsets of the initial instructions...
    end: int  # ...and of the entry's end


@dataclass(frozen=True, slots=True)
class _Fde:
    start: int
    end: int
    cie: _Cie
    instructions: int
    entry_end: int


class _Reader:
    """Reads the fields of one entry: never past ``end``."""

    def __init__(self, frames: CallFrames, pos: int, end: int) -> None:
        self.frames = frames
        self.data = frames.data
        self.pos = pos
        self.end = end

    def fixed(self, layout: struct.Struct) -> int:
        end = self.pos + layout.size
        if end > self.end:
            raise _Unusable
        (value,) = layout.unpack_from(self.data, self.pos)
        self.pos = end
        return int(value)

    def u8(self) -> int:
        if self.pos >= self.end:
            raise _Unusable
        self.pos += 1
        return self.data[self.pos - 1]

    def uleb(self) -> int:
        data, value, shift = self.data, 0, 0
        for at in range(self.pos, min(self.pos + _MAX_LEB128, self.end)):
            byte = data[at]
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                self.pos = at + 1
                return value
            shift += 7
        raise _Unusable

    def sleb(self) -> int:
        start = self.pos
        value = self.uleb()
        bits = 7 * (self.pos - start)
        return value - (1 << bits) if value >> (bits - 1) & 1 else value

    def skip_block(self) -> None:
        """A DW_FORM_block: its length, then that many bytes."""
        length = self.uleb()
        if self.pos + length > self.end:
            raise _Unusable
        self.pos += length

    def value(self, encoding: int) -> int:
        """A number in the format of a DW_EH_PE_* encoding (its low four bits)."""
        kind = encoding & 0x0F
        if kind == _ULEB128:
            return self.uleb()
        if kind == _SLEB128:
            return self.sleb()
        if kind not in _FIXED:
            raise _Unusable
        return self.fixed(_FIXED[kind])

    def pointer(self, encoding: int) -> int:
        """An address: absolute, or relative to where it is stored."""
        at = self.frames.address + self.pos
        if encoding & 0xF0 not in (0, _DW_EH_PE_pcrel):
            raise _Unusable  # omit, datarel, textrel, funcrel, aligned, indirect: unused here
        value = self.value(encoding)
        return (value + at if encoding & _DW_EH_PE_pcrel else value) & _MASK64


class CallFrameTable:
    """The unwind rows of one guest, looked up by pc."""

    def __init__(self, guest: GuestImage | str | os.PathLike[str]) -> None:
        """``guest``: the image, or the path of its ELF (loaded, and cached, with
        :meth:`GuestImage.load`; one that does not load has no rows)."""
        image: GuestImage | None = None
        if isinstance(guest, GuestImage):
            image = guest
        else:
            with contextlib.suppress(GuestImageError):
                image = GuestImage.load(guest)
        self._frames = image.call_frames if image is not None else None
        self._cies: dict[int, _Cie | None] = {}
        self._fdes: list[_Fde] = self._index() if self._frames is not None else []
        self._fdes.sort(key=lambda fde: fde.start)
        self._starts = [fde.start for fde in self._fdes]

    def row(self, pc: int) -> Row | None:
        """The rules at ``pc``: None where no FDE covers it or its FDE is unusable."""
        i = bisect.bisect_right(self._starts, pc) - 1
        if i < 0 or not self._fdes[i].start <= pc < self._fdes[i].end:
            return None
        try:
            return self._run(self._fdes[i], pc)
        except _Unusable:
            return None

    # ---------------------------------------------------------------- index
    def _entry(self, at: int) -> tuple[int, int, int, int] | None:
        """(id, offset of the id, offset after it, end) of the entry at ``at``,
        or None where none fits in the section. The id is -1 for a CIE."""
        assert self._frames is not None
        data = self._frames.data
        if not 0 <= at <= len(data) - 4:
            return None
        (length,) = _U32.unpack_from(data, at)
        at += 4
        # The id (CIE pointer) has 4 bytes, 8 in 64-bit .debug_frame entries.
        layout = _U32
        if length == 0xFFFF_FFFF:
            if at + 8 > len(data):
                return None
            (length,) = _U64.unpack_from(data, at)
            at += 8
            layout = _U32 if self._frames.eh else _U64
        end = at + length
        if end > len(data) or length < layout.size:
            return None
        (ident,) = layout.unpack_from(data, at)
        is_cie = ident == 0 if self._frames.eh else ident in (0xFFFF_FFFF, _MASK64)
        return (-1 if is_cie else ident), at, at + layout.size, end

    def _index(self) -> list[_Fde]:
        """One pass over the entry headers: each FDE with its CIE and range."""
        assert self._frames is not None
        fdes = []
        offset = 0
        for _ in range(MAX_CALL_FRAME_ENTRIES):
            if offset + 4 > len(self._frames.data):
                break
            if self._frames.eh and self._frames.data[offset : offset + 4] == bytes(4):
                offset += 4  # a terminator; .eh_frame sections may go on after one
                continue
            entry = self._entry(offset)
            if entry is None:
                break
            ident, pointer, body, end = entry
            if ident >= 0:
                # .eh_frame: the distance back from the pointer to its CIE;
                # .debug_frame: the CIE's offset.
                cie = self._cie(pointer - ident if self._frames.eh else ident)
                if cie is not None:
                    with contextlib.suppress(_Unusable):
                        fdes.append(self._fde(cie, body, end))
            offset = end
        return fdes

    def _fde(self, cie: _Cie, body: int, end: int) -> _Fde:
        assert self._frames is not None
        reader = _Reader(self._frames, body, end)
        if self._frames.eh:
            start = reader.pointer(cie.encoding)
            length = reader.value(cie.encoding)
            if cie.augmented:
                reader.skip_block()
        else:
            start, length = reader.fixed(_U64), reader.fixed(_U64)
        return _Fde(start, start + length, cie, reader.pos, end)

    def _cie(self, at: int) -> _Cie | None:
        """The CIE at ``at`` (read once), or None if there is none to use."""
        if at not in self._cies:
            try:
                self._cies[at] = self._read_cie(at)
            except _Unusable:
                self._cies[at] = None
        return self._cies[at]

    def _read_cie(self, at: int) -> _Cie:
        assert self._frames is not None
        entry = self._entry(at)
        if entry is None or entry[0] >= 0:
            raise _Unusable
        _, _, body, end = entry
        reader = _Reader(self._frames, body, end)
        version = reader.u8()
        if version not in (1, 3, 4):
            raise _Unusable
        nul = self._frames.data.find(b"\0", reader.pos, min(reader.pos + _MAX_AUGMENTATION, end))
        if nul < 0:
            raise _Unusable
        augmentation = self._frames.data[reader.pos : nul]
        reader.pos = nul + 1
        if version == 4:
            reader.u8(), reader.u8()  # address size, segment selector size
        code_align, data_align = reader.uleb(), reader.sleb()
        if version == 1:
            reader.u8()  # return address register: the unwinder uses RA
        else:
            reader.uleb()
        encoding = 0  # DW_EH_PE_absptr
        if augmentation.startswith(b"z"):
            length = reader.uleb()
            data_end = reader.pos + length
            if data_end > end:
                raise _Unusable
            for letter in augmentation[1:]:
                if letter == ord("R"):
                    encoding = reader.u8()
                elif letter == ord("L"):
                    reader.u8()
                elif letter == ord("P"):  # the personality routine, often indirect
                    reader.value(reader.u8())
                elif letter != ord("S"):
                    break  # the length lets the rest be skipped
            reader.pos = data_end
        elif augmentation:
            raise _Unusable  # where its instructions begin is unknown
        return _Cie(code_align, data_align, encoding, augmentation[:1] == b"z", reader.pos, end)

    # ---------------------------------------------------------------- rows
    def _run(self, fde: _Fde, pc: int) -> Row:
        """The CIE's initial instructions, then the FDE's up to ``pc``."""
        assert self._frames is not None
        machine = _Machine(fde.cie, MAX_CFI_INSTRUCTIONS)
        machine.run(_Reader(self._frames, fde.cie.instructions, fde.cie.end), None)
        machine.initial = dict(machine.rules)
        machine.saved.clear()
        machine.location = fde.start
        machine.run(_Reader(self._frames, fde.instructions, fde.entry_end), pc)
        return Row(machine.cfa, machine.rules.get(RA), machine.rules.get(RBP))


class _Machine:
    """The DWARF call-frame instructions (DWARF 5, 6.4.2) for the CFA and the
    rules of the registers the unwinder uses (RA and RBP); the others' rules
    are read and forgotten. ``rules`` maps a register to its CFA offset, or
    to None for any rule that is not an offset."""

    def __init__(self, cie: _Cie, budget: int) -> None:
        self.cie = cie
        self.budget = budget
        self.cfa: tuple[int, int] | None = None
        self.rules: dict[int, int | None] = {}
        self.initial: dict[int, int | None] | None = None  # after the CIE: what restore restores
        self.location = 0
        self.saved: list[tuple[tuple[int, int] | None, dict[int, int | None]]] = []

    def run(self, reader: _Reader, pc: int | None) -> None:
        """Instructions until the end, or until the location passes ``pc``."""
        cie = self.cie
        while reader.pos < reader.end:
            self.budget -= 1
            if self.budget < 0:
                raise _Unusable
            opcode = reader.u8()
            high, low = opcode & 0xC0, opcode & 0x3F
            advance: int | None = None
            if high == 0x40:  # DW_CFA_advance_loc
                advance = low * cie.code_align
            elif high == 0x80:  # DW_CFA_offset
                self._set(low, reader.uleb() * cie.data_align)
            elif high == 0xC0:  # DW_CFA_restore
                self._restore(low)
            elif opcode == 0x00:  # DW_CFA_nop
                pass
            elif opcode == 0x01:  # DW_CFA_set_loc
                target = reader.pointer(cie.encoding) if reader.frames.eh else reader.fixed(_U64)
                advance = target - self.location
            elif opcode in (0x02, 0x03, 0x04):  # DW_CFA_advance_loc1, 2, 4
                advance = reader.fixed(_ADVANCES[opcode]) * cie.code_align
            elif opcode in (0x05, 0x11, 0x2F):  # offset_extended, _sf, GNU_negative_
                register = reader.uleb()
                offset = reader.sleb() if opcode == 0x11 else reader.uleb()
                self._set(register, (-offset if opcode == 0x2F else offset) * cie.data_align)
            elif opcode == 0x06:  # DW_CFA_restore_extended
                self._restore(reader.uleb())
            elif opcode in (0x07, 0x08):  # DW_CFA_undefined, same_value
                self._set(reader.uleb(), None)
            elif opcode in (0x09, 0x14):  # DW_CFA_register, val_offset
                self._set(reader.uleb(), None)
                reader.uleb()
            elif opcode == 0x15:  # DW_CFA_val_offset_sf
                self._set(reader.uleb(), None)
                reader.sleb()
            elif opcode in (0x10, 0x16):  # DW_CFA_expression, val_expression
                self._set(reader.uleb(), None)
                reader.skip_block()
            elif opcode == 0x0A:  # DW_CFA_remember_state
                self.saved.append((self.cfa, dict(self.rules)))
            elif opcode == 0x0B:  # DW_CFA_restore_state
                if not self.saved:
                    raise _Unusable
                self.cfa, self.rules = self.saved.pop()
            elif opcode == 0x0C:  # DW_CFA_def_cfa
                self.cfa = (reader.uleb(), reader.uleb())
            elif opcode == 0x12:  # DW_CFA_def_cfa_sf
                self.cfa = (reader.uleb(), reader.sleb() * cie.data_align)
            elif opcode == 0x0D:  # DW_CFA_def_cfa_register
                self.cfa = (reader.uleb(), self._cfa_offset())
            elif opcode == 0x0E:  # DW_CFA_def_cfa_offset
                self.cfa = (self._cfa_register(), reader.uleb())
            elif opcode == 0x13:  # DW_CFA_def_cfa_offset_sf
                self.cfa = (self._cfa_register(), reader.sleb() * cie.data_align)
            elif opcode == 0x0F:  # DW_CFA_def_cfa_expression
                self.cfa = None
                reader.skip_block()
            elif opcode == 0x2E:  # DW_CFA_GNU_args_size
                reader.uleb()
            elif opcode == 0x2D:  # DW_CFA_GNU_window_save (SPARC), AArch64's negate_ra_state
                pass
            else:
                raise _Unusable
            if advance is not None:
                if pc is not None and self.location + advance > pc:
                    return
                self.location += advance

    def _set(self, register: int, rule: int | None) -> None:
        if register in (RA, RBP):
            self.rules[register] = rule

    def _restore(self, register: int) -> None:
        if self.initial is None:
            raise _Unusable  # DW_CFA_restore in a CIE: nothing to restore
        if register in self.initial:
            self.rules[register] = self.initial[register]
        else:
            self.rules.pop(register, None)

    def _cfa_register(self) -> int:
        if self.cfa is None:
            raise _Unusable  # a new offset for a CFA that is not register + offset
        return self.cfa[0]

    def _cfa_offset(self) -> int:
        if self.cfa is None:
            raise _Unusable
        return self.cfa[1]


def unwind(
    read: Callable[[int, int], bytes],
    rip: int,
    rsp: int,
    rbp: int,
    table: CallFrameTable | None,
    max_frames: int,
) -> list[int]:
    """Program counters of the call stack, innermost first."""
    pcs = [rip]
    pc = rip
    while len(pcs) < max_frames:
        # Caller frames hold return addresses: look up the call, one byte before.
        row = table.row(pc if len(pcs) == 1 else pc - 1) if table is not None else None
        try:
            if row is not None and row.cfa is not None and row.cfa[0] in (RSP, RBP):
                register, offset = row.cfa
                cfa = (rsp if register == RSP else rbp) + offset
                if row.return_address is None:
                    break
                ret = _U64.unpack(read(cfa + row.return_address, 8))[0]
                if row.rbp is not None:
                    rbp = _U64.unpack(read(cfa + row.rbp, 8))[0]
                new_rsp = cfa
            else:
                if rbp == 0 or rbp % 8:
                    break
                rbp_next, ret = struct.unpack("<QQ", read(rbp, 16))
                new_rsp = rbp + 16
                rbp = rbp_next
        except ValueError:  # the stack ran out of dumped memory
            break
        if ret == 0 or new_rsp <= rsp:
            break
        pcs.append(ret)
        pc, rsp = ret, new_rsp
    return pcs
