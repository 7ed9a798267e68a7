"""What this host's KVM offers a debugger, measured on a bare vCPU (no
hlasync sandbox), at CPL3 as hlasync's guests run and at CPL0 for
comparison, as a markdown table:

    python -m tests.kvm.guest_debug_probe

Each row runs a few instructions under one mechanism and reports the exit
KVM gave: ``KVM_EXIT_DEBUG`` (the host debugger sees it), an exception
delivered to the guest's own IDT (its gate for each vector is a CPL0 stub
``out (0xE0 + vector), al; hlt``), or nothing (the code ran through to its
final ``out 0x10``). The long-mode set-up is the one of DESIGN.md's probe:
identity-mapped 2 MiB pages, flat segments, a TSS whose I/O bitmap lets the
guest use port 0x10 only. For docs/architecture.md (live debugging).
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import struct
from collections.abc import Callable

from hlasync.guest.layout import _descriptor  # the GDT entries, as sandboxes build them
from hlasync.kvm import _abi


# ---- the KVM API this needs: hlasync's own, plus the debug ioctls ----------
class GuestDebug(ctypes.Structure):  # struct kvm_guest_debug (x86)
    _fields_ = [
        ("control", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("debugreg", ctypes.c_uint64 * 8),
    ]


class DebugRegs(ctypes.Structure):  # struct kvm_debugregs
    _fields_ = [
        ("db", ctypes.c_uint64 * 4),
        ("dr6", ctypes.c_uint64),
        ("dr7", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("reserved", ctypes.c_uint64 * 9),
    ]


KVM_SET_GUEST_DEBUG = _abi._iow(0x9B, ctypes.sizeof(GuestDebug))
KVM_GET_DEBUGREGS = _abi._ior(0xA1, ctypes.sizeof(DebugRegs))
KVM_SET_DEBUGREGS = _abi._iow(0xA2, ctypes.sizeof(DebugRegs))
KVM_CAP_SET_GUEST_DEBUG, KVM_CAP_DEBUGREGS, KVM_CAP_SET_GUEST_DEBUG2 = 23, 50, 195
ENABLE, SINGLESTEP, USE_SW_BP, USE_HW_BP = 0x1, 0x2, 0x10000, 0x20000
EXIT_IO, EXIT_DEBUG = _abi.KVM_EXIT_IO, _abi.KVM_EXIT_DEBUG
EXIT_INTERNAL_ERROR = _abi.KVM_EXIT_INTERNAL_ERROR
KVM_CHECK_EXTENSION, KVM_GET_VCPU_MMAP_SIZE = _abi.KVM_CHECK_EXTENSION, _abi.KVM_GET_VCPU_MMAP_SIZE
KVM_CREATE_VM, KVM_CREATE_VCPU, KVM_RUN = _abi.KVM_CREATE_VM, _abi.KVM_CREATE_VCPU, _abi.KVM_RUN
KVM_GET_REGS, KVM_SET_REGS = _abi.KVM_GET_REGS, _abi.KVM_SET_REGS
KVM_GET_SREGS, KVM_SET_SREGS = _abi.KVM_GET_SREGS, _abi.KVM_SET_SREGS
KVM_SET_USER_MEMORY_REGION = _abi.KVM_SET_USER_MEMORY_REGION

# ---- one vCPU in long mode (guest physical == guest virtual) ----------------
MEM_SIZE = 8 << 20
PML4, PDPT, PD = 0x1000, 0x2000, 0x3000
GDT, TSS, IDT, STUBS = 0x4000, 0x5000, 0x6000, 0x7000
CODE, KERNEL_STACK_TOP, USER_STACK_TOP, DATA = 0x10000, 0x1F0000, 0x200000, 0x100000
TSS_LIMIT = 104 + 32


class Guest:
    """One VM and one vCPU running ``code`` at CODE at privilege level ``cpl``."""

    def __init__(self, kvm: int, code: bytes, cpl: int) -> None:
        self.vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
        self.mem = mmap.mmap(-1, MEM_SIZE)
        user = 4 if cpl == 3 else 0
        struct.pack_into("<Q", self.mem, PML4, PDPT | 3 | user)
        struct.pack_into("<Q", self.mem, PDPT, PD | 3 | user)
        for i in range(MEM_SIZE >> 21):
            struct.pack_into("<Q", self.mem, PD + 8 * i, (i << 21) | 0x83 | user)
        gdt = (
            b"\0" * 8
            + _descriptor(0, 0xFFFFF, 0x9A, 0xA)
            + _descriptor(0, 0xFFFFF, 0x92, 0xC)
            + _descriptor(0, 0xFFFFF, 0xFA, 0xA)
            + _descriptor(0, 0xFFFFF, 0xF2, 0xC)
            + _descriptor(TSS, TSS_LIMIT, 0x89, 0)
            + b"\0" * 8
        )
        self.mem[GDT : GDT + len(gdt)] = gdt
        tss = bytearray(TSS_LIMIT + 1)
        struct.pack_into("<Q", tss, 4, KERNEL_STACK_TOP)
        struct.pack_into("<H", tss, 102, 104)
        tss[104:] = b"\xff" * 33
        tss[104 + 0x10 // 8] &= ~(1 << (0x10 % 8))  # port 0x10 allowed at CPL3
        self.mem[TSS : TSS + len(tss)] = bytes(tss)
        for vector in range(32):
            stub = STUBS + 4 * vector
            self.mem[stub : stub + 3] = bytes([0xE6, 0xE0 + vector, 0xF4])
            gate = struct.pack("<HHBBHII", stub & 0xFFFF, 0x08, 0, 0x8E, stub >> 16, 0, 0)
            self.mem[IDT + 16 * vector : IDT + 16 * vector + 16] = gate
        self.mem[CODE : CODE + len(code)] = code
        address = ctypes.addressof(ctypes.c_char.from_buffer(self.mem))
        fcntl.ioctl(
            self.vm,
            KVM_SET_USER_MEMORY_REGION,
            _abi.kvm_userspace_memory_region(0, 0, 0, MEM_SIZE, address),
        )
        self.vcpu = fcntl.ioctl(self.vm, KVM_CREATE_VCPU, 0)
        size = fcntl.ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE)
        self.run_area = mmap.mmap(
            self.vcpu, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
        )
        sregs = _abi.kvm_sregs()
        fcntl.ioctl(self.vcpu, KVM_GET_SREGS, sregs)
        code_sel, data_sel = (0x1B, 0x23) if cpl == 3 else (0x08, 0x10)
        sregs.cs = _abi.kvm_segment(0, 0xFFFFFFFF, code_sel, 11, 1, cpl, 0, 1, 1, 1)
        data = _abi.kvm_segment(0, 0xFFFFFFFF, data_sel, 3, 1, cpl, 1, 1, 0, 1)
        sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
        sregs.tr = _abi.kvm_segment(TSS, TSS_LIMIT, 0x28, 11, 1, 0, 0, 0, 0, 0)
        sregs.gdt.base, sregs.gdt.limit = GDT, len(gdt) - 1
        sregs.idt.base, sregs.idt.limit = IDT, 16 * 32 - 1
        sregs.cr3, sregs.cr4, sregs.cr0, sregs.efer = PML4, 0x620, 0x80050033, 0x500
        fcntl.ioctl(self.vcpu, KVM_SET_SREGS, sregs)
        fcntl.ioctl(
            self.vcpu, KVM_SET_REGS, _abi.kvm_regs(rip=CODE, rsp=USER_STACK_TOP, rflags=0x2)
        )

    def run(self) -> str:
        """Run to the next exit; what it was, in words."""
        fcntl.ioctl(self.vcpu, KVM_RUN, 0)
        reason = struct.unpack_from("<I", self.run_area, 8)[0]
        if reason == EXIT_DEBUG:
            exception, _, pc, dr6, _ = struct.unpack_from("<IIQQQ", self.run_area, 32)
            return f"KVM_EXIT_DEBUG (#{exception} at {pc:#x}, dr6 {dr6:#x})"
        if reason == EXIT_IO:
            port = struct.unpack_from("<H", self.run_area, 34)[0]
            if port >= 0xE0:
                return f"vector {port - 0xE0} to the guest's IDT"
            return "no stop (ran to the end)"
        return f"exit {reason}" + (
            " (KVM_EXIT_INTERNAL_ERROR)" if reason == EXIT_INTERNAL_ERROR else ""
        )

    def regs(self) -> _abi.kvm_regs:
        regs = _abi.kvm_regs()
        fcntl.ioctl(self.vcpu, KVM_GET_REGS, regs)
        return regs

    def guest_debug(self, control: int, debugreg: dict[int, int] | None = None) -> None:
        setting = GuestDebug(control, 0)
        for index, value in (debugreg or {}).items():
            setting.debugreg[index] = value
        fcntl.ioctl(self.vcpu, KVM_SET_GUEST_DEBUG, setting)

    def debugregs(self, address: int, dr7: int) -> None:
        setting = DebugRegs()
        setting.db[0], setting.dr7, setting.dr6 = address, dr7, 0xFFFF0FF0
        fcntl.ioctl(self.vcpu, KVM_SET_DEBUGREGS, setting)


NOPS = bytes([0x90] * 4) + bytes([0xE6, 0x10])  # nop x4; out 0x10, al
INT3 = bytes([0x90, 0xCC, 0x90, 0xE6, 0x10])
WRITE = bytes([0x88, 0x04, 0x25]) + struct.pack("<I", DATA) + bytes([0x90, 0xE6, 0x10])
READ = bytes([0x8A, 0x04, 0x25]) + struct.pack("<I", DATA) + bytes([0x90, 0xE6, 0x10])
RW = 0x3 << 16  # DR7: breakpoint 0 on data reads and writes
W = 0x1 << 16  # ...on data writes


def _single_step(guest: Guest) -> str:
    guest.guest_debug(ENABLE | SINGLESTEP)
    return "; ".join(guest.run() for _ in range(2))


def _software_breakpoint(guest: Guest) -> str:
    guest.guest_debug(ENABLE | USE_SW_BP)
    return guest.run()


def _hardware_breakpoint(guest: Guest) -> str:
    guest.guest_debug(ENABLE | USE_HW_BP, {0: CODE + 2, 7: 0x1})
    return guest.run()


def _hardware_watchpoint(guest: Guest) -> str:
    guest.guest_debug(ENABLE | USE_HW_BP, {0: DATA, 7: 0x1 | W})
    return guest.run()


def _guest_dr_execute(guest: Guest) -> str:
    guest.debugregs(CODE + 2, 0x401)
    return guest.run()


def _guest_dr_write(guest: Guest) -> str:
    guest.debugregs(DATA, 0x401 | W)
    return guest.run()


def _guest_dr_access(guest: Guest) -> str:
    guest.debugregs(DATA, 0x401 | RW)
    return guest.run()


def _plain(guest: Guest) -> str:
    return guest.run()


def _guest_tf(guest: Guest) -> str:
    regs = guest.regs()
    regs.rflags |= 0x100
    fcntl.ioctl(guest.vcpu, KVM_SET_REGS, regs)
    return guest.run()


ROWS: list[tuple[str, bytes, Callable[[Guest], str]]] = [
    ("KVM_SET_GUEST_DEBUG single-step", NOPS, _single_step),
    ("KVM_SET_GUEST_DEBUG software breakpoint (int3)", INT3, _software_breakpoint),
    ("KVM_SET_GUEST_DEBUG hardware breakpoint (execute)", NOPS, _hardware_breakpoint),
    ("KVM_SET_GUEST_DEBUG watchpoint (write)", WRITE, _hardware_watchpoint),
    ("KVM_SET_DEBUGREGS: the guest's DR0/DR7 (execute)", NOPS, _guest_dr_execute),
    ("KVM_SET_DEBUGREGS: the guest's DR0/DR7 (write)", WRITE, _guest_dr_write),
    ("KVM_SET_DEBUGREGS: the guest's DR0/DR7 (read/write)", READ, _guest_dr_access),
    ("the guest's own int3, no debugging set", INT3, _plain),
    ("RFLAGS.TF set by the host, no debugging set", NOPS, _guest_tf),
]


def main() -> None:
    kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    caps = {
        name: fcntl.ioctl(kvm, KVM_CHECK_EXTENSION, cap)
        for name, cap in [
            ("KVM_CAP_SET_GUEST_DEBUG", KVM_CAP_SET_GUEST_DEBUG),
            ("KVM_CAP_SET_GUEST_DEBUG2", KVM_CAP_SET_GUEST_DEBUG2),
            ("KVM_CAP_DEBUGREGS", KVM_CAP_DEBUGREGS),
        ]
    }
    print(", ".join(f"{name} = {value:#x}" for name, value in caps.items()))
    print()
    print("| mechanism | CPL3 (hlasync's guests) | CPL0 |")
    print("|---|---|---|")
    for label, code, action in ROWS:
        cells = []
        for cpl in (3, 0):
            try:
                cells.append(action(Guest(kvm, code, cpl)))
            except OSError as exc:
                cells.append(f"refused ({exc.strerror})")
        print(f"| {label} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
