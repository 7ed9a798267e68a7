"""The vCPU state a sandbox saves and restores, and how a new vCPU is set up.

A snapshot keeps *all* state guest code can read or set: the general
registers and flags, the segment registers with their bases (on hosts where
CPL3 may run ``wrfsbase``/``wrgsbase`` or load selectors, a call can change
them), and the whole XSAVE area (x87, MMX, SSE, AVX, AVX-512, ...). It also
keeps the vCPU's event state with nothing in flight: a kick that stops
``KVM_RUN`` while KVM delivers a fault leaves that exception injected, and
the next ``KVM_RUN`` would deliver it at whatever rip it finds. Restoring
sets all four, so nothing one call leaves in the CPU reaches the next.

New vCPUs get a minimal CPUID (the host's supported leaves without KVM's
paravirtual ones) before they first run (KVM refuses CPUID changes after
that), and CR4 with the protections the host accepts: UMIP (``sidt``/``sgdt``
fault at CPL3), SMEP and SMAP.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from ..errors import IoctlError
from ..guest import layout as lay
from ..kvm import Kvm, Vcpu, kvm_regs, kvm_segment, kvm_sregs, kvm_vcpu_events, kvm_xsave
from ..kvm._abi import (
    KVM_VCPUEVENT_VALID_NMI_PENDING,
    KVM_VCPUEVENT_VALID_SHADOW,
    KVM_VCPUEVENT_VALID_SMM,
    kvm_cpuid_entry2,
)
from .faults import copy_struct

__all__ = ["CpuState", "apply", "capture", "configure_vcpu", "settled", "user_mode_sregs"]

CR4_UMIP, CR4_SMEP, CR4_SMAP = 1 << 11, 1 << 20, 1 << 21
#: CR4 protections tried in order; each is kept only if KVM accepts it.
CR4_HARDENING = (CR4_UMIP, CR4_SMEP, CR4_SMAP)
_HYPERVISOR_LEAVES = range(0x4000_0000, 0x5000_0000)
#: The optional parts of an event state that restoring sets (KVM_VCPUEVENT_VALID_*):
#: NMI pending, interrupt shadow, SMM. Not the exception payload nor a pending
#: triple fault: KVM refuses them unless the VM enabled their capability (ours do not).
_EVENT_PARTS = (
    KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SHADOW | KVM_VCPUEVENT_VALID_SMM
)

_accepted_cr4: int | None = None
_cr4_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class CpuState:
    """Everything of a vCPU that guest code can observe or change."""

    regs: kvm_regs
    sregs: kvm_sregs
    xsave: kvm_xsave
    events: kvm_vcpu_events  # settled: nothing in flight


def capture(vcpu: Vcpu) -> CpuState:
    return CpuState(vcpu.get_regs(), vcpu.get_sregs(), vcpu.get_xsave(), settled(vcpu.get_events()))


def settled(events: kvm_vcpu_events) -> kvm_vcpu_events:
    """``events`` with nothing being delivered or held for delivery: no exception,
    interrupt, NMI or SMI injected or pending. What belongs to the vCPU's
    position (interrupt shadow, NMI mask, SMM) stays as captured."""
    clean = kvm_vcpu_events()
    clean.interrupt.shadow = events.interrupt.shadow
    clean.nmi.masked = events.nmi.masked
    clean.smi.smm, clean.smi.smm_inside_nmi = events.smi.smm, events.smi.smm_inside_nmi
    clean.flags = events.flags & _EVENT_PARTS
    return clean


def apply(vcpu: Vcpu, state: CpuState) -> None:
    """Load ``state``: the x87/SSE/AVX state now, the general and segment
    registers and the settled event state staged for the next ``KVM_RUN`` (or
    set now, where KVM cannot take them from the run area; every later state
    access sees them either way)."""
    vcpu.set_xsave(state.xsave)
    vcpu.stage_regs(state.regs, state.sregs, state.events)


def minimal_cpuid(kvm: Kvm) -> list[kvm_cpuid_entry2]:
    """The host's supported CPUID without KVM's paravirtual leaves (guests have no
    use for them: no clock, no hypercalls)."""
    return [
        copy_struct(entry)
        for entry in kvm.supported_cpuid()
        if entry.function not in _HYPERVISOR_LEAVES
    ]


def configure_vcpu(vcpu: Vcpu, kvm: Kvm) -> None:
    """Set up a vCPU that has never run: CPUID."""
    vcpu.set_cpuid(minimal_cpuid(kvm))


def user_mode_sregs(sregs: kvm_sregs) -> None:
    """64-bit mode, paging on, flat CPL3 segments, our GDT/TSS/IDT."""
    flat = {"base": 0, "limit": 0xFFFFFFFF, "present": 1, "s": 1, "g": 1}
    sregs.cs = kvm_segment(selector=lay.USER_CS, type=11, dpl=3, l=1, **flat)
    data = kvm_segment(selector=lay.USER_DS, type=3, dpl=3, db=1, **flat)
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.tr = kvm_segment(
        base=lay.TSS, limit=lay.TSS_LIMIT, selector=lay.TSS_SELECTOR, type=11, present=1
    )
    sregs.gdt.base, sregs.gdt.limit = lay.GDT, len(lay.gdt_bytes()) - 1
    sregs.idt.base, sregs.idt.limit = lay.IDT, 16 * lay.IDT_ENTRIES - 1
    sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = lay.CR0, lay.PML4, lay.CR4, lay.EFER


def set_user_mode(vcpu: Vcpu) -> None:
    """Put a new vCPU in user mode with every CR4 protection KVM accepts here
    (measured once per process: PVM and bare-metal KVM differ)."""
    global _accepted_cr4
    sregs = vcpu.get_sregs()
    user_mode_sregs(sregs)
    with _cr4_lock:
        if _accepted_cr4 is None:
            accepted = 0
            for bit in CR4_HARDENING:
                sregs.cr4 = lay.CR4 | accepted | bit
                try:
                    vcpu.set_sregs(sregs)
                except IoctlError:
                    continue
                accepted |= bit
            _accepted_cr4 = accepted
    sregs.cr4 = lay.CR4 | _accepted_cr4
    vcpu.set_sregs(sregs)
