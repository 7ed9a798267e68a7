"""ELF core file format knowledge: structure layouts and constants.

x86-64 Linux layouts (``<linux/elfcore.h>``, ``<sys/procfs.h>``,
``<asm/user.h>``), so gdb, lldb and readelf read hlasync dumps like the core
of a Linux process. No I/O lives here.
"""

from __future__ import annotations

import signal
import struct

# ELF identification and header values.
ELFMAG = b"\x7fELF"
ELFCLASS64, ELFDATA2LSB, EV_CURRENT, ELFOSABI_NONE = 2, 1, 1, 0
ET_CORE = 4
EM_X86_64 = 62
PT_LOAD, PT_NOTE = 1, 4
PF_X, PF_W, PF_R = 1, 2, 4

EHDR = struct.Struct("<16sHHIQQQIHHHHHH")  # Elf64_Ehdr, 64 bytes
PHDR = struct.Struct("<IIQQQQQQ")  # Elf64_Phdr, 56 bytes
NHDR = struct.Struct("<III")  # namesz, descsz, type

# Note types.
NT_PRSTATUS = 1
NT_FPREGSET = 2
NT_PRPSINFO = 3
NT_AUXV = 6
NT_SIGINFO = 0x53494749
NT_FILE = 0x46494C45
NT_X86_XSTATE = 0x202
#: hlasync metadata note: name "HLASYNC", JSON description.
NT_HLASYNC = 0x484C0001
NOTE_NAME_CORE = b"CORE"
NOTE_NAME_LINUX = b"LINUX"
NOTE_NAME_HLASYNC = b"HLASYNC"

# Bounds on what hlasync reads of a core file (hlasync's own dumps stay far below
# them; the writer keeps its metadata within MAX_METADATA_BYTES). A file beyond
# any of them is refused: a hostile file costs what these allow, never what it claims.
MAX_PROGRAM_HEADERS = 1024  # hlasync writes 1 + one per memory region (~20)
MAX_NOTE_SEGMENTS = 16  # hlasync writes 1
MAX_NOTE_SEGMENT_BYTES = 32 << 20
MAX_NOTES = 256  # in all segments together; hlasync writes 8
MAX_NOTE_NAME_BYTES = 256  # "CORE", "LINUX", "HLASYNC"
MAX_NOTE_BYTES = 64 << 10  # each note read besides the metadata (prstatus, prpsinfo, auxv)
MAX_METADATA_BYTES = 1 << 20  # the hlasync note's JSON: decoding costs up to ~20x its size
#: Identification reads this many note headers of the first PT_NOTE at most:
#: hlasync's note is its eighth at most.
IDENTIFY_NOTES = 16

# Auxiliary vector.
AT_NULL, AT_PHDR, AT_PHENT, AT_PHNUM, AT_PAGESZ, AT_ENTRY = 0, 3, 4, 5, 6, 9

#: ``user_regs_struct`` order, as in ``NT_PRSTATUS.pr_reg``.
USER_REGS = (
    "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx",
    "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base", "ds",
    "es", "fs", "gs",
)  # fmt: skip

# struct elf_prstatus (336 bytes): siginfo{signo, code, errno}, cursig, sigpend, sighold,
# pid, ppid, pgrp, sid, 4 x timeval, pr_reg[27], fpvalid.
PRSTATUS = struct.Struct("<iiih2xQQiiii64x27Qi4x")
# struct elf_prpsinfo (136 bytes): state, sname, zomb, nice, flag, uid, gid, pid, ppid,
# pgrp, sid, fname[16], psargs[80].
PRPSINFO = struct.Struct("<bcbb4xQIIiiii16s80s")
SIGINFO_SIZE = 128
SIGINFO = struct.Struct("<iiiiQ")  # signo, errno, code, pad, si_addr
FXSAVE_SIZE = 512
FXSAVE_HEAD = struct.Struct("<HHBxHQQII")  # fcw fsw ftw(abridged) fop rip rdp mxcsr mxcsr_mask
XSAVE_XCR0_OFFSET = 464  # Linux stores XCR0 in the fxsave software-reserved bytes
XSAVE_HEADER_OFFSET = 512
#: NT_X86_XSTATE size by XCR0: legacy area + XSAVE header (+ AVX upper halves).
XSAVE_SIZES = {0x3: 576, 0x7: 832}

# si_code values.
SI_USER = 0
SI_KERNEL = 0x80
SI_TIMER = -2
FPE_INTDIV = 1
ILL_ILLOPN = 2
SEGV_MAPERR, SEGV_ACCERR = 1, 2
BUS_ADRALN = 1
TRAP_BRKPT = 1

assert PRSTATUS.size == 336 and PRPSINFO.size == 136 and EHDR.size == 64 and PHDR.size == 56

#: Signal and si_code reported for each CPU exception vector.
VECTOR_SIGNALS: dict[int, tuple[int, int]] = {
    0: (signal.SIGFPE, FPE_INTDIV),
    1: (signal.SIGTRAP, TRAP_BRKPT),
    3: (signal.SIGTRAP, TRAP_BRKPT),
    4: (signal.SIGSEGV, SI_KERNEL),
    5: (signal.SIGSEGV, SI_KERNEL),
    6: (signal.SIGILL, ILL_ILLOPN),
    7: (signal.SIGFPE, SI_KERNEL),
    16: (signal.SIGFPE, SI_KERNEL),
    17: (signal.SIGBUS, BUS_ADRALN),
    19: (signal.SIGFPE, SI_KERNEL),
}


#: Signal and si_code reported for each dump reason (faults use VECTOR_SIGNALS).
#: Only signals whose default action dumps core, so every reader meets a signal it
#: knows from real core files: lldb 14 hangs on a core that stopped on a signal that
#: does not stop a process, such as SIGALRM. SIGQUIT is the "dump core now" signal.
REASON_SIGNALS: dict[str, tuple[int, int]] = {
    "fault": (signal.SIGSEGV, SI_KERNEL),
    "abort": (signal.SIGABRT, SI_USER),
    "protocol-error": (signal.SIGSYS, SI_KERNEL),
    "unexpected-exit": (signal.SIGSYS, SI_KERNEL),
    "timeout": (signal.SIGQUIT, SI_TIMER),
    "cpu-timeout": (signal.SIGXCPU, SI_KERNEL),
    "cancelled": (signal.SIGQUIT, SI_USER),
    "on-demand": (signal.SIGQUIT, SI_USER),
    "signal": (signal.SIGQUIT, SI_USER),
    "init-timeout": (signal.SIGQUIT, SI_TIMER),
}


def signal_name(signum: int) -> str:
    """``SIGUSR2``, ``SIGRTMIN+3``: how people write signal ``signum``."""
    if signal.SIGRTMIN < signum < signal.SIGRTMAX:
        return f"SIGRTMIN+{signum - signal.SIGRTMIN}"
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def note(name: bytes, kind: int, desc: bytes) -> bytes:
    """One ELF note with 4-byte aligned name and description."""
    name_z = name + b"\0"
    pad_name = b"\0" * (-len(name_z) % 4)
    pad_desc = b"\0" * (-len(desc) % 4)
    return NHDR.pack(len(name_z), len(desc), kind) + name_z + pad_name + desc + pad_desc
