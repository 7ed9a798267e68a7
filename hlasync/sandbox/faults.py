"""CPU exceptions taken by guest code: names, and recovering the faulting
context from the interrupt frame the CPL0 stub left on the exception stack."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import TypeVar

from .. import abi
from ..errors import GuestCrashed, GuestError, GuestProtocolError
from ..guest import layout as lay
from ..guest.image import GuestImage
from ..guest.memory import GuestMemory
from ..kvm import Vcpu, kvm_regs, kvm_sregs

__all__ = ["VECTOR_NAMES", "ExceptionInfo", "decode_exception"]

VECTOR_NAMES: dict[int, tuple[str, str]] = {
    0: ("#DE", "divide error"),
    1: ("#DB", "debug exception"),
    2: ("NMI", "non-maskable interrupt"),
    3: ("#BP", "breakpoint"),
    4: ("#OF", "overflow"),
    5: ("#BR", "bound range exceeded"),
    6: ("#UD", "invalid opcode"),
    7: ("#NM", "device not available"),
    8: ("#DF", "double fault"),
    9: ("#MF9", "coprocessor segment overrun"),
    10: ("#TS", "invalid TSS"),
    11: ("#NP", "segment not present"),
    12: ("#SS", "stack-segment fault"),
    13: ("#GP", "general protection fault"),
    14: ("#PF", "page fault"),
    16: ("#MF", "x87 floating-point exception"),
    17: ("#AC", "alignment check"),
    18: ("#MC", "machine check"),
    19: ("#XM", "SIMD floating-point exception"),
    20: ("#VE", "virtualization exception"),
    21: ("#CP", "control protection exception"),
    28: ("#HV", "hypervisor injection exception"),
    29: ("#VC", "VMM communication exception"),
    30: ("#SX", "security exception"),
}

_S = TypeVar("_S", bound=ctypes.Structure)


def copy_struct(struct: _S) -> _S:
    clone = type(struct)()
    ctypes.pointer(clone)[0] = struct
    return clone


@dataclass(frozen=True, slots=True)
class ExceptionInfo:
    """A CPU exception taken by guest code, recovered from the interrupt frame."""

    vector: int
    error_code: int | None
    cr2: int | None
    regs: kvm_regs  # the faulting context (rip, rsp, rflags from the frame)
    sregs: kvm_sregs


def decode_exception(
    vcpu: Vcpu,
    memory: GuestMemory,
    image: GuestImage,
    *,
    sandbox_id: str,
    function: str | None,
    vector: int,
) -> tuple[GuestError, ExceptionInfo | None]:
    """The error for an exception report on port ``0xE0 + vector``, and the
    faulting context (None when the report is not genuine)."""

    def protocol_error(message: str) -> tuple[GuestError, None]:
        return GuestProtocolError(message, sandbox_id=sandbox_id, function=function), None

    regs = vcpu.get_regs()
    sregs = vcpu.get_sregs()
    if sregs.cs.selector & 3:
        port = vector + abi.PORT_EXCEPTION_BASE
        return protocol_error(f"guest wrote to exception port {port:#x} from user mode")
    has_error = vector in lay.ERROR_CODE_VECTORS
    words = 6 if has_error else 5
    frame_at = regs.rsp
    if not lay.KERNEL_STACK_BASE <= frame_at <= lay.KERNEL_STACK_TOP - 8 * words:
        return protocol_error(f"exception frame at {frame_at:#x} is outside the exception stack")
    frame = [int.from_bytes(memory.read(frame_at + 8 * i, 8), "little") for i in range(words)]
    error_code = frame.pop(0) if has_error else None
    rip, _cs, rflags, rsp, _ss = frame
    faulting = copy_struct(regs)
    faulting.rip, faulting.rsp, faulting.rflags = rip, rsp, rflags
    cr2 = sregs.cr2 if vector == 14 else None
    name, description = VECTOR_NAMES.get(vector, (f"#{vector}", "exception"))
    if vector == 14 and rip == 0 and _is_syscall_at(memory, regs.rcx - 2):
        # PVM runs `syscall` even without EFER.SCE and enters LSTAR (0): report the
        # instruction that did it (its address is in rcx) rather than address 0.
        rip = faulting.rip = regs.rcx - 2
        description = "after a syscall instruction (guests have no system calls)"
    info = ExceptionInfo(vector, error_code, cr2, faulting, sregs)
    error = GuestCrashed(
        sandbox_id=sandbox_id,
        function=function,
        vector=vector,
        vector_name=name,
        description=description,
        error_code=error_code,
        rip=rip,
        cr2=cr2,
        symbol=image.symbolize(rip),
    )
    return error, info


def _is_syscall_at(memory: GuestMemory, address: int) -> bool:
    try:
        return memory.read(address, 2) == b"\x0f\x05"
    except ValueError:
        return False
