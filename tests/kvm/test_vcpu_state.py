"""Registers staged in the run area (KVM_CAP_SYNC_REGS): every reader sees
them before the guest runs, and the next KVM_RUN hands them to KVM."""

from __future__ import annotations

import struct

from hlasync import Sandbox, guests
from hlasync.kvm import Kvm, Vm, _abi


def _dirty_field(vcpu: object) -> int:
    return int(struct.unpack_from("<Q", vcpu.run_area, _abi.RUN_DIRTY_REGS)[0])  # type: ignore[attr-defined]


def test_staged_registers_are_what_the_accessors_read(kvm: Kvm) -> None:
    vm = Vm(kvm)
    try:
        vcpu = vm.create_vcpu()
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
        regs.rax, regs.rip, regs.rflags = 0x1234_5678_9ABC, 0x4000, 0x202
        sregs.ds.selector = 0x2B
        vcpu.stage_regs(regs, sregs)
        assert vcpu.get_regs().rax == 0x1234_5678_9ABC  # applied before the read
        assert vcpu.get_regs().rip == 0x4000
        assert vcpu.get_sregs().ds.selector == 0x2B
        assert _dirty_field(vcpu) == 0  # nothing left for KVM_RUN to apply twice
    finally:
        vm.close()


def test_a_restore_hands_its_registers_to_the_next_run(kvm: Kvm) -> None:
    with Sandbox(guests.path("simpleguest")) as sb:
        assert sb.call("increment") == 1
        snap = sb.snapshot()
        expected = sb._machine.vcpu.get_regs()
        assert sb.call("increment") == 2
        sb.restore(snap)
        vcpu = sb._machine.vcpu
        if kvm.check_extension(_abi.KVM_CAP_SYNC_REGS) & 3 == 3:
            assert _dirty_field(vcpu) == 3  # staged, not yet taken
        assert sb.call("increment") == 2  # the guest ran from the snapshot's registers
        assert _dirty_field(vcpu) == 0  # KVM took them with that KVM_RUN
        sb.restore(snap)
        got = vcpu.get_regs()
        assert (got.rip, got.rsp, got.rflags) == (expected.rip, expected.rsp, expected.rflags)
        assert sb.call("increment") == 2
