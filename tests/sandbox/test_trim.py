"""Idle trim (``SandboxConfig.idle_trim``): an idle sandbox stops mapping the
pages of its backing image that its guest only read (RSS counted them once per
sandbox), keeps every page the guest wrote, and its guest sees no difference."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from pathlib import Path

import pytest

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


def test_a_host_write_during_a_trim_is_kept(kvm: Kvm, simpleguest: Path) -> None:
    """A host write into guest memory (``_write_memory``: the JavaScript stack
    capture uses it) waits for a trim that holds the sandbox: before, a write
    between the trim's look at the pages and its discard was lost."""
    mib = 1 << 20
    config = SandboxConfig(idle_trim=0.05, spin=0, memory_size=64 * mib)
    with Sandbox(simpleguest, config) as sb:
        size = sb.layout.memory_size
        low = 16 * mib  # far above the image: the guest never touches it
        written = 0
        for attempt in range(3):
            assert sb.call("add", 1, 2) == 3  # a holder leaves: the trim is noted
            sb.read_memory(low, size - low)  # every page of [low, size) mapped from the image
            deadline = time.monotonic() + 5
            while sb._holder is None and time.monotonic() < deadline:
                pass  # the trim is short: poll without sleeping
            assert sb._holder is not None  # the trim began
            marker = bytes([attempt + 1]) * 8
            addresses: list[int] = []
            while sb._holder is not None and low + len(addresses) * 4096 < size:
                address = low + len(addresses) * 4096
                sb._write_memory(address, marker)
                addresses.append(address)
            written += len(addresses)
            lost = [a for a in addresses if sb.read_memory(a, 8) != marker]
            assert lost == [], f"{len(lost)} of {len(addresses)} writes lost"
        assert written > 0


def test_no_thread_for_the_trim_leaves_calls_and_close_working(
    kvm: Kvm, simpleguest: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where no thread can be started (a thread limit, interpreter exit), a call
    still returns its result and close() works; the sandbox is not trimmed."""
    trim.settle(5.0)
    assert "hlasync-trim" not in [t.name for t in threading.enumerate()]
    started = threading.Thread.start

    def refuse(thread: threading.Thread) -> None:
        if thread.name == "hlasync-trim":
            raise RuntimeError("can't start new thread")
        started(thread)

    monkeypatch.setattr(threading.Thread, "start", refuse)
    sb = Sandbox(simpleguest, SandboxConfig(idle_trim=TRIM, spin=0))
    assert sb.call("add", 1, 2) == 3
    assert "no idle trim" in caplog.text
    assert sb.call("add", 2, 2) == 4
    sb.close()
    monkeypatch.undo()
    with Sandbox(simpleguest, SandboxConfig(idle_trim=TRIM, spin=0)) as again:
        assert again.call("add", 1, 1) == 2
        assert wait_for(lambda: mapping(again)["Shared"] == 0)  # trimming works again


def test_a_dropped_sandbox_does_not_keep_the_trim_thread(kvm: Kvm, simpleguest: Path) -> None:
    dropped = Sandbox(simpleguest, SandboxConfig(idle_trim=3600, spin=0))
    assert dropped.call("add", 1, 1) == 2
    del dropped
    gc.collect()
    with Sandbox(simpleguest, SandboxConfig(spin=0)) as other:
        assert other.call("add", 1, 1) == 2
    # other's close settled the thread: the dropped sandbox's due time (an hour) is not waited for
    assert trim.pending() == 0
    assert "hlasync-trim" not in [t.name for t in threading.enumerate()]


def test_closed_sandboxes_do_not_pile_up_in_the_trimmer(kvm: Kvm, simpleguest: Path) -> None:
    config = SandboxConfig(idle_trim=3600, spin=0)
    with Sandbox(simpleguest, config) as kept:
        assert kept.call("add", 1, 1) == 2
        for _ in range(150):
            with Sandbox(simpleguest, config) as sb:
                assert sb.call("add", 1, 1) == 2
        assert trim.pending() == 1
        assert len(trim._trimmer._due) <= 2 * 1 + 64 + 1
