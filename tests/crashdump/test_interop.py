"""Dumps of real guests, opened by clients we did not write: gdb, lldb,
readelf and pyelftools."""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from hlasync import GuestAborted, GuestCrashed, Sandbox, SandboxState, abi
from hlasync.kvm import Kvm
from tests.conftest import require_tool

SENTINEL = "hlasync sentinel 0xC0FFEE"


@pytest.fixture
def sb(kvm: Kvm, simpleguest: Path) -> Iterator[Sandbox]:
    with Sandbox(simpleguest) as sandbox:
        yield sandbox


def _run(command: list[str]) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    return result.stdout + result.stderr


def _gdb(guest: Path, core: Path, *commands: str) -> str:
    """``gdb -nx -batch -ex CMD ... GUEST CORE``: what gdb prints."""
    arguments = [argument for command in commands for argument in ("-ex", command)]
    return _run([require_tool("gdb"), "-nx", "-batch", *arguments, str(guest), str(core)])


def _fault_dump(sb: Sandbox) -> tuple[Path, GuestCrashed]:
    with pytest.raises(GuestCrashed) as info:
        sb.call("divide_by_zero")
    assert info.value.core_path is not None and info.value.core_path.is_file()
    return info.value.core_path, info.value


def _spin_dump(sb: Sandbox) -> Path:
    """A dump of spin() taken while the call runs on another thread."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            sb.call("spin")
        except BaseException as exc:  # noqa: BLE001 - inspected below
            errors.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 5
    while sb.state is not SandboxState.RUNNING and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(0.02)
    path = sb.generate_crashdump()
    assert sb.state is SandboxState.RUNNING  # the call goes on after the dump
    sb.interrupt()
    worker.join()
    assert len(errors) == 1
    sb.restore()
    return path


def test_gdb_shows_fault_backtrace_rip_and_auxv(sb: Sandbox, simpleguest: Path) -> None:
    require_tool("gdb")
    core, crash = _fault_dump(sb)
    out = _gdb(simpleguest, core, "bt", "info registers rip", "info auxv")
    assert "Program terminated with signal SIGFPE" in out
    frames = re.findall(r"^#\d+\s+(?:0x[0-9a-f]+ in )?(\w+) \(", out, re.M)
    assert frames[0] == "divide_by_zero"
    assert "hl_main" in frames or "dispatch" in frames  # its caller
    assert re.search(rf"^rip\s+{crash.rip:#x}\s", out, re.M)
    entry = sb.image.entry
    assert re.search(rf"AT_ENTRY\s+Entry point of program\s+{entry:#x}", out)
    assert re.search(r"AT_PHDR\s+Program headers for program\s+0x100040", out)
    assert "warning" not in out.lower()


def test_gdb_reads_the_sentinel_from_guest_memory(sb: Sandbox, simpleguest: Path) -> None:
    require_tool("gdb")
    sb.call("write_sentinel", SENTINEL)
    core = sb.generate_crashdump()
    out = _gdb(simpleguest, core, "bt", f"x/s {abi.SCRATCH_ADDR:#x}")
    assert f'"{SENTINEL}"' in out
    assert "hl_main" in out  # idle at the dispatcher


def test_gdb_backtrace_of_a_running_call(sb: Sandbox, simpleguest: Path) -> None:
    require_tool("gdb")
    core = _spin_dump(sb)
    out = _gdb(simpleguest, core, "bt", "info registers rip")
    frames = re.findall(r"^#\d+\s+(?:0x[0-9a-f]+ in )?(\w+) \(", out, re.M)
    assert frames[0] == "spin"
    assert "hl_main" in frames or "dispatch" in frames
    assert "<spin+" in out


def test_lldb_shows_the_same_function_and_rip(sb: Sandbox, simpleguest: Path) -> None:
    lldb = require_tool("lldb")
    core, crash = _fault_dump(sb)
    out = _run(
        [lldb, "--batch", "-c", str(core), str(simpleguest), "-o", "bt", "-o", "register read rip"]
    )
    assert "stop reason = signal SIGFPE" in out
    assert re.search(rf"frame #0: 0x0*{crash.rip:x} \S+`divide_by_zero", out)
    assert re.search(rf"rip = 0x0*{crash.rip:x}\s+\S+`divide_by_zero", out)
    sb.restore()
    spin_core = _spin_dump(sb)
    out = _run([lldb, "--batch", "-c", str(spin_core), str(simpleguest), "-o", "bt"])
    assert re.search(r"frame #0: 0x[0-9a-f]+ \S+`spin", out)


def test_readelf_lists_the_notes_and_segments(sb: Sandbox) -> None:
    readelf = require_tool("readelf")
    core, _ = _fault_dump(sb)
    notes = _run([readelf, "-n", str(core)])
    for name in (
        "NT_PRSTATUS",
        "NT_PRPSINFO",
        "NT_SIGINFO",
        "NT_AUXV",
        "NT_FILE",
        "NT_FPREGSET",
        "NT_X86_XSTATE",
    ):
        assert name in notes, name
    assert "HLASYNC" in notes
    header = _run([readelf, "-h", "-l", str(core)])
    assert "CORE (Core file)" in header and "X86-64" in header
    assert header.count("LOAD") == len(sb.layout.regions)
    assert "NOTE" in header


def test_pyelftools_reads_every_segment_back_identical(sb: Sandbox) -> None:
    sb.call("write_sentinel", SENTINEL)
    sb.call("echo_bytes", bytes(range(256)) * 64)
    core, _ = _fault_dump(sb)
    with open(core, "rb") as f:
        elf = ELFFile(f)
        assert elf.header["e_type"] == "ET_CORE"
        loads = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        assert len(loads) == len(sb.layout.regions)
        for segment, region in zip(loads, sb.layout.regions, strict=True):
            assert segment["p_vaddr"] == region.start
            assert segment.data() == sb.read_memory(region.start, region.size), region.name
            writable = bool(segment["p_flags"] & 2)
            assert writable == bool(region.flags & 2)


@pytest.mark.parametrize(
    ("function", "args", "signo"),
    [
        ("divide_by_zero", (), signal.SIGFPE),
        ("undefined_instruction", (), signal.SIGILL),
        ("null_pointer_write", (), signal.SIGSEGV),
        ("privileged_instruction", (), signal.SIGSEGV),
        ("abort_guest", (3, "giving up"), signal.SIGABRT),
    ],
)
def test_signal_matches_the_cause(
    sb: Sandbox, simpleguest: Path, function: str, args: tuple[object, ...], signo: int
) -> None:
    require_tool("gdb")
    with pytest.raises((GuestCrashed, GuestAborted)) as info:
        sb.call(function, *args)  # type: ignore[arg-type]
    core = info.value.core_path
    assert core is not None
    out = _gdb(simpleguest, core, "bt")
    assert f"Program terminated with signal {signal.Signals(signo).name}" in out
    assert re.search(rf"\b{function}\b", out)
