"""Thin, typed access to the Linux KVM API (the only module that issues ioctls).

Mirrors the kernel's file-descriptor hierarchy: :class:`Kvm` (``/dev/kvm``),
:class:`Vm` (memory slots) and :class:`Vcpu` (run, registers, kicks). vCPU
exits are values from :mod:`hlasync.kvm.exits`.
"""

from . import exits
from ._abi import kvm_fpu, kvm_regs, kvm_segment, kvm_sregs, kvm_vcpu_events, kvm_xsave
from .system import Kvm, ioctl
from .vcpu import KICK_SIGNAL, Vcpu
from .vm import Vm

__all__ = [
    "KICK_SIGNAL",
    "Kvm",
    "Vcpu",
    "Vm",
    "exits",
    "ioctl",
    "kvm_fpu",
    "kvm_regs",
    "kvm_segment",
    "kvm_sregs",
    "kvm_vcpu_events",
    "kvm_xsave",
]
