"""Stack unwinding for dumps: DWARF call-frame information (``.eh_frame`` or
``.debug_frame`` of the guest ELF, read with pyelftools), falling back to the
frame-pointer chain where a function has no CFI (guests keep frame pointers)."""

from __future__ import annotations

import bisect
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from elftools.common.exceptions import DWARFError, ELFError
from elftools.dwarf.callframe import FDE
from elftools.elf.elffile import ELFFile

from ..guest.image import open_regular_file

__all__ = ["CallFrameTable", "unwind"]

RBP, RSP, RA = 6, 7, 16  # DWARF register numbers on x86-64
_U64 = struct.Struct("<Q")


class CallFrameTable:
    """The unwind rows of one ELF, looked up by pc."""

    def __init__(self, path: Path) -> None:
        self._ranges: list[tuple[int, int, Any]] = []
        self._decoded: dict[int, list[dict[Any, Any]]] = {}
        try:
            with open_regular_file(path) as f:  # a FIFO swapped in since cannot block
                dwarf = ELFFile(f).get_dwarf_info()
                if dwarf.has_EH_CFI():
                    entries = dwarf.EH_CFI_entries()
                elif dwarf.has_CFI():
                    entries = dwarf.CFI_entries()
                else:
                    entries = []
                for entry in entries:
                    if isinstance(entry, FDE):
                        start = entry.header["initial_location"]
                        rows = entry.get_decoded().table
                        self._ranges.append((start, start + entry.header["address_range"], rows))
        except (OSError, ELFError, DWARFError, ValueError, KeyError, AssertionError):
            self._ranges = []
        self._ranges.sort(key=lambda r: r[0])
        self._starts = [r[0] for r in self._ranges]

    def row(self, pc: int) -> dict[Any, Any] | None:
        i = bisect.bisect_right(self._starts, pc) - 1
        if i < 0 or not self._ranges[i][0] <= pc < self._ranges[i][1]:
            return None
        chosen = None
        for row in self._ranges[i][2]:
            if row["pc"] > pc:
                break
            chosen = row
        return chosen


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
            if row is not None and row["cfa"].expr is None and row["cfa"].reg in (RSP, RBP):
                cfa = (rsp if row["cfa"].reg == RSP else rbp) + row["cfa"].offset
                ra_rule = row.get(RA)
                if ra_rule is None or ra_rule.type != "OFFSET":
                    break
                ret = _U64.unpack(read(cfa + ra_rule.arg, 8))[0]
                rbp_rule = row.get(RBP)
                if rbp_rule is not None and rbp_rule.type == "OFFSET":
                    rbp = _U64.unpack(read(cfa + rbp_rule.arg, 8))[0]
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
