"""Dumps of real guests, opened by clients we did not write: gdb, lldb,
readelf, elfutils and pyelftools."""

from __future__ import annotations

import os
import re
import shutil
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import anyio
import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.segments import NoteSegment

from hlasync import (
    CoreDump,
    GuestAborted,
    GuestCrashed,
    GuestImage,
    GuestProtocolError,
    GuestTimeout,
    Sandbox,
    SandboxConfig,
    SandboxState,
    abi,
)
from hlasync.crashdump._format import REASON_SIGNALS, VECTOR_SIGNALS
from hlasync.kvm import Kvm
from hlasync.supervisor import Supervisor
from tests.conftest import require_tool

SENTINEL = "hlasync sentinel 0xC0FFEE"
#: How long any debugger may take on one small core before the test calls it hung.
TOOL_TIMEOUT = 60
#: Signals whose default action dumps core (signal(7)): what real core files carry.
CORE_SIGNALS = {
    signal.SIGQUIT,
    signal.SIGILL,
    signal.SIGTRAP,
    signal.SIGABRT,
    signal.SIGBUS,
    signal.SIGFPE,
    signal.SIGSEGV,
    signal.SIGSYS,
    signal.SIGXCPU,
    signal.SIGXFSZ,
}


@pytest.fixture
def sb(kvm: Kvm, simpleguest: Path) -> Iterator[Sandbox]:
    with Sandbox(simpleguest) as sandbox:
        yield sandbox


def _run(command: list[str], *, expect_success: bool = False) -> str:
    """What ``command`` prints; a tool that hangs fails the test instead of wedging it."""
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{Path(command[0]).name} did not finish within {TOOL_TIMEOUT} s: {command}")
    output = result.stdout + result.stderr
    if expect_success:
        assert result.returncode == 0, f"{command} exited {result.returncode}:\n{output}"
    return output


def _lldb(guest: Path, core: Path, *commands: str) -> str:
    arguments = [argument for command in commands for argument in ("-o", command)]
    return _run([require_tool("lldb"), "--batch", "-c", str(core), str(guest), *arguments])


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
    require_tool("lldb")
    core, crash = _fault_dump(sb)
    out = _lldb(simpleguest, core, "bt", "register read rip")
    assert "stop reason = signal SIGFPE" in out
    assert re.search(rf"frame #0: 0x0*{crash.rip:x} \S+`divide_by_zero", out)
    assert re.search(rf"rip = 0x0*{crash.rip:x}\s+\S+`divide_by_zero", out)
    sb.restore()
    spin_core = _spin_dump(sb)
    out = _lldb(simpleguest, spin_core, "bt")
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


# ------------------------------------------------------------ every kind of dump
class KindOfDump(NamedTuple):
    core: Path
    guest: Path
    function: str  # the guest function its backtrace must show


KINDS = ["fault", "abort", "timeout", "cpu-timeout", "on-demand", "protocol-error"]


@pytest.fixture(scope="module")
def every_kind(
    kvm: Kvm, simpleguest: Path, hostile_guest: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, KindOfDump]:
    """One dump of each kind, made the way users meet them."""
    config = SandboxConfig(crashdump_dir=str(tmp_path_factory.mktemp("every-kind")))
    made: dict[str, tuple[Path | None, Path, str]] = {}
    with Sandbox(simpleguest, config) as sandbox:
        with pytest.raises(GuestCrashed) as crashed:
            sandbox.call("divide_by_zero")
        made["fault"] = (crashed.value.core_path, simpleguest, "divide_by_zero")
        sandbox.restore()
        with pytest.raises(GuestAborted) as aborted:
            sandbox.call("abort_guest", 3, "giving up")
        made["abort"] = (aborted.value.core_path, simpleguest, "abort_guest")
        sandbox.restore()
        made["on-demand"] = (_spin_dump(sandbox), simpleguest, "spin")
    with Sandbox(hostile_guest, config) as sandbox, pytest.raises(GuestProtocolError) as broke:
        sandbox.call("bad_result_frame")
    made["protocol-error"] = (broke.value.core_path, hostile_guest, "bad_result_frame")

    async def watchdogs() -> None:
        # The wall-clock one in this process, the CPU-time one in a worker process.
        watched = (("timeout", "timeout", 0), ("cpu-timeout", "cpu_timeout", 1))
        for kind, limit, processes in watched:
            async with Supervisor(processes=processes) as sup:
                pool = await sup.create_pool(simpleguest, size=1, config=config)
                with pytest.raises(GuestTimeout) as timed_out:
                    await pool.call("spin", **{limit: 0.2})
                made[kind] = (timed_out.value.core_path, simpleguest, "spin")

    anyio.run(watchdogs)
    dumps = {}
    for kind, (core, guest, function) in made.items():
        assert core is not None, kind
        with CoreDump.open(core) as dump:
            assert dump.metadata["reason"] == kind
        dumps[kind] = KindOfDump(core, guest, function)
    assert sorted(dumps) == sorted(KINDS)
    return dumps


def test_every_reason_and_vector_maps_to_a_core_dumping_signal() -> None:
    chosen = {**REASON_SIGNALS, **{f"vector {v}": s for v, s in VECTOR_SIGNALS.items()}}
    assert {name: signo for name, (signo, _) in chosen.items() if signo not in CORE_SIGNALS} == {}


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_carries_a_signal_real_cores_carry(
    every_kind: dict[str, KindOfDump], kind: str
) -> None:
    with CoreDump.open(every_kind[kind].core) as dump:
        assert dump.signal in CORE_SIGNALS, signal.Signals(dump.signal).name


@pytest.mark.parametrize("kind", KINDS)
def test_lldb_opens_every_kind(every_kind: dict[str, KindOfDump], kind: str) -> None:
    require_tool("lldb")
    dump = every_kind[kind]
    with CoreDump.open(dump.core) as core:
        signo, rip = core.signal, core.registers["rip"]
    out = _lldb(dump.guest, dump.core, "bt", "register read rip")
    assert f"stop reason = signal {signal.Signals(signo).name}" in out
    assert re.search(rf"frame #0: 0x0*{rip:x} ", out), out
    assert re.search(rf"frame #\d+: 0x[0-9a-f]+ \S+`{dump.function}\b", out), out
    assert re.search(rf"rip = 0x0*{rip:x}\b", out), out


@pytest.mark.parametrize("kind", KINDS)
def test_elfutils_read_every_kind(every_kind: dict[str, KindOfDump], kind: str) -> None:
    dump = every_kind[kind]
    notes = _run([require_tool("eu-readelf"), "-n", str(dump.core)], expect_success=True)
    for name in ("PRSTATUS", "PRPSINFO", "SIGINFO", "AUXV", "FILE", "FPREGSET", "X86_XSTATE"):
        assert re.search(rf"^\s+(CORE|LINUX)\s+\d+\s+{name}$", notes, re.M), name
    assert re.search(r"^\s+HLASYNC\s+\d+\s", notes, re.M)
    stack = _run(
        [require_tool("eu-stack"), "--core", str(dump.core), "-e", str(dump.guest)],
        expect_success=True,  # it exits 1 when it cannot unwind to the outermost frame
    )
    frames = re.findall(r"^#\d+\s+0x[0-9a-f]+\s+(\w+)", stack, re.M)
    assert dump.function in frames, stack
    assert frames[-1] == "_hl_start", stack


def test_lldb_reads_mxcsr_from_the_xsave_state(sb: Sandbox, simpleguest: Path) -> None:
    require_tool("lldb")
    assert sb.call("add_float", 1.5, 2.25) == 3.75
    core = sb.generate_crashdump()
    with open(core, "rb") as f:
        xstate = next(
            note["n_desc"]
            for segment in ELFFile(f).iter_segments()
            if isinstance(segment, NoteSegment)
            for note in segment.iter_notes()
            if note["n_name"] == "LINUX"  # the one LINUX note: NT_X86_XSTATE
        )
    mxcsr, mxcsr_mask = struct.unpack_from("<II", xstate, 24)  # the legacy area's fields
    assert mxcsr == 0x1F80  # the power-on default: all exceptions masked
    out = _lldb(simpleguest, core, "register read mxcsr mxcsrmask")
    assert re.search(rf"\bmxcsr = 0x0*{mxcsr:x}\b", out), out
    assert re.search(rf"\bmxcsrmask = 0x0*{mxcsr_mask:x}\b", out), out


# --------------------------------------------------------------------- build-id
def test_the_dump_carries_the_guest_build_id_in_memory(sb: Sandbox, simpleguest: Path) -> None:
    build_id = GuestImage.load(simpleguest).build_id
    assert build_id is not None
    core, _ = _fault_dump(sb)
    with CoreDump.open(core) as dump:
        assert dump.build_id == build_id
    # elfutils finds the module and its build-id in the dumped guest memory.
    modules = _run([require_tool("eu-unstrip"), "-n", "--core", str(core)], expect_success=True)
    assert re.search(rf"^0x100000\+0x[0-9a-f]+ {build_id}@0x[0-9a-f]+ ", modules, re.M), modules


def test_gdb_finds_the_guest_by_build_id(sb: Sandbox, simpleguest: Path, tmp_path: Path) -> None:
    build_id = GuestImage.load(simpleguest).build_id
    assert build_id is not None
    core, _ = _fault_dump(sb)
    index = tmp_path / "debug" / ".build-id" / build_id[:2]
    index.mkdir(parents=True)
    (index / build_id[2:]).symlink_to(simpleguest)
    out = _run(
        [
            require_tool("gdb"),
            "-nx",
            "-batch",
            "-iex",
            f"set debug-file-directory {tmp_path / 'debug'}",
            "-ex",
            "bt",
            "-c",
            str(core),
        ]
    )
    frames = re.findall(r"^#\d+\s+(?:0x[0-9a-f]+ in )?(\w+) \(", out, re.M)
    assert frames and frames[0] == "divide_by_zero", out  # no ELF given: found by build-id


def test_gdb_tells_a_renamed_copy_from_a_rebuild(
    sb: Sandbox, simpleguest: Path, rebuilt_simpleguest: Path, tmp_path: Path
) -> None:
    require_tool("gdb")
    core, _ = _fault_dump(sb)
    copy = tmp_path / "renamed.elf"
    shutil.copy2(simpleguest, copy)
    assert "may not match" not in _gdb(copy, core, "bt")  # the build-ids agree
    other = tmp_path / "other.elf"
    shutil.copy2(rebuilt_simpleguest, other)
    os.utime(other, (0, 0))  # older than the dump: only the build-id can tell
    assert "core file may not match specified executable file" in _gdb(other, core, "bt")
