"""The command line, run as a user would."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hlasync import GuestCrashed, Sandbox, guests
from hlasync.kvm import Kvm

from .conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_on_bundled_defaults(kvm: Kvm) -> None:
    result = run_cli("demo")
    assert result.returncode == 0, result.stderr
    assert "add(2, 3)            -> 5" in result.stdout
    assert "GuestCrashed" in result.stdout and "#DE divide error" in result.stdout
    assert "GuestCancelled" in result.stdout
    assert "(this line was printed by the guest)" in result.stdout


def test_guest_functions_lists_signatures() -> None:
    result = run_cli("guest", "functions", "simpleguest")
    assert result.returncode == 0, result.stderr
    assert "add(int, int) -> int" in result.stdout.splitlines()


def test_build_a_custom_guest_and_run_it(kvm: Kvm, tmp_path: Path) -> None:
    source = tmp_path / "mine.c"
    source.write_text(
        "#include <hlasync_guest.h>\n"
        "int64_t square(int64_t x) { return x * x; }\n"
        "HL_EXPORT(square, HL_INT, HL_INT);\n"
        "int64_t crash(void) { volatile int64_t z = 0; return 100 / z; }\n"
        "HL_EXPORT(crash, HL_INT);\n"
    )
    output = tmp_path / "mine.elf"
    result = run_cli("guest", "build", str(source), "-o", str(output))
    assert result.returncode == 0, result.stderr
    assert "square(int) -> int" in result.stdout
    with Sandbox(output) as sb:
        assert sb.call("square", 12) == 144
        try:
            sb.call("crash")
        except GuestCrashed as exc:
            assert exc.symbol is not None and exc.symbol.startswith("crash")
        else:
            raise AssertionError("crash() did not fault")


def test_build_reports_compiler_errors(tmp_path: Path) -> None:
    source = tmp_path / "broken.c"
    source.write_text("int64_t broken( {\n")
    output = tmp_path / "broken.elf"
    result = run_cli("guest", "build", str(source), "-o", str(output))
    assert result.returncode == 1
    assert "failed" in result.stderr and "broken.c" in result.stderr
    assert not output.exists()
    assert [p for p in tmp_path.iterdir() if p.is_file()] == [source]  # nothing half-written


def test_build_reports_missing_sources(tmp_path: Path) -> None:
    result = run_cli("guest", "build", str(tmp_path / "nope.c"), "-o", str(tmp_path / "x.elf"))
    assert result.returncode == 1 and "not found" in result.stderr


def test_guest_without_exports_is_rejected_when_built(tmp_path: Path) -> None:
    source = tmp_path / "empty.c"
    source.write_text("#include <hlasync_guest.h>\nint unused;\n")
    result = run_cli("guest", "build", str(source), "-o", str(tmp_path / "empty.elf"))
    assert result.returncode == 1
    assert "GuestImageError" in result.stderr


def test_help_is_plain_text() -> None:
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    assert "python -m hlasync" in result.stdout
    assert "``" not in result.stdout and ":class:" not in result.stdout


@pytest.mark.parametrize("command", ["dump show", "guest functions simpleguest"])
def test_a_closed_pipe_ends_output_quietly(
    command: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """``hlasync dump show CORE | head``: no traceback when the reader stops reading."""
    arguments = command.split()
    if command == "dump show":
        request.getfixturevalue("kvm")
        with Sandbox(guests.path("simpleguest")) as sb:
            arguments.append(str(sb.generate_crashdump(tmp_path)))
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first byte is written
    try:
        result = subprocess.run(
            [sys.executable, "-m", "hlasync", *arguments],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            timeout=120,
            check=False,
        )
    finally:
        os.close(write_end)
    assert result.stderr == ""
    assert result.returncode == 128 + signal.SIGPIPE


def test_dump_list_skips_what_is_not_a_dump(tmp_path: Path) -> None:
    loop = tmp_path / "hl_core_loop.elf"
    loop.symlink_to(loop)
    (tmp_path / "hl_core_directory.elf").mkdir()
    (tmp_path / "hl_core_text.elf").write_text("not a core\n")
    result = run_cli("dump", "list", str(tmp_path))
    assert result.returncode == 0, result.stderr
    lines = sorted(result.stdout.splitlines())
    assert lines[0] == f"{tmp_path / 'hl_core_directory.elf'}  skipped: not a regular file"
    assert lines[1] == f"{loop}  skipped: not a regular file"
    assert re.match(rf"{tmp_path / 'hl_core_text.elf'}  \d+ KiB  unreadable: ", lines[2])
