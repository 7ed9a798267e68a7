"""Making a sandbox's machine: from the template of an earlier sandbox of the
same guest and configuration (:mod:`.snapshots`), or by booting the guest
from its entry point to its dispatcher within ``SandboxConfig.init_timeout``
(a guest that does not get there is dumped and refused); and taking the
snapshots that a boot leaves behind and :meth:`~.core.Sandbox.snapshot` takes.
"""

from __future__ import annotations

import struct
import threading

from .. import abi
from ..errors import GuestImageError
from ..guest import layout as lay
from ..guest.memory import GuestMemory, MemoryImage
from ..kvm import kvm_regs, kvm_sregs
from ..kvm.exits import Interrupted, IoOut
from . import cpu
from .dumps import try_dump
from .faults import copy_struct, decode_exception
from .holder import SandboxBase
from .machine import Machine
from .snapshots import Snapshot, templates

__all__ = ["Booting"]

_UD = 6  # invalid opcode
#: The guest runtime's probes of what its code may do, and their instructions'
#: lengths: xgetbv (0f 01 d0), rdfsbase %rax (f3 48 0f ae c0).
_PROBES = (("hl_xgetbv_probe", 3), ("hl_rdfsbase_probe", 5))


class Booting(SandboxBase):
    """Creating the machine and taking snapshots (a part of :class:`~.core.Sandbox`)."""

    def _boot(self) -> Snapshot:
        template = templates.get(self._compat)
        if template is not None:
            self._machine = Machine(self.layout, template._image)
            self._machine.vcpu.owner.label = self.id
            try:
                cpu.apply(self._machine.vcpu, template._cpu)
            except BaseException:
                self._machine.release()
                raise
            # The template's output buffer still holds the ready frame its guest wrote.
            features = abi.READY.unpack_from(self._machine.output, 0)[3]
            self._doorbell = bool(features & abi.FEATURE_DOORBELL)
            self._park_feature = self._doorbell and bool(features & abi.FEATURE_PARK)
            return template
        boot = MemoryImage(self.layout.memory_size, "hlasync-boot")
        try:
            mapping = GuestMemory(boot)  # write the boot image once through a private map
            try:
                lay.build_boot_image(mapping.view, self.layout, self.image)
                # Everything the boot image holds lies below the stack.
                boot.write_runs(mapping.view, [(0, self.layout.stack_base)])
            finally:
                mapping.close()
            self._machine = Machine(self.layout, boot)
            self._machine.vcpu.owner.label = self.id
        except BaseException:
            boot.close()
            raise
        try:
            vcpu = self._machine.vcpu
            cpu.set_user_mode(vcpu)
            vcpu.set_regs(
                kvm_regs(rip=self.image.entry, rsp=self.layout.stack_top, rflags=lay.RFLAGS)
            )
            self._initialise()
            initial = self._take_snapshot()
        except BaseException:
            self._machine.release()
            boot.close()  # not left to the GC: a traceback may keep it alive a long time
            raise
        templates.put(self._compat, initial)
        return initial

    def _initialise(self) -> None:
        """Run the guest from its entry point to its dispatcher, for at most
        ``config.init_timeout`` seconds."""
        vcpu = self._machine.vcpu
        user = vcpu.get_sregs()  # the guest starts in user mode
        expired = threading.Event()
        guard = threading.Lock()
        booting = True

        def expire() -> None:
            with guard:  # kick only while this thread is still booting
                if booting:
                    expired.set()
                    vcpu.kick()

        timer = threading.Timer(self.config.init_timeout, expire)
        timer.daemon = True
        timer.start()
        try:
            while True:
                exit_ = vcpu.run()
                undefined = isinstance(exit_, IoOut) and exit_.port == abi.PORT_EXCEPTION_BASE + _UD
                if undefined and self._skip_probe(user):
                    continue
                if not isinstance(exit_, Interrupted):
                    break
                if expired.is_set():
                    self._init_timed_out()
        finally:
            with guard:
                booting = False
            timer.cancel()
            vcpu.owner.drain()  # a kick sent just before the guard closed
        if not (isinstance(exit_, IoOut) and exit_.port == abi.PORT_RETURN):
            raise GuestImageError(
                f"guest did not reach its dispatcher during initialisation (exit: {exit_}); "
                "was it built with the hlasync SDK?",
                path=self.image.path,
            )
        magic, version, count, features = abi.READY.unpack_from(self._machine.output, 0)
        self._doorbell = bool(features & abi.FEATURE_DOORBELL)
        self._park_feature = self._doorbell and bool(features & abi.FEATURE_PARK)
        if magic != abi.MAGIC_READY or version != abi.ABI_VERSION:
            raise GuestImageError(
                f"guest speaks ABI {version if magic == abi.MAGIC_READY else '?'}, host speaks "
                f"{abi.ABI_VERSION}: rebuild it with this version of the SDK",
                path=self.image.path,
            )
        if count != len(self.image.functions):
            raise GuestImageError(
                f"guest reports {count} functions, its ELF declares {len(self.image.functions)}",
                path=self.image.path,
            )
        if self._park_feature:
            # What hl_park resets, where the guest cannot change it (the PEB is read-only).
            can_set = abi.READY_CAN_SET.unpack_from(self._machine.output, abi.READY.size)
            xcr0, fsgsbase, segments = can_set
            memory = self._machine.memory
            assert memory is not None
            park = struct.pack("<QQQ", xcr0 & abi.PARK_XSTATE, 1 if fsgsbase else 0, segments)
            start = abi.PEB_ADDR + abi.PEB_XSAVE_MASK
            memory.view[start : start + len(park)] = park

    def _skip_probe(self, user: kvm_sregs) -> bool:
        """The guest's ``xgetbv`` or ``rdfsbase`` at its ``hl_*_probe`` label
        raised #UD (not allowed to its code here): resume it past the
        instruction with rax, rcx and rdx zero, which the probe reads as "no".
        False for any other #UD."""
        vcpu = self._machine.vcpu
        memory = self._machine.memory
        assert memory is not None
        _, info = decode_exception(
            vcpu, memory, self.image, sandbox_id=self.id, function=None, vector=_UD
        )
        if info is None:
            return False
        lengths = {}
        for name, length in _PROBES:
            probe = self.image.symbol(name)
            if probe is not None:
                lengths[probe.address] = length
        length = lengths.get(info.regs.rip, 0)
        if not length:
            return False
        regs = info.regs
        regs.rip += length
        regs.rax = regs.rcx = regs.rdx = 0
        sregs = vcpu.get_sregs()  # back from the CPL0 stub to user mode
        sregs.cs, sregs.ss = copy_struct(user.cs), copy_struct(user.ss)
        vcpu.set_sregs(sregs)
        vcpu.set_regs(regs)
        return True

    def _init_timed_out(self) -> None:
        path, failure = None, None
        if self.config.crashdump_enabled:
            path, failure = try_dump(self, "init-timeout", None, function=None)
        where = f"; core dump: {path}" if path else ""
        if failure is not None:
            where = f"; no core dump: {failure}"
        error = GuestImageError(
            f"guest did not reach its dispatcher within {self.config.init_timeout:g} s of "
            f"starting (SandboxConfig.init_timeout){where}",
            path=self.image.path,
        )
        error.core_path = path
        raise error

    def _take_snapshot(self) -> Snapshot:
        machine = self._machine
        assert machine.memory is not None
        machine.vcpu.complete()  # before reading memory: finishing an `ins` writes it
        image = machine.memory.snapshot_image(machine.data_runs())
        # Map the new image under the guest so restoring it is a cheap reset.
        machine.remap(image)
        return Snapshot(self._compat, image, cpu.capture(machine.vcpu))
