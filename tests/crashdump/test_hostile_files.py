"""Hostile files where hlasync reads dumps (issue 18): a core whose note
claims more than the file holds, a guest path that names a FIFO, a planted
file that made identification slow, and guest text that would drive the
terminal of whoever reads the dump. Each reads a bounded number of bytes and
ends with a result or a clear error."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hlasync import (
    CoreDump,
    GuestImage,
    GuestImageError,
    InvalidCoreDump,
)
from hlasync.crashdump import _format as fmt
from hlasync.crashdump import placement
from hlasync.kvm import Kvm
from tests.conftest import run_cli

from . import hostile

ROOT = Path(__file__).resolve().parents[2]
ESC = "\x1b[31m"


@pytest.fixture(scope="module")
def crash_core(tmp_path_factory: pytest.TempPathFactory, kvm: Kvm, simpleguest: Path) -> Path:
    """The dump of a divide_by_zero fault."""
    return hostile.real_dump(tmp_path_factory.mktemp("hostile"), simpleguest)


def _finishes(work: Callable[[], Any], seconds: float, release: Callable[[], None]) -> Any:
    """``work()``'s result, or a failure if it has not returned within
    ``seconds`` (``release`` then unblocks it, so the test run goes on)."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(("value", work()))
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(("error", exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        release()
        thread.join(10)
        pytest.fail(f"still blocked after {seconds} s")
    kind, value = outcome[0]
    if kind == "error":
        raise value
    return value


# ------------------------------------------------------------ sparse notes
def test_a_note_claiming_gigabytes_of_a_sparse_file_is_refused(
    crash_core: Path, tmp_path: Path
) -> None:
    """8 KiB on disk, a PT_NOTE of 1.5 GiB: `dump show` said nothing for
    seconds and grew to 1.5 GB; now the claim itself is refused."""
    core = hostile.sparse_note(crash_core, tmp_path / "sparse.elf", 1536 << 20)
    assert core.stat().st_blocks * 512 <= 16 << 10
    shown = run_cli("dump", "show", str(core), timeout=60)
    assert shown.returncode == 1 and "InvalidCoreDump" in shown.stderr
    assert "PT_NOTE" in shown.stderr and "limit" in shown.stderr


def test_a_sparse_note_within_the_limits_costs_what_is_read(
    crash_core: Path, tmp_path: Path
) -> None:
    """A claim under the size limit is walked note by note: the zeros of the
    hole are empty notes, refused after MAX_NOTES of them, not read whole."""
    core = hostile.sparse_note(crash_core, tmp_path / "sparse.elf", 24 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(InvalidCoreDump, match="notes"):
            CoreDump.open(core)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_a_metadata_note_with_a_hole_is_not_read(crash_core: Path, tmp_path: Path) -> None:
    """The hlasync note's JSON never holds a run of zero bytes: one whose
    bytes lie in a hole is refused before they are read."""
    data = bytearray(crash_core.read_bytes()[: 2 * hostile.PAGE])
    note = hostile.program_headers(bytes(data))[0]
    offset, size = note[2], note[5]
    # The last note is hlasync's: make it claim 8 MiB that end the file as a hole.
    hl_header = data.rfind(b"HLASYNC\0", offset, offset + size) - 12
    data[hl_header + 4 : hl_header + 8] = (8 << 20).to_bytes(4, "little")
    desc = hl_header + 12 + 8
    note[5] = desc + (8 << 20) - offset
    phdr = fmt.PHDR.pack(*note)
    data[64 : 64 + len(phdr)] = phdr
    core = tmp_path / "hole.elf"
    core.write_bytes(bytes(data[:desc]))
    os.truncate(core, desc + (8 << 20))
    tracemalloc.start()
    try:
        with pytest.raises(InvalidCoreDump, match="hole"):
            CoreDump.open(core)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_the_writer_keeps_its_metadata_within_the_readers_limit() -> None:
    """A guest's abort message can be as long as its output buffer; the
    dump's note keeps each long string's start and says how much was cut."""
    from hlasync.crashdump.writer import build_metadata

    huge = "\u00e9" * (12 << 20)  # 6 bytes each as JSON: 72 MiB uncut
    payload = build_metadata({"message": huge, "abort_message": huge, "reason": "abort"})
    assert len(payload) <= fmt.MAX_METADATA_BYTES
    metadata = json.loads(payload)
    assert metadata["reason"] == "abort"
    assert metadata["message"].startswith("\u00e9" * 1000)
    assert metadata["message"].endswith(" characters cut]")


# ------------------------------------------------------------------- FIFOs
def test_a_guest_path_naming_a_fifo_is_refused_without_blocking(
    crash_core: Path, tmp_path: Path
) -> None:
    fifo = tmp_path / "guest.elf"
    os.mkfifo(fifo)

    def release() -> None:  # a writer lets a blocked open() of the FIFO return
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    with pytest.raises(GuestImageError, match="not a regular file"):
        _finishes(lambda: GuestImage.load(fifo), 10, release)
    core = hostile.with_metadata(
        crash_core, tmp_path / "fifo.elf", lambda meta: meta.update(guest=str(fifo))
    )
    with CoreDump.open(core) as dump:
        problem = _finishes(dump.guest_problem, 10, release)
    assert problem == (
        "the recorded guest ELF cannot be loaded: "
        f"{fifo}: cannot read guest binary: not a regular file (a FIFO)"
    )
    try:
        shown = run_cli("dump", "show", str(core), timeout=30)
    except subprocess.TimeoutExpired:
        release()
        raise
    assert shown.returncode == 0, shown.stderr
    assert "not a regular file (a FIFO)" in shown.stdout
    with pytest.raises(InvalidCoreDump, match="not a regular file"):
        _finishes(lambda: CoreDump.open(fifo), 10, release)


# ----------------------------------------------------------- planted files
_CRASH_WITH_RETENTION = """
import sys
from hlasync import GuestCrashed, RetentionPolicy, Sandbox, SandboxConfig, guests
config = SandboxConfig(crashdump_dir=sys.argv[1], crashdump_retention=RetentionPolicy(max_files=5))
with Sandbox(guests.path("simpleguest"), config) as sb:
    try:
        sb.call("divide_by_zero")
    except GuestCrashed as exc:
        print(exc.core_path)
"""


def test_a_planted_file_does_not_stall_dump_writing_or_listing(kvm: Kvm, tmp_path: Path) -> None:
    """4096 PT_NOTE headers over one megabyte of zeros, named like a dump:
    retention took minutes to decide that it is not one, holding up the
    GuestCrashed of the crash whose dump triggered it."""
    directory = tmp_path / "dumps-with-a-plant"
    directory.mkdir()
    plant = hostile.planted(directory / "hl_core_20000101_T000000.000_1-1-0000.elf")
    assert plant.stat().st_blocks * 512 <= 232 << 10
    fd = os.open(plant, os.O_RDONLY)
    try:
        assert not placement.is_hlasync_dump(fd)
    finally:
        os.close(fd)
    crashed = subprocess.run(
        [sys.executable, "-c", _CRASH_WITH_RETENTION, str(directory)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert crashed.returncode == 0, crashed.stderr
    core = Path(crashed.stdout.strip())
    assert core.parent == directory and core.is_file()
    assert plant.exists()  # not an hlasync dump: retention leaves it alone
    listed = run_cli("dump", "list", str(directory), timeout=60)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert any(line.startswith(f"{plant}  ") and "unreadable" in line for line in lines)
    assert any(line.startswith(f"{core}  ") and "fault" in line for line in lines)


def test_identification_of_a_file_with_offsets_past_any_file_is_no(tmp_path: Path) -> None:
    """An e_phoff or p_offset beyond off_t raised OverflowError out of
    is_hlasync_dump, through retention, failing every dump written there."""
    for field in (32, fmt.EHDR.size + 8):  # e_phoff, the first p_offset
        plant = hostile.planted(tmp_path / "hl_core_offsets.elf", count=1, zeros=4096)
        with open(plant, "r+b") as f:
            f.seek(field)
            f.write((2**64 - 1).to_bytes(8, "little"))
        fd = os.open(plant, os.O_RDONLY)
        try:
            assert not placement.is_hlasync_dump(fd)
        finally:
            os.close(fd)
        with pytest.raises(InvalidCoreDump):
            CoreDump.open(plant)


# ----------------------------------------------------- terminal injection
def test_guest_text_cannot_drive_the_terminal(
    crash_core: Path, simpleguest: Path, tmp_path: Path
) -> None:
    """Everything `dump show` and `dump list` print that the guest or the
    file could choose goes through errors.printable: escapes, not escape codes."""
    guest = tmp_path / f"guest{ESC}.elf"
    # The same build (same build-id) with a symbol whose name holds an escape.
    renamed = b"divide\x1b[1mzero"  # as long as the name it replaces
    guest.write_bytes(simpleguest.read_bytes().replace(b"divide_by_zero", renamed))

    def change(meta: dict[str, Any]) -> None:
        meta.update(
            guest=str(guest),
            message=f"a message{ESC}\nwith a second line",
            function=f"fn{ESC}",
            sandbox_id=f"sb{ESC}",
            reason=f"fault{ESC}",
            timestamp=f"2026{ESC}",
            vector_name=f"#DE{ESC}",
            js_stack=f"at handler{ESC} (<eval>:1)\n    at main\x07",
        )
        meta["regions"][0]["name"] = f"tables{ESC}"

    directory = tmp_path / "dumps"
    directory.mkdir(exist_ok=True)
    core = hostile.with_metadata(crash_core, directory / "hl_core_crafted.elf", change)
    shown = run_cli("dump", "show", str(core))
    assert shown.returncode == 0, shown.stderr
    assert "\x1b" not in shown.stdout and "\x07" not in shown.stdout
    for escaped in (
        "a message\\x1b[31m\\x0awith a second line",
        "function: fn\\x1b[31m",
        "sandbox: sb\\x1b[31m",
        "reason:   fault\\x1b[31m",
        "time:     2026\\x1b[31m",
        "#DE\\x1b[31m",
        "at handler\\x1b[31m (<eval>:1)",
        "at main\\x07",
        "divide\\x1b[1mzero",
        "tables\\x1b[31m",
        f"guest:    {tmp_path}/guest\\x1b[31m.elf",
    ):
        assert escaped in shown.stdout
    as_json = run_cli("dump", "show", "--json", str(core))
    assert "\x1b" not in as_json.stdout
    assert json.loads(as_json.stdout)["metadata"]["function"] == f"fn{ESC}"
    listed = run_cli("dump", "list", str(directory))
    assert "\x1b" not in listed.stdout
    assert "sb\\x1b[31m  fault\\x1b[31m  fn\\x1b[31m" in listed.stdout
    named = directory / f"hl_core_{ESC}.elf"
    named.write_bytes(b"not a core")
    listed = run_cli("dump", "list", str(directory))
    assert "\x1b" not in listed.stdout and "hl_core_\\x1b[31m.elf" in listed.stdout
    refused = run_cli("dump", "show", str(named))
    assert refused.returncode == 1 and "\x1b" not in refused.stderr
    assert "hl_core_\\x1b[31m.elf" in refused.stderr
