"""The machine under a sandbox: what the vCPU lets guest code see (CR4
protections, CPUID), what snapshots and dumps hold (data, never residency),
and which resources the template cache keeps."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from hlasync import CoreDump, GuestCrashed, Sandbox, SandboxConfig
from hlasync.kvm import Kvm
from hlasync.sandbox.cpu import CR4_UMIP
from hlasync.sandbox.snapshots import TEMPLATE_CACHE_SIZE, templates

PAGE = 4096


@pytest.fixture
def hostile(kvm: Kvm, hostile_guest: Path) -> Iterator[Sandbox]:
    with Sandbox(hostile_guest, output=lambda text: None) as sb:
        yield sb


def test_guest_code_cannot_read_descriptor_table_addresses(hostile: Sandbox) -> None:
    """UMIP: sidt and sgdt at CPL3 fault instead of revealing the IDT/GDT base."""
    for which in (30, 31):  # sidt, sgdt (tests/guests/hostile.c `instruction`)
        with pytest.raises(GuestCrashed) as info:
            hostile.call("instruction", which)
        assert info.value.vector_name == "#GP"
        hostile.restore()
    path = hostile.generate_crashdump()
    with CoreDump.open(path) as dump:
        assert dump.metadata["special_registers"]["cr4"] & CR4_UMIP


def test_vcpus_get_a_minimal_cpuid(hostile: Sandbox) -> None:
    """KVM holds the host's supported leaves without its paravirtual ones (no clock,
    no hypercalls for guests). On bare-metal KVM that is what guest code sees; on
    PVM, CPUID at CPL3 is answered by the host's own hypervisor (measured: the
    guest reads "KVMKVMKVM" at 0x40000000 whatever the table says)."""
    leaves = {entry.function for entry in hostile._machine.vcpu.get_cpuid()}
    assert {0, 1, 7, 0xD, 0x8000_0000, 0x8000_0001} <= leaves
    assert not any(0x4000_0000 <= leaf < 0x5000_0000 for leaf in leaves)
    assert hostile.call("cpuid_leaf", 0) != 0  # the guest runs with it


def test_the_template_cache_is_bounded(kvm: Kvm, simpleguest: Path) -> None:
    """Sandboxes of many distinct configurations, each closed after use, leave at
    most TEMPLATE_CACHE_SIZE templates (and their memfds) behind."""
    templates.clear()
    process = psutil.Process()
    before = process.num_fds()
    for index in range(TEMPLATE_CACHE_SIZE + 20):
        config = SandboxConfig(stack_size=(64 + 4 * index) * 1024)
        with Sandbox(simpleguest, config) as sb:
            assert sb.call("add", index, 1) == index + 1
    assert len(templates) == TEMPLATE_CACHE_SIZE
    assert process.num_fds() - before <= TEMPLATE_CACHE_SIZE


def test_dump_content_comes_from_data_not_from_residency(kvm: Kvm, hostile_guest: Path) -> None:
    """Which pages a snapshot or a dump copies is decided by where data is (the
    backing memfd's SEEK_DATA ranges plus the pages written since, from KVM's dirty
    log and the host's own writes), never by ``mincore``, which calls a swapped-out
    page absent. Every written page is copied; untouched zero pages stay holes."""
    value = 0x1122334455667788
    with Sandbox(hostile_guest) as sb:
        machine = sb._machine
        heap, heap_size = sb.layout.heap_addr, sb.layout.heap_size
        last_page = heap + heap_size - PAGE
        sb.call("plant_secrets", 0, 0)  # touches no heap page
        runs = machine.data_runs()
        assert not any(start <= last_page < end for start, end in runs)
        sb.call("fill_heap", value)
        runs = machine.data_runs()
        assert any(start <= last_page < end for start, end in runs)
        snapshot = sb.snapshot()
        assert any(start <= last_page < end for start, end in snapshot._image.data_runs())
        with CoreDump.open(sb.generate_crashdump()) as dump:
            assert dump.read(last_page, 8) == value.to_bytes(8, "little")
        sb.call("fill_heap", 0)
        sb.restore(snapshot)
        assert sb.read_memory(last_page, 8) == value.to_bytes(8, "little")
