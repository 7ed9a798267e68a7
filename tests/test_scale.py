"""Many sandboxes in one process, and nothing leaked when they close."""

from __future__ import annotations

import gc
import threading
from pathlib import Path

import psutil

from hlasync import Sandbox
from hlasync.kvm import Kvm


def _guest_mappings(process: psutil.Process) -> int:
    """Mappings of guest memory (memfd) and vCPU run areas."""
    return sum("hlasync" in m.path or "kvm" in m.path for m in process.memory_maps(grouped=False))


def test_thousand_sandboxes_alive_then_closed_without_leaks(kvm: Kvm, simpleguest: Path) -> None:
    process = psutil.Process()
    Sandbox(simpleguest).close()  # the per-process template exists from here on
    gc.collect()
    fds_before = process.num_fds()
    threads_before = _owner_threads()
    maps_before = _guest_mappings(process)

    sandboxes = [Sandbox(simpleguest) for _ in range(1000)]
    try:
        assert len({sb.id for sb in sandboxes}) == 1000
        for i, sb in enumerate(sandboxes):
            assert sb.call("add", i, 1) == i + 1
        assert process.num_fds() >= fds_before + 2000  # a VM and a vCPU fd each
        assert _guest_mappings(process) >= maps_before + 2000  # memory and run area each
        assert len(_owner_threads()) >= 1000  # one owner thread per vCPU
    finally:
        for sb in sandboxes:
            sb.close()
    del sandboxes
    gc.collect()
    assert process.num_fds() == fds_before
    assert set(_owner_threads()) <= set(threads_before)  # every new owner thread ended
    assert _guest_mappings(process) == maps_before


def _owner_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("hlasync-owner-"))


def test_snapshots_release_their_memory_when_dropped(kvm: Kvm, simpleguest: Path) -> None:
    process = psutil.Process()
    with Sandbox(simpleguest) as sb:
        gc.collect()
        fds_before = process.num_fds()
        for _ in range(50):
            snap = sb.snapshot()
            sb.call("increment")
            sb.restore(snap)
        del snap
        sb.restore()
        gc.collect()
        assert process.num_fds() == fds_before
