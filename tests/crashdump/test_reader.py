"""Reading dumps back with hlasync.crashdump.CoreDump and the CLI."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hlasync import (
    CoreDump,
    GuestAborted,
    GuestCrashed,
    GuestImage,
    GuestImageError,
    InvalidCoreDump,
    Sandbox,
    SandboxConfig,
    abi,
)
from hlasync.kvm import Kvm
from tests.conftest import fuzz_examples, run_cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fault_core(tmp_path_factory: pytest.TempPathFactory, kvm: Kvm, simpleguest: Path) -> Path:
    directory = tmp_path_factory.mktemp("reader")
    with Sandbox(simpleguest, SandboxConfig(crashdump_dir=str(directory))) as sb:
        sb.call("write_sentinel", "read me back")
        with contextlib.suppress(GuestCrashed):
            sb.call("divide_by_zero")
        return sb.generate_crashdump(directory)


def test_registers_metadata_and_memory(kvm: Kvm, simpleguest: Path) -> None:
    with Sandbox(simpleguest) as sb:
        sb.call("write_sentinel", "read me back")
        with pytest.raises(GuestCrashed) as info:
            sb.call("null_pointer_write")
        assert info.value.core_path is not None
        with CoreDump.open(info.value.core_path) as dump:
            assert dump.registers["rip"] == info.value.rip
            assert dump.registers["cs"] == 0x1B  # the faulting user context, not the stub's
            assert dump.signal == 11
            meta = dump.metadata
            assert meta["sandbox_id"] == sb.id
            assert meta["reason"] == "fault"
            assert meta["function"] == "null_pointer_write"
            assert meta["vector"] == 14 and meta["vector_name"] == "#PF"
            assert meta["cr2"] == 0 and meta["error_code"] == 6
            assert meta["special_registers"]["cr3"] == 0x1000
            assert dump.guest_path == simpleguest.resolve()
            assert dump.read_string(abi.SCRATCH_ADDR) == "read me back"
            region = dump.region_at(sb.layout.stack_base)
            assert region is not None and region.permissions == "rw-"
            assert dump.read(sb.layout.input_addr, 4096) == sb.read_memory(
                sb.layout.input_addr, 4096
            )
            with pytest.raises(ValueError):
                dump.read(0x0, 8)  # the null page is never mapped
            frames = dump.backtrace()
            assert frames[0].symbol is not None and frames[0].symbol.startswith(
                "null_pointer_write"
            )
            assert any(f.symbol and f.symbol.startswith("hl_main") for f in frames[1:])


def test_abort_metadata(kvm: Kvm, simpleguest: Path) -> None:
    with Sandbox(simpleguest) as sb, pytest.raises(GuestAborted) as info:
        sb.call("abort_guest", 99, "out of cheese")
    assert info.value.core_path is not None
    with CoreDump.open(info.value.core_path) as dump:
        assert dump.metadata["abort_code"] == 99
        assert dump.metadata["abort_message"] == "out of cheese"
        symbols = [f.symbol or "" for f in dump.backtrace()]
        assert symbols[0].startswith("hl_abort")
        assert any(s.startswith("abort_guest") for s in symbols)


def test_report_and_json(fault_core: Path) -> None:
    with CoreDump.open(fault_core) as dump:
        text = dump.report()
        summary = dump.summary()
    assert "reason:   on-demand" in text and "divide_by_zero" in text
    assert summary["metadata"]["reason"] == "on-demand"
    assert summary["backtrace"][0]["symbol"].startswith("divide_by_zero")


def test_cli_show_and_list(fault_core: Path) -> None:
    shown = run_cli("dump", "show", str(fault_core))
    assert shown.returncode == 0, shown.stderr
    assert "divide_by_zero" in shown.stdout and "backtrace:" in shown.stdout
    as_json = run_cli("dump", "show", "--json", str(fault_core))
    assert json.loads(as_json.stdout)["metadata"]["function"] is None  # dumped while idle
    listed = run_cli("dump", "list", str(fault_core.parent))
    assert str(fault_core) in listed.stdout and "on-demand" in listed.stdout
    bad = run_cli("dump", "show", str(ROOT / "README.md"))
    assert bad.returncode == 1 and "InvalidCoreDump" in bad.stderr


def test_truncated_and_foreign_files_are_clear_errors(fault_core: Path, tmp_path: Path) -> None:
    data = fault_core.read_bytes()
    for cut in (0, 10, 64, 500, 2000, len(data) // 2):
        broken = tmp_path / f"cut{cut}.elf"
        broken.write_bytes(data[:cut])
        with pytest.raises(InvalidCoreDump):
            CoreDump.open(broken)
    with pytest.raises(InvalidCoreDump, match="not an x86-64 ELF core"):
        CoreDump.open(sys.executable)
    with pytest.raises(InvalidCoreDump, match="cannot open"):
        CoreDump.open(tmp_path / "missing.elf")
    noise = tmp_path / "noise.elf"
    noise.write_bytes(random.Random(5).randbytes(5000))
    with pytest.raises(InvalidCoreDump):
        CoreDump.open(noise)


@settings(
    max_examples=fuzz_examples(100),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.data())
def test_mutated_dumps_only_raise_invalid_core_dump(
    fault_core: Path, tmp_path: Path, data: st.DataObject
) -> None:
    blob = bytearray(fault_core.read_bytes()[:0x4000])  # headers and notes
    for _ in range(data.draw(st.integers(1, 6))):
        blob[data.draw(st.integers(0, 0x2000))] = data.draw(st.integers(0, 255))
    path = tmp_path / "mutant.elf"
    path.write_bytes(bytes(blob))
    os.truncate(path, fault_core.stat().st_size)  # guest memory reads as zero holes
    try:
        with CoreDump.open(path) as dump:
            dump.report()
    except InvalidCoreDump:
        pass
    except GuestImageError as exc:
        # A mutated build-id names another build of the guest: refused with the
        # same hint as a guest rebuilt since the dump.
        assert "not the guest this dump was taken from" in str(exc)


def test_dump_of_a_guest_blocked_in_a_host_function(kvm: Kvm, simpleguest: Path) -> None:
    import threading

    entered, release = threading.Event(), threading.Event()

    def slow(x: int) -> int:
        entered.set()
        release.wait(10)
        return x + 1

    with Sandbox(simpleguest) as sb:
        sb.register_host_function("slow", slow)
        result: list[object] = []
        worker = threading.Thread(target=lambda: result.append(sb.call("call_host", "slow", 41)))
        worker.start()
        assert entered.wait(10)
        path = sb.generate_crashdump()
        release.set()
        worker.join(10)
        assert result == [42]  # the call finished normally after the dump
    with CoreDump.open(path) as dump:
        assert dump.metadata["function"] == "call_host"
        symbols = [frame.symbol or "" for frame in dump.backtrace()]
    assert symbols[0].startswith("hl_call_host_v")  # stopped at its `out` to the host
    # call_host() tail-calls hl_call_host_int(), which is what the stack holds.
    assert symbols[1].startswith("hl_call_host_int")


def _dump_of_a_copy(simpleguest: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(guest, core): a fault dump of a copy of simpleguest that the test may change."""
    guest = tmp_path / "guest" / "simpleguest.elf"
    guest.parent.mkdir()
    shutil.copy2(simpleguest, guest)
    with Sandbox(guest) as sb, pytest.raises(GuestCrashed) as info:
        sb.call("divide_by_zero")
    assert info.value.core_path is not None
    return guest, info.value.core_path


def test_a_rebuilt_guest_is_refused_with_a_hint(
    kvm: Kvm, simpleguest: Path, rebuilt_simpleguest: Path, tmp_path: Path
) -> None:
    guest, core = _dump_of_a_copy(simpleguest, tmp_path)
    kept = tmp_path / "kept.elf"
    shutil.copy2(guest, kept)
    shutil.copy2(rebuilt_simpleguest, guest)  # rebuilt in place after the dump
    with CoreDump.open(core) as dump:
        assert dump.build_id == GuestImage.load(kept).build_id
        with pytest.raises(GuestImageError, match=r"build-id .* --guest PATH") as info:
            dump.backtrace()
        assert info.value.path == guest
        with pytest.raises(GuestImageError, match="not the guest this dump was taken from"):
            dump.report(guest=rebuilt_simpleguest)
        assert (dump.backtrace(guest=kept)[0].symbol or "").startswith("divide_by_zero")
    refused = run_cli("dump", "show", str(core))
    assert refused.returncode == 1 and refused.stdout == ""
    assert "not the guest this dump was taken from" in refused.stderr
    assert "--guest PATH" in refused.stderr
    shown = run_cli("dump", "show", "--guest", str(kept), str(core))
    assert shown.returncode == 0, shown.stderr
    assert "divide_by_zero" in shown.stdout


def test_a_missing_guest_still_gives_a_report_without_symbols(
    kvm: Kvm, simpleguest: Path, tmp_path: Path
) -> None:
    guest, core = _dump_of_a_copy(simpleguest, tmp_path)
    guest.unlink()
    with CoreDump.open(core) as dump:
        assert dump.guest_image() is None
        assert dump.guest_problem() == f"the recorded guest ELF {guest} is missing"
        assert all(frame.symbol is None for frame in dump.backtrace())
        assert dump.summary()["guest_problem"] == dump.guest_problem()
        rip = dump.registers["rip"]
    shown = run_cli("dump", "show", str(core))
    assert shown.returncode == 0, shown.stderr
    assert f"symbols:  none: the recorded guest ELF {guest} is missing" in shown.stdout
    assert "--guest PATH" in shown.stdout
    assert f"rip {rip:#018x}" in shown.stdout
