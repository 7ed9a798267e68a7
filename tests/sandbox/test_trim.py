"""Idle trim (``SandboxConfig.idle_trim``): an idle sandbox stops mapping the
pages of its backing image that its guest only read (RSS counted them once per
sandbox), keeps every page the guest wrote, and its guest sees no difference."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from pathlib import Path

from hlasync import CoreDump, Sandbox, SandboxConfig
from hlasync.kvm import Kvm
from hlasync.sandbox import trim

TRIM = 0.1


def mapping(sb: Sandbox) -> dict[str, int]:
    """/proc/self/smaps of the sandbox's guest memory, in KiB."""
    memory = sb._machine.memory
    assert memory is not None
    start = f"{memory.address:x}-"
    fields: dict[str, int] = {}
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            parts = line.split()
            if parts and "-" in parts[0] and not parts[0].endswith(":"):
                inside = parts[0].startswith(start)
            elif inside and parts[0].endswith(":") and len(parts) >= 2 and parts[1].isdigit():
                fields[parts[0][:-1]] = int(parts[1])
    assert fields, "the guest memory mapping is not in smaps"
    # The image's own pages (shared with every sandbox made from it, though
    # smaps calls them private while one mapping alone maps them); "Anonymous"
    # are the copies the guest's writes made.
    fields["Shared"] = fields["Rss"] - fields["Anonymous"]
    return fields


def wait_for(condition: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def test_an_idle_sandbox_gives_back_the_image_pages_it_only_read(
    kvm: Kvm, simpleguest: Path
) -> None:
    with Sandbox(simpleguest, SandboxConfig(idle_trim=TRIM, spin=0)) as sb:
        assert sb.call("increment") == 1
        assert sb.call("increment") == 2
        assert sb.call("echo", "kept") == "kept"
        size = sb._machine.layout.memory_size
        content = sb.read_memory(0, size)
        called = mapping(sb)
        assert called["Shared"] > 0  # image pages the guest read (and the host just did)
        assert wait_for(lambda: mapping(sb)["Shared"] == 0)
        trimmed = mapping(sb)
        assert trimmed["Rss"] == called["Rss"] - called["Shared"]
        assert trimmed["Anonymous"] == called["Anonymous"] > 0  # every write is kept
        # The guest sees the same memory: its counter goes on, and every byte reads the same.
        assert sb.read_memory(0, size) == content
        assert sb.call("increment") == 3
        assert sb.call("add", 2, 3) == 5


def test_idle_trim_none_keeps_the_mappings(kvm: Kvm, simpleguest: Path) -> None:
    with (
        Sandbox(simpleguest, SandboxConfig(idle_trim=None, spin=0)) as kept,
        Sandbox(simpleguest, SandboxConfig(idle_trim=TRIM, spin=0)) as trimmed,
    ):
        for sb in (kept, trimmed):
            assert sb.call("add", 1, 2) == 3
        shared = mapping(kept)["Shared"]
        assert wait_for(lambda: mapping(trimmed)["Shared"] == 0)
        time.sleep(3 * TRIM)
        assert mapping(kept)["Shared"] == shared > 0


def test_a_running_call_is_never_trimmed(kvm: Kvm, simpleguest: Path) -> None:
    """A call that outlasts idle_trim (in a host function) keeps its mappings;
    the sandbox is trimmed once the call has ended and idle_trim has passed."""
    seen: list[int] = []

    def slow(value: int) -> int:
        time.sleep(6 * TRIM)
        seen.append(mapping(sb)["Shared"])
        return value + 1

    with Sandbox(simpleguest, SandboxConfig(idle_trim=TRIM, spin=0)) as sb:
        sb.register_host_function("slow", slow)
        assert sb.call("add", 1, 1) == 2
        assert wait_for(lambda: mapping(sb)["Shared"] == 0)
        assert sb.call("call_host", "slow", 41) == 42
        assert seen and seen[0] > 0  # mid-call: the guest's pages were mapped again, and kept
        ended = time.monotonic()
        assert mapping(sb)["Shared"] > 0
        assert wait_for(lambda: mapping(sb)["Shared"] == 0)
        assert time.monotonic() - ended >= TRIM * 0.9
        assert sb.call("call_host", "slow", 1) == 2


def test_hot_sandboxes_are_trimmed_after_their_spin(kvm: Kvm, simpleguest: Path) -> None:
    with Sandbox(simpleguest, SandboxConfig(idle_trim=TRIM, spin=0.05)) as sb:
        for index in range(50):
            assert sb.call("add", index, 1) == index + 1
        assert wait_for(lambda: mapping(sb)["Shared"] == 0)
        assert sb.call("add", 5, 5) == 10


def test_snapshots_restores_and_dumps_after_a_trim(kvm: Kvm, simpleguest: Path) -> None:
    with Sandbox(simpleguest, SandboxConfig(idle_trim=TRIM, spin=0)) as sb:
        assert sb.call("increment") == 1
        one = sb.snapshot()
        assert sb.call("increment") == 2
        assert wait_for(lambda: mapping(sb)["Shared"] == 0)
        sb.restore(one)  # another image: mapped over, then trimmed again when idle
        assert wait_for(lambda: mapping(sb)["Shared"] == 0)
        assert sb.call("increment") == 2
        assert wait_for(lambda: mapping(sb)["Shared"] == 0)
        sb.restore(one)  # the same image: written pages copied back from its view
        assert sb.call("increment") == 2
        assert wait_for(lambda: mapping(sb)["Shared"] == 0)
        sb.restore()  # to the initial state
        assert sb.call("increment") == 1
        assert wait_for(lambda: mapping(sb)["Shared"] == 0)
        size = sb._machine.layout.memory_size
        with CoreDump.open(sb.generate_crashdump()) as dump:
            compared = 0
            for region in dump.regions:  # the guest's memory is identity-mapped
                if region.end <= size:
                    length = region.end - region.start
                    assert dump.read(region.start, length) == sb.read_memory(region.start, length)
                    compared += length
            assert compared > 0


def test_many_sandboxes_trimmed_while_others_are_called(kvm: Kvm, simpleguest: Path) -> None:
    """Trims and calls from several threads at once: every result is right and
    every idle sandbox ends up trimmed."""
    config = SandboxConfig(idle_trim=0.02, spin=0)
    sandboxes = [Sandbox(simpleguest, config) for _ in range(8)]
    errors: list[BaseException] = []

    def caller(sb: Sandbox) -> None:
        try:
            for index in range(200):
                assert sb.call("increment") == index + 1
                if index % 20 == 0:
                    time.sleep(0.05)  # idle long enough to be trimmed
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    try:
        threads = [threading.Thread(target=caller, args=(sb,)) for sb in sandboxes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not errors
        assert all(wait_for(lambda sb=sb: mapping(sb)["Shared"] == 0) for sb in sandboxes)
    finally:
        for sb in sandboxes:
            sb.close()


def test_closed_and_dropped_sandboxes_leave_the_trimmer(kvm: Kvm, simpleguest: Path) -> None:
    config = SandboxConfig(idle_trim=TRIM, spin=0)
    closed = Sandbox(simpleguest, config)
    assert closed.call("add", 1, 1) == 2
    closed.close()
    dropped = Sandbox(simpleguest, config)
    assert dropped.call("add", 1, 1) == 2
    gone = weakref.ref(dropped)
    del dropped
    gc.collect()
    assert gone() is None  # the trimmer keeps no sandbox alive
    assert wait_for(lambda: trim.pending() == 0)
