"""A KVM virtual CPU: run, registers, kicks, all on its owner thread (:mod:`.owner`)."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import signal
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import IoctlError
from . import _abi
from .exits import (
    Exit,
    FailEntry,
    Hlt,
    InternalError,
    Interrupted,
    IoIn,
    IoOut,
    Mmio,
    Shutdown,
    UnknownExit,
)
from .owner import Owner
from .system import ioctl

if TYPE_CHECKING:
    from .vm import Vm

__all__ = ["KICK_SIGNAL", "Vcpu"]

#: Real-time signal used to kick a vCPU out of ``KVM_RUN``. A vCPU's owner
#: thread keeps it blocked; KVM unblocks it only while the guest runs.
KICK_SIGNAL: int = signal.SIGRTMIN + 2

_IO = struct.Struct("<BBHIQ")  # direction, size, port, count, data_offset
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_SYNC_BOTH = _abi.KVM_SYNC_X86_REGS | _abi.KVM_SYNC_X86_SREGS
_REGS_SIZE = ctypes.sizeof(_abi.kvm_regs)
_SREGS_SIZE = ctypes.sizeof(_abi.kvm_sregs)
_EVENTS_SIZE = ctypes.sizeof(_abi.kvm_vcpu_events)
#: What the run area can stage: (KVM_SYNC_X86_* bit, the ioctl that sets it, offset,
#: size), in the order applied when no KVM_RUN took them (events last, as KVM does).
_SYNC_PARTS = (
    (_abi.KVM_SYNC_X86_SREGS, _abi.KVM_SET_SREGS, _abi.RUN_SYNC_SREGS, _SREGS_SIZE),
    (_abi.KVM_SYNC_X86_REGS, _abi.KVM_SET_REGS, _abi.RUN_SYNC_REGS, _REGS_SIZE),
    (_abi.KVM_SYNC_X86_EVENTS, _abi.KVM_SET_VCPU_EVENTS, _abi.RUN_SYNC_EVENTS, _EVENTS_SIZE),
)
_MMIO = struct.Struct("<Q8sIB")  # phys_addr, data, len, is_write
_FAIL_ENTRY = struct.Struct("<QI")
_INTERNAL = struct.Struct("<II")
#: At most this many KVM_RUNs finish one exit (a string `in` exits once per 4 KiB page).
COMPLETION_ROUNDS = 1 << 17
_INTERRUPTED = Interrupted()
_HLT = Hlt()
_SHUTDOWN = Shutdown()


class Vcpu:
    """One vCPU of a :class:`~hlasync.kvm.vm.Vm`."""

    def __init__(self, vm: Vm, index: int) -> None:
        self.index = index
        self.fd = ioctl(vm.fd, _abi.KVM_CREATE_VCPU, index)
        try:
            os.set_inheritable(self.fd, False)
            self.run_area = mmap.mmap(
                self.fd, vm.kvm.vcpu_mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
            )
        except BaseException:
            os.close(self.fd)
            raise
        self._run_size = len(self.run_area)
        try:
            #: The one thread that runs this vCPU and issues its ioctls.
            self.owner = Owner(KICK_SIGNAL)
        except BaseException:
            self.run_area.close()
            os.close(self.fd)
            raise
        self.owner.own_fd(self.fd)
        # The kick signal is deliverable to the owner thread only inside KVM_RUN.
        self._ioctl(_abi.KVM_SET_SIGNAL_MASK, struct.pack("<IQ", 8, self.owner.run_mask))
        #: The last exit was an I/O or MMIO access: KVM finishes it (writes the data
        #: an `in` reads, advances rip past an `out` on VMX/SVM) only on the next
        #: KVM_RUN. Until then the vCPU state is not consistent (KVM API, "KVM_RUN").
        self._incomplete = False
        # Exits of single-byte `out`s repeat on every call: reuse the values.
        self._out_cache: dict[int, IoOut] = {}
        #: KVM takes registers staged in the run area with the next KVM_RUN
        #: (KVM_CAP_SYNC_REGS), which saves an ioctl (~5 us on PVM) per set.
        sync = vm.kvm.check_extension(_abi.KVM_CAP_SYNC_REGS)
        self._sync_regs = sync & _SYNC_BOTH == _SYNC_BOTH
        #: The event state goes the same way where KVM takes it from the run area too.
        self._sync_events = bool(sync & _abi.KVM_SYNC_X86_EVENTS)
        self._staged = False

    # -- running -----------------------------------------------------------
    def kick(self) -> None:
        """Make the guest leave ``KVM_RUN`` now, or the next ``KVM_RUN`` return at
        once (from any thread; never blocks)."""
        self.owner.kick()

    def run(self, *, long: bool = False) -> Exit:
        """One ``KVM_RUN``: run the guest until its next exit and describe it.

        KVM first finishes the previous exit's access (if any), then runs.
        """
        try:
            ran = self.owner.run(self.fd, long=long)
        except BaseException:
            # Whatever the run came to is unknown (a KeyboardInterrupt while it
            # ran): let the next state access complete it (harmless if nothing is).
            self._incomplete = True
            raise
        if not ran:
            self._incomplete = False  # KVM completes pending accesses before it checks signals
            return _INTERRUPTED
        return self._describe_exit()

    def _describe_exit(self) -> Exit:
        area = self.run_area
        reason = _U32.unpack_from(area, _abi.RUN_EXIT_REASON)[0]
        self._incomplete = reason == _abi.KVM_EXIT_IO or reason == _abi.KVM_EXIT_MMIO
        if reason == _abi.KVM_EXIT_IO:
            direction, size, port, count, offset = _IO.unpack_from(area, _abi.RUN_IO_DIRECTION)
            nbytes = size * count
            if offset + nbytes > self._run_size:
                return InternalError(-1, (offset, nbytes))
            if direction == _abi.KVM_EXIT_IO_IN:
                # Nothing answers on any port: the guest reads all ones, never stale bytes.
                area[offset : offset + nbytes] = b"\xff" * nbytes
                return IoIn(port, size, count)
            if nbytes == 1:
                key = (port << 8) | area[offset]
                cached = self._out_cache.get(key)
                if cached is None:
                    cached = self._out_cache[key] = IoOut(port, 1, 1, bytes([area[offset]]))
                return cached
            return IoOut(port, size, count, area[offset : offset + nbytes])
        if reason == _abi.KVM_EXIT_HLT:
            return _HLT
        if reason == _abi.KVM_EXIT_SHUTDOWN:
            return _SHUTDOWN
        if reason == _abi.KVM_EXIT_INTR:
            return _INTERRUPTED
        if reason == _abi.KVM_EXIT_MMIO:
            address, data, length, is_write = _MMIO.unpack_from(area, _abi.RUN_UNION)
            length = min(length, 8)
            if not is_write:
                area[_abi.RUN_UNION + 8 : _abi.RUN_UNION + 16] = b"\xff" * 8
            return Mmio(address, bool(is_write), length, data[:length])
        if reason == _abi.KVM_EXIT_FAIL_ENTRY:
            hw_reason, cpu = _FAIL_ENTRY.unpack_from(area, _abi.RUN_UNION)
            return FailEntry(hw_reason, cpu)
        if reason == _abi.KVM_EXIT_INTERNAL_ERROR:
            suberror, ndata = _INTERNAL.unpack_from(area, _abi.RUN_UNION)
            ndata = min(ndata, 16)
            data = struct.unpack_from(f"<{ndata}Q", area, _abi.RUN_UNION + 8)
            return InternalError(suberror, data)
        return UnknownExit(reason)

    def complete(self) -> None:
        """Let KVM finish the last exit's I/O or MMIO access without running guest code.

        The KVM API makes userspace re-enter ``KVM_RUN`` (here with
        ``immediate_exit``) before the vCPU state is consistent: on VMX/SVM rip
        still points at an `out` until then, and an `in` has not written its
        register or memory. Every state accessor below calls this first, so no
        state is read or replaced in between. A string `in` that spans more
        than one data page exits again for each page: bounded by
        :data:`COMPLETION_ROUNDS`, after which :class:`IoctlError` (EIO) says the
        vCPU cannot be brought to a consistent state.
        """
        rounds = 0
        while self._incomplete:
            rounds += 1
            if rounds > COMPLETION_ROUNDS:
                raise IoctlError(
                    "KVM_RUN", errno.EIO, "the guest's I/O access did not complete (vCPU unusable)"
                )
            self.run_area[_abi.RUN_IMMEDIATE_EXIT] = 1
            try:
                self._ioctl(_abi.KVM_RUN, 0)
            except IoctlError as exc:
                if exc.errno != errno.EINTR:
                    raise
                self._incomplete = False  # the expected outcome of immediate_exit
                continue
            finally:
                self.run_area[_abi.RUN_IMMEDIATE_EXIT] = 0
            self._describe_exit()  # finishing it needed another exit (the next page of an `ins`)

    # -- state ---------------------------------------------------------------
    def stage_regs(
        self,
        regs: _abi.kvm_regs,
        sregs: _abi.kvm_sregs,
        events: _abi.kvm_vcpu_events | None = None,
    ) -> None:
        """Give the vCPU these general and segment registers (and ``events``, its
        exception/interrupt/NMI state, when given) before it next runs.

        Where KVM supports ``KVM_CAP_SYNC_REGS`` they are written into the run
        area and applied by the next ``KVM_RUN``, without an ioctl each; every
        state accessor first applies staged state KVM has not taken yet, so
        reads and writes in between see it.
        """
        self._settle()
        if not self._sync_regs:
            self._ioctl(_abi.KVM_SET_SREGS, sregs)
            self._ioctl(_abi.KVM_SET_REGS, regs)
            if events is not None:
                self._ioctl(_abi.KVM_SET_VCPU_EVENTS, events)
            return
        area = self.run_area
        dirty = _SYNC_BOTH
        # Slice assignment copies exactly the struct's size (mmap refuses any other
        # length), within the run area (the sync-regs area spans 2 KiB from RUN_SYNC_REGS).
        area[_abi.RUN_SYNC_REGS : _abi.RUN_SYNC_REGS + _REGS_SIZE] = memoryview(regs).cast("B")
        area[_abi.RUN_SYNC_SREGS : _abi.RUN_SYNC_SREGS + _SREGS_SIZE] = memoryview(sregs).cast("B")
        if events is not None:
            if self._sync_events:
                end = _abi.RUN_SYNC_EVENTS + _EVENTS_SIZE
                area[_abi.RUN_SYNC_EVENTS : end] = memoryview(events).cast("B")
                dirty |= _abi.KVM_SYNC_X86_EVENTS
            else:
                self._ioctl(_abi.KVM_SET_VCPU_EVENTS, events)
        _U64.pack_into(area, _abi.RUN_DIRTY_REGS, dirty)
        self._staged = True

    def _settle(self) -> None:
        """Make KVM's copy of the vCPU state current: staged registers applied,
        the last exit's access finished."""
        if self._staged:
            area = self.run_area
            pending = _U64.unpack_from(area, _abi.RUN_DIRTY_REGS)[0]
            if pending:  # no KVM_RUN took them yet
                _U64.pack_into(area, _abi.RUN_DIRTY_REGS, 0)
                for part, request, start, size in _SYNC_PARTS:
                    if pending & part:
                        self._ioctl(request, bytes(area[start : start + size]))
            self._staged = False
        self.complete()

    def get_regs(self) -> _abi.kvm_regs:
        self._settle()
        regs = _abi.kvm_regs()
        self._ioctl(_abi.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: _abi.kvm_regs) -> None:
        self._settle()
        self._ioctl(_abi.KVM_SET_REGS, regs)

    def get_sregs(self) -> _abi.kvm_sregs:
        self._settle()
        sregs = _abi.kvm_sregs()
        self._ioctl(_abi.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: _abi.kvm_sregs) -> None:
        self._settle()
        self._ioctl(_abi.KVM_SET_SREGS, sregs)

    def get_fpu(self) -> _abi.kvm_fpu:
        self._settle()
        fpu = _abi.kvm_fpu()
        self._ioctl(_abi.KVM_GET_FPU, fpu)
        return fpu

    def set_fpu(self, fpu: _abi.kvm_fpu) -> None:
        self._settle()
        self._ioctl(_abi.KVM_SET_FPU, fpu)

    def get_xsave(self) -> _abi.kvm_xsave:
        self._settle()
        xsave = _abi.kvm_xsave()
        self._ioctl(_abi.KVM_GET_XSAVE, xsave)
        return xsave

    def set_xsave(self, xsave: _abi.kvm_xsave) -> None:
        self._settle()
        self._ioctl(_abi.KVM_SET_XSAVE, xsave)

    def get_events(self) -> _abi.kvm_vcpu_events:
        """The exception, interrupt, NMI and SMI the vCPU is being given or holds
        (``KVM_GET_VCPU_EVENTS``): what its next ``KVM_RUN`` delivers first."""
        self._settle()
        events = _abi.kvm_vcpu_events()
        # The request number encodes sizeof(kvm_vcpu_events): KVM writes exactly this owned buffer.
        self._ioctl(_abi.KVM_GET_VCPU_EVENTS, events)
        return events

    def set_events(self, events: _abi.kvm_vcpu_events) -> None:
        """Replace that state now (``KVM_SET_VCPU_EVENTS``; ``events.flags`` says
        which optional parts KVM applies)."""
        self._settle()
        # KVM reads sizeof(kvm_vcpu_events) bytes, the size of ``events`` itself.
        self._ioctl(_abi.KVM_SET_VCPU_EVENTS, events)

    def set_cpuid(self, entries: Sequence[_abi.kvm_cpuid_entry2]) -> None:
        """The CPUID the guest sees; KVM accepts it only before the first ``KVM_RUN``."""
        table = _abi.kvm_cpuid2(nent=len(entries))
        for index, entry in enumerate(entries):
            table.entries[index] = entry
        self._ioctl(_abi.KVM_SET_CPUID2, table)

    def get_cpuid(self) -> tuple[_abi.kvm_cpuid_entry2, ...]:
        """The CPUID table KVM holds for this vCPU."""
        table = _abi.kvm_cpuid2(nent=_abi.CPUID_MAX_ENTRIES)
        self._ioctl(_abi.KVM_GET_CPUID2, table)
        return tuple(table.entries[: table.nent])

    def tsc_khz(self) -> int:
        """The guest's TSC frequency in kHz (what ``rdtsc`` counts in the guest)."""
        return self._ioctl(_abi.KVM_GET_TSC_KHZ)

    def _ioctl(self, request: int, arg: object = 0) -> int:
        """An ioctl of this vCPU, on its owner thread."""
        return self.owner.ioctl(self.fd, request, arg)

    def close(self) -> None:
        """Close the vCPU (on its owner, after any KVM_RUN returned) and end the owner."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            try:
                self.owner.close_fd(fd)
            finally:
                self.owner.stop()
                self.run_area.close()
