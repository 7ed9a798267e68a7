"""Registers and events staged in the run area (KVM_CAP_SYNC_REGS): every
reader sees them before the guest runs, and the next KVM_RUN hands them to KVM.
The event state (KVM_GET/SET_VCPU_EVENTS) round-trips."""

from __future__ import annotations

import struct

import pytest

from hlasync import Sandbox, SandboxConfig, guests
from hlasync.kvm import Kvm, Vcpu, Vm, _abi


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
            assert _dirty_field(vcpu) & 3 == 3  # staged, not yet taken
        assert sb.call("increment") == 2  # the guest ran from the snapshot's registers
        assert _dirty_field(vcpu) == 0  # KVM took them with that KVM_RUN
        sb.restore(snap)
        got = vcpu.get_regs()
        assert (got.rip, got.rsp, got.rflags) == (expected.rip, expected.rsp, expected.rflags)
        assert sb.call("increment") == 2


def _divide_error_in_flight(vcpu: Vcpu) -> _abi.kvm_vcpu_events:
    """The vCPU's events with a #DE (vector 0) being delivered, as a kick that lands
    mid-delivery leaves them."""
    events = vcpu.get_events()
    events.exception.injected, events.exception.nr = 1, 0
    return events


def test_events_round_trip(kvm: Kvm) -> None:
    vm = Vm(kvm)
    try:
        vcpu = vm.create_vcpu()
        clean = vcpu.get_events()
        assert (clean.exception.injected, clean.exception.pending) == (0, 0)
        assert clean.flags & _abi.KVM_VCPUEVENT_VALID_SHADOW  # KVM says what it reported
        vcpu.set_events(_divide_error_in_flight(vcpu))
        got = vcpu.get_events()
        assert (got.exception.injected, got.exception.nr, got.exception.has_error_code) == (1, 0, 0)
        vcpu.set_events(clean)
        assert vcpu.get_events().exception.injected == 0
    finally:
        vm.close()


def test_staged_events_are_what_the_accessors_read(kvm: Kvm) -> None:
    vm = Vm(kvm)
    try:
        vcpu = vm.create_vcpu()
        clean = vcpu.get_events()
        vcpu.set_events(_divide_error_in_flight(vcpu))
        vcpu.stage_regs(vcpu.get_regs(), vcpu.get_sregs(), clean)
        assert vcpu.get_events().exception.injected == 0  # applied before the read
        assert _dirty_field(vcpu) == 0
    finally:
        vm.close()


@pytest.mark.parametrize(
    ("sync_regs", "sync_events"),
    [(True, True), (True, False), (False, False)],
    ids=["run area", "events by ioctl", "all by ioctl"],
)
def test_a_restore_hands_its_events_to_the_next_run(
    kvm: Kvm, sync_regs: bool, sync_events: bool
) -> None:
    """restore() stages a settled event state with the registers (or sets it, where
    KVM cannot take it from the run area): an exception left in flight is never
    delivered."""
    staged = 7 if sync_events else 3 if sync_regs else 0  # KVM_SYNC_X86_* in the run area
    available = kvm.check_extension(_abi.KVM_CAP_SYNC_REGS)
    if available & staged != staged:
        pytest.skip(f"KVM_CAP_SYNC_REGS is {available} here")
    with Sandbox(guests.path("simpleguest"), SandboxConfig(spin=0)) as sb:
        assert sb.call("add", 2, 3) == 5
        vcpu = sb._machine.vcpu
        vcpu._sync_regs, vcpu._sync_events = sync_regs, sync_events
        vcpu.set_events(_divide_error_in_flight(vcpu))
        sb.restore()
        assert _dirty_field(vcpu) == staged  # not yet taken
        assert sb.call("add", 2, 3) == 5
        assert _dirty_field(vcpu) == 0
        assert vcpu.get_events().exception.injected == 0
