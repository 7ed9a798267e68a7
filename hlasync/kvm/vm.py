"""A KVM virtual machine: memory slots and vCPUs."""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Iterable

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
        self._bitmaps: dict[int, ctypes.Array[ctypes.c_char]] = {}

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

    def get_dirty_log(self, slot: int, size: int) -> list[int]:
        """Indexes of the pages of ``slot`` (``size`` bytes) the guest wrote since the
        last call; needs the slot registered with ``KVM_MEM_LOG_DIRTY_PAGES``."""
        pages = size // 4096
        bitmap = self._bitmaps.get(pages)
        if bitmap is None:
            # 64-bit aligned, as KVM copies the log in longs.
            bitmap = self._bitmaps[pages] = ctypes.create_string_buffer(((pages + 63) // 64) * 8)
        # Safe: the buffer is owned here and sized for every page of the slot.
        request = struct.pack("<IIQ", slot, 0, ctypes.addressof(bitmap))
        ioctl(self.fd, _abi.KVM_GET_DIRTY_LOG, request)
        bits = int.from_bytes(bitmap.raw, "little")
        dirty = []
        while bits:
            lowest = bits & -bits
            dirty.append(lowest.bit_length() - 1)
            bits ^= lowest
        return dirty

    def enable_cap(self, cap: int, *args: int) -> None:
        """``KVM_ENABLE_CAP`` on the VM: turn on capability ``cap`` with up to four
        arguments (raises :class:`IoctlError` where the kernel lacks it)."""
        if len(args) > 4:
            raise ValueError("KVM_ENABLE_CAP takes at most four arguments")
        values = (*args, 0, 0, 0, 0)[:4]
        ioctl(self.fd, _abi.KVM_ENABLE_CAP, struct.pack("<II4Q64x", cap, 0, *values))

    def clear_dirty_log(self, slot: int, size: int, pages: Iterable[int]) -> None:
        """Write-protect ``pages`` of ``slot`` (``size`` bytes) again and clear their dirty bits
        (``KVM_CLEAR_DIRTY_LOG``; needs ``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2``).

        Pages KVM does not hold as dirty are left alone, so naming extra pages
        is harmless.
        """
        indexes = sorted(set(pages))
        if not indexes:
            return
        slot_pages = size // 4096
        if indexes[0] < 0 or indexes[-1] >= slot_pages:
            raise ValueError(f"pages {indexes[0]}..{indexes[-1]} reach outside the slot")
        # The kernel wants first_page in a multiple of 64 and num_pages too,
        # unless the range runs to the end of the slot.
        first = indexes[0] // 64 * 64
        count = min((indexes[-1] - first) // 64 * 64 + 64, slot_pages - first)
        bits = bytearray((count + 63) // 64 * 8)
        for page in indexes:
            bits[(page - first) >> 3] |= 1 << ((page - first) & 7)
        bitmap = ctypes.create_string_buffer(bytes(bits), len(bits))
        # Safe: the buffer outlives the call and holds num_pages bits.
        request = struct.pack("<IIQQ", slot, count, first, ctypes.addressof(bitmap))
        ioctl(self.fd, _abi.KVM_CLEAR_DIRTY_LOG, request)

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
