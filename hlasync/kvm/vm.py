"""A KVM virtual machine: memory slots and vCPUs."""

from __future__ import annotations

import os

from . import _abi
from .system import Kvm, ioctl
from .vcpu import Vcpu

__all__ = ["Vm"]


class Vm:
    """One VM file descriptor. Owns the vCPUs it creates."""

    def __init__(self, kvm: Kvm | None = None) -> None:
        self.kvm = kvm if kvm is not None else Kvm.shared()
        self.fd = self.kvm.create_vm_fd()
        self.vcpus: list[Vcpu] = []

    def set_user_memory_region(
        self, slot: int, guest_phys_addr: int, size: int, userspace_addr: int, flags: int = 0
    ) -> None:
        """Map ``size`` bytes of host memory at ``userspace_addr`` into the guest.

        The caller keeps that host mapping alive for as long as the slot exists.
        """
        region = _abi.kvm_userspace_memory_region(
            slot, flags, guest_phys_addr, size, userspace_addr
        )
        ioctl(self.fd, _abi.KVM_SET_USER_MEMORY_REGION, region)

    def create_vcpu(self) -> Vcpu:
        vcpu = Vcpu(self, len(self.vcpus))
        self.vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
