"""Raw KVM API: ioctl numbers, ctypes structures and ``kvm_run`` offsets.

Layouts follow ``include/uapi/linux/kvm.h`` and ``arch/x86/include/uapi/asm/kvm.h``
for x86-64. No logic lives here.
"""

from __future__ import annotations

import ctypes

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _ior(nr: int, size: int) -> int:
    return _ioc(_IOC_READ, nr, size)


def _iow(nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, nr, size)


def _iowr(nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, size)


u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64


class kvm_regs(ctypes.Structure):  # noqa: N801 - kernel name
    _fields_ = [
        (name, u64)
        for name in [
            "rax",
            "rbx",
            "rcx",
            "rdx",
            "rsi",
            "rdi",
            "rsp",
            "rbp",
            "r8",
            "r9",
            "r10",
            "r11",
            "r12",
            "r13",
            "r14",
            "r15",
            "rip",
            "rflags",
        ]
    ]


class kvm_segment(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class kvm_dtable(ctypes.Structure):  # noqa: N801
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


class kvm_sregs(ctypes.Structure):  # noqa: N801
    _fields_ = (
        [(name, kvm_segment) for name in ["cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"]]
        + [("gdt", kvm_dtable), ("idt", kvm_dtable)]
        + [(name, u64) for name in ["cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"]]
        + [("interrupt_bitmap", u64 * 4)]
    )


class kvm_fpu(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("fpr", (u8 * 16) * 8),
        ("fcw", u16),
        ("fsw", u16),
        ("ftwx", u8),
        ("pad1", u8),
        ("last_opcode", u16),
        ("last_ip", u64),
        ("last_dp", u64),
        ("xmm", (u8 * 16) * 16),
        ("mxcsr", u32),
        ("pad2", u32),
    ]


class kvm_xsave(ctypes.Structure):  # noqa: N801
    _fields_ = [("region", u32 * 1024)]


class kvm_vcpu_events_exception(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("injected", u8),
        ("nr", u8),
        ("has_error_code", u8),
        ("pending", u8),
        ("error_code", u32),
    ]


class kvm_vcpu_events_interrupt(ctypes.Structure):  # noqa: N801
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class kvm_vcpu_events_nmi(ctypes.Structure):  # noqa: N801
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class kvm_vcpu_events_smi(ctypes.Structure):  # noqa: N801
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8)]


class kvm_vcpu_events_triple_fault(ctypes.Structure):  # noqa: N801
    _fields_ = [("pending", u8)]


class kvm_vcpu_events(ctypes.Structure):  # noqa: N801
    """Events KVM is delivering to the vCPU or holds for it (exception,
    interrupt, NMI, SMI, triple fault): what ``KVM_RUN`` delivers first."""

    _fields_ = [
        ("exception", kvm_vcpu_events_exception),
        ("interrupt", kvm_vcpu_events_interrupt),
        ("nmi", kvm_vcpu_events_nmi),
        ("sipi_vector", u32),
        ("flags", u32),
        ("smi", kvm_vcpu_events_smi),
        ("triple_fault", kvm_vcpu_events_triple_fault),
        ("reserved", u8 * 26),
        ("exception_has_payload", u8),
        ("exception_payload", u64),
    ]


# kvm_vcpu_events.flags: which optional fields KVM_SET_VCPU_EVENTS applies.
KVM_VCPUEVENT_VALID_NMI_PENDING = 0x01
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x02
KVM_VCPUEVENT_VALID_SHADOW = 0x04
KVM_VCPUEVENT_VALID_SMM = 0x08
KVM_VCPUEVENT_VALID_PAYLOAD = 0x10
KVM_VCPUEVENT_VALID_TRIPLE_FAULT = 0x20


class kvm_cpuid_entry2(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    ]


#: Entries in the CPUID tables we exchange with KVM (KVM reports about 60 on x86-64).
CPUID_MAX_ENTRIES = 256


class kvm_cpuid2(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("nent", u32),
        ("padding", u32),
        ("entries", kvm_cpuid_entry2 * CPUID_MAX_ENTRIES),
    ]


class kvm_userspace_memory_region(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]


# System ioctls (on the /dev/kvm fd).
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _ioc(_IOC_READ | _IOC_WRITE, 0x05, 8)  # struct kvm_cpuid2 header
# VM ioctls.
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, ctypes.sizeof(kvm_userspace_memory_region))
KVM_GET_DIRTY_LOG = _iow(0x42, 16)  # struct kvm_dirty_log { u32 slot, pad; u64 bitmap; }
KVM_MEM_LOG_DIRTY_PAGES = 1
# struct kvm_enable_cap { u32 cap, flags; u64 args[4]; u8 pad[64]; }
KVM_ENABLE_CAP = _iow(0xA3, 104)
# struct kvm_clear_dirty_log { u32 slot, num_pages; u64 first_page; u64 bitmap; }
KVM_CLEAR_DIRTY_LOG = _iowr(0xC0, 24)
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_CAP_SYNC_REGS = 74
KVM_SYNC_X86_REGS = 1
KVM_SYNC_X86_SREGS = 2
KVM_SYNC_X86_EVENTS = 4
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1
# vCPU ioctls.
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, ctypes.sizeof(kvm_regs))
KVM_SET_REGS = _iow(0x82, ctypes.sizeof(kvm_regs))
KVM_GET_SREGS = _ior(0x83, ctypes.sizeof(kvm_sregs))
KVM_SET_SREGS = _iow(0x84, ctypes.sizeof(kvm_sregs))
KVM_SET_SIGNAL_MASK = _iow(0x8B, 4)  # struct kvm_signal_mask { u32 len; u8 sigset[]; }
KVM_GET_FPU = _ior(0x8C, ctypes.sizeof(kvm_fpu))
KVM_SET_FPU = _iow(0x8D, ctypes.sizeof(kvm_fpu))
KVM_GET_VCPU_EVENTS = _ior(0x9F, ctypes.sizeof(kvm_vcpu_events))
KVM_SET_VCPU_EVENTS = _iow(0xA0, ctypes.sizeof(kvm_vcpu_events))
KVM_GET_TSC_KHZ = _io(0xA3)
KVM_GET_XSAVE = _ior(0xA4, ctypes.sizeof(kvm_xsave))
KVM_SET_XSAVE = _iow(0xA5, ctypes.sizeof(kvm_xsave))
KVM_SET_CPUID2 = _iow(0x90, 8)  # struct kvm_cpuid2 header
KVM_GET_CPUID2 = _ioc(_IOC_READ | _IOC_WRITE, 0x91, 8)

KVM_API_VERSION = 12

#: Request number -> name, for error messages (every _IO* number above carries KVMIO).
IOCTL_NAMES = {
    value: name
    for name, value in dict(globals()).items()
    if name.startswith("KVM_") and isinstance(value, int) and (value >> 8) & 0xFF == KVMIO
}

# struct kvm_run: the fields we read (offsets in bytes).
RUN_EXIT_REASON = 8
RUN_IMMEDIATE_EXIT = 1
RUN_UNION = 32
# After the 256-byte exit union: u64 kvm_valid_regs, kvm_dirty_regs, then the
# kvm_sync_regs area (x86: struct kvm_regs, struct kvm_sregs, struct kvm_vcpu_events).
RUN_VALID_REGS = 288
RUN_DIRTY_REGS = 296
RUN_SYNC_REGS = 304
RUN_SYNC_SREGS = RUN_SYNC_REGS + ctypes.sizeof(kvm_regs)
RUN_SYNC_EVENTS = RUN_SYNC_SREGS + ctypes.sizeof(kvm_sregs)
# io: __u8 direction, size; __u16 port; __u32 count; __u64 data_offset
RUN_IO_DIRECTION = 32
RUN_IO_SIZE = 33
RUN_IO_PORT = 34
RUN_IO_COUNT = 36
RUN_IO_DATA_OFFSET = 40
KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT = 0, 1

# Exit reasons.
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
