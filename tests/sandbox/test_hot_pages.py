"""Pages the guest writes on every call stay writable in KVM (manual dirty-log
protection) and are copied back on every reset: fresh state must stay exact."""

from __future__ import annotations

import pytest

from hlasync import Sandbox, abi
from hlasync.kvm import Vm
from hlasync.sandbox.machine import COOL_EVERY, HOT_AFTER


def _pages(sandbox: Sandbox):  # type: ignore[no-untyped-def]
    return sandbox._machine.pages


def test_hot_pages_are_restored_on_every_reset_across_cooling(sandbox: Sandbox) -> None:
    initial = sandbox.read_memory(abi.SCRATCH_ADDR, 16)
    seen_hot = False
    for i in range(2 * COOL_EVERY + HOT_AFTER + 3):
        sandbox.restore()
        assert sandbox.read_memory(abi.SCRATCH_ADDR, 16) == initial, i
        assert sandbox.call("increment") == 1, i
        sandbox.call("write_sentinel", f"secret {i}")
        seen_hot = seen_hot or bool(_pages(sandbox).hot)
    if _pages(sandbox).manual:
        assert seen_hot  # the guest writes its counter page on every call


def test_hot_pages_stay_in_the_log_until_cooled(sandbox: Sandbox) -> None:
    pages = _pages(sandbox)
    if not pages.manual:
        pytest.skip("KVM without manual dirty-log protection")
    for _ in range(HOT_AFTER + 1):
        sandbox.restore()
        sandbox.call("increment")
    sandbox.restore()
    hot = pages.hot
    assert hot
    # The guest has not run since the reset, yet KVM reports the hot pages: they
    # were never write-protected again, so a write to them cannot go unseen.
    collected = pages.collect()
    assert collected is not None and hot <= collected
    sandbox.restore(sandbox.snapshot())  # a remap cools every page
    assert not pages.hot
    assert sandbox.call("increment") == 1


def test_alternating_snapshots_with_hot_pages(sandbox: Sandbox) -> None:
    assert sandbox.call("increment") == 1
    snap = sandbox.snapshot()
    for i in range(3 * HOT_AFTER + 4):
        sandbox.restore(snap)
        assert sandbox.call("increment") == 2, i
        assert sandbox.call("increment") == 3, i
        if i % 3 == 0:
            sandbox.restore()
            assert sandbox.call("increment") == 1, i


def test_clear_dirty_log_refuses_pages_outside_the_slot(kvm: object) -> None:
    vm = Vm()
    try:
        with pytest.raises(ValueError, match="outside the slot"):
            vm.clear_dirty_log(0, 64 * 4096, [64])
        with pytest.raises(ValueError, match="outside the slot"):
            vm.clear_dirty_log(0, 64 * 4096, [-1])
        vm.clear_dirty_log(0, 64 * 4096, [])  # nothing to do: no ioctl
    finally:
        vm.close()
