"""Hostile guests: every misbehaviour ends in a precise error, with a dump, and
the same sandbox works again after restore(); the host is unharmed."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from hlasync import (
    CoreDump,
    GuestAborted,
    GuestCrashed,
    GuestProtocolError,
    HlasyncError,
    HostFunctionError,
    Sandbox,
    SandboxBusy,
    SandboxConfig,
    SandboxState,
    abi,
)
from hlasync.guest import layout
from hlasync.kvm import Kvm
from hlasync.sandbox import trim

# (index in tests/guests/hostile.c `instruction`, name, expected vector)
INSTRUCTIONS = [
    (0, "hlt", 13),
    (1, "rdmsr", 13),
    (2, "wrmsr", 13),
    (3, "lgdt", 13),
    (4, "lidt", 13),
    (5, "mov cr3", 13),
    (6, "int 0x80", 6),  # PVM reports #UD; bare metal: #GP (gate DPL 0)
    (7, "syscall", 14),
    (8, "sysenter", 6),
    (9, "int3", 3),
    (10, "in from port 0x60", 13),
    (11, "out to port 0x80", 13),
    (12, "cli", 13),
    (13, "invlpg", 13),
    (14, "wbinvd", 13),
    (17, "vmcall", 13),
    (18, "ud2", 6),
    (19, "read cr0", 13),
    (20, "swapgs", 13),
    (21, "iretq", 13),
    (22, "write the page tables", 14),
    (23, "read the GDT", 14),
    (24, "write its own code", 14),
    (25, "read beyond guest memory", 14),
    (26, "write the PEB", 14),
    (27, "jump into the exception stubs", 14),
    (28, "read the top of the address space", 14),
    (29, "use a non-canonical address", 13),
]


@pytest.fixture
def hostile(kvm: Kvm, hostile_guest: Path) -> Iterator[Sandbox]:
    with Sandbox(hostile_guest, output=lambda text: None) as sb:
        yield sb


def _works(sb: Sandbox) -> None:
    sb.restore()
    assert sb.state is SandboxState.READY
    assert sb.call("instruction", 15) == 15  # cpuid is allowed: the guest runs again


@pytest.mark.parametrize(
    ("which", "what", "vector"), INSTRUCTIONS, ids=[i[1] for i in INSTRUCTIONS]
)
def test_forbidden_operations_fault_precisely(
    hostile: Sandbox, which: int, what: str, vector: int
) -> None:
    with pytest.raises(GuestCrashed) as info:
        hostile.call("instruction", which)
    crash = info.value
    assert crash.vector == vector, (what, crash)
    assert crash.sandbox_id == hostile.id and crash.function == "instruction"
    if which != 27:  # a jump into the stubs faults at the stubs, not in guest code
        assert crash.symbol is not None and crash.symbol.startswith("instruction"), what
    assert crash.core_path is not None and crash.core_path.is_file()
    with CoreDump.open(crash.core_path) as dump:
        assert dump.registers["rip"] == crash.rip
        assert dump.metadata["vector"] == vector
    _works(hostile)


def test_supervisor_pages_are_not_guest_accessible(hostile: Sandbox) -> None:
    for address in (
        layout.PML4,
        layout.GDT,
        layout.IDT,
        layout.STUBS,
        layout.KERNEL_STACK_BASE,
        layout.PAGE_TABLES,
    ):
        with pytest.raises(GuestCrashed) as info:
            hostile.call("peek", address)
        assert info.value.vector == 14 and info.value.cr2 == address
        assert info.value.error_code is not None and info.value.error_code & 0x1  # present
        hostile.restore()
    # The guest's own data is fine.
    hostile.call("poke", abi.SCRATCH_ADDR, 42)
    assert hostile.call("peek", abi.SCRATCH_ADDR) == 42


def test_garbage_frames_are_protocol_errors(hostile: Sandbox) -> None:
    for function, message in [
        ("bad_result_frame", "bad result frame"),
        ("bad_host_call", "bad host-call frame"),
        ("bad_print_frame", "bad print frame"),
        ("in_port", "unexpected vCPU exit"),
    ]:
        with pytest.raises(GuestProtocolError, match=message) as info:
            hostile.call(function)
        assert info.value.core_path is not None and info.value.function == function
        _works(hostile)
    with pytest.raises(GuestProtocolError, match="bad abort frame"):
        hostile.call("bad_abort_frame")
    _works(hostile)


def test_print_flood_is_delivered_and_bounded(kvm: Kvm, hostile_guest: Path) -> None:
    received = [0]

    def count(text: str) -> None:
        received[0] += len(text)

    with Sandbox(hostile_guest, output=count) as sb:
        assert sb.call("flood_print", 20_000) == 20_000
    assert received[0] == 20_000 * len("flood flood flood flood flood flood flood\n")


def test_unbounded_recursion_through_host_calls(hostile: Sandbox) -> None:
    calls: list[int] = []

    def again(depth: int) -> int:
        calls.append(depth)
        return depth

    hostile.register_host_function("again", again)
    with pytest.raises(GuestCrashed) as info:
        hostile.call("host_recursion", 0)
    assert info.value.vector == 14  # the guard page below the stack
    assert len(calls) > 100 and calls == list(range(len(calls)))
    _works(hostile)


def test_reentering_the_sandbox_from_a_host_call_is_refused(hostile: Sandbox) -> None:
    hostile.register_host_function("again", lambda depth: hostile.call("instruction", 15))
    with pytest.raises(HostFunctionError) as info:
        hostile.call("host_recursion", 0)
    assert isinstance(info.value.__cause__, SandboxBusy)
    assert hostile.state is SandboxState.READY  # unwound to its dispatcher, still usable
    assert hostile.call("instruction", 15) == 15


def _threads() -> set[threading.Thread]:
    """The live threads, less the process-wide ``hlasync-trim`` thread: that one
    comes and goes with idle sandboxes anywhere in the process (another test's
    sandbox trimmed meanwhile ended it in a CI run), not with this test's."""
    return {t for t in threading.enumerate() if t.name != "hlasync-trim"}


def test_poking_everywhere_never_reaches_the_host(kvm: Kvm, hostile_guest: Path) -> None:
    process = psutil.Process()
    # A thread of someone else's that ends while the test runs, as an idle
    # worker of trio's thread cache (from an earlier test) did in a CI run.
    release = threading.Event()
    theirs = threading.Thread(target=release.wait, name="not-this-test's", daemon=True)
    theirs.start()
    threads = _threads()
    # An idle sandbox trimmed while the test runs: the trim thread is alive now
    # and gone at the end, as when another test's sandbox went idle in a CI run.
    idle = Sandbox(hostile_guest, config=SandboxConfig(idle_trim=0.05))
    idle.call("instruction", 15)
    trims = trim.trims()
    assert "hlasync-trim" in {t.name for t in threading.enumerate()}
    with idle, Sandbox(hostile_guest) as a, Sandbox(hostile_guest) as b:
        b.call("poke", abi.SCRATCH_ADDR, 0x5EC2E7)
        for address in range(0, a.layout.memory_size + (64 << 20), 0x7FFF8):
            try:
                a.call("poke", address, -1)
            except GuestCrashed as exc:
                assert exc.vector in (13, 14)
                a.restore()
            except HlasyncError as exc:  # pragma: no cover - reported with its type
                raise AssertionError(f"unexpected {type(exc).__name__} at {address:#x}") from exc
        assert b.call("peek", abi.SCRATCH_ADDR) == 0x5EC2E7  # b never saw a's writes
        a.restore()
        assert a.call("peek", abi.SCRATCH_ADDR) == 0
        assert trim.trims() > trims  # the idle one was trimmed meanwhile
        assert idle.call("instruction", 15) == 15
        release.set()
        theirs.join()
    # Nothing of the sandboxes' own outlived them: no thread started since the
    # test began is still alive (threads that were there before may have ended).
    assert _threads() - threads == set()
    assert process.status() != psutil.STATUS_ZOMBIE


def test_abort_with_a_huge_message_is_clean(kvm: Kvm, simpleguest: Path) -> None:
    with Sandbox(simpleguest) as sb:
        with pytest.raises(GuestAborted) as info:
            sb.call("abort_guest", -1, "x" * 200_000)
        assert len(info.value.guest_message) <= sb.layout.output_size
        sb.restore()
        assert sb.call("add", 1, 1) == 2
